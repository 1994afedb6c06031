"""An inspection run (``pipeline inspect``'s output folder) as the ground truth of a review queue.

``export labelstudio O/predictions.json`` without ``--gt`` reads the files ``inspect`` writes beside it:

- ``images.json``: COCO ``images`` (``id``, ``file_name`` the absolute path, ``width``, ``height``),
  ``categories`` (the detector's classes, or one class ``defect`` for PatchCore's class-less regions)
  and ``errors`` (unreadable files: verdict ``error``, left out of the queue and counted);
- ``verdicts.jsonl``: per image ``verdict``, ``defect_type``, ``confidence`` (in ``[0.5, 1]``, 0.5 on
  the threshold), ``scores`` (per source), ``regions`` (``source`` ``detector`` or ``anomaly``);
- ``config.yaml``: the ``bundle`` folder, whose ``bundle.yaml`` holds the decision's per-source
  ``thresholds`` and the ``split`` the models were trained on.

The image root is the common folder of the inspected images (they can live anywhere); ``file_name``
becomes the path relative to it. The review's classes are the parent dataset's COCO categories
(``coco/train.json`` beside the bundle's ``split.json`` source), so that ``import labelstudio`` and
``dataset add-reviewed`` see the parent's class names; class-less PatchCore regions take the class of
the image's verdict ``defect_type`` (the classifier's), else the only class, else the label
:data:`UNCLASSIFIED`, which the reviewer must replace (``add-reviewed`` accepts only the parent's classes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_yaml_mapping

IMAGES = "images.json"
VERDICTS = "verdicts.jsonl"
ERROR = "error"
UNCLASSIFIED = "defect"  # inspect's name for PatchCore's class-less regions


@dataclass
class Inspection:
    """An inspection folder read for review.

    Attributes:
        gt: COCO ground truth dict without annotations: ``info.image_root`` (the common folder),
            ``images`` (``file_name`` relative to it, ``width``, ``height``, ``defect_type`` the verdict's),
            ``categories`` (the review's classes, with ``defect_types``).
        inspect_categories: ``images.json``'s categories (what ``predictions.json`` ids refer to).
        verdicts: image id -> its ``verdicts.jsonl`` record (readable images only).
        thresholds: source -> the bundle's val-chosen threshold (empty when the bundle is gone).
        n_errors: images with verdict ``error`` (left out).
        classes_from: where the review's class names came from, in words.
    """

    gt: dict
    inspect_categories: list[dict]
    verdicts: dict[int, dict] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    n_errors: int = 0
    classes_from: str = ""

    @property
    def image_root(self) -> Path:
        return Path(self.gt["info"]["image_root"])


def _bundle(folder: Path) -> dict:
    """The inspection's ``bundle.yaml`` (via its ``config.yaml``), ``{}`` when it cannot be found."""
    bundle = read_yaml_mapping(folder / "config.yaml").get("bundle")
    return read_yaml_mapping(Path(bundle) / "bundle.yaml") if bundle else {}


def _parent_categories(bundle: dict) -> tuple[list[dict] | None, str]:
    """The parent dataset's COCO categories (``coco/train.json`` beside the bundle's split source)."""
    source = (bundle.get("split") or {}).get("source")
    if not source:
        return None, "no bundle.yaml found"
    train = Path(source).parent / "coco" / "train.json"
    try:
        cats = json.loads(train.read_text(encoding="utf-8"))["categories"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"no {train}"
    return [dict(c) for c in cats], str(train)


def read_inspection(predictions: Path) -> Inspection:
    """Read the inspection folder holding ``predictions`` (module docstring).

    Raises:
        PipelineError: no ``images.json`` beside ``predictions`` (pass ``--gt`` for a split's
            predictions), a malformed one, or no readable image at all.
    """
    from pipeline.core.io import read_json

    folder = Path(predictions).resolve().parent
    path = folder / IMAGES
    if not path.is_file():
        raise PipelineError(
            f"{predictions}: no --gt and no {IMAGES} beside it (expected a 'pipeline inspect' output folder; "
            "for a split's predictions pass --gt annotations/<category>/coco/<split>.json)"
        )
    doc = read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "categories")):
        raise PipelineError(f"{path}: not an inspect image list (expected 'images' and 'categories')")
    if not doc["images"]:
        raise PipelineError(f"{path}: no readable image ({len(doc.get('errors') or [])} errors): nothing to review")
    verdicts = {}
    if (folder / VERDICTS).is_file():
        for line in (folder / VERDICTS).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                if rec.get("verdict") != ERROR:
                    verdicts[rec["id"]] = rec
    bundle = _bundle(folder)
    categories, classes_from = _parent_categories(bundle)
    if categories is None:
        categories = [dict(c) for c in doc["categories"]]
        classes_from = f"{path} ({classes_from})"
    root = Path(os.path.commonpath([Path(im["file_name"]).parent.as_posix() for im in doc["images"]]))
    images = []
    for im in doc["images"]:
        rel = Path(im["file_name"]).relative_to(root).as_posix()
        v = verdicts.get(im["id"], {})
        images.append(
            {
                "id": im["id"],
                "file_name": rel,
                "width": im["width"],
                "height": im["height"],
                "defect_type": v.get("defect_type") or "",
            }
        )
    gt = {
        "info": {"description": f"pipeline inspect {folder}", "image_root": str(root), "inspection": str(folder)},
        "images": images,
        "annotations": [],
        "categories": categories,
    }
    return Inspection(
        gt=gt,
        inspect_categories=[dict(c) for c in doc["categories"]],
        verdicts=verdicts,
        thresholds={k: float(v) for k, v in ((bundle.get("decision") or {}).get("thresholds") or {}).items()},
        n_errors=len(doc.get("errors") or []),
        classes_from=classes_from,
    )


def class_of_region(insp: Inspection, image_id: int, inspect_category_id: int) -> str:
    """The review class of a ``predictions.json`` result: its own class when the review knows it, else
    (PatchCore's class-less ``defect``) the class holding the image's verdict ``defect_type``, else the
    only class, else :data:`UNCLASSIFIED`."""
    names = [c["name"] for c in insp.gt["categories"]]
    own = next((c["name"] for c in insp.inspect_categories if c["id"] == inspect_category_id), UNCLASSIFIED)
    if own in names:
        return own
    dtype = (insp.verdicts.get(image_id) or {}).get("defect_type")
    for c in insp.gt["categories"]:
        if dtype and (dtype == c["name"] or dtype in (c.get("defect_types") or [])):
            return c["name"]
    return names[0] if len(names) == 1 else UNCLASSIFIED


def remap_results(insp: Inspection, results: list[dict]) -> list[dict]:
    """``predictions.json`` results with ``category_id`` in the review's categories (copies); a class
    the review lacks is added to ``insp.gt["categories"]`` (ids after the last)."""
    cats = insp.gt["categories"]
    out = []
    for r in results:
        name = class_of_region(insp, r["image_id"], r["category_id"])
        cat = next((c for c in cats if c["name"] == name), None)
        if cat is None:
            cat = {"id": max((c["id"] for c in cats), default=0) + 1, "name": name, "supercategory": "defect"}
            cats.append(cat)
        out.append(dict(r, category_id=cat["id"]))
    return out


def verdict_uncertainty(insp: Inspection, image_id: int) -> tuple[float, float, str]:
    """Review priority of one inspected image: ``(closeness, disagreement, reason)``.

    - closeness in ``[0, 1]``: ``2 * (1 - confidence)``, 1 when the verdict's confidence is 0.5 (on
      the threshold), 0 at confidence 1; the queue's first key;
    - disagreement: 1.0 when some sources score at or above their bundle threshold and others below
      (0 otherwise, or without thresholds); the second key;
    - reason, e.g. ``"defect (spot), confidence 0.54: near the threshold; models disagree: anomaly
      3.1 >= 2.4, classifier 0.12 < 0.5"``.
    """
    rec = insp.verdicts.get(image_id)
    if rec is None:
        return 0.0, 0.0, "no verdict recorded"
    conf = rec.get("confidence")
    u = 0.0 if conf is None else min(1.0, max(0.0, 2.0 * (1.0 - float(conf))))
    verdict = rec.get("verdict") or "?"
    head = verdict + (f" ({rec['defect_type']})" if rec.get("defect_type") else "")
    parts = [f"{head}, confidence {float(conf):.2f}" if conf is not None else head]
    parts[0] += ": near the threshold" if u >= 0.5 else ": far from the threshold"
    said = []
    for s, t in insp.thresholds.items():
        if s in (rec.get("scores") or {}):
            v = float(rec["scores"][s])
            said.append((v >= t, f"{s} {v:.3g} {'>=' if v >= t else '<'} {t:.3g}"))
    disagree = 1.0 if len({d for d, _ in said}) > 1 else 0.0
    if disagree:
        parts.append("models disagree: " + ", ".join(text for _, text in said))
    return u, disagree, "; ".join(parts)


def anomaly_results(insp: Inspection) -> list[dict]:
    """PatchCore's regions from ``verdicts.jsonl`` as COCO results on review categories, when
    ``predictions.json`` holds the detector's boxes instead (``[]`` when it holds PatchCore's own)."""
    if [c["name"] for c in insp.inspect_categories] == [UNCLASSIFIED]:
        return []
    out = []
    for img_id, rec in insp.verdicts.items():
        for reg in rec.get("regions") or []:
            if reg.get("source") != "anomaly":
                continue
            r = {"image_id": img_id, "category_id": 0, "bbox": list(reg["bbox_xywh"]), "score": float(reg["score"])}
            if reg.get("mask") is not None:
                r["segmentation"] = reg["mask"]
            out.append(r)
    return remap_results(insp, out)
