"""Images for the classifier: class list, manifest entries, decoding/resizing/caching, batches.

The split manifest gives ``(image, label)``; labels are ``good`` (:data:`pipeline.data.mvtec.GOOD`)
or the defect type (``task="binary"`` folds every defect into :data:`DEFECT`). Images are decoded
and resized once and cached (in memory, and on disk under ``data.cache_dir``) as ``N x 3 x H x W``
uint8 RGB (:class:`ImageSet`); normalisation and augmentation run on whole batches on the training
device (:func:`normalize`, :func:`augment`).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.console import progress as progress_bar
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, read_rgb
from pipeline.data.mvtec import GOOD

DEFECT = "defect"
_MEMORY_CACHE: dict[tuple, np.ndarray] = {}


@dataclass
class ImageSet:
    """Decoded, resized images of one subset.

    Attributes:
        images: ``N x 3 x H x W`` uint8 RGB tensor (CPU).
        labels: ``N`` int64 class indices into ``classes``.
        paths: image paths relative to the category root (POSIX).
        classes: class names (``good`` first).
    """

    images: Any
    labels: Any
    paths: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def counts(self) -> list[int]:
        """Images per class, in ``classes`` order."""
        return np.bincount(self.labels.numpy(), minlength=len(self.classes)).tolist()


def class_names(split, task: str) -> list[str]:
    """``["good", *defect types]`` (multiclass) or ``["good", "defect"]`` (binary)."""
    if task == "binary":
        return [GOOD, DEFECT]
    return [GOOD] + sorted(c for c in split.classes if c != GOOD)


def subset_entries(
    split, subset: str, classes: Sequence[str], *, use_train_good: bool = False, max_train_good: int = -1, seed: int = 0
) -> list[tuple[Path, int]]:
    """``(absolute image path, class index)`` of a manifest subset (``train``, ``val``, ``test``).

    ``use_train_good`` (train subset only) adds ``train/good`` images as ``good``; ``max_train_good``
    (>= 0) keeps a seeded random subset of that many, in sorted order.

    Raises:
        PipelineError: a label that is not among ``classes``.
    """
    index = {c: i for i, c in enumerate(classes)}
    binary = list(classes) == [GOOD, DEFECT]
    out = []
    for s in split.samples(subset):
        lab = DEFECT if binary and s.label != GOOD else s.label
        if lab not in index:
            raise PipelineError(
                f"{split.path}: label {s.label!r} of {s.image} is not among the manifest classes {list(classes)}"
            )
        out.append((s.image, index[lab]))
    if use_train_good and subset == "train":
        extra = split.train_good()
        if 0 <= max_train_good < len(extra):
            keep = np.sort(np.random.default_rng(seed).permutation(len(extra))[:max_train_good])
            extra = [extra[i] for i in keep]
        out += [(p, index[GOOD]) for p in extra]
    return out


def check_classes_present(split, entries: list[tuple[Path, int]], classes: Sequence[str], subset: str) -> None:
    """Every class needs at least one image in ``subset``; one line naming the empty ones.

    Raises:
        PipelineError: a class without images.
    """
    counts = np.bincount([i for _, i in entries], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise PipelineError(
            f"{split.path}: class(es) {', '.join(empty)} have no images in the {subset} split (expected at least "
            "one per class; re-split or drop the class)"
        )


def _cache_key(path: Path, size_hw: tuple[int, int]) -> tuple:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size, tuple(size_hw))


def load_resized(path: Path, size_hw: tuple[int, int], *, cache_dir: Path | None = None) -> np.ndarray:
    """Decode an image as RGB and resize it to ``size_hw`` (INTER_AREA when shrinking, else
    INTER_LINEAR): ``3 x H x W`` uint8.

    Results are kept in a process-wide memory cache and, with ``cache_dir``, as ``.npy`` files
    named by a hash of (path, mtime, size, target size).

    Raises:
        PipelineError: missing, unreadable or truncated image (:func:`pipeline.core.io.read_rgb`).
    """
    import cv2

    path = Path(path)
    key = _cache_key(path, size_hw)
    hit = _MEMORY_CACHE.get(key)
    if hit is not None:
        return hit
    disk = None
    if cache_dir is not None:
        disk = Path(cache_dir) / (hashlib.sha1(repr(key).encode()).hexdigest() + ".npy")
        if disk.is_file():
            try:
                arr = np.load(disk)
                _MEMORY_CACHE[key] = arr
                return arr
            except (OSError, ValueError):  # a damaged cache file is decoded again and rewritten
                pass
    img = read_rgb(path)
    h, w = size_hw
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR)
    arr = np.ascontiguousarray(img.transpose(2, 0, 1))
    _MEMORY_CACHE[key] = arr
    if disk is not None:
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(disk, buf.getvalue())
    return arr


def load_image_set(
    entries: list[tuple[Path, int]],
    classes: Sequence[str],
    root: Path,
    size_hw: tuple[int, int],
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    desc: str = "images",
) -> ImageSet:
    """Decode, resize and stack ``entries`` into an :class:`ImageSet` (cached; decoded in a thread pool).

    ``paths`` are made relative to ``root`` (kept absolute for images outside it)."""
    h, w = size_hw
    arrs = []
    # OpenCV releases the GIL while decoding and resizing, so threads fill the cache in parallel
    with (
        ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool,
        progress_bar(f"decode {desc}", len(entries), enabled=progress and len(entries) > 20, transient=True) as advance,
    ):
        for arr in pool.map(lambda e: load_resized(e[0], size_hw, cache_dir=cache_dir), entries):
            arrs.append(arr)
            advance()
    images = torch.from_numpy(np.stack(arrs)) if arrs else torch.zeros((0, 3, h, w), dtype=torch.uint8)
    labels = torch.tensor([i for _, i in entries], dtype=torch.int64)
    rel = []
    for p, _ in entries:
        try:
            rel.append(Path(p).relative_to(root).as_posix())
        except ValueError:
            rel.append(Path(p).as_posix())
    return ImageSet(images, labels, rel, list(classes))


def normalize(batch_u8, mean: Sequence[float], std: Sequence[float]):
    """``B x 3 x H x W`` uint8 -> float32 normalised: ``(x / 255 - mean) / std``."""
    m = torch.tensor(mean, device=batch_u8.device, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, device=batch_u8.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch_u8.float() / 255.0 - m) / s


def augment(x, aug, gen, *, global_n: int | None = None, rows: slice | None = None):
    """Random flips, rotation/translation, brightness/contrast on a normalised float batch.

    ``x``: ``B x 3 x H x W``; ``aug``: :class:`AugmentConfig`; ``gen``: CPU ``torch.Generator``
    (parameters are drawn on the CPU, so runs are reproducible on every device).
    ``global_n``/``rows``: under DDP ``x`` is the ``rows`` part of a global batch of ``global_n``
    images; parameters are drawn for the whole global batch (so ``gen`` advances identically on
    every rank) and sliced, so an image gets the same augmentation whatever the world size.
    """
    b = x.shape[0]
    dev = x.device
    n = b if global_n is None else global_n
    rows = slice(0, b) if rows is None else rows

    def rand(first, *rest):
        return torch.rand(n, *rest, generator=gen)[rows].to(dev)

    if aug.hflip > 0:
        m = (rand(b) < aug.hflip).view(b, 1, 1, 1)
        x = torch.where(m, x.flip(3), x)
    if aug.vflip > 0:
        m = (rand(b) < aug.vflip).view(b, 1, 1, 1)
        x = torch.where(m, x.flip(2), x)
    if aug.rotate_deg > 0 or aug.translate_frac > 0:
        ang = (rand(b) * 2 - 1) * math.radians(aug.rotate_deg)
        t = (rand(b, 2) * 2 - 1) * aug.translate_frac * 2  # grid units span 2
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if aug.brightness > 0:
        x = x + ((rand(b) * 2 - 1) * aug.brightness).view(b, 1, 1, 1)
    if aug.contrast > 0:
        c = (1 + (rand(b) * 2 - 1) * aug.contrast).view(b, 1, 1, 1)
        mu = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mu) * c + mu
    return x


def batch_to_device(images, idx, device: str, pinned: dict | None):
    """``images[idx]`` on ``device``; on CUDA through a reused pinned host buffer (async copy).

    ``pinned``: a dict the caller keeps across batches (holds the buffer), or None for a plain copy.
    """
    if pinned is None or not device.startswith("cuda"):
        return images[idx].to(device)
    buf = pinned.get("buf")
    if buf is None or buf.shape[0] < len(idx):
        buf = pinned["buf"] = torch.empty((max(len(idx), 1), *images.shape[1:]), dtype=images.dtype).pin_memory()
    out = buf[: len(idx)]
    torch.index_select(images, 0, idx, out=out)
    return out.to(device, non_blocking=True)
