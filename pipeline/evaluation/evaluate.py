"""``pipeline evaluate``: score prediction files by their kind, and optionally the fused image-level decision.

The kind of a file is told by :func:`pipeline.data.predictions.load_predictions`: COCO results go
to :mod:`pipeline.evaluation.coco`, ``"kind": "classification"`` files to
:mod:`pipeline.evaluation.classification`, ``"kind": "anomaly"`` files to
:mod:`pipeline.evaluation.anomaly`. Each file's outputs carry its :func:`result_tag`, so several
files (and runs) can be scored into one folder. With val predictions, :mod:`pipeline.evaluation.fusion`
adds the image-level good/defect decision of each source and of their fusion (``fusion.json``).

SAM masks prompted with the ground-truth boxes (their provenance says ``prompt: gt``) are an upper
bound, not a model's own output: they are still scored, with ``"upper_bound": "ground-truth prompts"``
in their metrics JSON and a summary line starting ``[upper bound: ground-truth prompts]``, but the
fusion refuses them. Files without provenance are scored as before.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, read_json
from pipeline.data.predictions import load_predictions, require_model_output, upper_bound
from pipeline.evaluation.coco import evaluate_coco_results, result_tag


def _needs_gt(pred_path: Path) -> PipelineError:
    return PipelineError(f"{pred_path}: COCO results need --gt (the split's COCO ground truth)")


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _coco_summary(tag: str, m: dict) -> str:
    b = m["bbox"]
    line = f"{tag}: bbox AP {b['AP']:.4f} AP50 {b['AP50']:.4f} AP75 {b['AP75']:.4f} AR100 {b['AR100']:.4f}"
    if "segm" in m:
        line += f" | segm AP {m['segm']['AP']:.4f} mIoU {_f(m['masks']['mIoU'])} mDice {_f(m['masks']['mDice'])}"
    return line


@contextmanager
def _tagged_outputs(out_dir: Path, tag: str) -> Iterator[Path]:
    """A temporary folder inside ``out_dir`` whose files move to ``out_dir/<stem>_<tag><suffix>`` on
    success (``metrics.json`` and ``anomaly_metrics.json`` both become ``metrics_<tag>.json``).

    The classifier and anomaly evaluators write fixed names; tagging them as COCO results are
    tagged lets several files be scored into one folder. On an error nothing is moved.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".eval-") as tmp:
        yield Path(tmp)
        for f in Path(tmp).iterdir():
            stem = "metrics" if f.stem in ("metrics", "anomaly_metrics") else f.stem
            os.replace(f, out_dir / f"{stem}_{tag}{f.suffix}")


def evaluate_file(
    pred_path: Path,
    *,
    gt: Path | None,
    out_dir: Path,
    class_agnostic: bool | None = None,
    mask_score_threshold: float = 0.5,
) -> dict:
    """Evaluate one prediction file by its kind; the result holds a printable ``_summary`` line.

    Args:
        pred_path: COCO results, classification or anomaly prediction file.
        gt: the split's COCO ground truth (required for COCO results; for anomaly files it selects
            the images' masks, default the category recorded in the file).
        out_dir: folder for the metrics JSON and plots (created), names tagged by :func:`result_tag`.
        class_agnostic: COCO results only: ``True`` / ``False`` force class-agnostic / class-aware
            matching, ``None`` decides from the file (:func:`pipeline.evaluation.coco.matching`).
        mask_score_threshold: COCO results only: masks scoring at least this enter mask IoU/Dice.

    Raises:
        PipelineError: unreadable or unknown file, COCO results without ``gt``, and the errors of
            the evaluator of the file's kind.
    """
    pf = load_predictions(pred_path)
    kind, bound = pf.kind, upper_bound(pf)
    out_dir = Path(out_dir)
    tag = result_tag(pred_path)
    if kind == "coco":
        if gt is None:
            raise _needs_gt(pred_path)
        m = evaluate_coco_results(
            gt, pred_path, out_dir, class_agnostic=class_agnostic, mask_score_threshold=mask_score_threshold
        )
        if bound is not None:  # the label goes into the metrics file evaluate_coco_results just wrote
            m = {"upper_bound": bound, **m}
            atomic_write_json(out_dir / f"metrics_{tag}.json", m)
        m["_summary"] = _labelled(bound, _coco_summary(tag, m))
        return m
    with _tagged_outputs(out_dir, tag) as tmp:
        if kind == "classification":
            from pipeline.evaluation.classification import evaluate_classification

            m = evaluate_classification(pred_path, tmp)
        else:
            from pipeline.evaluation.anomaly import evaluate_anomaly

            m = evaluate_anomaly(pred_path, gt, out_dir=tmp)
    m.setdefault("_summary", f"{tag}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))
    m["_summary"] = _labelled(bound, m["_summary"])
    return m


def matching_options(
    predictions: Sequence[Path], kinds: Sequence[str], *, agnostic: Sequence[Path] = (), aware: Sequence[Path] = ()
) -> list[bool | None]:
    """Per prediction file the forced matching (``True`` class-agnostic, ``False`` class-aware) or ``None``
    (decided from the file), from ``--class-agnostic FILE`` / ``--class-aware FILE``.

    Files are compared by resolved path.

    Raises:
        PipelineError: an option naming a file that is not among ``predictions``, is not COCO results,
            or is named by both options.
    """
    index = {Path(p).resolve(): k for k, p in enumerate(predictions)}
    out: list[bool | None] = [None] * len(predictions)
    for flag, files, value in (("--class-agnostic", agnostic, True), ("--class-aware", aware, False)):
        for f in files:
            k = index.get(Path(f).resolve())
            if k is None:
                raise PipelineError(f"{flag} {f}: not one of the prediction files given")
            if kinds[k] != "coco":
                raise PipelineError(f"{flag} {f}: a {kinds[k]} file (only COCO results are matched by class)")
            if out[k] is not None and out[k] != value:
                raise PipelineError(f"{f}: given to both --class-agnostic and --class-aware")
            out[k] = value
    return out


def _labelled(bound: str | None, line: str) -> str:
    """A summary line, prefixed ``[upper bound: <why>]`` for an upper-bound file (see the module docstring)."""
    return line if bound is None else f"[upper bound: {bound}] {line}"


def check_inputs(
    predictions: Sequence[Path],
    *,
    gt: Path | None,
    val_predictions: Sequence[Path] = (),
    val_gt: Path | None = None,
    class_agnostic: Sequence[Path] = (),
    class_aware: Sequence[Path] = (),
) -> list[bool | None]:
    """Refuse bad inputs of :func:`evaluate_files` before anything is written.

    Checks that every prediction file (test and val) is readable and of a known kind, that COCO
    results come with ``gt``, that the ground truths are readable JSON (a category folder is
    accepted as ``gt`` for anomaly files), and with val predictions that ``val_gt`` and ``gt``
    are given, hold ``defect_type`` per image, and that val and test name the same sources in the
    same order, that ``class_agnostic`` / ``class_aware`` name COCO files among ``predictions``
    (:func:`matching_options`), and that no fusion input is an upper bound (SAM masks prompted with
    the ground truth, :func:`pipeline.data.predictions.require_model_output`). Deeper checks (image
    ids, mask sizes) stay with each evaluator.

    Returns:
        the forced matching per prediction file (:func:`matching_options`).

    Raises:
        PipelineError: the first bad input, as one line naming it.
    """
    if val_predictions and (val_gt is None or gt is None):
        raise PipelineError(
            "--val-predictions needs --val-gt (val COCO ground truth) and --gt (ground truth of the evaluated split)"
        )
    files = [load_predictions(p) for p in predictions]
    kinds = [pf.kind for pf in files]
    if gt is None and "coco" in kinds:
        raise _needs_gt(predictions[kinds.index("coco")])
    forced = matching_options(predictions, kinds, agnostic=class_agnostic, aware=class_aware)
    if val_predictions:
        from pipeline.evaluation.fusion import FUSION_PURPOSE, check_pairs, load_split_labels

        val_files = [load_predictions(p) for p in val_predictions]
        for pf in val_files + files:
            require_model_output(pf, FUSION_PURPOSE)
        val_kinds = [pf.kind for pf in val_files]
        check_pairs(list(zip(map(str, val_predictions), val_kinds)), list(zip(map(str, predictions), kinds)))
        load_split_labels(val_gt)
        load_split_labels(gt)
    elif gt is not None and not Path(gt).is_dir():
        read_json(gt)
    return forced


def _write_fusion(
    out_dir: Path, val_predictions: Sequence[Path], predictions: Sequence[Path], *, val_gt: Path, gt: Path, l2: float
) -> list[str]:
    """Fused image-level decision into ``out_dir/fusion.json``; returns the lines to print."""
    from pipeline.evaluation.fusion import format_table, fuse_files

    result = fuse_files(val_predictions, predictions, val_gt=val_gt, test_gt=gt, l2=l2)
    result["metrics_files"] = sorted(str(p.resolve()) for p in out_dir.glob("metrics_*.json"))
    atomic_write_json(out_dir / "fusion.json", result)
    lines = ["image-level good/defect on test (thresholds and choices from val):", format_table(result)]
    chosen = f"best overall: {result['best']}"
    if result["better_fusion"]:
        chosen = f"better fusion: {result['better_fusion']}; {chosen}"
    lines.append(f"chosen on val: {chosen} (test metrics are only reported)")
    return lines


def evaluate_files(
    predictions: Sequence[Path],
    *,
    gt: Path | None,
    out_dir: Path,
    class_agnostic: Sequence[Path] = (),
    class_aware: Sequence[Path] = (),
    mask_score_threshold: float = 0.5,
    val_predictions: Sequence[Path] | None = None,
    val_gt: Path | None = None,
    l2: float = 1.0,
) -> list[str]:
    """``pipeline evaluate``: every file scored by its kind, then (with val predictions) the fusion.

    All inputs are checked first (:func:`check_inputs`), so a bad file leaves ``out_dir`` untouched.

    Args:
        predictions: prediction files of the evaluated split (COCO results, classifier, anomaly).
        gt: COCO ground truth of that split (needed for COCO results and for the fusion).
        out_dir: folder for ``metrics_<tag>.json``, plots and ``fusion.json``.
        class_agnostic, class_aware: COCO results files (among ``predictions``) matched whatever their
            class / by class; every other COCO file is decided from its records
            (:func:`pipeline.evaluation.coco.matching`: class-less when each carries ``class_agnostic: true``).
        mask_score_threshold: predicted masks scoring at least this enter mask IoU/Dice.
        val_predictions: the same sources predicted on val, in the same order; turns on the
            image-level decision (thresholds from val, see :mod:`pipeline.evaluation.fusion`).
        val_gt: COCO ground truth of the val split.
        l2: L2 penalty of the logistic-regression fusion.

    Returns:
        The lines to print: one summary per file, then the fusion table when asked for.

    Raises:
        PipelineError: a bad input (before anything is written) or an evaluator's error.
    """
    val_predictions = list(val_predictions or [])
    forced = check_inputs(
        predictions,
        gt=gt,
        val_predictions=val_predictions,
        val_gt=val_gt,
        class_agnostic=class_agnostic,
        class_aware=class_aware,
    )
    out_dir = Path(out_dir)
    lines = [
        evaluate_file(p, gt=gt, out_dir=out_dir, class_agnostic=f, mask_score_threshold=mask_score_threshold).pop(
            "_summary", ""
        )
        for p, f in zip(predictions, forced)
    ]
    if val_predictions:
        lines += _write_fusion(out_dir, val_predictions, predictions, val_gt=val_gt, gt=gt, l2=l2)
    return lines
