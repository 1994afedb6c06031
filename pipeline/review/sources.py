"""Prediction files as review sources: read, refused when not a model's own output, and each detection
source's score threshold (``export labelstudio --min-score``).

A source is one prediction file (:func:`pipeline.data.predictions.load_predictions`): COCO results are
``detections`` (shown as regions), classifier and anomaly files only feed the review queue. SAM masks
prompted with the ground-truth boxes are refused (:func:`pipeline.data.predictions.require_model_output`):
a review queue is for a model's own output. Files without provenance are accepted.

``--min-score auto`` (:func:`apply_min_scores`) takes, per detection source, the score threshold its
provenance records (PatchCore's regions: the pixel threshold chosen on val), else 0.0 (keep every
region; the uncertainty order puts the doubtful ones first). A number applies to every source.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError

# review's name for each kind of pipeline.data.predictions: COCO results are the detections shown as regions
SOURCE_KINDS = {"coco": "detections", "classification": "classification", "anomaly": "anomaly"}
AUTO = "auto"
EXPORT_PURPOSE = "a Label Studio review queue (export labelstudio)"


@dataclass
class Source:
    """One prediction file.

    Attributes:
        name: model version shown in Label Studio (detections) and in review reasons.
        kind: ``"detections"`` (COCO results), ``"classification"`` or ``"anomaly"`` (see :data:`SOURCE_KINDS`).
        by_image: image id -> that image's entries (COCO results, or the file's prediction records).
        threshold: anomaly decision threshold (``kind == "anomaly"``).
        scale: anomaly score scale (population standard deviation of the file's scores, 1 when 0).
        path: the prediction file (``None`` for a source built in memory).
        provenance: the file's provenance record, ``None`` when it has none.
        min_score: detections: regions scoring at least this are shown, also the threshold of the
            uncertainty term and the verdict; ``None``: the ``threshold`` the caller gives.
        min_score_from: where ``min_score`` came from, in words (``"--min-score"``, ``"chosen on val"``,
            ``"none recorded"``).
    """

    name: str
    kind: str
    by_image: dict[int, list[dict]] = field(default_factory=dict)
    threshold: float | None = None
    scale: float = 1.0
    path: Path | None = None
    provenance: dict | None = None
    min_score: float | None = None
    min_score_from: str = ""


def read_sources(paths: list[Path], coco, *, model_version: str = "pipeline") -> list[Source]:
    """Read prediction files (kinds as :func:`pipeline.data.predictions.load_predictions` tells them),
    matched to the ground truth.

    COCO results files become ``detections`` sources named ``model_version`` (one file) or
    ``model_version/<file stem>`` (several). Classifier/anomaly records are matched by ``image_id``,
    else by ``image`` (path relative to the category root) against the images' ``file_name``.

    Raises:
        PipelineError: unreadable files, unknown kinds, SAM masks prompted with the ground truth,
            images or categories not in the ground truth.
    """
    from pipeline.data.coco import check_results
    from pipeline.data.predictions import load_predictions, require_model_output

    files = []
    for p in paths:
        pf = require_model_output(load_predictions(Path(p)), EXPORT_PURPOSE)
        if pf.kind == "coco":
            check_results(pf.doc, coco, pf.path)
            for i, r in enumerate(pf.doc):
                if "bbox" not in r:
                    raise PipelineError(f"{pf.path}: result {i} has no bbox (expected COCO results with [x, y, w, h])")
        files.append(pf)
    n_det = sum(pf.kind == "coco" for pf in files)
    sources, names = [], set()
    for pf in files:
        if pf.kind == "coco":
            name = model_version if n_det == 1 else f"{model_version}/{pf.path.stem}"
        else:
            name = str(pf.doc.get("model") or pf.path.stem)
        base, k = name, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.add(name)
        src = Source(name=name, kind=SOURCE_KINDS[pf.kind], path=pf.path, provenance=pf.provenance)
        if pf.kind == "coco":
            for r in pf.doc:
                src.by_image.setdefault(r["image_id"], []).append(r)
        else:
            _add_image_records(src, pf.path, pf.doc, coco)
        sources.append(src)
    return sources


def _add_image_records(src: Source, path: Path, doc: dict, coco) -> None:
    """Index a classification/anomaly file's per-image records into ``src`` (and its anomaly threshold/scale)."""
    by_file = {img["file_name"]: img["id"] for img in coco.dataset["images"]}
    img_ids = set(coco.getImgIds())
    for i, rec in enumerate(doc["predictions"]):
        if not isinstance(rec, dict):
            raise PipelineError(f"{path}: prediction {i} is not an object")
        img_id = rec.get("image_id")
        if img_id not in img_ids:
            img_id = by_file.get(str(rec.get("image", "")).replace(os.sep, "/"))
        if img_id is None:
            raise PipelineError(
                f"{path}: prediction {i} (image {rec.get('image')!r}, image_id "
                f"{rec.get('image_id')!r}) is not an image of the ground truth"
            )
        if src.kind == "classification" and not isinstance(rec.get("scores"), dict):
            raise PipelineError(f"{path}: prediction {i} lacks scores {{class: probability}}")
        if src.kind == "anomaly" and not isinstance(rec.get("score"), (int, float)):
            raise PipelineError(f"{path}: prediction {i} lacks a numeric score")
        src.by_image.setdefault(img_id, []).append(rec)
    if src.kind == "anomaly":
        if not isinstance(doc.get("threshold"), (int, float)):
            raise PipelineError(f"{path}: anomaly predictions lack a numeric threshold")
        src.threshold = float(doc["threshold"])
        scores = np.array([float(r["score"]) for r in doc["predictions"]] or [0.0])
        src.scale = float(scores.std()) or 1.0


# ----------------------------------------------------------------------------- --min-score


def parse_min_score(value: float | str) -> float | str:
    """``--min-score``: :data:`AUTO` or a finite number.

    Raises:
        PipelineError: anything else.
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise PipelineError(f"--min-score {value!r}: expected 'auto' or a number (e.g. 0.25)")
    return number


def apply_min_scores(sources: list[Source], min_score: float | str) -> None:
    """Set each detection source's ``min_score`` (in place): a number for all, or with :data:`AUTO` the
    ``score_threshold`` its provenance records, else 0.0 (keep every region).

    Raises:
        PipelineError: a bad ``min_score`` (see :func:`parse_min_score`).
    """
    min_score = parse_min_score(min_score)
    for src in sources:
        if src.kind != "detections":
            continue
        if min_score != AUTO:
            src.min_score, src.min_score_from = float(min_score), "--min-score"
            continue
        recorded = (src.provenance or {}).get("score_threshold")
        if isinstance(recorded, (int, float)) and math.isfinite(recorded):
            on = (src.provenance or {}).get("score_threshold_chosen_on")
            src.min_score, src.min_score_from = float(recorded), f"chosen on {on}" if on else "recorded"
        else:
            src.min_score, src.min_score_from = 0.0, "none recorded: every region kept"


def region_counts(sources: list[Source]) -> list[dict]:
    """Per detection source: ``{"source" (its run folder's name), "file", "kept", "total", "min_score",
    "min_score_from", "best_score"}``; ``kept`` counts the results scoring at least ``min_score``."""
    from pipeline.data.predictions import source_name

    out = []
    for src in sources:
        if src.kind != "detections":
            continue
        scores = [float(r["score"]) for recs in src.by_image.values() for r in recs]
        t = src.min_score if src.min_score is not None else 0.0
        out.append(
            {
                "source": source_name(src.path) if src.path is not None else src.name,
                "file": str(src.path) if src.path is not None else None,
                "kept": sum(s >= t for s in scores),
                "total": len(scores),
                "min_score": t,
                "min_score_from": src.min_score_from,
                "best_score": max(scores, default=None),
            }
        )
    return out


def region_lines(counts: list[dict]) -> list[str]:
    """The lines ``export labelstudio`` prints per detection source, e.g.
    ``yolo_test: kept 12 of 40 regions (score >= 0.05, --min-score)``; a source that loses every region
    gets a ``WARNING`` line saying its best score and how to keep them."""
    lines = []
    for c in counts:
        lines.append(
            f"{c['source']}: kept {c['kept']} of {c['total']} regions "
            f"(score >= {c['min_score']:g}, {c['min_score_from']})"
        )
        if c["total"] and not c["kept"]:
            hint = "lower --min-score" + (" or pass --min-score auto" if c["min_score_from"] == "--min-score" else "")
            lines.append(
                f"WARNING: {c['source']}: all {c['total']} regions score below {c['min_score']:g} "
                f"(best {c['best_score']:.3g}), so the review queue shows none of them; {hint}"
            )
    return lines
