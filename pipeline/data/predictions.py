"""Prediction files: which kind a file is, loaded and checked once for every reader.

Three kinds, each written by ``pipeline predict``:

- ``coco``: a COCO results list (Lin et al., ECCV 2014; cocodataset.org/#format-results):
  ``[{"image_id", "category_id", "bbox": [x, y, w, h] px, "score", "segmentation"?: RLE}, ...]``;
- ``classification``: ``{"kind": "classification", "classes", "predictions": [...]}``
  (:mod:`pipeline.evaluation.classification` documents the fields);
- ``anomaly``: ``{"kind": "anomaly", "threshold", "predictions": [...]}``
  (:mod:`pipeline.evaluation.anomaly` documents the fields).

Evaluation, fusion, the report and review read prediction files through :func:`load_predictions`,
never through a model.

Provenance: every ``pipeline predict <family> --out DIR`` also writes ``DIR/provenance.json``
(:func:`write_provenance`), which says how each prediction file in ``DIR`` was made::

    {"family": "yolo" | "sam" | "classifier" | "anomaly", "model": <weights file, absolute> | null,
     "weights_sha256": <hex SHA-256 of that file> | null, "prompt": "gt" | "detector:<boxes file>" | null,
     "split": <COCO ground truth or split manifest, absolute>, "subset"?: <manifest subset>,
     "created_by": "pipeline predict <family>",
     "files": {"predictions.json": {"score_threshold": <float> | null, "score_threshold_chosen_on": "val" | null}}}

``prompt`` is SAM's only (``gt``: masks prompted with the ground-truth boxes, an upper bound of what
a detector-prompted SAM can reach); ``score_threshold`` is a threshold in that file's own score units
chosen on the val split (PatchCore's), ``null`` when the model has none. The dict-shaped
``classification``/``anomaly`` files also carry their record under a ``"provenance"`` key.
:func:`read_provenance` gives one file's record: the run-level keys plus that file's ``files`` entry.
Files without a record (written before provenance existed, or made by hand) load as before, with
``provenance`` ``None``: they are never refused for lacking one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, read_json, sha256_file

KINDS = ("coco", "classification", "anomaly")
FAMILIES = ("yolo", "sam", "classifier", "anomaly")
PROVENANCE = "provenance.json"
GT_PROMPTS = "ground-truth prompts"  # the upper-bound label of SAM masks prompted with ground-truth boxes


@dataclass(frozen=True)
class PredictionFile:
    """A loaded prediction file.

    Attributes:
        path: the file.
        kind: one of :data:`KINDS`.
        doc: the parsed JSON (a list for ``coco``, a dict otherwise).
        provenance: how the file was made (see the module docstring), ``None`` when it has no record.
    """

    path: Path
    kind: str
    doc: Any
    provenance: dict | None = None

    @property
    def records(self) -> list[dict]:
        """The per-detection (``coco``) or per-image (other kinds) records."""
        return self.doc if self.kind == "coco" else self.doc["predictions"]


def kind_of(doc: Any) -> str | None:
    """The kind of a parsed prediction document, or ``None`` when it is none of :data:`KINDS`."""
    if isinstance(doc, list):
        return "coco"
    if isinstance(doc, dict) and doc.get("kind") in KINDS[1:] and isinstance(doc.get("predictions"), list):
        return doc["kind"]
    return None


def load_predictions(path: Path, *, expect: str | tuple[str, ...] | None = None) -> PredictionFile:
    """Read a prediction file and tell its kind.

    Args:
        path: the JSON file.
        expect: a kind or kinds the caller accepts; ``None`` accepts all.

    The returned file's ``provenance`` is the record embedded in the document, else the one in
    ``provenance.json`` beside it (:func:`read_provenance`), else ``None``.

    Raises:
        PipelineError: missing or invalid JSON, not a prediction file, or not of the expected kind;
            an unreadable ``provenance.json`` beside it.
    """
    path = Path(path)
    doc = read_json(path)
    kind = kind_of(doc)
    if kind is None:
        raise PipelineError(
            f"{path}: not a prediction file (expected a COCO results list, or an object with "
            "kind classification/anomaly and a predictions list)"
        )
    wanted = (expect,) if isinstance(expect, str) else expect
    if wanted is not None and kind not in wanted:
        raise PipelineError(f"{path}: a {kind} prediction file (expected {' or '.join(wanted)})")
    embedded = doc.get("provenance") if isinstance(doc, dict) else None
    prov = embedded if isinstance(embedded, dict) else read_provenance(path)
    return PredictionFile(path=path, kind=kind, doc=doc, provenance=prov)


def prediction_kind(path: Path) -> str:
    """The kind of the prediction file at ``path`` (see :func:`load_predictions`)."""
    return load_predictions(path).kind


def source_name(path: Path) -> str:
    """A prediction file's name in tables and task headers: the run folder's name for
    ``<run>/predictions.json`` (what every ``pipeline predict`` writes), else the file's stem."""
    path = Path(path)
    return path.parent.resolve().name if path.stem == "predictions" else path.stem


# ----------------------------------------------------------------------------- provenance


def write_provenance(
    run_dir: Path,
    *,
    family: str,
    model: Path | None,
    split: Path | str,
    prompt: str | None = None,
    subset: str | None = None,
    files: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict]:
    """Write ``run_dir/provenance.json`` (strict JSON, atomically): how the prediction files there were made.

    Args:
        run_dir: the prediction run folder.
        family: one of :data:`FAMILIES`.
        model: the weights file the predictions come from (hashed with SHA-256); ``None`` for a model
            with no file (a randomly initialised one).
        split: the COCO ground truth or split manifest predicted on.
        prompt: SAM's prompt source, ``"gt"`` or ``"detector:<boxes file>"``; ``None`` for other families.
        subset: the manifest subset predicted, when ``split`` is a manifest.
        files: file name in ``run_dir`` -> its own keys (``score_threshold``,
            ``score_threshold_chosen_on``); default ``{"predictions.json": {}}``. Missing keys are null.

    Returns:
        ``{file name: its record}``, each what :func:`read_provenance` returns for that file (to embed
        in dict-shaped prediction files).

    Raises:
        PipelineError: an unknown family, a prompt outside SAM, a missing weights file.
    """
    if family not in FAMILIES:
        raise PipelineError(f"family {family!r}: expected one of {', '.join(FAMILIES)}")
    if prompt is not None and (family != "sam" or not (prompt == "gt" or prompt.startswith("detector:"))):
        raise PipelineError(f"prompt {prompt!r}: only SAM has one, 'gt' or 'detector:<boxes file>'")
    record: dict[str, Any] = {
        "family": family,
        "model": str(Path(model).resolve()) if model is not None else None,
        "weights_sha256": sha256_file(model) if model is not None else None,
        "prompt": prompt,
        "split": str(Path(split).resolve()) if isinstance(split, Path) else str(split),
    }
    if subset is not None:
        record["subset"] = subset
    record["created_by"] = f"pipeline predict {family}"
    entries = {
        name: {"score_threshold": None, "score_threshold_chosen_on": None, **dict(extra)}
        for name, extra in (files if files is not None else {"predictions.json": {}}).items()
    }
    atomic_write_json(Path(run_dir) / PROVENANCE, {**record, "files": entries})
    return {name: {**record, **extra} for name, extra in entries.items()}


def read_provenance(pred_path: Path) -> dict | None:
    """The provenance record of a prediction file from ``provenance.json`` beside it: the run-level keys
    plus the file's own ``files`` entry; ``None`` when there is no such file or it does not list this one.

    Raises:
        PipelineError: ``provenance.json`` is not valid JSON or not an object.
    """
    pred_path = Path(pred_path)
    beside = pred_path.parent / PROVENANCE
    if not beside.is_file():
        return None
    doc = read_json(beside)
    if not isinstance(doc, dict) or not isinstance(doc.get("files", {}), dict):
        raise PipelineError(f"{beside}: not a provenance record (expected an object with a files mapping)")
    entry = doc.get("files", {}).get(pred_path.name)
    if not isinstance(entry, dict):
        return None
    return {**{k: v for k, v in doc.items() if k != "files"}, **entry}


def upper_bound(pf: PredictionFile) -> str | None:
    """What makes a file an upper bound rather than a model's own output: :data:`GT_PROMPTS` for SAM masks
    prompted with the ground-truth boxes, else ``None`` (also for files without provenance)."""
    prov = pf.provenance or {}
    return GT_PROMPTS if prov.get("family") == "sam" and prov.get("prompt") == "gt" else None


def require_model_output(pf: PredictionFile, purpose: str) -> PredictionFile:
    """``pf`` itself when it is a model's own output; files without provenance are accepted (nothing says
    otherwise).

    Args:
        purpose: what needs a model's own output, for the message (``"fusion"``, ``"export labelstudio"``).

    Raises:
        PipelineError: SAM masks prompted with the ground-truth boxes (:func:`upper_bound`).
    """
    if upper_bound(pf) == GT_PROMPTS:
        raise PipelineError(
            f"{pf.path}: SAM masks prompted with ground-truth boxes (an upper bound, not a model's own output); "
            f"{purpose} needs predictions prompted by a detector "
            "(pipeline predict sam --boxes <detector predictions.json>)"
        )
    return pf
