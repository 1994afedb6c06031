"""Read an MVTec AD category: pair images with masks and validate them.

Layout (Bergmann et al., CVPR 2019; the MVTec AD download):
``<root>/<category>/train/good/*.png``, ``test/<defect|good>/*.png``,
``ground_truth/<defect>/<stem>_mask.png``. Masks are 8-bit, read as ``> 0``.

MVTec's ``train/`` holds only good images, so supervised training needs a re-split of ``test/``:
that is :mod:`pipeline.data.split`.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """A scanned MVTec AD category: ``train/good`` images and labelled ``test`` samples."""

    root: Path
    train_good: tuple[Path, ...]
    test: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.label for s in self.test if s.label != GOOD})


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_category(root: Path, *, check_pixels: bool = True) -> Category:
    """Scan and validate an MVTec AD category folder.

    Checks that every defect image has exactly one mask ``ground_truth/<defect>/<stem>_mask.png``,
    that no mask is orphaned, and (``check_pixels``) that each mask decodes, has its image's size
    and holds only {0, 255} or {0, 1}.

    Args:
        root: the category folder (e.g. ``.../mvtec_ad/bottle``).
        check_pixels: decode every mask and image header to check sizes and values.

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
        raise PipelineError(f"{test_dir}: missing (expected MVTec AD layout: train/good, test/<defect>, ground_truth/<defect>)")
    problems: list[str] = []
    samples: list[Sample] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        label = defect_dir.name
        for img in _images(defect_dir):
            if label == GOOD:
                samples.append(Sample(img, None, GOOD))
                continue
            mask = gt_dir / label / f"{img.stem}_mask.png"
            if not mask.is_file():
                problems.append(f"{img}: no mask (expected {mask})")
                continue
            samples.append(Sample(img, mask, label))
    if gt_dir.is_dir():
        stems = {(s.label, s.image.stem) for s in samples}
        for mdir in sorted(p for p in gt_dir.iterdir() if p.is_dir()):
            for m in _images(mdir):
                stem = m.stem[: -len("_mask")] if m.stem.endswith("_mask") else m.stem
                if (mdir.name, stem) not in stems:
                    problems.append(f"{m}: orphan mask (expected image {test_dir / mdir.name / (stem + '.png')})")
    if check_pixels:
        from pipeline.core.io import image_size_hw

        for s in samples:
            if s.mask is None:
                continue
            try:
                mask = read_image(s.mask)
                size = image_size_hw(s.image)
                read_image(s.image)
            except PipelineError as exc:
                problems.append(str(exc))
                continue
            problems.extend(mask_problems(mask, s.mask, size))
    if problems:
        raise PipelineError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems))
    if not samples:
        raise PipelineError(f"{test_dir}: no test images found (expected test/<defect>/*.png)")
    train_good = tuple(_images(train_dir)) if train_dir.is_dir() else ()
    return Category(root=root, train_good=train_good, test=tuple(samples))


def mask_problems(mask: np.ndarray, path: Path, size_hw: tuple[int, int]) -> list[str]:
    """Problems of one decoded mask: wrong size, more than one channel, non-binary values."""
    out = []
    if mask.ndim != 2:
        out.append(f"{path}: mask has {mask.shape[2]} channels (expected one 8-bit grey channel)")
        return out
    if mask.shape != tuple(size_hw):
        out.append(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image {size_hw[1]}x{size_hw[0]}")
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
