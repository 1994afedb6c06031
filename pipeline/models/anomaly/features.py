"""PatchCore's image side: pre-processing, locally aware patch features, patch scores -> anomaly maps.

Pre-processing (``resize``): every 8-bit image (any size, grey/BGR/BGRA; :func:`pipeline.core.io.read_rgb`
refuses other depths) is converted to RGB and resized, aspect ratio not kept, to ``size`` x ``size``:

- ``"area"``: OpenCV area interpolation on the 8-bit image, then scaled to ``[0, 1]``;
- ``"bilinear_aa"``: scaled to ``[0, 1]`` floats first, then antialiased bilinear
  (``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``, what
  torchvision's ``Resize(antialias=True)`` does to a float tensor, and so anomalib's pre-processing).

Maps (``upsample``): the ``hxw`` grid of patch scores is upsampled to the input size, ``"bilinear"``
(OpenCV, half-pixel centres) or ``"nearest"`` (each patch score fills its ``stride x stride`` cell,
``torch.nn.functional.interpolate(mode="nearest")``'s rule, as anomalib does), then smoothed by a
Gaussian of ``sigma`` input pixels (Roth et al. 2022, Sec. 3.3: sigma 4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_rgb

RESIZE_METHODS = ("area", "bilinear_aa")
UPSAMPLE_METHODS = ("bilinear", "nearest")


def check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    """Raise a one-line :class:`PipelineError` when ``value`` is not one of ``allowed``."""
    if value not in allowed:
        raise PipelineError(f"{what} {value!r}: expected one of {', '.join(allowed)}")


# ------------------------------------------------------------------------------ pre-processing
def resize_rgb(image_rgb: np.ndarray, *, size: int, resize: str = "area"):
    """One ``HxWx3`` uint8 RGB image -> ``3xSxS`` float32 tensor in ``[0, 1]`` (module docstring).

    Raises:
        PipelineError: unknown ``resize``.
    """
    import torch

    check_choice("resize", resize, RESIZE_METHODS)
    if resize == "area":
        import cv2

        im = cv2.resize(image_rgb, (size, size), interpolation=cv2.INTER_AREA)
        return torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div_(255.0)
    x = torch.from_numpy(np.ascontiguousarray(image_rgb)).permute(2, 0, 1).float().div_(255.0)
    if x.shape[-2:] == (size, size):
        return x
    return torch.nn.functional.interpolate(
        x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )[0]


def preprocess(images_rgb: Iterable[np.ndarray], *, size: int, spec, device: str = "cpu", resize: str = "area"):
    """``HxWx3`` uint8 RGB images -> ``Bx3xSxS`` float32 tensor, resized (:func:`resize_rgb`) and
    normalised with ``spec.mean`` / ``spec.std``."""
    import torch

    x = torch.stack([resize_rgb(im, size=size, resize=resize) for im in images_rgb])
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def load_batch(paths: Sequence[Path], *, size: int, spec, device: str = "cpu", resize: str = "area"):
    """Read and pre-process image files: ``(Bx3xSxS tensor, [(H, W) native sizes])``."""
    imgs = [read_rgb(p) for p in paths]
    return preprocess(imgs, size=size, spec=spec, device=device, resize=resize), [im.shape[:2] for im in imgs]


# ------------------------------------------------------------------------------ features
def patch_features(backbone, x, *, feature_dim: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Locally aware patch features of a batch (Roth et al. 2022, Sec. 3.1).

    Each of the backbone's two stages is averaged over its ``3x3`` neighbourhood (stride 1, ``p = 3``),
    the deeper one is upsampled bilinearly to the shallower one's grid, and the two are concatenated.

    Args:
        backbone: a :class:`pipeline.models.backbones.Backbone`.
        x: ``Bx3xSxS`` pre-processed tensor.
        feature_dim: optional channel count after adaptive average pooling over channels.

    Returns:
        ``(features, (h, w))``: ``(B*h*w)xD`` float32 array in row-major order (image, row, column),
        and the grid size of the shallower stage.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        f1, f2 = backbone.model(x)
        f1 = F.avg_pool2d(f1, 3, stride=1, padding=1)
        f2 = F.avg_pool2d(f2, 3, stride=1, padding=1)
        if f2.shape[-2:] != f1.shape[-2:]:
            f2 = F.interpolate(f2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([f1, f2], dim=1)  # BxDxhxw
        b, d, h, w = f.shape
        f = f.permute(0, 2, 3, 1).reshape(-1, d)
        if feature_dim is not None and feature_dim != d:
            f = F.adaptive_avg_pool1d(f.unsqueeze(1), feature_dim).squeeze(1)
    return f.float().cpu().numpy(), (h, w)


# ------------------------------------------------------------------------------ maps
def upsample_grid(grid: np.ndarray, *, size: int, upsample: str = "bilinear") -> np.ndarray:
    """One ``hxw`` float grid -> ``SxS`` float32, bilinear (OpenCV, half-pixel centres) or nearest
    (output pixel ``i`` takes grid cell ``floor(i * h / S)``, ``torch`` ``mode="nearest"``).

    Raises:
        PipelineError: unknown ``upsample``.
    """
    import cv2

    check_choice("upsample", upsample, UPSAMPLE_METHODS)
    g = np.ascontiguousarray(grid, dtype=np.float32)
    if upsample == "bilinear":
        return cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR)
    h, w = g.shape
    rows = np.minimum((np.arange(size) * h) // size, h - 1)
    cols = np.minimum((np.arange(size) * w) // size, w - 1)
    return g[rows[:, None], cols[None, :]]


def patch_maps(patch: np.ndarray, *, size: int, sigma: float, upsample: str = "bilinear") -> np.ndarray:
    """``Bxhxw`` patch scores -> ``BxSxS`` float32 maps: :func:`upsample_grid`, then a Gaussian of
    ``sigma`` px (kernel ``2 * int(4 * sigma + 0.5) + 1``, reflected border; none when ``sigma <= 0``)."""
    import cv2

    k = 2 * int(4 * sigma + 0.5) + 1
    out = np.empty((patch.shape[0], size, size), np.float32)
    for i, p in enumerate(patch.astype(np.float32)):
        up = upsample_grid(p, size=size, upsample=upsample)
        if sigma > 0:
            up = cv2.GaussianBlur(up, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
        out[i] = up
    return out
