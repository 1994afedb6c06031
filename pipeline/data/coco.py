"""COCO ground truth and results (cocodataset.org/#format-data, #format-results): load and check
them, and turn a model's per-image outputs into results for one split.

A detector returns, per image, ``{"bbox_xyxy": [x0, y0, x1, y1] (pixels, original image), "class_index":
YOLO index, "score"}``; here they become COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` against the split's ground truth, matching classes by name.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json


def split_images(gt: dict) -> list[tuple[int, Path, tuple[int, int]]]:
    """``(image_id, absolute path, size_hw)`` for every image of a COCO ground truth written by convert-masks."""
    root = Path(gt.get("info", {}).get("image_root", "."))
    return [(img["id"], root / img["file_name"], (img["height"], img["width"])) for img in gt["images"]]


def class_index_to_category(model_names: list[str], gt: dict, *, source: Path) -> dict[int, int]:
    """Map a model's class indices (0-based, trained order) to the ground truth's category ids by name.

    Raises:
        PipelineError: a ground-truth class the model does not know (trained on another class list).
    """
    by_name = {c["name"]: c["id"] for c in gt["categories"]}
    missing = sorted(set(by_name) - set(model_names))
    if missing:
        raise PipelineError(
            f"{source}: model classes {model_names} lack the ground truth's {missing} (trained on another dataset?)"
        )
    return {i: by_name[n] for i, n in enumerate(model_names) if n in by_name}


def detections_to_results(
    detections: list[list[dict]], images: list[tuple[int, Path, tuple[int, int]]], index_to_cat: dict[int, int]
) -> list[dict]:
    """Per-image detections (same order as ``images``) -> COCO results, boxes clipped to the image."""
    out = []
    for (img_id, _, (h, w)), dets in zip(images, detections):
        for d in dets:
            if d["class_index"] not in index_to_cat:
                continue
            x0, y0, x1, y1 = (float(v) for v in d["bbox_xyxy"])
            x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
            out.append(
                {
                    "image_id": img_id,
                    "category_id": index_to_cat[d["class_index"]],
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "score": round(float(d["score"]), 5),
                }
            )
    return out


def load_coco_gt(gt_path: Path):
    """Load COCO ground truth quietly (pycocotools prints to stdout). Raises PipelineError when invalid."""
    from pycocotools.coco import COCO

    data = read_json(gt_path)
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise PipelineError(f"{gt_path}: not COCO ground truth (expected images, annotations, categories)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_results(results: list, coco_gt, source: Path) -> None:
    """Every result names a ground-truth image and category and has a valid box/score.

    Raises:
        PipelineError: one line naming ``source`` and the first offending entry.
    """
    img_ids, cat_ids = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "score"} <= set(r):
            raise PipelineError(f"{source}: result {i} lacks image_id/category_id/score (expected COCO results)")
        if r["image_id"] not in img_ids:
            raise PipelineError(f"{source}: result {i} has image_id {r['image_id']} not in the ground truth")
        if r["category_id"] not in cat_ids:
            raise PipelineError(f"{source}: result {i} has category_id {r['category_id']} not in {sorted(cat_ids)}")
        if "bbox" in r and (len(r["bbox"]) != 4 or r["bbox"][2] < 0 or r["bbox"][3] < 0):
            raise PipelineError(f"{source}: result {i} bbox {r['bbox']} (expected [x, y, w, h] with w, h >= 0)")
