"""Label Studio brush masks: its own RLE (not COCO RLE), made and read by ``label_studio_sdk``.

A ``brushlabels`` result holds ``{"format": "rle", "rle": [...]}``: run-length bytes over an
``H x W x 4`` RGBA buffer at the original image size (``label_studio_sdk.converter.brush``). This
module and :mod:`pipeline.review.client` are the only ones that import ``label_studio_sdk``, always
inside a function, so importing the package stays fast.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import PipelineError


def import_sdk():
    """``label_studio_sdk`` imported without its pydantic deprecation warnings (noise for our users)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import label_studio_sdk
        import label_studio_sdk.converter.brush  # noqa: F401
        import label_studio_sdk.core.api_error  # noqa: F401
    return label_studio_sdk


def brush_encode(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of an ``HxW`` mask (pixels ``> 0`` are painted) at the original image size.

    The mask is written as uint8 0/255 in all four RGBA channels (the SDK's ``mask2rle``); a 0/1 mask
    would import as almost transparent strokes.

    Returns:
        The ``rle`` list of byte values (ints 0-255) for a ``brushlabels`` result.

    Raises:
        ValueError: ``mask`` is not 2-D.
    """
    mask2rle = import_sdk().converter.brush.mask2rle
    if mask.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {mask.shape}")
    return [int(v) for v in mask2rle(np.where(mask > 0, 255, 0).astype(np.uint8))]


def brush_decode(rle: list[int], *, size_hw: tuple[int, int], source: str = "brush") -> np.ndarray:
    """Inverse of :func:`brush_encode`: the alpha channel of the RGBA buffer, ``HxW`` uint8 (0-255).

    Raises:
        PipelineError: the RLE is not decodable or does not hold ``H * W * 4`` values.
    """
    decode_rle = import_sdk().converter.brush.decode_rle
    h, w = size_hw
    try:
        flat = decode_rle(bytes(int(v) for v in rle))
    except (ValueError, IndexError) as exc:
        raise PipelineError(f"{source}: brush RLE not decodable ({exc})") from None
    if flat.size != h * w * 4:
        raise PipelineError(f"{source}: brush RLE holds {flat.size} values, expected {h}x{w}x4 = {h * w * 4}")
    return flat.reshape(h, w, 4)[:, :, 3].copy()
