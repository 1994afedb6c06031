"""Label Studio result dicts for one predicted object: rectangle, brush mask, polygons.

Every result has ``id``, ``type``, ``from_name`` (control tag), ``to_name`` (the image tag),
``original_width``, ``original_height``, ``image_rotation`` and ``value``; coordinates in percent
(0-100) of the original image size. Ids: ``R`` (10 hex digits) for the rectangle, ``R_brush`` for
the mask and ``R_poly<k>`` for its polygons (:func:`pipeline.review.reviewed.task_regions` groups them).

Polygons are lossy (outer contours only; holes and parts under three points dropped). A reviewer who
keeps them gets back what ``import labelstudio`` fills from them, so the export measures that: the IoU
of each mask with its filled polygons (:func:`polygon_iou`), and one warning line when some are below
:data:`POLYGON_MIN_IOU` (:func:`polygon_warning`).
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.review.labeling_config import BRUSH_TAG, IMAGE_TAG, POLY_TAG, RECT_TAG

POLYGON_MIN_IOU = 0.8


def _result_id(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]


def _base_result(*, rid: str, kind: str, from_name: str, size_hw: tuple[int, int], score: float | None) -> dict:
    h, w = size_hw
    r = {
        "id": rid,
        "type": kind,
        "from_name": from_name,
        "to_name": IMAGE_TAG,
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
    }
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
    r["value"] = {
        "x": 100 * x0 / w,
        "y": 100 * y0 / h,
        "width": 100 * (x1 - x0) / w,
        "height": 100 * (y1 - y0) / h,
        "rotation": 0,
        "rectanglelabels": [label],
    }
    if score is not None:
        r["score"] = float(score)
    return r


def brush_result(*, mask: np.ndarray, label: str, score: float | None, rid: str) -> dict:
    """One ``brushlabels`` result from an ``HxW`` mask (pixels ``> 0`` are the region) at the original size.

    The mask is encoded as uint8 0/255 with ``label_studio_sdk``'s brush converter (a 0/1 mask would
    import as nearly transparent strokes).
    """
    from pipeline.review.brush import brush_encode

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


def region_results(
    *,
    bbox_xywh,
    mask: np.ndarray | None,
    label: str,
    size_hw: tuple[int, int],
    score: float | None,
    rid: str,
    polygons: bool = False,
    polygon_ious: list[float] | None = None,
) -> list[dict]:
    """A predicted object as results: its rectangle (id ``rid``), its brush mask (``rid_brush``) when it
    has a mask, and its polygons (``rid_poly<k>``) when ``polygons``; the IoU of those polygons with the
    mask (:func:`polygon_iou`) is appended to ``polygon_ious`` when given.

    Raises:
        PipelineError: ``mask`` is not ``size_hw``.
    """
    out = [rectangle_result(bbox_xywh=bbox_xywh, label=label, size_hw=size_hw, score=score, rid=rid)]
    if mask is not None:
        if mask.shape != tuple(size_hw):
            raise PipelineError(
                f"prediction mask {mask.shape[1]}x{mask.shape[0]} is not at the image size {size_hw[1]}x{size_hw[0]}"
            )
        out.append(brush_result(mask=mask, label=label, score=score, rid=f"{rid}_brush"))
        if polygons:
            polys = polygon_results(mask=mask, label=label, score=score, rid=rid)
            if polygon_ious is not None:
                polygon_ious.append(polygon_iou(mask, polys))
            out += polys
    return out


def polygon_iou(mask: np.ndarray, polygons: list[dict]) -> float:
    """IoU of an ``HxW`` mask (pixels ``> 0``) with the union of its ``polygonlabels`` results, filled as
    ``import labelstudio`` fills them (:func:`pipeline.review.reviewed.polygon_to_mask`): what a reviewer
    who keeps the polygons gets back. 1.0 for an empty mask without polygons; 0.0 when a mask has no
    polygon at all (every part too small)."""
    from pipeline.review.reviewed import polygon_to_mask

    m = mask > 0
    back = np.zeros(m.shape, bool)
    for r in polygons:
        back |= polygon_to_mask(r["value"]["points"], size_hw=m.shape)
    union = int((m | back).sum())
    return 1.0 if union == 0 else int((m & back).sum()) / union


def polygon_warning(ious: list[float]) -> str | None:
    """The one warning line of an export whose polygons differ from their masks (IoU below
    :data:`POLYGON_MIN_IOU`); None when every polygon set is close enough or none was exported."""
    low = [u for u in ious if u < POLYGON_MIN_IOU]
    if not low:
        return None
    return (
        f"{len(low)} of {len(ious)} masks exported as polygons have IoU < {POLYGON_MIN_IOU} with their mask "
        f"(worst {min(low):.2f}): review them as brush masks (every mask is also exported as a brush region; "
        "leave out --polygons to export brush masks only)"
    )
