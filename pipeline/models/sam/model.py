"""Segment Anything: model construction, checkpoints, prompt/mask geometry and the image-embedding cache.

The only module importing ``segment_anything`` (Kirillov et al., "Segment Anything", ICCV 2023).

Frames (all boxes XYXY, pixels):

- *original*: the image as stored, ``size_hw = (H, W)``.
- *input*: the image after ``ResizeLongestSide(img_size)``: ``(h', w')`` with ``max(h', w') ==
  img_size``, padded bottom/right to ``img_size x img_size`` (1024 for vit_b/l/h, 256 for tiny).
- *low-res*: the mask decoder's logits, ``img_size/4`` square, covering the padded input frame.

``postprocess_masks`` goes low-res -> padded input -> crop ``(h', w')`` -> original, so masks
come back at native resolution; boxes go original -> input with the same per-axis scale as
the image (``apply_boxes_torch``), which differs slightly between x and y on non-square images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_torch_save, load_torch_file, read_rgb, sha256_file

MODEL_TYPES = ("tiny", "vit_b", "vit_l", "vit_h")
OFFICIAL_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}
# A small SAM built from segment_anything's own modules, random init from a fixed seed: for tests
# and CPU smoke runs. 256-px input, 16x16 embedding grid, 64x64 low-res masks.
TINY = {
    "img_size": 256,
    "patch_size": 16,
    "embed_dim": 64,
    "depth": 2,
    "num_heads": 2,
    "window_size": 4,
    "global_attn_indexes": (1,),
    "prompt_embed_dim": 64,
    "decoder_mlp_dim": 256,
    "decoder_num_heads": 4,
    "iou_head_hidden_dim": 64,
}
# Bump when image preprocessing changes: part of every embedding-cache key.
PREPROCESS_VERSION = "rls-pil-v1"
# Fine-tuned checkpoints (``finetune sam``): format tag and version, checked on every load.
CKPT_FORMAT = "pipeline.sam-finetune"
CKPT_VERSION = 1


def _build_tiny(seed: int):
    from functools import partial

    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    t = TINY
    grid = t["img_size"] // t["patch_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=t["img_size"],
                patch_size=t["patch_size"],
                embed_dim=t["embed_dim"],
                depth=t["depth"],
                num_heads=t["num_heads"],
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                qkv_bias=True,
                use_rel_pos=True,
                window_size=t["window_size"],
                global_attn_indexes=t["global_attn_indexes"],
                out_chans=t["prompt_embed_dim"],
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=t["prompt_embed_dim"],
                image_embedding_size=(grid, grid),
                input_image_size=(t["img_size"], t["img_size"]),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2,
                    embedding_dim=t["prompt_embed_dim"],
                    mlp_dim=t["decoder_mlp_dim"],
                    num_heads=t["decoder_num_heads"],
                ),
                transformer_dim=t["prompt_embed_dim"],
                iou_head_depth=3,
                iou_head_hidden_dim=t["iou_head_hidden_dim"],
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    return sam.eval()


def _build(model_type: str, *, tiny_seed: int):
    if model_type == "tiny":
        return _build_tiny(tiny_seed)
    import torch
    from segment_anything import sam_model_registry

    # vit_*: official architecture; the random init is overwritten by a checkpoint, or kept (timing only).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny_seed)
        return sam_model_registry[model_type](checkpoint=None).eval()


def build_sam(
    model_type: str,
    *,
    checkpoint: Path | None = None,
    tiny_seed: int = 0,
    device: str = "cpu",
):
    """Build a ``segment_anything.modeling.Sam`` and optionally load a full checkpoint, strictly.

    Args:
        model_type: ``tiny`` (random init from ``tiny_seed``), ``vit_b``, ``vit_l`` or ``vit_h``.
        checkpoint: a full SAM state dict (e.g. the official ``sam_vit_b_01ec64.pth``), already
            resolved to a path; ``None`` keeps the (seeded) random init.
        tiny_seed: seed of the random init (the tiny model's frozen parts depend on it).
        device: torch device string.

    Returns:
        The model in eval mode on ``device``.

    Raises:
        PipelineError: unknown type; checkpoint unreadable or not matching ``model_type``
            (missing/unexpected keys or shape mismatches; never a partial load).
    """
    import torch

    if model_type not in MODEL_TYPES:
        raise PipelineError(f"model type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    state = None
    if checkpoint is not None:
        state = _read_state_dict(Path(checkpoint))
        with torch.device("meta"):  # check keys and shapes before allocating a big model
            expected = {k: tuple(v.shape) for k, v in _build(model_type, tiny_seed=tiny_seed).state_dict().items()}
        _check_state(state, expected, where=f"{checkpoint}", what=f"--model-type {model_type}")
    sam = _build(model_type, tiny_seed=tiny_seed)
    if state is not None:
        sam.load_state_dict(state, strict=True)
    return sam.to(device).eval()


def _read_state_dict(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of all kinds
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        raise PipelineError(f"{path}: not a readable PyTorch checkpoint ({why})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PipelineError(f"{path}: expected a SAM state dict (name -> tensor)")
    return obj


def _check_state(state: dict, expected: dict[str, tuple], *, where: str, what: str) -> None:
    """Raise one line when ``state`` does not have exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != expected[k]]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        k = shapes[0]
        parts.append(
            f"{len(shapes)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} in file, {expected[k]} expected)"
        )
    hint = ", ".join(f"{n} is {t}" for t, n in OFFICIAL_CHECKPOINTS.items())
    raise PipelineError(f"{where}: does not match {what}: {'; '.join(parts)} (pair type and file: {hint})")


def load_state_strict(module, state: dict, *, where: str, what: str) -> None:
    """Load ``state`` into ``module`` after checking keys and shapes (one-line error otherwise)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _check_state(state, expected, where=where, what=what)
    module.load_state_dict(state, strict=True)


def resolve_base_checkpoint(model_type: str, checkpoint: str | None, *, allow_download: bool = False) -> Path | None:
    """The full SAM checkpoint to start from: required for vit_b/l/h (name or path), optional for tiny.

    Raises:
        PipelineError: vit_* without a checkpoint, or the file not found (see ``pipeline.core.weights``).
    """
    from pipeline.core.weights import resolve_weights

    if model_type not in MODEL_TYPES:
        raise PipelineError(f"--model-type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    if checkpoint is None:
        if model_type == "tiny":
            return None
        raise PipelineError(
            f"--model-type {model_type} needs --checkpoint (the official file is {OFFICIAL_CHECKPOINTS[model_type]})"
        )
    return resolve_weights(checkpoint, allow_download=allow_download)


def save_finetuned(path: Path, *, sam, config: dict, trained: list[str], extra: dict | None = None) -> None:
    """Write a fine-tuned checkpoint: the trained modules' state dicts and the config, atomically.

    Content: ``{"format", "version", "config", "trained", "state": {module: state_dict}, **extra}``;
    loadable with ``torch.load(..., weights_only=True)``.
    """
    obj = {
        "format": CKPT_FORMAT,
        "version": CKPT_VERSION,
        "config": config,
        "trained": list(trained),
        "state": {m: {k: v.detach().cpu() for k, v in getattr(sam, m).state_dict().items()} for m in trained},
    }
    obj.update(extra or {})
    atomic_torch_save(Path(path), obj)


def read_finetuned(path: Path) -> dict:
    """Load a fine-tuned checkpoint's dict (``map_location="cpu"``, ``weights_only=True``).

    Raises:
        PipelineError: missing, unreadable, or not written by :func:`save_finetuned`.
    """
    obj = load_torch_file(path, what="fine-tuned SAM checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        raise PipelineError(f"{path}: not a fine-tuned SAM checkpoint (expected one written by pipeline finetune sam)")
    if obj.get("version") != CKPT_VERSION:
        raise PipelineError(f"{path}: checkpoint version {obj.get('version')} (expected {CKPT_VERSION})")
    return obj


# ----------------------------------------------------------------------------- geometry


def input_shape_hw(size_hw: tuple[int, int], *, img_size: int) -> tuple[int, int]:
    """``(h', w')`` of an ``(H, W)`` image after ``ResizeLongestSide(img_size)`` (before padding)."""
    from segment_anything.utils.transforms import ResizeLongestSide

    return ResizeLongestSide.get_preprocess_shape(int(size_hw[0]), int(size_hw[1]), img_size)


def boxes_to_input(bbox_xyxy, *, size_hw: tuple[int, int], img_size: int):
    """Map ``Bx4`` XYXY boxes from original pixels to the input frame (same scale as the image).

    Args:
        bbox_xyxy: ``Bx4`` float tensor or array, original-image pixels.
        size_hw: original ``(H, W)``.
        img_size: model input side (1024, or 256 for tiny).

    Returns:
        ``Bx4`` float32 tensor in input-frame pixels (x scaled by ``w'/W``, y by ``h'/H``).
    """
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    boxes = torch.as_tensor(np.asarray(bbox_xyxy) if not isinstance(bbox_xyxy, torch.Tensor) else bbox_xyxy)
    return ResizeLongestSide(img_size).apply_boxes_torch(boxes, tuple(size_hw)).float()


def logits_to_native(sam, low_res_logits, *, size_hw: tuple[int, int]):
    """Low-res decoder logits ``Bx1xhxw`` -> ``Bx1xHxW`` logits at the original size (differentiable).

    Upsamples to the padded input square, removes the bottom/right padding, resizes to ``(H, W)``
    (bilinear, as ``SamPredictor``). Threshold at 0 for the binary mask.
    """
    img_size = sam.image_encoder.img_size
    return sam.postprocess_masks(
        low_res_logits,
        input_size=input_shape_hw(size_hw, img_size=img_size),
        original_size=tuple(int(s) for s in size_hw),
    )


def lowres_target(mask: np.ndarray, *, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A true mask in the decoder's low-res frame, for a loss at that resolution.

    The mask goes through the image's own geometry: resized to the input frame ``(h', w')``
    (``cv2.INTER_AREA``: coverage fractions when shrinking, so thin defects are not lost), padded
    bottom/right to ``img_size``, then 4x4 average-pooled to ``img_size/4`` square.

    Args:
        mask: ``HxW`` bool true mask at the original size.
        img_size: model input side.

    Returns:
        ``(target, valid)``: ``(img_size/4)x(img_size/4)`` float32 arrays; ``target`` in [0, 1] is the
        fraction of the cell covered by the mask, ``valid`` the fraction of the cell inside the image
        (0 on the padding).
    """
    import cv2

    h, w = input_shape_hw(mask.shape, img_size=img_size)
    big = np.zeros((img_size, img_size), np.float32)
    big[:h, :w] = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    valid = np.zeros((img_size, img_size), np.float32)
    valid[:h, :w] = 1.0
    g = img_size // 4
    return big.reshape(g, 4, g, 4).mean((1, 3)), valid.reshape(g, 4, g, 4).mean((1, 3))


def image_to_input(sam, image_rgb: np.ndarray):
    """``HxWx3`` uint8 RGB -> ``1x3xSxS`` float tensor: resized longest side, normalised, padded."""
    import torch
    from segment_anything.utils.transforms import ResizeLongestSide

    img_size = sam.image_encoder.img_size
    resized = ResizeLongestSide(img_size).apply_image(image_rgb)
    x = torch.as_tensor(resized, device=sam.device).permute(2, 0, 1).contiguous().float()
    return sam.preprocess(x)[None]


def decode(sam, embedding, boxes_input, *, multimask: bool = False):
    """Run prompt encoder + mask decoder with gradients (``SamPredictor`` disables them).

    Args:
        sam: the model.
        embedding: ``1xCxgxg`` image embedding (one image).
        boxes_input: ``Bx4`` XYXY boxes in the input frame (see :func:`boxes_to_input`).

    Returns:
        ``(low_res_logits Bx1x4gx4g, iou_pred Bx1)`` (``Bx3`` each with ``multimask``).
    """
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes_input.to(embedding.device), masks=None)
    return sam.mask_decoder(
        image_embeddings=embedding,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


# ----------------------------------------------------------------------------- embedding cache


def default_cache_dir() -> Path:
    """``$PIPELINE_CACHE/sam-embeddings``, else ``$XDG_CACHE_HOME/pipeline/sam-embeddings`` (``~/.cache``)."""
    if os.environ.get("PIPELINE_CACHE"):
        return Path(os.environ["PIPELINE_CACHE"]).expanduser() / "sam-embeddings"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "pipeline" / "sam-embeddings"


def encoder_fingerprint(sam) -> str:
    """SHA-256 over the image encoder's weights, input size, pixel statistics and preprocessing."""
    import torch

    h = hashlib.sha256(PREPROCESS_VERSION.encode())
    h.update(str(sam.image_encoder.img_size).encode())
    for name in ("pixel_mean", "pixel_std"):
        h.update(getattr(sam, name).detach().cpu().float().numpy().tobytes())
    for k, v in sorted(sam.image_encoder.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode() + str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Embedder:
    """Image embeddings, computed once under ``no_grad`` and cached on disk.

    Cache file: ``<cache_dir>/<encoder fingerprint[:16]>/<sha256 of image file>.pt`` holding a
    ``CxgxG`` float32 tensor. A hit does no encoder work; the counters say what happened.

    Attributes:
        sam: the model (its image encoder must be frozen for cached embeddings to stay valid).
        cache_dir: folder of the cache; ``None`` computes every time (the benchmark's baseline).
    """

    sam: Any
    cache_dir: Path | None = None
    encoder_calls: int = 0
    cache_hits: int = 0
    _fingerprint: str | None = None
    _sha: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = encoder_fingerprint(self.sam)
        return self._fingerprint

    def _cache_file(self, image: Path) -> Path:
        st = image.stat()
        key = (str(image), st.st_mtime_ns, st.st_size)
        if key not in self._sha:
            self._sha[key] = sha256_file(image)
        return Path(self.cache_dir) / self.fingerprint[:16] / f"{self._sha[key]}.pt"

    def compute(self, image: Path):
        """Run the image encoder (no cache): ``1xCxgxg`` float32 tensor on the model's device."""
        import torch

        x = image_to_input(self.sam, read_rgb(image))
        with torch.no_grad():
            emb = self.sam.image_encoder(x)
        self.encoder_calls += 1
        return emb

    def __call__(self, image: Path):
        """Embedding of ``image`` (``1xCxgxg`` float32 on the model's device), from cache when possible."""
        import torch

        image = Path(image)
        if not image.is_file():
            raise PipelineError(f"{image}: file not found (expected an image)")
        if self.cache_dir is None:
            return self.compute(image)
        path = self._cache_file(image)
        if path.is_file():
            try:
                emb = torch.load(path, map_location="cpu", weights_only=True)
                self.cache_hits += 1
                return emb[None].to(self.sam.device)
            except Exception:  # a corrupt cache entry is recomputed, not fatal
                pass
        emb = self.compute(image)
        atomic_torch_save(path, emb[0].detach().float().cpu().clone())
        return emb
