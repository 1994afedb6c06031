"""Read an MVTec AD category: pair images with masks and validate them.

Layout (Bergmann et al., CVPR 2019; the MVTec AD download):
``<root>/<category>/train/good/*.png``, ``test/<defect|good>/*.png``,
``ground_truth/<defect>/<stem>_mask.png``. Masks are 8-bit, read as ``> 0``.

MVTec's ``train/`` holds only good images, so supervised training needs a re-split of ``test/``:
that is :mod:`pipeline.data.split`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


@dataclass(frozen=True)
class Sample:
    """One test image of a category.

    Attributes:
        image: absolute path of the image.
        mask: absolute path of its ground-truth mask, ``None`` for good images.
        label: ``"good"`` or the defect type (folder name under ``test/``).
    """

    image: Path
    mask: Path | None
    label: str


@dataclass(frozen=True)
class Category:
    """A scanned MVTec AD category: ``train/good`` images and labelled ``test`` samples.

    Attributes:
        root: the category folder.
        train_good: ``train/good`` images, sorted.
        test: the ``test/`` samples, sorted by label then name.
        empty_masks: defect images whose mask is all zero, kept as good images
            (``allow_empty_masks``); empty otherwise.
        masks: decoded masks (``HxW`` bool) by mask path, when scanned with ``keep_masks``.
        sizes_hw: image sizes (height, width in pixels) by image path, when pixels were checked.
    """

    root: Path
    train_good: tuple[Path, ...]
    test: tuple[Sample, ...]
    empty_masks: tuple[Path, ...] = ()
    masks: dict = field(default_factory=dict, repr=False, compare=False)
    sizes_hw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.label for s in self.test if s.label != GOOD})


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _same_stem_problems(folder: Path, images: list[Path]) -> list[str]:
    """Two images with one stem (``000.png``, ``000.jpg``) would share one mask and one YOLO label."""
    by_stem: dict[str, list[str]] = {}
    for p in images:
        by_stem.setdefault(p.stem, []).append(p.name)
    return [
        f"{folder}: images {', '.join(names)} share the stem {stem!r} (expected one image per stem)"
        for stem, names in sorted(by_stem.items())
        if len(names) > 1
    ]


def scan_category(
    root: Path,
    *,
    check_pixels: bool = True,
    allow_empty_masks: bool = False,
    keep_masks: bool = False,
    workers: int | None = None,
) -> Category:
    """Scan and validate an MVTec AD category folder.

    Checks that every defect image has exactly one mask ``ground_truth/<defect>/<stem>_mask.png``,
    that no mask is orphaned and no two images of a folder share a stem, and (``check_pixels``)
    decodes every image (``train/good`` and ``test/good`` too) and every mask, in a thread pool
    (OpenCV releases the GIL while decoding): images must be 8-bit, masks must have their image's
    size, hold only {0, 255} or {0, 1}, and mark at least one pixel.

    Args:
        root: the category folder (e.g. ``.../mvtec_ad/bottle``).
        check_pixels: decode every image and mask (off: pairing only).
        allow_empty_masks: keep a defect image whose mask is all zero as a good image (listed in
            :attr:`Category.empty_masks`) instead of failing.
        keep_masks: keep the decoded masks in :attr:`Category.masks` (for the converter, so each
            file is decoded once).
        workers: decoding threads (default: the machine's cores).

    Returns:
        The :class:`Category` with absolute, sorted paths.

    Raises:
        PipelineError: one error whose message lists every offending file.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise PipelineError(f"{root}: category folder not found (expected <root>/<category> in MVTec AD layout)")
    test_dir, gt_dir, train_dir = root / "test", root / "ground_truth", root / "train" / GOOD
    if not test_dir.is_dir():
        raise PipelineError(
            f"{test_dir}: missing (expected MVTec AD layout: train/good, test/<defect>, ground_truth/<defect>)"
        )
    problems: list[str] = []
    samples = _pair_masks(test_dir, gt_dir, problems)
    train_good = tuple(_images(train_dir)) if train_dir.is_dir() else ()
    problems += _same_stem_problems(train_dir, list(train_good))
    if not samples and not problems:
        raise PipelineError(f"{test_dir}: no test images found (expected test/<defect>/*.png)")
    empty: list[Path] = []
    masks: dict = {}
    sizes: dict = {}
    if check_pixels and not problems:
        checks = _decode_all([*train_good, *(s.image for s in samples)], [s for s in samples if s.mask], workers)
        for path, (size, problem) in checks["images"].items():
            sizes[path] = size
            problems += [problem] if problem else []
        for s in samples:
            if s.mask is None or s.image not in sizes or sizes[s.image] is None:
                continue
            mask, probs = checks["masks"][s.mask]
            if mask is not None:
                probs = probs + mask_problems(mask, s.mask, sizes[s.image])
            if not probs and not (mask > 0).any():
                if allow_empty_masks:
                    empty.append(s.image)
                    continue
                probs = [
                    f"{s.mask}: all-zero mask for defect image {s.image.name} "
                    "(expected a marked defect; --allow-empty-masks keeps it as a good image)"
                ]
            problems += probs
            if keep_masks and not probs:
                masks[s.mask] = mask[..., 0] > 0 if mask.ndim == 3 else mask > 0
    if problems:
        raise PipelineError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems))
    test = tuple(Sample(s.image, None, GOOD) if s.image in empty else s for s in samples)
    return Category(root=root, train_good=train_good, test=test, empty_masks=tuple(empty), masks=masks, sizes_hw=sizes)


def _pair_masks(test_dir: Path, gt_dir: Path, problems: list[str]) -> list[Sample]:
    """Samples of ``test/``, each defect image paired with its mask; pairing problems appended."""
    samples: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        label = defect_dir.name
        images = _images(defect_dir)
        problems += _same_stem_problems(defect_dir, images)
        for img in images:
            if label == GOOD:
                samples.append(Sample(img, None, GOOD))
                continue
            mask = gt_dir / label / f"{img.stem}_mask.png"
            if not mask.is_file():
                problems.append(f"{img}: no mask (expected {mask})")
                continue
            samples.append(Sample(img, mask, label))
    if gt_dir.is_dir():
        stems = {(s.label, s.image.stem): s.image for s in samples}
        for mdir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
            for m in _images(mdir):
                stem = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else m.stem
                if (mdir.name, stem) not in stems:
                    expected = next(iter(_images_with_stem(test_dir / mdir.name, stem)), None)
                    expected = expected or test_dir / mdir.name / f"{stem}.png"
                    problems.append(f"{m}: orphan mask (expected its image {expected})")
    return samples


def _images_with_stem(folder: Path, stem: str) -> list[Path]:
    return [p for p in _images(folder) if p.stem == stem] if folder.is_dir() else []


def _decode_all(images: list[Path], with_masks: list[Sample], workers: int | None) -> dict:
    """Decode every image and mask once, in parallel: ``{"images": {path: (size_hw | None, problem |
    None)}, "masks": {path: (array | None, [problems])}}``."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    def image(p: Path):
        try:
            img = read_image(p)
        except PipelineError as exc:
            return None, str(exc)
        if img.dtype != np.uint8:
            return None, f"{p}: {img.dtype} image (expected 8 bits per sample; convert it to 8-bit first)"
        return tuple(img.shape[:2]), None

    def mask(s: Sample):
        try:
            return read_image(s.mask), []
        except PipelineError as exc:
            return None, [str(exc)]

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        img_results = dict(zip(images, pool.map(image, images)))
        mask_results = dict(zip([s.mask for s in with_masks], pool.map(mask, with_masks)))
    return {"images": img_results, "masks": mask_results}


def mask_problems(mask: np.ndarray, path: Path, size_hw: tuple[int, int]) -> list[str]:
    """Problems of one decoded mask: wrong size, more than one channel, non-binary values."""
    out = []
    if mask.ndim != 2:
        out.append(f"{path}: mask has {mask.shape[2]} channels (expected one 8-bit grey channel)")
        return out
    if mask.shape != tuple(size_hw):
        out.append(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image {size_hw[1]}x{size_hw[0]}"
        )
    values = set(np.unique(mask).tolist())
    if not (values <= {0, 255} or values <= {0, 1}):
        bad = sorted(values - {0, 1, 255})[:5]
        out.append(f"{path}: mask values {bad} (expected only 0/255 or 0/1)")
    return out


def read_mask(path: Path) -> np.ndarray:
    """Read a ground-truth mask as an ``HxW`` bool array (``> 0``); never divide by 255."""
    m = read_image(path)
    if m.ndim == 3:
        m = m[..., 0]
    return m > 0
