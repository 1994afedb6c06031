"""Reviewed labels back to COCO: a Label Studio JSON export -> COCO ground truth in convert-masks' conventions.

Reads the export (Label Studio's Export > JSON: tasks with ``data`` and ``annotations``) and the project's
labeling config; writes COCO ground truth (Lin et al., ECCV 2014) whose ``info.image_root`` is the
category folder, so the reviewed labels go straight back to training and evaluation. Results in percent
(``rectanglelabels`` ``x, y, width, height``; ``polygonlabels`` ``points``) become integer pixels;
brush masks are decoded with :mod:`pipeline.review.brush`.

Region ids as :mod:`pipeline.review.export` writes them: one predicted object is ``R`` (10 hex digits)
for its rectangle, ``R_brush`` for its mask and ``R_poly<k>`` for its polygons; :func:`task_regions`
uses them to put a region's box and mask back into one COCO annotation.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.mvtec import GOOD
from pipeline.review.labeling_config import IMAGE_TAG, config_class_names, validate_tasks

_REGION_ID = re.compile(r"^(?P<stem>[0-9a-f]{10})(?:_brush|_poly\d+)?(?:#.*)?$")  # the editor may add "#<annotation>"


def _pick_annotation(task: dict) -> dict | None:
    """The task's review: its latest submitted annotation (ground-truth-marked ones first); None if none."""
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not anns:
        return None
    return max(anns, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""), a.get("id") or 0))


def _result_size_hw(r: dict, size_hw: tuple[int, int], source: str) -> tuple[int, int]:
    h, w = int(r.get("original_height") or size_hw[0]), int(r.get("original_width") or size_hw[1])
    if (h, w) != tuple(size_hw):
        raise PipelineError(
            f"{source}: result {r.get('id')!r} is for a {w}x{h} image, the task's image is {size_hw[1]}x{size_hw[0]}"
        )
    return h, w


def rect_to_bbox_xywh(value: dict, *, size_hw: tuple[int, int]) -> list[int]:
    """A rectangle's percent ``x, y, width, height`` -> integer pixel ``[x, y, w, h]`` (edges rounded),
    clipped to the image. Rotated rectangles are refused (PipelineError)."""
    h, w = size_hw
    if abs(float(value.get("rotation", 0) or 0)) > 1e-6:
        raise PipelineError(f"rotated rectangle (rotation {value['rotation']}): expected axis-aligned boxes")
    x0 = min(max(round(float(value["x"]) * w / 100), 0), w)
    y0 = min(max(round(float(value["y"]) * h / 100), 0), h)
    x1 = min(max(round((float(value["x"]) + float(value["width"])) * w / 100), 0), w)
    y1 = min(max(round((float(value["y"]) + float(value["height"])) * h / 100), 0), h)
    return [x0, y0, x1 - x0, y1 - y0]


def polygon_to_mask(points_pct, *, size_hw: tuple[int, int]) -> np.ndarray:
    """Fill a polygon given in percent ``[[x, y], ...]`` into an ``HxW`` bool mask (vertices rounded to
    pixels; OpenCV ``fillPoly``, boundary pixels included)."""
    import cv2

    h, w = size_hw
    pts = np.array([[round(float(x) * w / 100), round(float(y) * h / 100)] for x, y in points_pct], np.int32)
    m = np.zeros((h, w), np.uint8)
    if len(pts) >= 3:
        cv2.fillPoly(m, [pts.reshape(-1, 1, 2)], 1)
    return m.astype(bool)


def _label(r: dict, source: str) -> str:
    labels = (r.get("value") or {}).get(r["type"], [])
    if len(labels) != 1:
        raise PipelineError(f"{source}: result {r.get('id')!r} has labels {labels} (expected exactly one)")
    return labels[0]


def task_regions(results: list[dict], *, size_hw: tuple[int, int], source: str) -> list[dict]:
    """Group a review's results into regions and turn each into COCO annotations (without ids).

    Results with ids ``R``, ``R_brush``, ``R_poly<k>`` (as exported) form one region; any other result is
    its own region. Per region:

    - label: the rectangle's, else the brush's, else the polygons';
    - mask: the union of its brush masks (alpha ``>= 128``) if it has any, else of its filled polygons;
    - a rectangle with a non-empty mask -> one annotation, ``bbox`` = the rectangle (pixels, edges rounded),
      ``segmentation`` = the mask, ``area`` = its pixel count;
    - a rectangle alone -> ``bbox`` = the rectangle, ``segmentation`` = the filled rectangle;
    - a mask alone -> one annotation per 8-connected component, ``bbox`` = its tight box (as convert-masks).

    Returns:
        ``[{"label", "bbox", "area", "segmentation", "iscrowd": 0}]`` in the order regions first appear.
    """
    from pipeline.data.instances import encode_rle, mask_to_instances

    h, w = size_hw
    out = []
    for rs in _group_regions(results):
        rects = [r for r in rs if r["type"] == "rectanglelabels"]
        brushes = [r for r in rs if r["type"] == "brushlabels"]
        polys = [r for r in rs if r["type"] == "polygonlabels"]
        label = _label((rects or brushes or polys)[0], source)
        mask = _region_mask(brushes, polys, size_hw=size_hw, source=source)
        for r in rects:
            _result_size_hw(r, size_hw, source)
        if rects:
            try:
                bbox = rect_to_bbox_xywh(rects[0]["value"], size_hw=size_hw)
            except PipelineError as exc:
                raise PipelineError(f"{source}: result {rects[0].get('id')!r}: {exc}") from None
            if bbox[2] <= 0 or bbox[3] <= 0:
                continue
            if mask is None or not mask.any():
                mask = np.zeros((h, w), bool)
                mask[bbox[1] : bbox[1] + bbox[3], bbox[0] : bbox[0] + bbox[2]] = True
            out.append(
                {"label": label, "bbox": bbox, "area": int(mask.sum()), "segmentation": encode_rle(mask), "iscrowd": 0}
            )
        elif mask is not None:
            for inst in mask_to_instances(mask):
                out.append(
                    {
                        "label": label,
                        "bbox": list(inst.bbox_xywh),
                        "area": inst.area,
                        "segmentation": encode_rle(inst.mask),
                        "iscrowd": 0,
                    }
                )
    return out


def _group_regions(results: list[dict]) -> list[list[dict]]:
    """Rectangle/brush/polygon results grouped by region id stem ``R``, in first-appearance order."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("type") not in ("rectanglelabels", "brushlabels", "polygonlabels"):
            continue
        m = _REGION_ID.match(str(r.get("id", "")))
        key = m.group("stem") if m else f"own:{r.get('id')}:{len(groups)}"
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def _region_mask(brushes: list[dict], polys: list[dict], *, size_hw: tuple[int, int], source: str) -> np.ndarray | None:
    """``HxW`` bool union of a region's brush masks (alpha ``>= 128``), else of its polygons; None if neither."""
    from pipeline.review.brush import brush_decode

    if not (brushes or polys):
        return None
    mask = np.zeros(size_hw, bool)
    if not brushes:
        for r in polys:
            _result_size_hw(r, size_hw, source)
            mask |= polygon_to_mask((r.get("value") or {}).get("points", []), size_hw=size_hw)
        return mask
    for r in brushes:
        _result_size_hw(r, size_hw, source)
        rle = (r.get("value") or {}).get("rle", r.get("rle"))
        if not isinstance(rle, list):
            raise PipelineError(
                f"{source}: brush result {r.get('id')!r} has no 'rle' list (expected Label Studio brush RLE)"
            )
        mask |= brush_decode(rle, size_hw=size_hw, source=source) >= 128
    return mask


def _task_file_name(task: dict, i: int, source: str, document_root: Path | None, image_root: Path | None) -> str:
    data = task["data"]
    if data.get("file_name"):
        return str(data["file_name"])
    url = str(data.get(IMAGE_TAG, ""))
    d = parse_qs(urlparse(url).query).get("d")
    if d and document_root is not None and image_root is not None:
        try:
            return (Path(document_root) / d[0]).resolve().relative_to(Path(image_root).resolve()).as_posix()
        except ValueError:
            pass
    raise PipelineError(
        f"{source}: task {i} has no data.file_name and its image URL {url!r} is not under the image root"
    )


def tasks_to_coco(
    tasks: list,
    config_xml: str,
    *,
    image_root: Path | None = None,
    source: str = "export",
    document_root: Path | None = None,
) -> tuple[dict, int]:
    """COCO ground truth from a Label Studio JSON export of reviewed tasks.

    Each task's review is its latest submitted (not cancelled) annotation; tasks without one are left
    out. Categories are the config's labels in order (ids from 1); images keep ``data.image_id`` when
    every task has a distinct one (else ids 1..N in export order), ``file_name`` from ``data.file_name``
    (relative to ``image_root``), and ``defect_type`` spelled as ``convert-masks`` spells it: ``"good"`` for
    images without regions, else a defect type (folder name, e.g. ``broken_large``) of the largest region's
    class (:func:`image_defect_type`). Categories carry ``defect_types`` like convert's
    (:func:`class_defect_types`). Annotations: see :func:`task_regions`; ids from 1, ``iscrowd`` 0.

    Args:
        tasks: the export (a JSON list of tasks with ``data`` and ``annotations``).
        config_xml: the project's labeling config (``labeling_config.xml`` written by the export).
        image_root: category root for ``info.image_root``; default: the tasks' ``data.image_root``.

    Returns:
        ``(coco, n_unreviewed)``.

    Raises:
        PipelineError: not a task list, results naming tags/labels not in the config (an export of a
            project with another config), missing image sizes or file names, undecodable masks.
    """
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise PipelineError(
            f"{source}: not a Label Studio JSON export (expected a list of tasks with data and annotations)"
        )
    validate_tasks(tasks, config_xml, source=source, groups=("annotations",))
    names = config_class_names(config_xml, source=source)
    if not names:
        raise PipelineError(f"{source}: the labeling config has no labels")
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    types_of = class_defect_types(tasks, names)
    image_root = Path(image_root) if image_root is not None else _tasks_image_root(tasks, source)
    reviewed = [(i, t, a) for i, t in enumerate(tasks) if (a := _pick_annotation(t)) is not None]
    ids = [t["data"].get("image_id") for _, t, _ in reviewed]
    keep_ids = all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids)
    images, annotations = [], []
    for k, (i, task, ann) in enumerate(reviewed):
        results = ann.get("result") or []
        file_name = _task_file_name(task, i, source, document_root, image_root)
        size_hw = _task_size_hw(task["data"], results, image_root / file_name)
        img_id = int(task["data"]["image_id"]) if keep_ids else k + 1
        regions = task_regions(results, size_hw=size_hw, source=f"{source}: task {i}")
        defect_type = image_defect_type(regions, types_of, original=task["data"].get("defect_type"))
        images.append(
            {
                "id": img_id,
                "file_name": file_name,
                "width": size_hw[1],
                "height": size_hw[0],
                "defect_type": defect_type,
            }
        )
        for reg in regions:
            annotations.append({"id": 0, "image_id": img_id, "category_id": cat_id[reg.pop("label")], **reg})
    images, annotations = _in_image_order(images, annotations)
    coco = {
        "info": {
            "description": f"Label Studio review import of {Path(source).name}",
            "image_root": str(image_root.resolve()),
            "source": str(source),
        },
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": cat_id[n], "name": n, "supercategory": "defect", "defect_types": types_of[n]} for n in names
        ],
    }
    return coco, len(tasks) - len(reviewed)


def class_defect_types(tasks: list[dict], names: list[str]) -> dict[str, list[str]]:
    """Class name -> its defect types (MVTec folder names), as ``convert-masks`` wrote them in the COCO
    categories' ``defect_types``: read from the tasks' ``data.class_defect_types`` (written by
    ``export labelstudio``). A class without an entry (tasks made elsewhere, a label added in Label Studio)
    gets convert's default naming inverted: ``broken large`` -> ``[broken_large]``."""
    known: dict[str, list[str]] = {}
    for t in tasks:
        for name, types in (t["data"].get("class_defect_types") or {}).items():
            if isinstance(types, list) and types:
                known.setdefault(str(name), [str(x) for x in types])
    return {n: known.get(n) or [n.replace(" ", "_")] for n in names}


def image_defect_type(regions: list[dict], types_of: dict[str, list[str]], *, original: str | None = None) -> str:
    """An image's ``defect_type`` in convert's spelling: ``good`` without regions; else a defect type of the
    largest region's class: the image's ``original`` one when the class has it (classes merged by
    ``convert-masks --rename`` hold several types), else the class's first (sorted) type."""
    if not regions:
        return GOOD
    types = types_of[max(regions, key=lambda r: r["area"])["label"]]
    return original if original in types else types[0]


def _tasks_image_root(tasks: list[dict], source: str) -> Path:
    """The one ``data.image_root`` the tasks share (the category folder), else PipelineError."""
    roots = {t["data"].get("image_root") for t in tasks} - {None, ""}
    if len(roots) != 1:
        raise PipelineError(
            f"{source}: cannot tell the image root from the tasks ({len(roots)} different); pass --image-root"
        )
    return Path(roots.pop())


def _task_size_hw(data: dict, results: list[dict], image_path: Path) -> tuple[int, int]:
    """The task image's ``(H, W)``: from the task data, else from a result's original size, else the file."""
    h, w = data.get("height"), data.get("width")
    if not (h and w):
        sized = [r for r in results if r.get("original_height") and r.get("original_width")]
        if sized:
            h, w = sized[0]["original_height"], sized[0]["original_width"]
        else:
            from pipeline.core.io import image_size_hw

            h, w = image_size_hw(image_path)
    return int(h), int(w)


def _in_image_order(images: list[dict], annotations: list[dict]) -> tuple[list[dict], list[dict]]:
    """Images sorted by id, annotations by their image (region order kept within one), annotation ids from 1."""
    images = sorted(images, key=lambda img: img["id"])
    rank = {img["id"]: j for j, img in enumerate(images)}
    annotations = sorted(annotations, key=lambda a: rank[a["image_id"]])  # stable
    for n, a in enumerate(annotations, 1):
        a["id"] = n
    return images, annotations


def import_export(
    export_path: Path, *, config_path: Path, out_path: Path, image_root: Path | None = None, force: bool = False
) -> dict:
    """Read a Label Studio JSON export and write COCO ground truth (see :func:`tasks_to_coco`) atomically.

    Returns:
        ``{"out", "n_images", "n_annotations", "n_unreviewed"}``.

    Raises:
        PipelineError: bad inputs (see :func:`tasks_to_coco`), an existing ``out_path`` without ``force``.
    """
    from pipeline.core.io import atomic_write_json, check_can_write, read_json

    out_path = Path(out_path)
    check_can_write(out_path, force=force)
    config_path = Path(config_path)
    if not config_path.is_file():
        raise PipelineError(f"{config_path}: file not found (expected the labeling config XML)")
    tasks = read_json(export_path)
    coco, n_unreviewed = tasks_to_coco(
        tasks, config_path.read_text(encoding="utf-8"), image_root=image_root, source=str(export_path)
    )
    atomic_write_json(out_path, coco, indent=None)
    return {
        "out": out_path.resolve(),
        "n_images": len(coco["images"]),
        "n_annotations": len(coco["annotations"]),
        "n_unreviewed": n_unreviewed,
    }
