"""Glue between a model's per-image outputs and COCO results files for one split.

A detector returns, per image, ``{"bbox_xyxy": [x0, y0, x1, y1] (pixels, original image), "class_index":
YOLO index, "score"}``; here they become COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h],
"score"}`` against the split's ground truth, matching classes by name.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError


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
        raise PipelineError(f"{source}: model classes {model_names} lack the ground truth's {missing} (trained on another dataset?)")
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
            out.append({"image_id": img_id, "category_id": index_to_cat[d["class_index"]],
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(d["score"]), 5)})
    return out
