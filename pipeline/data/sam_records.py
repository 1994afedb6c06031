"""SAM prompt/mask records: the JSON Lines ``sam/<split>.jsonl`` that ``convert-masks`` writes.

One line per defect component::

    {"image": "/abs/path.png", "image_id": 3, "annotation_id": 7, "size_hw": [H, W],
     "category_id": 1, "category": "broken_large", "bbox_xyxy": [x0, y0, x1, y1], "segmentation": RLE}

``bbox_xyxy`` is in original-image pixels with ``x1``/``y1`` exclusive; ``segmentation`` is the
component's COCO compressed RLE at ``size_hw``. Used by ``finetune sam`` (training and validation
prompts) and by the benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import image_size_hw

RECORD_KEYS = ("image", "image_id", "annotation_id", "size_hw", "category_id", "bbox_xyxy", "segmentation")


@dataclass(frozen=True)
class SamRecord:
    """One defect component: the prompt box and its true mask (a line of ``sam/<split>.jsonl``).

    Attributes:
        image: absolute image path.
        size_hw: original image ``(H, W)`` in pixels.
        bbox_xyxy: ``(x0, y0, x1, y1)`` original pixels, ``x1``/``y1`` exclusive.
        segmentation: COCO compressed RLE of the component mask, size ``size_hw``.
    """

    image: Path
    image_id: int
    annotation_id: int
    size_hw: tuple[int, int]
    category_id: int
    category: str
    bbox_xyxy: tuple[float, float, float, float]
    segmentation: dict


@dataclass
class ImageGroup:
    """All records of one image: one embedding, a batch of ``B`` boxes, ``B`` true masks."""

    image: Path
    image_id: int
    size_hw: tuple[int, int]
    records: list[SamRecord]
    masks: list[np.ndarray] | None = None  # HxW bool each, decoded lazily
    extra: dict = field(default_factory=dict)  # derived per-image data (e.g. low-res loss targets)

    def bbox_xyxy(self) -> np.ndarray:
        """``Bx4`` float32 boxes, original pixels."""
        return np.array([r.bbox_xyxy for r in self.records], np.float32).reshape(-1, 4)

    def true_masks(self) -> list[np.ndarray]:
        """``B`` true masks, ``HxW`` bool each at the original size (decoded once)."""
        from pipeline.data.instances import decode_rle

        if self.masks is None:
            self.masks = [decode_rle(r.segmentation) for r in self.records]
        return self.masks


def read_records(path: Path) -> list[SamRecord]:
    """Read and validate SAM records (JSON Lines written by ``pipeline convert-masks``).

    Checks each record: keys present, image file exists with size ``size_hw``, box inside the
    image with positive width and height, RLE of size ``size_hw`` and not empty.

    Raises:
        PipelineError: one line ``<file>:<line>: <what is wrong>`` for the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (expected SAM records sam/<split>.jsonl from convert-masks)")
    records: list[SamRecord] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            records.append(_parse_record(line, where=f"{path}:{n}", sizes=sizes))
    return records


def _parse_record(line: str, *, where: str, sizes: dict[Path, tuple[int, int]]) -> SamRecord:
    """One validated record; ``sizes`` caches image sizes across lines."""
    from pipeline.data.instances import decode_rle

    try:
        d = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(d, dict) or not all(k in d for k in RECORD_KEYS):
        raise PipelineError(f"{where}: expected a SAM record with keys {', '.join(RECORD_KEYS)}")
    image = Path(d["image"])
    if not image.is_file():
        raise PipelineError(f"{where}: image {image} not found")
    if image not in sizes:
        sizes[image] = image_size_hw(image)
    h, w = (int(v) for v in d["size_hw"])
    if sizes[image] != (h, w):
        raise PipelineError(
            f"{where}: image {image} is {sizes[image][1]}x{sizes[image][0]}, record says size_hw {[h, w]}"
        )
    try:
        x0, y0, x1, y1 = (float(v) for v in d["bbox_xyxy"])
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: bbox_xyxy {d['bbox_xyxy']!r} (expected four numbers x0, y0, x1, y1)") from None
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise PipelineError(
            f"{where}: bbox_xyxy {[x0, y0, x1, y1]} outside the {w}x{h} image or empty "
            "(expected 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H)"
        )
    seg = d["segmentation"]
    if not isinstance(seg, dict) or list(seg.get("size", [])) != [h, w] or "counts" not in seg:
        raise PipelineError(f"{where}: segmentation is not an RLE of size {[h, w]}")
    try:
        m = decode_rle(seg)
    except Exception as exc:  # pycocotools raises bare errors for bad counts
        raise PipelineError(f"{where}: segmentation RLE does not decode ({exc})") from None
    if not m.any():
        raise PipelineError(f"{where}: empty mask (annotation {d['annotation_id']} has no pixels)")
    return SamRecord(
        image=image,
        image_id=int(d["image_id"]),
        annotation_id=int(d["annotation_id"]),
        size_hw=(h, w),
        category_id=int(d["category_id"]),
        category=str(d.get("category", d["category_id"])),
        bbox_xyxy=(x0, y0, x1, y1),
        segmentation=seg,
    )


def group_by_image(records: list[SamRecord]) -> list[ImageGroup]:
    """Records grouped per image, in order of first appearance."""
    groups: dict[Path, ImageGroup] = {}
    for r in records:
        g = groups.setdefault(r.image, ImageGroup(image=r.image, image_id=r.image_id, size_hw=r.size_hw, records=[]))
        g.records.append(r)
    return list(groups.values())
