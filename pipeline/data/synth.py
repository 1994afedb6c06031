"""A small synthetic category in the exact MVTec AD layout, deterministic by seed.

Used by the demo (``pipeline synth-mvtec OUT``) and most tests, in the spirit of anomalib's
test-data generator. Each defect type covers cases real masks have:

- ``scratch``: 1-pixel-thin lines (one or two per image: several components in one mask);
- ``ring``: an annulus (a component with a hole);
- ``spot``: two or three filled blobs, one touching the image border (corners included).

Good images have no mask. Images are non-square by default (``size_hw=(96, 128)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFECT_TYPES = ("ring", "scratch", "spot")


def _background(rng: np.random.Generator, size_hw: tuple[int, int]) -> np.ndarray:
    """A product-like texture: smooth gradient, a centred disc, mild noise. HxWx3 uint8 BGR."""
    import cv2

    h, w = size_hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 110 + 20 * (xx / max(w - 1, 1)) + 10 * (yy / max(h - 1, 1))
    img = np.repeat(base[..., None], 3, axis=2)
    disc = np.zeros((h, w), np.uint8)
    cv2.ellipse(disc, (w // 2, h // 2), (int(w * 0.38), int(h * 0.38)), 0, 0, 360, 1, -1)
    img[disc > 0] += 25
    img += rng.normal(0, 3, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_defect(kind: str, index: int, rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Draw one defect of ``kind`` into ``img`` (in place); return its HxW uint8 0/255 mask."""
    import cv2

    h, w = img.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    if kind == "scratch":
        n = 1 + index % 2  # odd images: two separate scratches
        for k in range(n):
            x0 = int(rng.integers(w // 8, w // 2)) + k * (w // 3)
            y0 = int(rng.integers(h // 8, h // 3))
            x1 = min(w - 2, x0 + int(rng.integers(8, w // 4)))
            y1 = min(h - 2, y0 + int(rng.integers(h // 4, h // 2)))
            cv2.line(mask, (x0, y0), (x1, y1), 255, thickness=1, lineType=cv2.LINE_8)
        img[mask > 0] = (25, 25, 25)
    elif kind == "ring":
        r = int(rng.integers(6, max(7, min(h, w) // 6)))
        cx = int(rng.integers(r + 2, w - r - 2))
        cy = int(rng.integers(r + 2, h - r - 2))
        cv2.circle(mask, (cx, cy), r, 255, thickness=3)
        img[mask > 0] = (235, 235, 235)
    elif kind == "spot":
        corners = [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)]
        cx, cy = corners[index % 4] if index % 2 == 0 else (int(rng.integers(0, w)), 0)
        cv2.circle(mask, (cx, cy), int(rng.integers(5, 10)), 255, thickness=-1)  # touches the border
        for _ in range(1 + index % 2):
            r = int(rng.integers(3, 7))
            cv2.circle(mask, (int(rng.integers(w // 4, 3 * w // 4)), int(rng.integers(h // 4, 3 * h // 4))), r, 255, -1)
        img[mask > 0] = (60, 60, 200)
    else:  # pragma: no cover - guarded by generate_category
        raise ValueError(kind)
    return mask


def generate_category(
    out: Path,
    *,
    seed: int = 0,
    size_hw: tuple[int, int] = (96, 128),
    n_train_good: int = 10,
    n_test_good: int = 6,
    n_per_defect: int = 6,
    defect_types: tuple[str, ...] = DEFECT_TYPES,
) -> Path:
    """Write a synthetic MVTec AD category to ``out`` and return ``out``.

    Args:
        out: category folder to create (its name is the category name).
        seed: everything drawn comes from ``numpy.random.default_rng(seed)``; same seed, same bytes.
        size_hw: image height and width in pixels.
        n_train_good, n_test_good, n_per_defect: image counts.
        defect_types: subset of :data:`DEFECT_TYPES`.

    Raises:
        ValueError: an unknown defect type or an image smaller than 32x32.
    """
    import cv2

    unknown = set(defect_types) - set(DEFECT_TYPES)
    if unknown:
        raise ValueError(f"unknown synthetic defect types {sorted(unknown)} (expected {DEFECT_TYPES})")
    if min(size_hw) < 32:
        raise ValueError(f"size_hw {size_hw}: expected at least 32x32")
    out = Path(out)
    rng = np.random.default_rng(seed)

    def write(path: Path, arr: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), arr):
            raise OSError(f"{path}: could not write image")

    for i in range(n_train_good):
        write(out / "train" / "good" / f"{i:03d}.png", _background(rng, size_hw))
    for i in range(n_test_good):
        write(out / "test" / "good" / f"{i:03d}.png", _background(rng, size_hw))
    for kind in defect_types:
        for i in range(n_per_defect):
            img = _background(rng, size_hw)
            mask = _draw_defect(kind, i, rng, img)
            write(out / "test" / kind / f"{i:03d}.png", img)
            write(out / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return out
