"""Prediction files -> Label Studio tasks with pre-annotations, ordered as a review queue.

Formats: Label Studio tasks and predictions (https://labelstud.io/guide/task_format,
https://labelstud.io/guide/predictions), and COCO ground truth as ``convert-masks`` writes it. Prediction
files are read through :func:`pipeline.data.predictions.load_predictions`. The result dicts are built
in :mod:`pipeline.review.results`; their conventions:

- ``rectanglelabels``: ``x``, ``y`` (top-left), ``width``, ``height`` in percent (0-100) of the
  original image size.
- ``brushlabels``: ``{"format": "rle", "rle": [...]}``, Label Studio's own RLE (see
  :mod:`pipeline.review.brush`) of the ``H x W`` mask at the original image size.
- ``polygonlabels``: ``points`` ``[[x, y], ...]`` in percent.

Local images are referenced as ``/data/local-files/?d=<path relative to the document root>``
(Label Studio's local file serving).

Prediction files become :class:`pipeline.review.sources.Source` objects (read, refused when they are
SAM masks from ground-truth boxes, and given their ``--min-score``) in :mod:`pipeline.review.sources`.

Result ids: one region (one predicted object) gets a 10-hex-digit id ``R`` for its rectangle,
``R_brush`` for its mask and ``R_poly<k>`` for its polygons; :func:`pipeline.review.reviewed.task_regions`
uses these ids to put a region's box and mask back into one COCO annotation.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.mvtec import GOOD
from pipeline.review.client import TOKEN_ENV
from pipeline.review.inspected import verdict_uncertainty
from pipeline.review.labeling_config import (
    IMAGE_TAG,
    REASON_FIELD,
    labeling_config,
    validate_tasks,
)
from pipeline.review.results import (  # noqa: F401  (the result builders, also importable from here)
    _result_id,
    brush_result,
    polygon_results,
    polygon_warning,
    rectangle_result,
    region_results,
)
from pipeline.review.sources import AUTO, Source, apply_min_scores, read_sources, region_counts

ORDERS = ("image", "uncertainty")


# ----------------------------------------------------------------------------- results


def image_url(
    path: Path, *, document_root: Path | None = None, url_prefix: str | None = None, rel: str | None = None
) -> str:
    """URL Label Studio uses for an image.

    With ``url_prefix``: ``url_prefix + rel`` (``rel`` = path relative to the category root). Otherwise
    ``/data/local-files/?d=<path relative to document_root>`` with forward slashes.

    Raises:
        PipelineError: the image is not under ``document_root``.
    """
    if url_prefix:
        return url_prefix.rstrip("/") + "/" + quote((rel or Path(path).name).replace(os.sep, "/"))
    root = Path(document_root).resolve()
    p = Path(path).resolve()
    try:
        r = p.relative_to(root)
    except ValueError:
        raise PipelineError(f"{p}: not under the document root {root} (pass --document-root or --url-prefix)") from None
    return "/data/local-files/?d=" + quote(r.as_posix())


# ----------------------------------------------------------------------------- review queue


def score_closeness(score: float, threshold: float) -> float:
    """How close a detection score in [0, 1] is to the threshold: ``1 - |s - t| / max(t, 1 - t)``.

    1 at the threshold, 0 at the farther end of [0, 1]; linear in between.
    """
    return float(max(0.0, 1.0 - abs(score - threshold) / max(threshold, 1.0 - threshold, 1e-9)))


def _relation(u: float, s: float, t: float, spec: str) -> str:
    """Where score ``s`` lies from threshold ``t``, in words: near it when its term ``u >= 0.5``, else
    below it (a low score) or above it; numbers formatted with ``spec``."""
    if u >= 0.5:
        return f"near threshold {t:{spec}}"
    return f"below threshold {t:{spec}} (low score)" if s < t else f"above threshold {t:{spec}}"


def _detection_terms(src: Source, recs: list[dict], threshold: float, names: dict[int, str]):
    """A detection file's uncertainty term (or None when it has no result on the image) and verdict."""
    term = None
    if recs:
        worst = max(recs, key=lambda r: score_closeness(float(r["score"]), threshold))
        s = float(worst["score"])
        u = score_closeness(s, threshold)
        term = (
            u,
            f"{src.name}: {names.get(worst['category_id'], '?')} score {s:.2f} {_relation(u, s, threshold, '.2f')}",
        )
    top = max(recs, key=lambda r: r["score"], default=None)
    is_defect = top is not None and top["score"] >= threshold
    cls = names.get(top["category_id"]) if is_defect else None
    text = f"{src.name}=defect ({cls} {top['score']:.2f})" if is_defect else f"{src.name}={GOOD}"
    return term, (is_defect, cls, text)


def _classifier_terms(src: Source, rec: dict):
    """A classifier's term ``1 - (p1 - p2)`` and its verdict (its label; defect unless ``GOOD``)."""
    probs = sorted(((float(v), k) for k, v in rec["scores"].items()), reverse=True)
    p1, c1 = probs[0] if probs else (0.0, "?")
    p2, c2 = probs[1] if len(probs) > 1 else (0.0, "-")
    label = str(rec.get("label", c1))
    is_defect = label != GOOD
    return (1.0 - (p1 - p2), f"{src.name}: {c1} {p1:.2f} vs {c2} {p2:.2f}"), (
        is_defect,
        label if is_defect else None,
        f"{src.name}={label} ({p1:.2f})",
    )


def _anomaly_terms(src: Source, rec: dict):
    """An anomaly model's term ``exp(-|s - t| / sigma)`` and its verdict (defect when ``s >= t``)."""
    s, t = float(rec["score"]), float(src.threshold)
    u = math.exp(-abs(s - t) / src.scale)
    is_defect = s >= t
    verdict = f"{src.name}={'defect' if is_defect else GOOD} ({s:.3g} {'>=' if is_defect else '<'} {t:.3g})"
    return (u, f"{src.name}: anomaly score {s:.3g} {_relation(u, s, t, '.3g')}"), (is_defect, None, verdict)


def image_uncertainty(
    image_id: int, sources: list[Source], *, threshold: float, names: dict[int, str]
) -> tuple[float, str]:
    """Review priority of one image in [0, 1] (1 = review first) and the reason, in words.

    uncertainty = max(disagreement, the per-source terms):

    - detections (COCO results): ``score_closeness(s, t)`` of its most uncertain result on the image
      (0 when it has none), ``t`` the source's ``min_score`` (its ``--min-score``), else ``threshold``;
    - classifier: ``1 - (p1 - p2)``, one minus the margin between its two highest class probabilities;
    - anomaly: ``exp(-|s - t| / sigma)``, ``t`` the file's threshold, ``sigma`` the standard deviation of
      the file's scores (1 at the threshold, 0.37 one sigma away);
    - disagreement: each source gives a verdict, defect (a detection ``>= t``; a classifier label
      other than ``good``; an anomaly score ``>= t``) or good; 1.0 when some say defect and others good,
      0.5 when all say defect but name different classes, else 0.

    The reason lists the terms of at least 0.5, largest first (only the largest when none is), e.g.
    ``"sources disagree: det=defect (scratch 0.81), patchcore=good (0.42 < 0.55)"``; a score term says
    ``near`` its threshold when it is at least 0.5, else ``below`` (a low score) or ``above`` it.
    """
    terms: list[tuple[float, str]] = []
    verdicts: list[tuple[bool, str | None, str]] = []  # (defect?, class, short text)
    for src in sources:
        recs = src.by_image.get(image_id, [])
        if src.kind == "detections":
            t = src.min_score if src.min_score is not None else threshold
            term, verdict = _detection_terms(src, recs, t, names)
        elif src.kind == "classification" and recs:
            term, verdict = _classifier_terms(src, recs[0])
        elif src.kind == "anomaly" and recs:
            term, verdict = _anomaly_terms(src, recs[0])
        else:
            continue
        if term is not None:
            terms.append(term)
        verdicts.append(verdict)
    if len(verdicts) > 1:
        defects = {v[0] for v in verdicts}
        classes = {v[1] for v in verdicts if v[1] is not None}
        if len(defects) > 1:
            terms.append((1.0, "sources disagree: " + ", ".join(v[2] for v in verdicts)))
        elif defects == {True} and len(classes) > 1:
            terms.append((0.5, "sources disagree on the class: " + ", ".join(v[2] for v in verdicts)))
    if not terms:
        return 0.0, "no predictions"
    terms.sort(key=lambda t: -t[0])
    shown = [t for t in terms if t[0] >= 0.5] or terms[:1]
    return float(terms[0][0]), "; ".join(t[1] for t in shown)


# ----------------------------------------------------------------------------- tasks


def _segmentation_mask(seg, *, size_hw: tuple[int, int]) -> np.ndarray:
    """``HxW`` bool mask of a COCO ``segmentation``: RLE (compressed or not) or a list of polygons."""
    from pipeline.data.instances import decode_rle

    h, w = size_hw
    if isinstance(seg, list):
        from pycocotools import mask as mask_utils

        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        if not polys:
            return np.zeros((h, w), bool)
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
    try:
        return decode_rle(seg)
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(
            f"prediction segmentation is not COCO RLE or polygons ({type(exc).__name__}: {exc})"
        ) from None


def _image_predictions(
    img: dict,
    sources: list[Source],
    *,
    min_score: float,
    names: dict[int, str],
    polygons: bool,
    polygon_ious: list[float] | None = None,
) -> list[dict]:
    """One Label Studio prediction per detection source: its results on ``img`` scoring at least the
    source's ``min_score`` (``min_score`` for a source without one)."""
    size_hw = (int(img["height"]), int(img["width"]))
    preds = []
    for src in sources:
        if src.kind != "detections":
            continue
        t = src.min_score if src.min_score is not None else min_score
        kept = sorted((r for r in src.by_image.get(img["id"], []) if r["score"] >= t), key=lambda r: -r["score"])
        result = []
        for k, r in enumerate(kept):
            mask = _segmentation_mask(r["segmentation"], size_hw=size_hw) if r.get("segmentation") else None
            result += region_results(
                bbox_xywh=r["bbox"],
                mask=mask,
                label=names[r["category_id"]],
                size_hw=size_hw,
                score=r["score"],
                rid=_result_id(img["id"], k, src.name),
                polygons=polygons,
                polygon_ious=polygon_ious,
            )
        preds.append(
            {"model_version": src.name, "score": max((r["score"] for r in kept), default=0.0), "result": result}
        )
    return preds


def build_tasks(
    coco_gt: dict,
    sources: list[Source],
    *,
    min_score: float = 0.0,
    document_root: Path | None = None,
    url_prefix: str | None = None,
    polygons: bool = False,
    order: str = "image",
    polygon_ious: list[float] | None = None,
    priority: dict[int, tuple[float, float, str]] | None = None,
) -> list[dict]:
    """Label Studio tasks, one per ground-truth image, with each detection source as one prediction.

    Args:
        coco_gt: COCO ground truth dict (images carry ``file_name`` relative to ``info.image_root``).
        sources: from :func:`read_sources`; detection results scoring at least their source's
            ``min_score`` become regions (rectangle; plus brush, and polygons when ``polygons``, for
            results with ``segmentation``).
        min_score: display threshold of detection sources without a ``min_score`` of their own, also
            the threshold of their uncertainty term.
        document_root / url_prefix: see :func:`image_url`; the default document root is the parent of
            the category root.
        order: ``"image"`` (ground-truth order) or ``"uncertainty"`` (most uncertain first, see
            :func:`image_uncertainty`; ties by image id).
        polygon_ious: with ``polygons``, receives the IoU of each mask with its polygons (:func:`polygon_iou`).
        priority: image id -> ``(uncertainty, tie-break, reason)`` replacing :func:`image_uncertainty`
            (an inspection's verdicts, :func:`pipeline.review.inspected.verdict_uncertainty`); the
            uncertainty order sorts by the first, then the second, both descending.

    Returns:
        Tasks ``{"data": {"image", "image_id", "file_name", "width", "height", "image_root",
        "defect_type", "class_defect_types", "uncertainty", "review_reason", "review_rank"}, "predictions": [...]}``
        (``class_defect_types``: class name -> its defect types, the categories' ``defect_types`` lists). Every image
        appears, also with no predictions, so the whole split can be reviewed. ``review_reason`` reads
        ``"<file_name> (path in the category): uncertainty <u>: <reason>"``.

    Raises:
        PipelineError: an unknown ``order``, images outside ``document_root``, undecodable masks.
    """
    if order not in ORDERS:
        raise PipelineError(f"--order {order!r}: expected one of {', '.join(ORDERS)}")
    image_root = Path(coco_gt.get("info", {}).get("image_root", "."))
    if document_root is None and url_prefix is None:
        document_root = image_root.parent
    names = {c["id"]: c["name"] for c in coco_gt["categories"]}
    # class name -> convert-masks' defect types, so that import labelstudio writes defect_type as convert does
    class_types = {c["name"]: list(c["defect_types"]) for c in coco_gt["categories"] if c.get("defect_types")}
    tasks = []
    ties = {}
    for img in coco_gt["images"]:
        if priority is not None:
            u, ties[img["id"]], reason = priority.get(img["id"], (0.0, 0.0, "no verdict recorded"))
        else:
            u, reason = image_uncertainty(img["id"], sources, threshold=min_score, names=names)
        tasks.append(
            {
                "data": {
                    IMAGE_TAG: image_url(
                        image_root / img["file_name"],
                        document_root=document_root,
                        url_prefix=url_prefix,
                        rel=img["file_name"],
                    ),
                    "image_id": img["id"],
                    "file_name": img["file_name"],
                    "width": int(img["width"]),
                    "height": int(img["height"]),
                    "image_root": str(image_root),
                    "defect_type": img.get("defect_type", ""),
                    "class_defect_types": class_types,
                    "uncertainty": round(u, 4),
                    REASON_FIELD: f"{img['file_name']}: uncertainty {u:.2f}: {reason}",
                },
                "predictions": _image_predictions(
                    img, sources, min_score=min_score, names=names, polygons=polygons, polygon_ious=polygon_ious
                ),
            }
        )
    if order == "uncertainty":
        tasks.sort(
            key=lambda t: (-t["data"]["uncertainty"], -ties.get(t["data"]["image_id"], 0.0), t["data"]["image_id"])
        )
    for rank, t in enumerate(tasks, 1):
        t["data"]["review_rank"] = rank
    return tasks


# ----------------------------------------------------------------------------- the export command


def export_tasks(
    pred_path: Path | list[Path],
    *,
    gt_path: Path | None,
    out_dir: Path,
    min_score: float | str = AUTO,
    model_version: str = "pipeline",
    document_root: Path | None = None,
    url_prefix: str | None = None,
    polygons: bool = False,
    order: str | None = None,
    force: bool = False,
    push: bool = False,
    url: str | None = None,
    project: str | None = None,
    token_env: str = TOKEN_ENV,
) -> dict:
    """Write ``tasks.json`` and ``labeling_config.xml`` into ``out_dir`` (atomically, as a folder); with
    ``push``, first create/update a project on the Label Studio server ``url`` and import the tasks.

    Args:
        pred_path: one or several prediction files (COCO results; classifier/anomaly JSON only feed the
            review order and reasons). SAM masks prompted with the ground truth are refused.
        gt_path: the split's COCO ground truth; ``None`` for a ``pipeline inspect`` run: the images come
            from ``images.json`` beside the first file (:mod:`pipeline.review.inspected`: one task per
            readable image, images with verdict ``error`` left out and counted, the image root the
            images' common folder, the classes the parent dataset's, PatchCore's regions from
            ``verdicts.jsonl`` as a second prediction when the file holds a detector's boxes, and the
            queue ordered by the verdicts: confidence near the threshold first, then model disagreement).
        min_score: ``"auto"`` (per detection source, the score threshold its provenance records, else
            0.0: keep every region) or a number for all (see :func:`pipeline.review.sources.apply_min_scores`).
        order: ``"image"`` or ``"uncertainty"`` (see :func:`build_tasks`); ``None``: ``"image"`` with
            ``gt_path``, ``"uncertainty"`` for an inspection.
        polygons: also give each predicted mask as polygons.
        push / url / project / token_env: see :func:`pipeline.review.client.push_tasks`; the project title
            defaults to ``"review <category> <split>"``; with local files (no ``url_prefix``) a Local
            Storage for the category folder is registered. A failed push leaves nothing written.

    Returns:
        ``{"tasks", "config", "n_tasks", "n_results", "n_masks", "document_root", "storage_path", "title",
        "pushed", "start_command", "regions", "polygon_ious", "warnings", "order", "image_root", "n_errors",
        "classes_from"}``: ``pushed`` is push_tasks'
        answer (None without ``push``), ``start_command`` the shell line starting Label Studio on the document
        root (None with ``url_prefix``), ``regions`` the kept/total counts per detection source
        (:func:`pipeline.review.sources.region_counts`), ``polygon_ious`` the IoU of each mask with its
        polygons (empty without ``polygons``), ``warnings`` at most one line: :func:`polygon_warning`.

    Raises:
        PipelineError: ``push`` without ``url``, a bad ``min_score``, unreadable inputs, SAM masks from
            ground-truth boxes, predictions on unknown images/classes,
            labels not in the config, an existing ``out_dir`` without ``force``, a failed push.
    """
    from pipeline.core.io import atomic_write_json, atomic_write_text, check_can_write, staged_dir
    from pipeline.data.coco import load_coco_gt
    from pipeline.review.client import local_files_start_command, push_tasks

    if push and not url:
        raise PipelineError("--push needs --url (the Label Studio server, e.g. http://127.0.0.1:8080)")
    out_dir = Path(out_dir)
    check_can_write(out_dir, force=force)
    paths = [pred_path] if isinstance(pred_path, (str, Path)) else list(pred_path)
    if not paths:
        raise PipelineError("no prediction files given")
    insp = None
    if gt_path is None:
        gt, sources, insp = _inspection_inputs(paths, model_version=model_version)
        order = order or "uncertainty"
    else:
        coco = load_coco_gt(gt_path)
        sources = read_sources(paths, coco, model_version=model_version)
        gt = coco.dataset
        order = order or "image"
    apply_min_scores(sources, min_score)
    image_root = Path(gt.get("info", {}).get("image_root", "."))
    if document_root is None and url_prefix is None:
        document_root = image_root.parent
    polygon_ious: list[float] = []
    tasks = build_tasks(
        gt,
        sources,
        document_root=document_root,
        url_prefix=url_prefix,
        polygons=polygons,
        order=order,
        polygon_ious=polygon_ious,
        priority=None if insp is None else {i: verdict_uncertainty(insp, i) for i in insp.verdicts},
    )
    config = labeling_config(
        [c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])], brush=True, polygons=polygons, reason=True
    )
    validate_tasks(tasks, config, source=str(paths[0]))
    split = gt.get("info", {}).get("split")
    title = f"review {image_root.name}" + (f" {split}" if split else "" if insp is None else " inspection")
    pushed = None
    if push:  # before anything is written: a refused push leaves no output folder
        pushed = push_tasks(
            tasks,
            config,
            url=url,
            title=project or title,
            token_env=token_env,
            storage_path=None if url_prefix else image_root,
            source=str(paths[0]),
        )
    with staged_dir(out_dir, force=force) as tmp:
        atomic_write_json(tmp / "tasks.json", tasks)
        atomic_write_text(tmp / "labeling_config.xml", config)
    results = [r for t in tasks for p in t["predictions"] for r in p["result"]]
    root = Path(document_root).resolve() if document_root else None
    return {
        "tasks": out_dir.resolve() / "tasks.json",
        "config": out_dir.resolve() / "labeling_config.xml",
        "n_tasks": len(tasks),
        "n_results": sum(r["type"] == "rectanglelabels" for r in results),
        "n_masks": sum(r["type"] == "brushlabels" for r in results),
        "document_root": root,
        "storage_path": image_root.resolve(),
        "title": title,
        "pushed": pushed,
        "start_command": local_files_start_command(root) if root else None,
        "polygon_ious": polygon_ious,
        "warnings": [w for w in [polygon_warning(polygon_ious)] if w],
        "regions": region_counts(sources),
        "order": order,
        "image_root": image_root.resolve(),
        "n_errors": insp.n_errors if insp is not None else 0,
        "classes_from": insp.classes_from if insp is not None else str(gt_path),
    }


def _inspection_inputs(paths: list[Path], *, model_version: str) -> tuple[dict, list[Source], object]:
    """Ground truth, sources and the :class:`~pipeline.review.inspected.Inspection` of an inspect run's
    prediction files (``images.json`` beside the first): the files' results remapped to the review's
    classes, plus PatchCore's regions from ``verdicts.jsonl`` when the files hold a detector's boxes."""
    from pycocotools.coco import COCO

    from pipeline.review.inspected import anomaly_results, read_inspection, remap_results

    insp = read_inspection(paths[0])
    check = COCO()  # the files' ids are images.json's: validate against its own categories
    check.dataset = dict(insp.gt, categories=insp.inspect_categories)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints
        check.createIndex()
    sources = read_sources(paths, check, model_version=model_version)
    for src in sources:
        if src.kind == "detections":
            results = [r for recs in src.by_image.values() for r in recs]
            src.by_image = {}
            for r in remap_results(insp, results):
                src.by_image.setdefault(r["image_id"], []).append(r)
    extra = anomaly_results(insp)
    if extra:
        src = Source(name=f"{model_version}/patchcore", kind="detections")  # already thresholded by inspect
        for r in extra:
            src.by_image.setdefault(r["image_id"], []).append(r)
        sources.append(src)
    return insp.gt, sources, insp
