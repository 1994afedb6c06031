"""Read an MVTec AD category, pair images with masks, and write/read the split manifest.

Layout (Bergmann et al., CVPR 2019; the MVTec AD download):
``<root>/<category>/train/good/*.png``, ``test/<defect|good>/*.png``,
``ground_truth/<defect>/<stem>_mask.png``. Masks are 8-bit, read as ``> 0``.

MVTec's ``train/`` holds only good images, so supervised training needs a re-split of ``test/``:
:func:`make_split` draws a seeded split stratified per defect type (and good) and the manifest
(``annotations/<category>/split.json``) is what every later stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, read_image, read_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


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


def make_split(
    category: Category,
    *,
    ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> dict:
    """Seeded split of the test images into train/val/test, stratified by label.

    Each label's images are shuffled with ``numpy.random.default_rng(seed)`` and cut by
    ``ratios`` (rounded; every label with at least 3 images gets at least one image in each
    split). ``train/good`` stays listed as extra negatives.

    Returns:
        The manifest dict (paths relative to the category root, POSIX separators).

    Raises:
        PipelineError: ratios not positive or not summing to 1.
    """
    if len(ratios) != 3 or min(ratios) < 0 or abs(sum(ratios) - 1) > 1e-6:
        raise PipelineError(f"split ratios {ratios}: expected three non-negative numbers (train, val, test) summing to 1")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Sample]] = {}
    for s in category.test:
        by_label.setdefault(s.label, []).append(s)
    splits: dict[str, list[dict]] = {k: [] for k in SPLITS}
    for label in sorted(by_label):
        items = by_label[label]
        order = rng.permutation(len(items))
        n = len(items)
        n_val = int(round(n * ratios[1]))
        n_test = int(round(n * ratios[2]))
        if n >= 3:
            n_val = max(n_val, 1 if ratios[1] > 0 else 0)
            n_test = max(n_test, 1 if ratios[2] > 0 else 0)
        n_train = n - n_val - n_test
        cuts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
        for name, idx in cuts.items():
            for i in sorted(idx.tolist()):
                s = items[i]
                splits[name].append(
                    {
                        "image": s.image.relative_to(category.root).as_posix(),
                        "mask": s.mask.relative_to(category.root).as_posix() if s.mask else None,
                        "label": s.label,
                    }
                )
    return {
        "version": MANIFEST_VERSION,
        "category": category.name,
        "root": str(category.root),
        "seed": seed,
        "ratios": dict(zip(SPLITS, ratios)),
        "classes": category.defect_types,
        "splits": splits,
        "train_good": [p.relative_to(category.root).as_posix() for p in category.train_good],
    }


@dataclass(frozen=True)
class Split:
    """A loaded split manifest; paths resolved against the category root."""

    path: Path
    root: Path
    category: str
    classes: tuple[str, ...]
    manifest: dict

    def samples(self, split: str) -> list[Sample]:
        """Samples of ``split`` (``train``, ``val`` or ``test``) with absolute paths."""
        if split not in self.manifest["splits"]:
            raise PipelineError(f"{self.path}: no split {split!r} (expected one of {', '.join(SPLITS)})")
        return [
            Sample(self.root / e["image"], self.root / e["mask"] if e["mask"] else None, e["label"])
            for e in self.manifest["splits"][split]
        ]

    def train_good(self) -> list[Path]:
        return [self.root / p for p in self.manifest.get("train_good", [])]


def write_split(manifest: dict, path: Path) -> None:
    atomic_write_json(Path(path), manifest)


def load_split(path: Path, *, root: Path | None = None) -> Split:
    """Load ``split.json``.

    Args:
        path: the manifest file.
        root: category folder overriding the one recorded (when the data moved).

    Raises:
        PipelineError: missing file, wrong version, or missing keys.
    """
    path = Path(path)
    m = read_json(path)
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION or "splits" not in m:
        raise PipelineError(f"{path}: not a split manifest (expected version {MANIFEST_VERSION} with 'splits')")
    r = Path(root) if root else Path(m["root"])
    if not r.is_dir():
        raise PipelineError(f"{path}: category root {r} not found (pass the category folder to relocate it)")
    return Split(path=path, root=r, category=m["category"], classes=tuple(m["classes"]), manifest=m)
