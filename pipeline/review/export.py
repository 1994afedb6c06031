"""Label Studio review: predictions as pre-annotations, a review queue, and reviewed labels back to COCO.

Formats: Label Studio tasks and predictions (https://labelstud.io/guide/task_format,
https://labelstud.io/guide/predictions), its JSON export, and COCO ground truth as ``convert-masks``
writes it. Conventions of Label Studio results:

- ``rectanglelabels``: ``x``, ``y`` (top-left), ``width``, ``height`` in percent (0-100) of the
  original image size.
- ``brushlabels``: ``{"format": "rle", "rle": [...]}``, Label Studio's own RLE over an ``H x W x 4``
  RGBA buffer (not COCO RLE), made by ``label_studio_sdk``'s brush converter from ``H x W`` uint8
  masks with values 0/255 (see :mod:`pipeline.review.client`).
- ``polygonlabels``: ``points`` ``[[x, y], ...]`` in percent.

Local images are referenced as ``/data/local-files/?d=<path relative to the document root>``
(Label Studio's local file serving).

Exported result ids: one region (one predicted object) gets a 10-hex-digit id ``R`` for its rectangle,
``R_brush`` for its mask and ``R_poly<k>`` for its polygons; :func:`tasks_to_coco` uses these ids to
put a region's box and mask back into one COCO annotation.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, quote, urlparse
from xml.etree import ElementTree as ET

import numpy as np

from pipeline.core.errors import PipelineError

IMAGE_TAG = "image"
RECT_TAG = "label"
BRUSH_TAG = "brush"
POLY_TAG = "polygon"
REASON_FIELD = "review_reason"
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324")
RESULT_KEYS = {"RectangleLabels": "rectanglelabels", "BrushLabels": "brushlabels", "PolygonLabels": "polygonlabels"}
ORDERS = ("image", "uncertainty")
_REGION_ID = re.compile(r"^(?P<stem>[0-9a-f]{10})(?:_brush|_poly\d+)?(?:#.*)?$")  # the editor may add "#<annotation>"


# ----------------------------------------------------------------------------- labeling config


def labeling_config(class_names: list[str], *, brush: bool = False, polygons: bool = False, reason: bool = False) -> str:
    """Label Studio labeling config XML: one image, rectangle labels and optionally brush/polygon labels.

    Args:
        class_names: label values, in category-id order (COCO id = index + 1).
        brush: add ``<BrushLabels name="brush">`` with the same labels.
        polygons: add ``<PolygonLabels name="polygon">`` with the same labels.
        reason: show the task's ``$review_reason`` (why it is in the review queue) above the image.
    """
    view = ET.Element("View")
    if reason:
        ET.SubElement(view, "Header", value=f"${REASON_FIELD}", size="5")
    ET.SubElement(view, "Image", name=IMAGE_TAG, value=f"${IMAGE_TAG}", zoom="true")
    controls = [("RectangleLabels", RECT_TAG)]
    if brush:
        controls.append(("BrushLabels", BRUSH_TAG))
    if polygons:
        controls.append(("PolygonLabels", POLY_TAG))
    for tag, name in controls:
        el = ET.SubElement(view, tag, name=name, toName=IMAGE_TAG)
        for i, n in enumerate(class_names):
            ET.SubElement(el, "Label", value=n, background=PALETTE[i % len(PALETTE)])
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


@dataclass(frozen=True)
class Control:
    """One labeling control of a config: its result type, image tag and label values (config order)."""

    kind: str  # "rectanglelabels" | "brushlabels" | "polygonlabels" | other "<tag>labels"
    to_name: str
    labels: tuple[str, ...]


def config_controls(config_xml: str, *, source: str = "labeling config") -> dict[str, Control]:
    """Control tags of a config (``*Labels`` elements): ``{name: Control}``, in document order.

    Raises:
        PipelineError: the config is not valid XML.
    """
    try:
        root = ET.fromstring(config_xml)
    except ET.ParseError as exc:
        raise PipelineError(f"{source}: labeling config is not valid XML ({exc})") from None
    out = {}
    for el in root.iter():
        if el.tag.endswith("Labels") and "name" in el.attrib:
            out[el.attrib["name"]] = Control(RESULT_KEYS.get(el.tag, el.tag.lower()), el.attrib.get("toName", ""),
                                             tuple(l.attrib["value"] for l in el.iter("Label")))
    return out


def config_labels(config_xml: str) -> dict[str, tuple[str, set[str]]]:
    """Control tags of a config: ``{from_name: (to_name, {label values})}``."""
    return {k: (c.to_name, set(c.labels)) for k, c in config_controls(config_xml).items()}


def config_class_names(config_xml: str, *, source: str = "labeling config") -> list[str]:
    """Class names of a config: the label values of its controls, first appearance first."""
    names: list[str] = []
    for c in config_controls(config_xml, source=source).values():
        names += [n for n in c.labels if n not in names]
    return names


def validate_tasks(tasks: list[dict], config_xml: str, *, source: str = "tasks",
                   groups: tuple[str, ...] = ("predictions", "annotations")) -> None:
    """Check every result's tag names, type and labels exist in the config and result ids are unique.

    Ids must be unique within each prediction or annotation (Label Studio copies a prediction's ids
    into the annotation made from it, so the same id may appear once in each).

    Raises:
        PipelineError: one line naming ``source``, the first offending task and result.
    """
    controls = config_controls(config_xml, source=source)
    for t, task in enumerate(tasks):
        for group in groups:
            for pred in task.get(group) or []:
                seen: set[str] = set()
                for r in pred.get("result") or []:
                    if r.get("type") == "relation":
                        continue
                    rid = r.get("id")
                    if rid in seen:
                        raise PipelineError(f"{source}: task {t} result id {rid!r} is not unique")
                    seen.add(rid)
                    if r.get("from_name") not in controls:
                        raise PipelineError(f"{source}: task {t} from_name {r.get('from_name')!r} not in the config {sorted(controls)}")
                    ctl = controls[r["from_name"]]
                    if r.get("to_name") != ctl.to_name:
                        raise PipelineError(f"{source}: task {t} to_name {r.get('to_name')!r} (config expects {ctl.to_name!r})")
                    if r.get("type") != ctl.kind:
                        raise PipelineError(f"{source}: task {t} result type {r.get('type')!r} for {r['from_name']!r} (config expects {ctl.kind!r})")
                    for label in (r.get("value") or {}).get(ctl.kind, []):
                        if label not in ctl.labels:
                            raise PipelineError(f"{source}: task {t} label {label!r} not in the config {sorted(ctl.labels)}")


# ----------------------------------------------------------------------------- results


def image_url(path: Path, *, document_root: Path | None = None, url_prefix: str | None = None, rel: str | None = None) -> str:
    """URL Label Studio uses for an image.

    With ``url_prefix``: ``url_prefix + rel`` (``rel`` = path relative to the category root). Otherwise
    ``/data/local-files/?d=<path relative to document_root>`` with forward slashes.

    Raises:
        PipelineError: the image is not under ``document_root``.
    """
    if url_prefix:
        return url_prefix.rstrip("/") + "/" + quote((rel or Path(path).name).replace(os.sep, "/"))
    root = Path(document_root).resolve()
    p = Path(path).resolve()
    try:
        r = p.relative_to(root)
    except ValueError:
        raise PipelineError(f"{p}: not under the document root {root} (pass --document-root or --url-prefix)") from None
    return "/data/local-files/?d=" + quote(r.as_posix())


def _result_id(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]


def _base_result(*, rid: str, kind: str, from_name: str, size_hw: tuple[int, int], score: float | None) -> dict:
    h, w = size_hw
    r = {"id": rid, "type": kind, "from_name": from_name, "to_name": IMAGE_TAG,
         "original_width": int(w), "original_height": int(h), "image_rotation": 0}
    if score is not None:
        r["score"] = float(score)
    return r


def rectangle_result(*, bbox_xywh, label: str, size_hw: tuple[int, int], score: float | None, rid: str) -> dict:
    """One ``rectanglelabels`` result; ``bbox_xywh`` in pixels -> ``x, y, width, height`` in percent."""
    h, w = size_hw
    x, y, bw, bh = (float(v) for v in bbox_xywh)
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
    r = _base_result(rid=rid, kind="rectanglelabels", from_name=RECT_TAG, size_hw=size_hw, score=None)
    r["value"] = {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                  "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]}
    if score is not None:
        r["score"] = float(score)
    return r


def brush_result(*, mask: np.ndarray, label: str, score: float | None, rid: str) -> dict:
    """One ``brushlabels`` result from an ``HxW`` mask (pixels ``> 0`` are the region) at the original size.

    The mask is encoded as uint8 0/255 with ``label_studio_sdk``'s brush converter (a 0/1 mask would
    import as nearly transparent strokes).
    """
    from pipeline.review.client import brush_encode

    r = _base_result(rid=rid, kind="brushlabels", from_name=BRUSH_TAG, size_hw=mask.shape, score=score)
    r["value"] = {"format": "rle", "rle": brush_encode(mask), "brushlabels": [label]}
    return r


def polygon_results(*, mask: np.ndarray, label: str, score: float | None, rid: str) -> list[dict]:
    """``polygonlabels`` results, one per outer contour of an ``HxW`` mask; points in percent.

    Lossy (holes dropped; see :func:`pipeline.data.instances.mask_to_polygons`). Result ids ``rid_poly<k>``.
    """
    from pipeline.data.instances import mask_to_polygons

    h, w = mask.shape
    out = []
    for k, poly in enumerate(mask_to_polygons(mask)):
        pts = np.asarray(poly, float).reshape(-1, 2)
        r = _base_result(rid=f"{rid}_poly{k}", kind="polygonlabels", from_name=POLY_TAG, size_hw=(h, w), score=score)
        r["value"] = {"points": [[100 * x / w, 100 * y / h] for x, y in pts], "closed": True, "polygonlabels": [label]}
        out.append(r)
    return out


def region_results(*, bbox_xywh, mask: np.ndarray | None, label: str, size_hw: tuple[int, int], score: float | None,
                   rid: str, polygons: bool = False) -> list[dict]:
    """A predicted object as results: its rectangle (id ``rid``), its brush mask (``rid_brush``) when it
    has a mask, and its polygons (``rid_poly<k>``) when ``polygons``."""
    out = [rectangle_result(bbox_xywh=bbox_xywh, label=label, size_hw=size_hw, score=score, rid=rid)]
    if mask is not None:
        if mask.shape != tuple(size_hw):
            raise PipelineError(f"prediction mask {mask.shape[1]}x{mask.shape[0]} is not at the image size {size_hw[1]}x{size_hw[0]}")
        out.append(brush_result(mask=mask, label=label, score=score, rid=f"{rid}_brush"))
        if polygons:
            out += polygon_results(mask=mask, label=label, score=score, rid=rid)
    return out


# ----------------------------------------------------------------------------- prediction sources, review queue


@dataclass
class Source:
    """One prediction file.

    Attributes:
        name: model version shown in Label Studio (detections) and in review reasons.
        kind: ``"detections"`` (COCO results), ``"classification"`` or ``"anomaly"``.
        by_image: image id -> that image's entries (COCO results, or the file's prediction records).
        threshold: anomaly decision threshold (``kind == "anomaly"``).
        scale: anomaly score scale (population standard deviation of the file's scores, 1 when 0).
    """

    name: str
    kind: str
    by_image: dict[int, list[dict]] = field(default_factory=dict)
    threshold: float | None = None
    scale: float = 1.0


def read_sources(paths: list[Path], coco, *, model_version: str = "pipeline") -> list[Source]:
    """Read prediction files, dispatching on shape (see ``pipeline evaluate``), matched to the ground truth.

    COCO results files become ``detections`` sources named ``model_version`` (one file) or
    ``model_version/<file stem>`` (several). Classifier/anomaly records are matched by ``image_id``,
    else by ``image`` (path relative to the category root) against the images' ``file_name``.

    Raises:
        PipelineError: unreadable files, unknown shapes, images or categories not in the ground truth.
    """
    from pipeline.data.coco import check_results
    from pipeline.core.io import read_json

    paths = [Path(p) for p in paths]
    n_det = 0
    loaded = []
    for p in paths:
        data = read_json(p)
        if isinstance(data, list):
            check_results(data, coco, p)
            for i, r in enumerate(data):
                if "bbox" not in r:
                    raise PipelineError(f"{p}: result {i} has no bbox (expected COCO results with [x, y, w, h])")
            n_det += 1
        elif not (isinstance(data, dict) and data.get("kind") in ("classification", "anomaly")
                  and isinstance(data.get("predictions"), list)):
            raise PipelineError(f"{p}: not a prediction file (expected a COCO results list or an object with "
                                f"kind classification/anomaly and predictions)")
        loaded.append((p, data))
    by_file = {img["file_name"]: img["id"] for img in coco.dataset["images"]}
    img_ids = set(coco.getImgIds())
    sources, names = [], set()
    for p, data in loaded:
        if isinstance(data, list):
            name = model_version if n_det == 1 else f"{model_version}/{p.stem}"
            kind = "detections"
        else:
            kind = data["kind"]
            name = str(data.get("model") or p.stem)
        base, k = name, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.add(name)
        src = Source(name=name, kind=kind)
        if kind == "detections":
            for r in data:
                src.by_image.setdefault(r["image_id"], []).append(r)
        else:
            for i, rec in enumerate(data["predictions"]):
                if not isinstance(rec, dict):
                    raise PipelineError(f"{p}: prediction {i} is not an object")
                img_id = rec.get("image_id")
                if img_id not in img_ids:
                    img_id = by_file.get(str(rec.get("image", "")).replace(os.sep, "/"))
                if img_id is None:
                    raise PipelineError(f"{p}: prediction {i} (image {rec.get('image')!r}, image_id "
                                        f"{rec.get('image_id')!r}) is not an image of the ground truth")
                if kind == "classification" and not isinstance(rec.get("scores"), dict):
                    raise PipelineError(f"{p}: prediction {i} lacks scores {{class: probability}}")
                if kind == "anomaly" and not isinstance(rec.get("score"), (int, float)):
                    raise PipelineError(f"{p}: prediction {i} lacks a numeric score")
                src.by_image.setdefault(img_id, []).append(rec)
            if kind == "anomaly":
                if not isinstance(data.get("threshold"), (int, float)):
                    raise PipelineError(f"{p}: anomaly predictions lack a numeric threshold")
                src.threshold = float(data["threshold"])
                scores = np.array([float(r["score"]) for r in data["predictions"]] or [0.0])
                src.scale = float(scores.std()) or 1.0
        sources.append(src)
    return sources


def score_closeness(score: float, threshold: float) -> float:
    """How close a detection score in [0, 1] is to the threshold: ``1 - |s - t| / max(t, 1 - t)``.

    1 at the threshold, 0 at the farther end of [0, 1]; linear in between.
    """
    return float(max(0.0, 1.0 - abs(score - threshold) / max(threshold, 1.0 - threshold, 1e-9)))


def image_uncertainty(image_id: int, sources: list[Source], *, threshold: float, names: dict[int, str]) -> tuple[float, str]:
    """Review priority of one image in [0, 1] (1 = review first) and the reason, in words.

    uncertainty = max(disagreement, the per-source terms):

    - detections (COCO results): ``score_closeness(s, threshold)`` of its most uncertain result on the
      image (0 when it has none), ``threshold`` being the export's ``--min-score``;
    - classifier: ``1 - (p1 - p2)``, one minus the margin between its two highest class probabilities;
    - anomaly: ``exp(-|s - t| / sigma)``, ``t`` the file's threshold, ``sigma`` the standard deviation of
      the file's scores (1 at the threshold, 0.37 one sigma away);
    - disagreement: each source gives a verdict, defect (a detection ``>= threshold``; a classifier label
      other than ``good``; an anomaly score ``>= t``) or good; 1.0 when some say defect and others good,
      0.5 when all say defect but name different classes, else 0.

    The reason lists the terms of at least 0.5, largest first (only the largest when none is), e.g.
    ``"sources disagree: det=defect (scratch 0.81), patchcore=good (0.42 < 0.55)"``.
    """
    terms: list[tuple[float, str]] = []
    verdicts: list[tuple[str, bool, str | None, str]] = []  # (source, defect?, class, short text)
    for src in sources:
        recs = src.by_image.get(image_id, [])
        if src.kind == "detections":
            if recs:
                worst = max(recs, key=lambda r: score_closeness(float(r["score"]), threshold))
                u = score_closeness(float(worst["score"]), threshold)
                terms.append((u, f"{src.name}: {names.get(worst['category_id'], '?')} score {worst['score']:.2f} "
                                 f"near threshold {threshold:.2f}"))
            top = max(recs, key=lambda r: r["score"], default=None)
            is_defect = top is not None and top["score"] >= threshold
            cls = names.get(top["category_id"]) if is_defect else None
            text = f"{src.name}=defect ({cls} {top['score']:.2f})" if is_defect else f"{src.name}=good"
            verdicts.append((src.name, is_defect, cls, text))
        elif src.kind == "classification" and recs:
            probs = sorted(((float(v), k) for k, v in recs[0]["scores"].items()), reverse=True)
            p1, c1 = probs[0] if probs else (0.0, "?")
            p2, c2 = probs[1] if len(probs) > 1 else (0.0, "-")
            terms.append((1.0 - (p1 - p2), f"{src.name}: {c1} {p1:.2f} vs {c2} {p2:.2f}"))
            label = str(recs[0].get("label", c1))
            is_defect = label != "good"
            verdicts.append((src.name, is_defect, label if is_defect else None, f"{src.name}={label} ({p1:.2f})"))
        elif src.kind == "anomaly" and recs:
            s, t = float(recs[0]["score"]), float(src.threshold)
            terms.append((math.exp(-abs(s - t) / src.scale), f"{src.name}: anomaly score {s:.3g} near threshold {t:.3g}"))
            is_defect = s >= t
            verdicts.append((src.name, is_defect, None,
                             f"{src.name}={'defect' if is_defect else 'good'} ({s:.3g} {'>=' if is_defect else '<'} {t:.3g})"))
    if len(verdicts) > 1:
        defects = {v[1] for v in verdicts}
        classes = {v[2] for v in verdicts if v[2] is not None}
        if len(defects) > 1:
            terms.append((1.0, "sources disagree: " + ", ".join(v[3] for v in verdicts)))
        elif defects == {True} and len(classes) > 1:
            terms.append((0.5, "sources disagree on the class: " + ", ".join(v[3] for v in verdicts)))
    if not terms:
        return 0.0, "no predictions"
    terms.sort(key=lambda t: -t[0])
    shown = [t for t in terms if t[0] >= 0.5] or terms[:1]
    return float(terms[0][0]), "; ".join(t[1] for t in shown)


# ----------------------------------------------------------------------------- tasks


def _segmentation_mask(seg, *, size_hw: tuple[int, int]) -> np.ndarray:
    """``HxW`` bool mask of a COCO ``segmentation``: RLE (compressed or not) or a list of polygons."""
    from pipeline.data.instances import decode_rle

    h, w = size_hw
    if isinstance(seg, list):
        from pycocotools import mask as mask_utils

        polys = [p for p in seg if isinstance(p, list) and len(p) >= 6]
        if not polys:
            return np.zeros((h, w), bool)
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, h, w))).astype(bool)
    try:
        return decode_rle(seg)
    except (KeyError, TypeError, ValueError) as exc:
        raise PipelineError(f"prediction segmentation is not COCO RLE or polygons ({type(exc).__name__}: {exc})") from None


def build_tasks(
    coco_gt: dict,
    sources: list[Source],
    *,
    min_score: float = 0.25,
    document_root: Path | None = None,
    url_prefix: str | None = None,
    polygons: bool = False,
    order: str = "image",
) -> list[dict]:
    """Label Studio tasks, one per ground-truth image, with each detection source as one prediction.

    Args:
        coco_gt: COCO ground truth dict (images carry ``file_name`` relative to ``info.image_root``).
        sources: from :func:`read_sources`; detection results scoring ``>= min_score`` become regions
            (rectangle; plus brush, and polygons when ``polygons``, for results with ``segmentation``).
        min_score: display threshold, also the threshold of the uncertainty score.
        document_root / url_prefix: see :func:`image_url`; the default document root is the parent of
            the category root.
        order: ``"image"`` (ground-truth order) or ``"uncertainty"`` (most uncertain first, see
            :func:`image_uncertainty`; ties by image id).

    Returns:
        Tasks ``{"data": {"image", "image_id", "file_name", "width", "height", "image_root",
        "defect_type", "uncertainty", "review_reason", "review_rank"}, "predictions": [...]}``. Every image
        appears, also with no predictions, so the whole split can be reviewed.
    """
    if order not in ORDERS:
        raise PipelineError(f"--order {order!r}: expected one of {', '.join(ORDERS)}")
    image_root = Path(coco_gt.get("info", {}).get("image_root", "."))
    if document_root is None and url_prefix is None:
        document_root = image_root.parent
    names = {c["id"]: c["name"] for c in coco_gt["categories"]}
    tasks = []
    for img in coco_gt["images"]:
        size_hw = (int(img["height"]), int(img["width"]))
        preds = []
        for src in sources:
            if src.kind != "detections":
                continue
            kept = sorted((r for r in src.by_image.get(img["id"], []) if r["score"] >= min_score), key=lambda r: -r["score"])
            result = []
            for k, r in enumerate(kept):
                mask = _segmentation_mask(r["segmentation"], size_hw=size_hw) if r.get("segmentation") else None
                result += region_results(bbox_xywh=r["bbox"], mask=mask, label=names[r["category_id"]], size_hw=size_hw,
                                         score=r["score"], rid=_result_id(img["id"], k, src.name), polygons=polygons)
            preds.append({"model_version": src.name, "score": max((r["score"] for r in kept), default=0.0), "result": result})
        u, reason = image_uncertainty(img["id"], sources, threshold=min_score, names=names)
        tasks.append({
            "data": {
                IMAGE_TAG: image_url(image_root / img["file_name"], document_root=document_root,
                                     url_prefix=url_prefix, rel=img["file_name"]),
                "image_id": img["id"],
                "file_name": img["file_name"],
                "width": size_hw[1],
                "height": size_hw[0],
                "image_root": str(image_root),
                "defect_type": img.get("defect_type", ""),
                "uncertainty": round(u, 4),
                REASON_FIELD: f"uncertainty {u:.2f}: {reason}",
            },
            "predictions": preds,
        })
    if order == "uncertainty":
        tasks.sort(key=lambda t: (-t["data"]["uncertainty"], t["data"]["image_id"]))
    for rank, t in enumerate(tasks, 1):
        t["data"]["review_rank"] = rank
    return tasks


def coco_to_tasks(coco_gt: dict, results: list[dict], *, model_version: str, min_score: float = 0.25,
                  document_root: Path | None = None, url_prefix: str | None = None) -> list[dict]:
    """:func:`build_tasks` for one COCO results list (rectangles and brush masks), in image order."""
    src = Source(name=model_version, kind="detections")
    for r in results:
        src.by_image.setdefault(r["image_id"], []).append(r)
    return build_tasks(coco_gt, [src], min_score=min_score, document_root=document_root, url_prefix=url_prefix)


def export_tasks(
    pred_path: Path | list[Path],
    *,
    gt_path: Path,
    out_dir: Path,
    min_score: float = 0.25,
    model_version: str = "pipeline",
    document_root: Path | None = None,
    url_prefix: str | None = None,
    polygons: bool = False,
    order: str = "image",
    force: bool = False,
    before_write: Callable[[list[dict], str, str], None] | None = None,
) -> dict:
    """Write ``tasks.json`` and ``labeling_config.xml`` into ``out_dir`` (atomically, as a folder).

    Args:
        pred_path: one or several prediction files (COCO results; classifier/anomaly JSON only feed the
            review order and reasons).
        order: ``"image"`` or ``"uncertainty"`` (see :func:`build_tasks`).
        polygons: also give each predicted mask as polygons.
        before_write: called as ``before_write(tasks, config_xml, title)`` after validation and before
            anything is written (the CLI pushes to a server there); an exception leaves nothing written.

    Returns:
        ``{"tasks", "config", "n_tasks", "n_results", "n_masks", "document_root", "storage_path", "title"}``.

    Raises:
        PipelineError: unreadable inputs, predictions on unknown images/classes, labels not in the
            config, an existing ``out_dir`` without ``force``.
    """
    from pipeline.data.coco import load_coco_gt
    from pipeline.core.io import atomic_write_json, atomic_write_text, check_can_write, staged_dir

    out_dir = Path(out_dir)
    check_can_write(out_dir, force=force)
    paths = [pred_path] if isinstance(pred_path, (str, Path)) else list(pred_path)
    if not paths:
        raise PipelineError("no prediction files given")
    coco = load_coco_gt(gt_path)
    sources = read_sources(paths, coco, model_version=model_version)
    gt = coco.dataset
    image_root = Path(gt.get("info", {}).get("image_root", "."))
    if document_root is None and url_prefix is None:
        document_root = image_root.parent
    tasks = build_tasks(gt, sources, min_score=min_score, document_root=document_root, url_prefix=url_prefix,
                        polygons=polygons, order=order)
    config = labeling_config([c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])],
                             brush=True, polygons=polygons, reason=True)
    validate_tasks(tasks, config, source=str(paths[0]))
    split = gt.get("info", {}).get("split")
    title = f"review {image_root.name}" + (f" {split}" if split else "")
    if before_write is not None:
        before_write(tasks, config, title)
    with staged_dir(out_dir, force=force) as tmp:
        atomic_write_json(tmp / "tasks.json", tasks)
        atomic_write_text(tmp / "labeling_config.xml", config)
    results = [r for t in tasks for p in t["predictions"] for r in p["result"]]
    return {
        "tasks": out_dir.resolve() / "tasks.json",
        "config": out_dir.resolve() / "labeling_config.xml",
        "n_tasks": len(tasks),
        "n_results": sum(r["type"] == "rectanglelabels" for r in results),
        "n_masks": sum(r["type"] == "brushlabels" for r in results),
        "document_root": Path(document_root).resolve() if document_root else None,
        "storage_path": image_root.resolve(),
        "title": title,
    }


# ----------------------------------------------------------------------------- reviewed labels -> COCO


def _pick_annotation(task: dict) -> dict | None:
    """The task's review: its latest submitted annotation (ground-truth-marked ones first); None if none."""
    anns = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
    if not anns:
        return None
    return max(anns, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""), a.get("id") or 0))


def _result_size_hw(r: dict, size_hw: tuple[int, int], source: str) -> tuple[int, int]:
    h, w = int(r.get("original_height") or size_hw[0]), int(r.get("original_width") or size_hw[1])
    if (h, w) != tuple(size_hw):
        raise PipelineError(f"{source}: result {r.get('id')!r} is for a {w}x{h} image, the task's image is {size_hw[1]}x{size_hw[0]}")
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
    from pipeline.review.client import brush_decode

    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("type") not in ("rectanglelabels", "brushlabels", "polygonlabels"):
            continue
        m = _REGION_ID.match(str(r.get("id", "")))
        key = m.group("stem") if m else f"own:{r.get('id')}:{len(groups)}"
        groups.setdefault(key, []).append(r)
    h, w = size_hw
    out = []
    for rs in groups.values():
        rects = [r for r in rs if r["type"] == "rectanglelabels"]
        brushes = [r for r in rs if r["type"] == "brushlabels"]
        polys = [r for r in rs if r["type"] == "polygonlabels"]
        label = _label((rects or brushes or polys)[0], source)
        mask = None
        if brushes:
            mask = np.zeros((h, w), bool)
            for r in brushes:
                _result_size_hw(r, size_hw, source)
                val = r.get("value") or {}
                rle = val.get("rle", r.get("rle"))
                if not isinstance(rle, list):
                    raise PipelineError(f"{source}: brush result {r.get('id')!r} has no 'rle' list (expected Label Studio brush RLE)")
                mask |= brush_decode(rle, size_hw=size_hw, source=source) >= 128
        elif polys:
            mask = np.zeros((h, w), bool)
            for r in polys:
                _result_size_hw(r, size_hw, source)
                mask |= polygon_to_mask((r.get("value") or {}).get("points", []), size_hw=size_hw)
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
                mask[bbox[1]:bbox[1] + bbox[3], bbox[0]:bbox[0] + bbox[2]] = True
            out.append({"label": label, "bbox": bbox, "area": int(mask.sum()), "segmentation": encode_rle(mask), "iscrowd": 0})
        elif mask is not None:
            for inst in mask_to_instances(mask):
                out.append({"label": label, "bbox": list(inst.bbox_xywh), "area": inst.area,
                            "segmentation": encode_rle(inst.mask), "iscrowd": 0})
    return out


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
    raise PipelineError(f"{source}: task {i} has no data.file_name and its image URL {url!r} is not under the image root")


def tasks_to_coco(tasks: list, config_xml: str, *, image_root: Path | None = None, source: str = "export",
                  document_root: Path | None = None) -> tuple[dict, int]:
    """COCO ground truth from a Label Studio JSON export of reviewed tasks.

    Each task's review is its latest submitted (not cancelled) annotation; tasks without one are left
    out. Categories are the config's labels in order (ids from 1); images keep ``data.image_id`` when
    every task has a distinct one (else ids 1..N in export order), ``file_name`` from ``data.file_name``
    (relative to ``image_root``), and ``defect_type`` ``"good"`` for images without regions, else the
    class of the largest region. Annotations: see :func:`task_regions`; ids from 1, ``iscrowd`` 0.

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
        raise PipelineError(f"{source}: not a Label Studio JSON export (expected a list of tasks with data and annotations)")
    validate_tasks(tasks, config_xml, source=source, groups=("annotations",))
    names = config_class_names(config_xml, source=source)
    if not names:
        raise PipelineError(f"{source}: the labeling config has no labels")
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    if image_root is None:
        roots = {t["data"].get("image_root") for t in tasks} - {None, ""}
        if len(roots) != 1:
            raise PipelineError(f"{source}: cannot tell the image root from the tasks ({len(roots)} different); pass --image-root")
        image_root = Path(roots.pop())
    reviewed = [(i, t, a) for i, t in enumerate(tasks) if (a := _pick_annotation(t)) is not None]
    ids = [t["data"].get("image_id") for _, t, _ in reviewed]
    keep_ids = all(isinstance(i, int) and i > 0 for i in ids) and len(set(ids)) == len(ids)
    images, annotations = [], []
    for k, (i, task, ann) in enumerate(reviewed):
        data = task["data"]
        results = ann.get("result") or []
        h, w = data.get("height"), data.get("width")
        if not (h and w):
            sized = [r for r in results if r.get("original_height") and r.get("original_width")]
            if sized:
                h, w = sized[0]["original_height"], sized[0]["original_width"]
            else:
                from pipeline.core.io import image_size_hw

                h, w = image_size_hw(Path(image_root) / _task_file_name(task, i, source, document_root, image_root))
        size_hw = (int(h), int(w))
        img_id = int(data["image_id"]) if keep_ids else k + 1
        regions = task_regions(results, size_hw=size_hw, source=f"{source}: task {i}")
        defect_type = "good" if not regions else max(regions, key=lambda r: r["area"])["label"]
        images.append({"id": img_id, "file_name": _task_file_name(task, i, source, document_root, image_root),
                       "width": size_hw[1], "height": size_hw[0], "defect_type": defect_type})
        for reg in regions:
            annotations.append({"id": 0, "image_id": img_id, "category_id": cat_id[reg.pop("label")], **reg})
    order = sorted(range(len(images)), key=lambda j: images[j]["id"])
    images = [images[j] for j in order]
    rank = {img["id"]: j for j, img in enumerate(images)}
    annotations.sort(key=lambda a: rank[a["image_id"]])  # stable: region order kept within an image
    for n, a in enumerate(annotations, 1):
        a["id"] = n
    coco = {
        "info": {"description": f"Label Studio review import of {Path(source).name}", "image_root": str(Path(image_root).resolve()),
                 "source": str(source)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id[n], "name": n, "supercategory": "defect"} for n in names],
    }
    return coco, len(tasks) - len(reviewed)


def import_export(export_path: Path, *, config_path: Path, out_path: Path, image_root: Path | None = None,
                  force: bool = False) -> dict:
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
    coco, n_unreviewed = tasks_to_coco(tasks, config_path.read_text(encoding="utf-8"), image_root=image_root,
                                       source=str(export_path))
    atomic_write_json(out_path, coco, indent=None)
    return {"out": out_path.resolve(), "n_images": len(coco["images"]), "n_annotations": len(coco["annotations"]),
            "n_unreviewed": n_unreviewed}
