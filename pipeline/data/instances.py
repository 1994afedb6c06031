"""Binary mask -> one instance per connected component, with COCO boxes and lossless RLE.

Connected components come from OpenCV (``cv2.connectedComponentsWithStats``), RLE from
pycocotools (``mask.encode``/``decode``/``toBbox``/``area``), so boxes and areas match what
COCOeval computes from the same RLE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Instance:
    """One connected component of a mask.

    Attributes:
        mask: ``HxW`` bool array at the full mask size.
        bbox_xywh: ``[x, y, w, h]`` in pixels (COCO; x, y of the top-left pixel, w/h in pixels).
        area: number of pixels (int).
    """

    mask: np.ndarray
    bbox_xywh: tuple[int, int, int, int]
    area: int

    @property
    def bbox_xyxy(self) -> tuple[int, int, int, int]:
        """``[x0, y0, x1, y1]`` in pixels, x1/y1 exclusive (= x + w, y + h)."""
        x, y, w, h = self.bbox_xywh
        return (x, y, x + w, y + h)


def mask_to_instances(mask: np.ndarray, *, connectivity: int = 8, min_area: int = 1) -> list[Instance]:
    """Split a binary mask into its connected components.

    Args:
        mask: ``HxW`` array; pixels ``> 0`` are foreground.
        connectivity: 8 (default; a 1-pixel diagonal scratch stays one instance) or 4.
        min_area: components with fewer pixels are dropped (default 1 keeps every component).

    Returns:
        Instances ordered by OpenCV's label order (raster order of each component's first pixel).

    Raises:
        ValueError: ``mask`` is not 2-D or ``connectivity`` not 4/8.
    """
    import cv2

    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    binary = (mask > 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=connectivity)
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area:
            continue
        out.append(Instance(mask=labels == k, bbox_xywh=(x, y, w, h), area=area))
    return out


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of an ``HxW`` binary mask: ``{"size": [h, w], "counts": str}`` (ASCII)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask > 0, dtype=np.uint8))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    """Inverse of :func:`encode_rle`: ``HxW`` bool array. Accepts ``counts`` as str, bytes or list."""
    from pycocotools import mask as mask_utils

    r = dict(rle)
    if isinstance(r["counts"], list):  # uncompressed RLE
        r = mask_utils.frPyObjects(r, *r["size"])
    elif isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return mask_utils.decode(r).astype(bool)


def rle_bbox_xywh(rle: dict) -> list[float]:
    """pycocotools' ``toBbox`` of an RLE: ``[x, y, w, h]`` in pixels."""
    from pycocotools import mask as mask_utils

    r = dict(rle)
    if isinstance(r["counts"], str):
        r["counts"] = r["counts"].encode("ascii")
    return [float(v) for v in mask_utils.toBbox(r)]


def mask_to_polygons(mask: np.ndarray, *, min_points: int = 3) -> list[list[float]]:
    """Outer contours of a binary mask as COCO polygons ``[x0, y0, x1, y1, ...]`` (pixels).

    Lossy (holes are dropped, pixel edges approximated): use RLE where exactness matters.
    Polygons with fewer than ``min_points`` points are dropped (pycocotools reads 4 numbers as a box).
    """
    import cv2

    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        pts = c.reshape(-1, 2).astype(float)
        if len(pts) >= min_points:
            polys.append(pts.ravel().tolist())
    return polys
