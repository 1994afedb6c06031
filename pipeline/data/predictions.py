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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json

KINDS = ("coco", "classification", "anomaly")


@dataclass(frozen=True)
class PredictionFile:
    """A loaded prediction file.

    Attributes:
        path: the file.
        kind: one of :data:`KINDS`.
        doc: the parsed JSON (a list for ``coco``, a dict otherwise).
    """

    path: Path
    kind: str
    doc: Any

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

    Raises:
        PipelineError: missing or invalid JSON, not a prediction file, or not of the expected kind.
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
    return PredictionFile(path=path, kind=kind, doc=doc)


def prediction_kind(path: Path) -> str:
    """The kind of the prediction file at ``path`` (see :func:`load_predictions`)."""
    return load_predictions(path).kind


def source_name(path: Path) -> str:
    """A prediction file's name in tables and task headers: the run folder's name for
    ``<run>/predictions.json`` (what every ``pipeline predict`` writes), else the file's stem."""
    path = Path(path)
    return path.parent.resolve().name if path.stem == "predictions" else path.stem
