"""Dataset versions: reviewed labels merged into a new version of a converted dataset.

``add_reviewed(parent, reviewed, out)`` reads a dataset folder (``annotations/<category>``, as
``convert-masks`` or an earlier ``add_reviewed`` wrote it) and a reviewed COCO ground truth (as
``pipeline import labelstudio`` writes it) and writes a new folder ``out`` in the same layout
(``split.json``, ``coco/<split>.json``, ``yolo/``, ``sam/<split>.jsonl``) plus::

    images/reviewed/<file_name>          the reviewed images, hard-linked (else copied) from the image root
    masks/reviewed/<file_name stem>_mask.png    their masks (union of their annotations, 0/255)
    masks/replaced/<image stem>_mask.png        masks of parent images whose labels were replaced
    dataset.yaml                         the parent, the reviewed file's SHA-256, counts added per class

The parent is only read. Its split stays as it is (same entries, same order); the reviewed images
are appended to ``train`` (or ``val``); ``--replace-labels`` replaces the labels of a parent image
with the same content (SHA-256 of the file bytes) in its own split. Every file is regenerated with
convert-masks' writers (:func:`pipeline.data.convert.add_image`, :func:`~pipeline.data.convert.write_outputs`)
from COCO ground truth: the parent's annotations verbatim (same ids, boxes, RLE), the reviewed
ones after them (ids after the parent's largest). Categories (ids, names, defect types) are the parent's.

Image paths and ids. Manifest paths are relative to the category root, and every stage resolves
``root / path``; the reviewed images live in ``out``, so their manifest path is the relative path
from the root to the held copy (``../../annotations/bottle-v2/images/reviewed/...``; ``root / path``
and ``relative_to(root)`` both round-trip it). No choice of path keeps the parent's ids under a rule
that numbers split images sorted and ``train_good`` after them: any image added to a split moves
every ``train_good`` id, and ``..`` sorts before ``test/``. So the manifest lists the images each
version added, in order, under ``added``, for :func:`pipeline.data.split.image_ids` to number after
all others (a manifest without ``added`` keeps its ids; a version's ids extend its parent's). The
parent's ids hold only where that rule honours ``added``; ``tests/data/test_dataset.py`` checks it.

The version holds its own copies of the reviewed images, so it stays valid when the inspection
folder is cleaned up; it refers to its parents' files (the category folder, an earlier version's
held images) by path, as the parent does.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_text, image_size_hw, read_json, sha256_file
from pipeline.data.mvtec import GOOD, Sample
from pipeline.data.split import SPLITS, image_ids

TARGETS = ("train", "val")  # test images come from the parent only


@dataclass
class ReviewedImage:
    """One image of the reviewed COCO file, checked against the parent's classes.

    Attributes:
        file_name: its path relative to the reviewed file's image root (POSIX).
        path: the resolved image file.
        sha256: hex SHA-256 of the file bytes.
        size_hw: ``(H, W)`` pixels.
        label: ``good`` (no annotations: a reviewed negative) or a defect type of the parent.
        annotations: COCO annotations without ids: parent ``category_id``, ``bbox`` ``[x, y, w, h]``
            pixels as reviewed, ``area`` pixel count, ``segmentation`` compressed RLE, ``iscrowd`` 0.
        mask: ``HxW`` bool union of the annotations' masks.
    """

    file_name: str
    path: Path
    sha256: str
    size_hw: tuple[int, int]
    label: str
    annotations: list[dict]
    mask: np.ndarray


@dataclass
class VersionSummary:
    """What :func:`add_reviewed` wrote (the ``added`` counts are also in ``dataset.yaml``)."""

    out: Path
    to: str
    images: dict[str, int] = field(default_factory=dict)
    added: dict = field(default_factory=dict)
    replaced: list[dict] = field(default_factory=list)


def add_reviewed(
    parent: Path,
    reviewed: Path,
    out: Path,
    *,
    to: str = "train",
    replace_labels: bool = False,
    force: bool = False,
) -> VersionSummary:
    """Write a new dataset version ``out``: the parent plus the reviewed images (module docstring).

    Args:
        parent: the parent dataset folder (``split.json`` and ``coco/<split>.json``).
        reviewed: reviewed COCO ground truth: ``info.image_root``; ``images`` with ``file_name``
            relative to it, ``width``, ``height``; ``annotations`` with ``bbox`` and/or RLE or polygon
            ``segmentation``; ``categories`` named as the parent's classes. An image without
            annotations is a reviewed negative (added as good).
        out: the new version's folder (never ``parent``).
        to: the split the reviewed images join, ``train`` or ``val``.
        replace_labels: a reviewed image whose content is already in the parent replaces that
            image's labels in its split (else it is refused).
        force: replace a version an earlier ``add_reviewed`` wrote in ``out``.

    Returns:
        A :class:`VersionSummary`.

    Raises:
        PipelineError: ``out`` is, holds or lies in ``parent``, or exists without ``force``; a bad
            ``to``; an unreadable parent or reviewed file; a reviewed ``file_name`` outside its image
            root, missing, or of another size; a class the parent lacks; an image already in the parent
            (without ``replace_labels``, or in its ``train/good``), a parent test image; a bad annotation.
    """
    from pipeline.core.runs import RunDir

    parent, reviewed, out = Path(parent), Path(reviewed), Path(out)
    _check_folders(parent, out)  # before the run-folder rules: --force must never reach the parent
    run = RunDir.open(out, kind="dataset", force=force)
    if to not in TARGETS:
        raise PipelineError(f"--to {to!r}: expected train or val (test images come from the parent only)")
    manifest, cocos = _read_parent(parent)
    categories = cocos["train"]["categories"]
    root = Path(manifest["root"])
    items = read_reviewed(reviewed, categories=categories, classes=manifest["classes"])
    replaced = _match_parent(items, manifest, root, replace_labels=replace_labels, reviewed=reviewed)
    out_abs = Path(os.path.abspath(out))
    plan = _plan(manifest, items, replaced, out_abs, to=to)
    built = _build_splits(plan, manifest, cocos, reviewed)
    with run:
        for dst, src in plan.held.items():
            _hold(src, dst)
        for path, mask in plan.masks.items():
            _write_mask(path, mask)
        from pipeline.data.convert import write_outputs

        write_outputs(run.path, built, plan.manifest, [c["name"] for c in categories])
        summary = VersionSummary(out=out_abs, to=to)
        summary.images = {s: len(plan.manifest["splits"][s]) for s in SPLITS}
        summary.added = _counts([i for i in items if not any(i is r for r in replaced.values())], categories)
        summary.replaced = [
            {"image": rel, "split": s} for s in SPLITS for e in manifest["splits"][s] if (rel := e["image"]) in replaced
        ]
        _write_dataset_yaml(run.path, parent, reviewed, summary)
    return summary


def _check_folders(parent: Path, out: Path) -> None:
    p, o = parent.resolve(), out.resolve()
    if o == p or p in o.parents or o in p.parents:
        raise PipelineError(
            f"--out {out}: the new version must be a folder of its own, not {parent} or a folder in or above it"
        )


def _read_parent(parent: Path) -> tuple[dict, dict[str, dict]]:
    """The parent's manifest and COCO ground truth per split; PipelineError when they do not agree."""
    from pipeline.data.split import load_split

    split_path = parent / "split.json"
    if not split_path.is_file():
        raise PipelineError(f"{parent}: no split.json (expected a dataset folder written by convert-masks)")
    manifest = load_split(split_path).manifest
    cocos = {}
    for s in SPLITS:
        path = parent / "coco" / f"{s}.json"
        if not path.is_file():
            raise PipelineError(f"{path}: file not found (expected the parent's COCO ground truth)")
        cocos[s] = read_json(path)
        listed = [img["file_name"] for img in cocos[s].get("images", [])]
        if listed != [e["image"] for e in manifest["splits"][s]]:
            raise PipelineError(f"{path}: its images differ from the {s} split of {split_path} (convert it again)")
    if any(cocos[s]["categories"] != cocos["train"]["categories"] for s in SPLITS):
        raise PipelineError(f"{parent}/coco: the splits have different categories (convert it again)")
    return manifest, cocos


def read_reviewed(path: Path, *, categories: list[dict], classes: list[str]) -> list[ReviewedImage]:
    """Read and check a reviewed COCO file against the parent's ``categories`` and defect types ``classes``.

    Raises:
        PipelineError: see :func:`add_reviewed` (one line naming the file and the image).
    """
    from pipeline.data.instances import decode_rle

    path = Path(path)
    doc = read_json(path)
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "annotations")):
        raise PipelineError(f"{path}: not COCO ground truth (expected 'images' and 'annotations' lists)")
    image_root = (doc.get("info") or {}).get("image_root")
    if not image_root or not Path(image_root).is_dir():
        raise PipelineError(f"{path}: info.image_root {image_root!r} is not a folder (expected the images' root)")
    image_root = Path(image_root).resolve()
    names = {c["id"]: c["name"] for c in doc.get("categories") or []}
    parent_id = {c["name"]: c["id"] for c in categories}
    by_image: dict = {}
    for a in doc["annotations"]:
        by_image.setdefault(a.get("image_id"), []).append(a)
    items, seen = [], {}
    for img in doc["images"]:
        where = f"{path}: image {img.get('id')} ({img.get('file_name')!r})"
        file = _resolve_file(img.get("file_name"), image_root, where)
        rel = file.relative_to(image_root).as_posix()
        if rel in seen:
            raise PipelineError(f"{where}: listed twice (also image {seen[rel]})")
        seen[rel] = img.get("id")
        size_hw = image_size_hw(file)
        if (img.get("height"), img.get("width")) != size_hw:
            raise PipelineError(
                f"{where}: the file is {size_hw[1]}x{size_hw[0]}, "
                f"the record says {img.get('width')}x{img.get('height')}"
            )
        anns = []
        for a in by_image.get(img.get("id"), []):
            name = names.get(a.get("category_id"))
            if name not in parent_id:
                raise PipelineError(
                    f"{where}: class {name!r} is not a class of the parent (expected one of {', '.join(parent_id)})"
                )
            anns.append(_annotation(a, parent_id[name], size_hw, f"{where}: annotation {a.get('id')}"))
        mask = np.zeros(size_hw, bool)
        for a in anns:
            mask |= decode_rle(a["segmentation"])
        label = _label(img, anns, categories, classes, where)
        items.append(ReviewedImage(rel, file, sha256_file(file), size_hw, label, anns, mask))
    known = {img.get("id") for img in doc["images"]}
    orphans = sorted({str(k) for k in by_image} - {str(k) for k in known})
    if orphans:
        raise PipelineError(f"{path}: annotations for image ids {orphans[:5]} that 'images' does not list")
    return items


def _resolve_file(file_name, image_root: Path, where: str) -> Path:
    """The file a ``file_name`` names under ``image_root``; refused when it resolves outside it."""
    if not isinstance(file_name, str) or not file_name:
        raise PipelineError(f"{where}: no file_name")
    file = (image_root / file_name).resolve()
    if image_root not in file.parents:
        raise PipelineError(f"{where}: file_name resolves to {file}, outside the image root {image_root}")
    if not file.is_file():
        raise PipelineError(f"{where}: image file {file} not found")
    return file


def _annotation(a: dict, category_id: int, size_hw: tuple[int, int], where: str) -> dict:
    """One reviewed annotation in convert-masks' form: the box as reviewed, the mask as RLE (the
    filled box, edges rounded, when there is none), ``area`` its pixel count."""
    from pipeline.data.instances import encode_rle, rle_bbox_xywh

    h, w = size_hw
    if a.get("iscrowd", 0) not in (0, False):
        raise PipelineError(f"{where}: iscrowd {a['iscrowd']} (expected 0: COCOeval ignores crowd ground truth)")
    mask = _segmentation_mask(a.get("segmentation"), size_hw, where)
    bbox = a.get("bbox")
    if bbox is None and mask is not None:
        bbox = [int(v) for v in rle_bbox_xywh(encode_rle(mask))]
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: bbox {bbox!r} (expected [x, y, w, h] in pixels, or a segmentation)") from None
    if not (0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h):
        raise PipelineError(f"{where}: bbox {bbox} is empty or outside the {w}x{h} image")
    if mask is None:
        mask = np.zeros(size_hw, bool)
        mask[round(y) : round(y + bh), round(x) : round(x + bw)] = True
    if not mask.any():
        raise PipelineError(f"{where}: empty mask")
    return {
        "category_id": category_id,
        "bbox": list(bbox),
        "area": int(mask.sum()),
        "segmentation": encode_rle(mask),
        "iscrowd": 0,
    }


def _segmentation_mask(seg, size_hw: tuple[int, int], where: str) -> np.ndarray | None:
    """``HxW`` bool mask of an RLE (compressed or not) or polygon list; None when there is none."""
    from pycocotools import mask as mask_utils

    from pipeline.data.instances import decode_rle

    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return None
    try:
        if isinstance(seg, dict):
            if list(seg.get("size", [])) != list(size_hw):
                raise PipelineError(f"{where}: segmentation size {seg.get('size')} (expected {list(size_hw)})")
            return decode_rle(seg)
        if isinstance(seg, list) and all(isinstance(p, list) and len(p) >= 6 for p in seg):
            return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, *size_hw))).astype(bool)
    except PipelineError:
        raise
    except Exception as exc:  # pycocotools raises bare errors for bad counts
        raise PipelineError(f"{where}: segmentation does not decode ({exc})") from None
    raise PipelineError(f"{where}: segmentation is neither RLE nor polygons of at least 3 points")


def _label(img: dict, anns: list[dict], categories: list[dict], classes: list[str], where: str) -> str:
    """``good`` for no annotations, else the defect type of the largest annotation's class (the
    image's ``defect_type`` picks one when the class merges several)."""
    if not anns:
        return GOOD
    cat = next(c for c in categories if c["id"] == max(anns, key=lambda a: a["area"])["category_id"])
    types = [t for t in cat.get("defect_types") or [cat["name"]] if t in classes]
    if img.get("defect_type") in types:
        return img["defect_type"]
    if len(types) == 1:
        return types[0]
    raise PipelineError(
        f"{where}: class {cat['name']!r} holds defect types {types}; set the image's defect_type to one of them"
    )


def _match_parent(
    items: list[ReviewedImage], manifest: dict, root: Path, *, replace_labels: bool, reviewed: Path
) -> dict[str, ReviewedImage]:
    """Reviewed images whose content (SHA-256) the parent holds: ``{parent manifest path: item}`` for
    those whose labels replace the parent's; PipelineError for the refused ones."""
    where_of = {sha256_file(root / rel): (rel, "train_good") for rel in manifest.get("train_good", [])}
    for split in SPLITS:
        for e in manifest["splits"][split]:
            where_of[sha256_file(root / e["image"])] = (e["image"], split)
    replaced, seen = {}, {}
    for item in items:
        if item.sha256 in seen:
            raise PipelineError(f"{reviewed}: {item.file_name} and {seen[item.sha256]} are the same image (same bytes)")
        seen[item.sha256] = item.file_name
        if item.sha256 not in where_of:
            continue
        rel, split = where_of[item.sha256]
        what = f"{reviewed}: {item.file_name} is the parent's {split} image {rel}"
        if split == "train_good":
            raise PipelineError(f"{what} (not in a split: its labels cannot be replaced)")
        if not replace_labels:
            if split == "test":
                raise PipelineError(f"{what}: test images can never be added to train")
            raise PipelineError(f"{what} (same content); pass --replace-labels to replace its labels")
        replaced[rel] = item
    return replaced


@dataclass
class _Plan:
    """What the new version writes besides convert-masks' files, and where its labels come from."""

    manifest: dict
    labels: dict[str, ReviewedImage] = field(default_factory=dict)  # manifest path -> reviewed labels
    held: dict[Path, Path] = field(default_factory=dict)  # held copy (absolute) -> source image
    masks: dict[Path, np.ndarray] = field(default_factory=dict)  # mask file (absolute) -> HxW bool


def _plan(manifest: dict, items: list[ReviewedImage], replaced: dict, out: Path, *, to: str) -> _Plan:
    """The new manifest (parent entries kept, labels of replaced ones updated, new ones appended to
    ``to`` and listed in ``added``), the held copies and the mask files."""
    import copy

    root = Path(manifest["root"])
    plan = _Plan(copy.deepcopy(manifest))
    for split in SPLITS:
        for e in plan.manifest["splits"][split]:
            item = replaced.get(e["image"])
            if item is not None:
                mask = out / "masks" / "replaced" / Path(e["image"]).with_name(f"{Path(e['image']).stem}_mask.png")
                e["label"], e["mask"] = item.label, None if item.label == GOOD else _rel(mask, root)
                plan.labels[e["image"]] = item
                plan.masks.update({} if item.label == GOOD else {mask: item.mask})
    added = []
    for item in items:
        if any(item is r for r in replaced.values()):
            continue
        held = out / "images" / "reviewed" / item.file_name
        mask = out / "masks" / "reviewed" / Path(item.file_name).with_name(f"{Path(item.file_name).stem}_mask.png")
        rel = _rel(held, root)
        entry = {"image": rel, "mask": None if item.label == GOOD else _rel(mask, root), "label": item.label}
        plan.manifest["splits"][to].append(entry)
        plan.labels[rel], plan.held[held] = item, item.path
        plan.masks.update({} if item.label == GOOD else {mask: item.mask})
        added.append(rel)
    plan.manifest["added"] = list(manifest.get("added", [])) + added
    return plan


def _rel(path: Path, root: Path) -> str:
    """``path`` relative to the category root, POSIX (``..`` where it lies outside)."""
    return Path(os.path.relpath(path, root)).as_posix()


def _hold(src: Path, dst: Path) -> None:
    """A hard link to ``src`` at ``dst`` where the file system allows, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_mask(path: Path, mask: np.ndarray) -> None:
    """An ``HxW`` bool mask as an 8-bit 0/255 PNG (the MVTec convention)."""
    import cv2

    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    if not ok:
        raise PipelineError(f"{path}: could not encode the mask as PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.tobytes())


def _build_splits(plan: _Plan, parent_manifest: dict, cocos: dict[str, dict], reviewed: Path) -> dict:
    """COCO, YOLO and SAM content of every split of the new version (convert-masks' writers): parent
    images with the parent's annotations, reviewed ones with theirs (ids after the parent's)."""
    from pipeline.data.convert import SplitFiles, add_image, yolo_name

    manifest, root = plan.manifest, Path(plan.manifest["root"])
    ids = image_ids(manifest)
    categories = cocos["train"]["categories"]
    names = [c["name"] for c in categories]
    parent_label = {e["image"]: e["label"] for s in SPLITS for e in parent_manifest["splits"][s]}
    parent_anns: dict[str, list[dict]] = {}
    ann_id = 0
    for coco in cocos.values():
        name_of = {img["id"]: img["file_name"] for img in coco["images"]}
        for a in coco["annotations"]:
            parent_anns.setdefault(name_of[a["image_id"]], []).append(a)
            ann_id = max(ann_id, int(a["id"]))
    sizes = {img["file_name"]: (img["height"], img["width"]) for coco in cocos.values() for img in coco["images"]}
    built = {}
    for split in SPLITS:
        info = dict(cocos[split].get("info") or {}, split=split, image_root=str(root))
        info["description"] = f"{info.get('description', split)}; dataset version with {reviewed.name}"
        files = SplitFiles(coco={"info": info, "images": [], "annotations": [], "categories": categories})
        for e in manifest["splits"][split]:
            rel, item = e["image"], plan.labels.get(e["image"])
            image = Path(os.path.normpath(root / rel))
            if item is None:
                anns = [dict(a, image_id=ids[rel]) for a in parent_anns.get(rel, [])]
            else:
                anns = []
                for a in item.annotations:
                    ann_id += 1
                    anns.append({"id": ann_id, "image_id": ids[rel], **a})
            if rel in parent_label:
                stem = yolo_name(Sample(image, None, parent_label[rel]))
            else:
                stem = "reviewed_" + "_".join(Path(item.file_name).with_suffix("").parts)
            if f"{stem}{image.suffix}" in files.links:
                raise PipelineError(f"{reviewed}: {rel} and another image share the YOLO name {stem} (rename one)")
            add_image(
                files,
                image=image,
                file_name=rel,
                img_id=ids[rel],
                size_hw=item.size_hw if item is not None else sizes[rel],
                defect_type=e["label"],
                yolo_stem=stem,
                annotations=anns,
                names=names,
                source=reviewed if item is not None else f"parent annotation of {rel}",
            )
        built[split] = files
    return built


def _counts(items: list[ReviewedImage], categories: list[dict]) -> dict:
    """Images, negatives and instances per class among ``items``."""
    per_class = {c["name"]: 0 for c in categories}
    name_of = {c["id"]: c["name"] for c in categories}
    for item in items:
        for a in item.annotations:
            per_class[name_of[a["category_id"]]] += 1
    return {
        "images": len(items),
        "negatives": sum(not item.annotations for item in items),
        "instances_per_class": per_class,
    }


def _write_dataset_yaml(out: Path, parent: Path, reviewed: Path, summary: VersionSummary) -> None:
    import yaml

    doc = {
        "kind": "dataset-version",
        "parent": str(parent.resolve()),
        "reviewed": str(reviewed.resolve()),
        "reviewed_sha256": sha256_file(reviewed),
        "to": summary.to,
        "added": summary.added,
        "replaced": summary.replaced,
        "images": summary.images,
    }
    atomic_write_text(out / "dataset.yaml", yaml.safe_dump(doc, sort_keys=False))
