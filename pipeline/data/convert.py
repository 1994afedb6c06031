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
from pipeline.core.io import atomic_write_json, atomic_write_text, image_size_hw
from pipeline.data.instances import decode_rle, encode_rle, mask_to_instances, rle_bbox_xywh
from pipeline.data.mvtec import Sample, read_mask, scan_category
from pipeline.data.split import SPLITS, Split, image_ids, make_split
from pipeline.data.yolo import MAX_CLASSES as MAX_YOLO_WORLD_CLASSES


@dataclass
class ConvertSummary:
    """Counts written by :func:`convert_category` (per split and overall)."""

    out: Path
    classes: list[str]
    images: dict[str, int] = field(default_factory=dict)
    masks: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    instances_per_class: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # files in ``out`` that convert-masks did not write

    def as_dict(self) -> dict:
        return {
            "out": str(self.out),
            "classes": self.classes,
            "images": self.images,
            "masks": self.masks,
            "instances": self.instances,
            "instances_per_class": self.instances_per_class,
            "warnings": self.warnings,
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
    """Unique file stem for the YOLO folder: ``<folder>_<stem>`` (stems repeat across defect types).

    The image's own folder, not its label: a defect image kept as good (``--allow-empty-masks``)
    must not take the name of the ``test/good`` image with the same stem."""
    return f"{sample.image.parent.name}_{sample.image.stem}"


# what convert-masks writes under ``out``; on --force these go, anything else (a reviewed.json) stays
OUTPUTS = ("split.json", "summary.json", "coco/train.json", "coco/val.json", "coco/test.json", "yolo/**", "sam/*.jsonl")


@dataclass
class SplitFiles:
    """One split's outputs, built in memory before anything is written (see :func:`add_image`)."""

    coco: dict
    sam_lines: list[str] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)  # YOLO stem -> label lines
    links: dict[str, Path] = field(default_factory=dict)  # YOLO image file name -> original
    n_masks: int = 0


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
    allow_empty_masks: bool = False,
    force: bool = False,
) -> ConvertSummary:
    """Convert an MVTec AD category's masks into COCO, YOLO and SAM files for every split.

    Every image and mask is decoded (once, in parallel) and every output built and self-checked in
    memory before the first file is written, so bad input leaves ``out`` untouched.

    Args:
        category_dir: the category folder (``.../bottle``).
        out: output folder. On ``force`` only the files convert-masks writes (:data:`OUTPUTS`) are
            replaced; anything else there (``coco/reviewed.json``, notes) stays.
        ratios: train/val/test fractions of ``test/`` images, stratified by label.
        seed: split seed.
        connectivity: 8 or 4, for connected components.
        min_area: drop components smaller than this many pixels (1 keeps all).
        rename: defect type -> class name (merges when several map to one name).
        split_manifest: reuse an existing split instead of drawing a new one.
        allow_empty_masks: keep defect images with an all-zero mask as good images (reported in
            :attr:`ConvertSummary.warnings`) instead of failing.
        force: replace an earlier conversion in ``out``.

    Returns:
        A :class:`ConvertSummary` with the counts and warnings.

    Raises:
        PipelineError: bad options, an invalid category (lists every offending file), an empty split,
            an existing ``out`` without ``force``, or a failed self-check.
    """
    from pipeline.core.runs import RunDir

    if connectivity not in (4, 8):
        raise PipelineError(f"--connectivity {connectivity}: expected 4 or 8 (pixel neighbours of a component)")
    if min_area < 1:
        raise PipelineError(f"--min-area {min_area}: expected a pixel count >= 1")
    run = RunDir.open(out, kind="convert-masks", force=force, legacy_files=OUTPUTS)
    category = scan_category(category_dir, allow_empty_masks=allow_empty_masks, keep_masks=True)
    names, type_to_name = class_names(category.defect_types, rename)
    manifest = split_manifest.manifest if split_manifest is not None else make_split(category, ratios=ratios, seed=seed)
    summary = ConvertSummary(out=Path(out).resolve(), classes=names)
    summary.warnings = _split_warnings(category, manifest, ratios, explicit=split_manifest is not None)
    built = _build_splits(category, manifest, names, type_to_name, connectivity=connectivity, min_area=min_area)
    for split, files in built.items():
        summary.images[split] = len(files.coco["images"])
        summary.masks[split] = files.n_masks
        summary.instances[split] = len(files.coco["annotations"])
        for a in files.coco["annotations"]:
            name = names[a["category_id"] - 1]
            summary.instances_per_class[name] = summary.instances_per_class.get(name, 0) + 1
    with run:
        write_outputs(run.path, built, manifest, names)
        atomic_write_json(run.path / "summary.json", summary.as_dict())
    summary.kept = run.kept
    return summary


def _split_warnings(category, manifest: dict, ratios, *, explicit: bool) -> list[str]:
    """Refuse an empty split; warn for labels that some splits will lack (fewer than 3 images)."""
    for split in SPLITS:
        if not manifest["splits"].get(split) and (explicit or ratios[SPLITS.index(split)] > 0):
            raise PipelineError(
                f"split {split!r} of {category.root} is empty (expected at least one image; check the ratios)"
            )
    warnings = [
        f"{p.relative_to(category.root).as_posix()}: all-zero mask, kept as a good image" for p in category.empty_masks
    ]
    for label in sorted({s.label for s in category.test}):
        lacking = [s for s in SPLITS if not any(e["label"] == label for e in manifest["splits"].get(s, []))]
        if lacking:
            n = sum(s.label == label for s in category.test)
            warnings.append(
                f"{label!r} has {n} image(s): the {', '.join(lacking)} split(s) will have none of it "
                "(metrics that need it there are null)"
            )
    return warnings


def _build_splits(
    category, manifest: dict, names: list[str], type_to_name: dict[str, str], *, connectivity: int, min_area: int
) -> dict[str, SplitFiles]:
    """COCO, YOLO and SAM content of every split, self-checked, nothing written yet."""
    ids = image_ids(manifest)
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    categories = coco_categories(names, type_to_name)
    built: dict[str, SplitFiles] = {}
    ann_id = 0
    for split in SPLITS:
        info = {
            "description": f"MVTec AD {category.name} {split} split (pipeline convert-masks)",
            "image_root": str(category.root),
            "split": split,
            "connectivity": connectivity,
            "min_area": min_area,
        }
        files = SplitFiles(coco={"info": info, "images": [], "annotations": [], "categories": categories})
        for e in manifest["splits"][split]:
            sample = Sample(category.root / e["image"], category.root / e["mask"] if e["mask"] else None, e["label"])
            ann_id = _add_sample(
                files,
                sample,
                category,
                ids[e["image"]],
                e,
                cat_id,
                type_to_name,
                ann_id,
                connectivity=connectivity,
                min_area=min_area,
            )
        built[split] = files
    return built


def _add_sample(
    files: SplitFiles,
    sample: Sample,
    category,
    img_id: int,
    entry: dict,
    cat_id: dict,
    type_to_name: dict,
    ann_id: int,
    *,
    connectivity: int,
    min_area: int,
) -> int:
    """One image's COCO image/annotations, YOLO label lines and SAM records; returns the last annotation id."""
    h, w = category.sizes_hw.get(sample.image) or image_size_hw(sample.image)
    annotations = []
    if sample.mask is not None:
        files.n_masks += 1
        mask = category.masks[sample.mask] if sample.mask in category.masks else read_mask(sample.mask)
        name = type_to_name[sample.label]
        for inst in mask_to_instances(mask, connectivity=connectivity, min_area=min_area):
            ann_id += 1
            rle = encode_rle(inst.mask)
            _self_check(rle, inst, sample.mask)
            x, y, bw, bh = inst.bbox_xywh
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": cat_id[name],
                    "bbox": [x, y, bw, bh],
                    "area": inst.area,
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
    add_image(
        files,
        image=sample.image,
        file_name=entry["image"],
        img_id=img_id,
        size_hw=(h, w),
        defect_type=entry["label"],
        yolo_stem=yolo_name(sample),
        annotations=annotations,
        names=list(cat_id),
        source=sample.mask,
    )
    return ann_id


def coco_categories(names: list[str], type_to_name: dict[str, str]) -> list[dict]:
    """COCO categories: ids from 1 in ``names`` order, each with the defect types it holds."""
    return [
        {
            "id": i + 1,
            "name": n,
            "supercategory": "defect",
            "defect_types": sorted(t for t, m in type_to_name.items() if m == n),
        }
        for i, n in enumerate(names)
    ]


def add_image(
    files: SplitFiles,
    *,
    image: Path,
    file_name: str,
    img_id: int,
    size_hw: tuple[int, int],
    defect_type: str,
    yolo_stem: str,
    annotations: list[dict],
    names: list[str],
    source,
) -> None:
    """Add one image of a split: its COCO image and annotations, YOLO link and label lines, SAM records.

    Args:
        files: the split being built.
        image: the image file (YOLO links to it; SAM records name it as ``str(image)``).
        file_name: the COCO ``file_name`` (relative to the COCO ``info.image_root``).
        img_id: its image id (the manifest's image-id rule).
        size_hw: ``(H, W)`` in pixels.
        defect_type: its label (``good`` or a defect type), the COCO image's ``defect_type``.
        yolo_stem: its unique file stem in the YOLO folder.
        annotations: its COCO annotations, ids set: ``bbox`` ``[x, y, w, h]`` pixels, ``category_id``
            from 1 (YOLO class = id - 1), ``segmentation`` compressed RLE of size ``size_hw``; appended as given.
        names: class names in category-id order (the SAM records' ``category``).
        source: named in a self-check error (the mask file, the reviewed file).

    Raises:
        PipelineError: a box whose YOLO numbers fall outside [0, 1] or do not map back to it.
    """
    h, w = size_hw
    files.coco["images"].append(
        {"id": img_id, "file_name": file_name, "width": w, "height": h, "defect_type": defect_type}
    )
    files.links[f"{yolo_stem}{image.suffix}"] = image
    lines = files.labels.setdefault(yolo_stem, [])
    for a in annotations:
        files.coco["annotations"].append(a)
        x, y, bw, bh = a["bbox"]
        box_norm = ((x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h)
        _check_yolo(box_norm, a["bbox"], (h, w), source)
        lines.append(f"{a['category_id'] - 1} " + " ".join(f"{v:.6f}" for v in box_norm))
        files.sam_lines.append(
            json.dumps(
                {
                    "image": str(image),
                    "image_id": img_id,
                    "annotation_id": a["id"],
                    "size_hw": [h, w],
                    "category_id": a["category_id"],
                    "category": names[a["category_id"] - 1],
                    "bbox_xyxy": [x, y, x + bw, y + bh],
                    "segmentation": a["segmentation"],
                }
            )
        )


def write_outputs(out: Path, built: dict[str, SplitFiles], manifest: dict, names: list[str]) -> None:
    """Write every split's COCO, YOLO and SAM files, ``yolo/data.yaml`` and ``split.json`` (each atomically).

    YOLO images are symlinks to the originals (hard links, then copies, where symlinks fail).
    """
    import yaml

    for split, files in built.items():
        for fname, src in files.links.items():
            _link(src, out / "yolo" / "images" / split / fname)
        for stem, lines in files.labels.items():
            atomic_write_text(out / "yolo" / "labels" / split / f"{stem}.txt", "".join(ln + "\n" for ln in lines))
        atomic_write_json(out / "coco" / f"{split}.json", files.coco, indent=None)
        atomic_write_text(out / "sam" / f"{split}.jsonl", "".join(ln + "\n" for ln in files.sam_lines))
    data_yaml = {
        "path": str(out.resolve() / "yolo"),
        "train": "images/train",
        "val": "images/val",
        "test": "images/test",
        "nc": len(names),
        "names": dict(enumerate(names)),
        "category": manifest["category"],
    }  # picks the label-safe augmentation policy
    atomic_write_text(out / "yolo" / "data.yaml", yaml.safe_dump(data_yaml, sort_keys=False))
    atomic_write_json(out / "split.json", manifest)


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
