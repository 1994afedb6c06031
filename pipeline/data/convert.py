"""Instances -> COCO ground truth, a YOLO dataset and SAM prompt/mask records, per split.

Output layout under ``out`` (usually ``annotations/<category>``)::

    split.json                      the split manifest (pipeline.data.mvtec)
    coco/<split>.json               COCO ground truth (boxes + compressed RLE, iscrowd 0)
    yolo/data.yaml                  one names list for all splits
    yolo/images/<split>/<label>_<stem>.png   links to the originals
    yolo/labels/<split>/<label>_<stem>.txt   "cls cx cy w h", normalised to [0, 1]
    sam/<split>.jsonl               one record per component: image, bbox_xyxy, RLE

Formats: COCO (https://cocodataset.org/#format-data), Ultralytics YOLO
(https://docs.ultralytics.com/datasets/detect/), SAM box prompts (Kirillov et al. 2023).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.instances import decode_rle, encode_rle, mask_to_instances, rle_bbox_xywh
from pipeline.core.io import atomic_write_json, atomic_write_text, staged_dir
from pipeline.data.mvtec import Sample, read_mask, scan_category
from pipeline.data.split import SPLITS, Split, image_ids, make_split
from pipeline.data.yolo import MAX_CLASSES as MAX_YOLO_WORLD_CLASSES
from pipeline.data.yolo import read_yolo_labels  # noqa: F401 - re-exported: convert's outputs are read with it


@dataclass
class ConvertSummary:
    """Counts written by :func:`convert_category` (per split and overall)."""

    out: Path
    classes: list[str]
    images: dict[str, int] = field(default_factory=dict)
    masks: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    instances_per_class: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "out": str(self.out),
            "classes": self.classes,
            "images": self.images,
            "masks": self.masks,
            "instances": self.instances,
            "instances_per_class": self.instances_per_class,
        }


def class_names(defect_types: list[str], rename: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Class names for the defect types: natural text (``broken_large`` -> ``broken large``).

    Args:
        defect_types: folder names under ``test/`` (good excluded).
        rename: defect type -> class name; several types mapped to one name merge them.

    Returns:
        ``(names, type_to_name)``: the sorted unique class names (COCO ids are index + 1, YOLO
        indices the index) and the mapping from each defect type to its name.

    Raises:
        PipelineError: a rename key that is no defect type, a name with ``/`` (YOLO-World reads it as a
            synonym separator), an empty name, or more than 80 classes.
    """
    rename = dict(rename or {})
    unknown = sorted(set(rename) - set(defect_types))
    if unknown:
        raise PipelineError(f"--rename names unknown defect types {unknown} (expected some of {defect_types})")
    mapping = {t: rename.get(t, t.replace("_", " ")).strip() for t in defect_types}
    for t, n in mapping.items():
        if not n or "/" in n:
            raise PipelineError(f"class name {n!r} for defect type {t!r}: expected non-empty text without '/'")
    names = sorted(set(mapping.values()))
    if len(names) > MAX_YOLO_WORLD_CLASSES:
        raise PipelineError(f"{len(names)} classes: YOLO-World takes at most {MAX_YOLO_WORLD_CLASSES}")
    return names, mapping


def parse_rename(items: list[str]) -> dict[str, str]:
    """``["broken_large=broken", ...]`` -> ``{"broken_large": "broken"}``; PipelineError on bad items."""
    out = {}
    for item in items:
        if "=" not in item:
            raise PipelineError(f"--rename {item!r}: expected DEFECT_TYPE=class name")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _link(src: Path, dst: Path) -> None:
    """Symlink ``dst`` -> ``src``; fall back to a hard link, then a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (os.symlink, os.link):
        try:
            attempt(src, dst)
            return
        except OSError:
            continue
    shutil.copy2(src, dst)


def yolo_name(sample: Sample) -> str:
    """Unique file stem for the YOLO folder: ``<label>_<stem>`` (stems repeat across defect types)."""
    return f"{sample.label}_{sample.image.stem}"


def convert_category(
    category_dir: Path,
    out: Path,
    *,
    ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    connectivity: int = 8,
    min_area: int = 1,
    rename: dict[str, str] | None = None,
    split_manifest: Split | None = None,
    force: bool = False,
) -> ConvertSummary:
    """Convert an MVTec AD category's masks into COCO, YOLO and SAM files for every split.

    Args:
        category_dir: the category folder (``.../bottle``).
        out: output folder; written atomically as a whole (built in a temporary sibling).
        ratios: train/val/test fractions of ``test/`` images, stratified by label.
        seed: split seed.
        connectivity: 8 or 4, for connected components.
        min_area: drop components smaller than this many pixels (1 keeps all).
        rename: defect type -> class name (merges when several map to one name).
        split_manifest: reuse an existing split instead of drawing a new one.
        force: replace an existing ``out``.

    Returns:
        A :class:`ConvertSummary` with the counts.

    Raises:
        PipelineError: invalid category (lists every offending file), an empty split, an existing
            ``out`` without ``force``, or a failed self-check.
    """
    category = scan_category(category_dir)
    names, type_to_name = class_names(category.defect_types, rename)
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    if split_manifest is not None:
        manifest = split_manifest.manifest
    else:
        manifest = make_split(category, ratios=ratios, seed=seed)
    for split in SPLITS:
        if not manifest["splits"].get(split) and (split_manifest is not None or ratios[SPLITS.index(split)] > 0):
            raise PipelineError(f"split {split!r} of {category.root} is empty (expected at least one image; check the ratios)")
    ids = image_ids(manifest)
    out = Path(out).resolve()
    summary = ConvertSummary(out=out, classes=names)
    ann_id = 0
    with staged_dir(out, force=force) as tmp:
        from pipeline.core.io import image_size_hw

        for split in SPLITS:
            entries = manifest["splits"][split]
            coco = {
                "info": {
                    "description": f"MVTec AD {category.name} {split} split (pipeline convert-masks)",
                    "image_root": str(category.root),
                    "split": split,
                    "connectivity": connectivity,
                    "min_area": min_area,
                },
                "images": [],
                "annotations": [],
                "categories": [
                    {"id": cat_id[n], "name": n, "supercategory": "defect",
                     "defect_types": sorted(t for t, m in type_to_name.items() if m == n)}
                    for n in names
                ],
            }
            sam_lines: list[str] = []
            n_masks = 0
            for e in entries:
                sample = Sample(category.root / e["image"], category.root / e["mask"] if e["mask"] else None, e["label"])
                h, w = image_size_hw(sample.image)
                img_id = ids[e["image"]]
                coco["images"].append(
                    {"id": img_id, "file_name": e["image"], "width": w, "height": h, "defect_type": e["label"]}
                )
                stem = yolo_name(sample)
                _link(sample.image, tmp / "yolo" / "images" / split / f"{stem}{sample.image.suffix}")
                label_lines = []
                if sample.mask is not None:
                    n_masks += 1
                    mask = read_mask(sample.mask)
                    name = type_to_name[sample.label]
                    for inst in mask_to_instances(mask, connectivity=connectivity, min_area=min_area):
                        ann_id += 1
                        rle = encode_rle(inst.mask)
                        _self_check(rle, inst, sample.mask)
                        x, y, bw, bh = inst.bbox_xywh
                        coco["annotations"].append(
                            {"id": ann_id, "image_id": img_id, "category_id": cat_id[name],
                             "bbox": [x, y, bw, bh], "area": inst.area, "segmentation": rle, "iscrowd": 0}
                        )
                        cx, cy, wn, hn = (x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h
                        _check_yolo((cx, cy, wn, hn), inst.bbox_xywh, (h, w), sample.mask)
                        label_lines.append(f"{cat_id[name] - 1} {cx:.6f} {cy:.6f} {wn:.6f} {hn:.6f}")
                        sam_lines.append(json.dumps({
                            "image": str(sample.image), "image_id": img_id, "annotation_id": ann_id,
                            "size_hw": [h, w], "category_id": cat_id[name], "category": name,
                            "bbox_xyxy": list(inst.bbox_xyxy), "segmentation": rle,
                        }))
                        summary.instances_per_class[name] = summary.instances_per_class.get(name, 0) + 1
                atomic_write_text(tmp / "yolo" / "labels" / split / f"{stem}.txt", "".join(l + "\n" for l in label_lines))
            atomic_write_json(tmp / "coco" / f"{split}.json", coco, indent=None)
            atomic_write_text(tmp / "sam" / f"{split}.jsonl", "".join(l + "\n" for l in sam_lines))
            summary.images[split] = len(entries)
            summary.masks[split] = n_masks
            summary.instances[split] = sum(1 for a in coco["annotations"])
        import yaml

        data_yaml = {
            "path": str(out / "yolo"),
            "train": "images/train",
            "val": "images/val",
            "test": "images/test",
            "nc": len(names),
            "names": {i: n for i, n in enumerate(names)},
        }
        atomic_write_text(tmp / "yolo" / "data.yaml", yaml.safe_dump(data_yaml, sort_keys=False))
        atomic_write_json(tmp / "split.json", manifest)
        atomic_write_json(tmp / "summary.json", summary.as_dict())
    return summary


def _self_check(rle: dict, inst, mask_path: Path) -> None:
    """Every RLE decodes to its component exactly and its pycocotools box is the component's box."""
    if not np.array_equal(decode_rle(rle), inst.mask):
        raise PipelineError(f"{mask_path}: self-check failed, RLE does not decode to its component")
    if [int(v) for v in rle_bbox_xywh(rle)] != list(inst.bbox_xywh):
        raise PipelineError(f"{mask_path}: self-check failed, box {inst.bbox_xywh} != toBbox {rle_bbox_xywh(rle)}")


def _check_yolo(box_norm: tuple[float, float, float, float], bbox_xywh, size_hw, mask_path: Path) -> None:
    """The YOLO numbers lie in [0, 1] and map back to the COCO box within the 6-decimal rounding."""
    h, w = size_hw
    cx, cy, wn, hn = box_norm
    if not all(0.0 <= v <= 1.0 for v in box_norm):
        raise PipelineError(f"{mask_path}: self-check failed, YOLO box {box_norm} outside [0, 1]")
    x, y, bw, bh = bbox_xywh
    back = ((cx - wn / 2) * w, (cy - hn / 2) * h, wn * w, hn * h)
    if max(abs(a - b) for a, b in zip(back, (x, y, bw, bh))) > 1e-6 * max(h, w) + 1e-9:
        raise PipelineError(f"{mask_path}: self-check failed, YOLO box {box_norm} != COCO box {bbox_xywh}")

