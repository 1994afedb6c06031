"""Class names -> the text embeddings YOLO-World takes as prompts.

Real CLIP (``clip:ViT-B/32``, the text encoder YOLO-World was trained with) when the ``clip``
package and its weights are on disk, otherwise deterministic per-name vectors
(:func:`hash_text_embeddings`), which make the detector closed-set. Either way they are computed
once per run, stored in ``weights/class_embeddings.pt`` beside the checkpoints
(:func:`save_embeddings`) and reused for validation, resume and prediction.

A class name may hold synonyms, ``"scratch / crack"``: ultralytics looks up every part, raw and
stripped (:func:`prompt_texts`); the first part stands for the class (:func:`class_prompt`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_torch_save

CLIP_VARIANT = "clip:ViT-B/32"  # the text encoder YOLO-World was trained with
HASH_SOURCE = "sha256-normal"  # deterministic stand-in when CLIP is unavailable
EMBEDDINGS_FILE = "class_embeddings.pt"


def hash_text_embeddings(texts: list[str], *, dim: int = 512) -> torch.Tensor:
    """Deterministic unit vectors, one per text, seeded from the SHA-256 of the text.

    The same text always gives the same vector (any process, any machine); different texts give
    independent standard-normal directions, so they are nearly orthogonal for ``dim`` 512. They
    carry no meaning: a detector trained with them only knows the trained names (closed set).

    Args:
        texts: class names (prompts), e.g. ``["ring", "scratch"]``.
        dim: embedding size of the model's text head (512 for the v8 worldv2 models).

    Returns:
        ``N x dim`` float32 tensor of L2-normalised rows, ``N = len(texts)``.
    """
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        vec = np.random.default_rng(seed).standard_normal(dim)
        rows.append(vec / np.linalg.norm(vec))
    return torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(len(texts), dim))


def clip_weights_path() -> Path:
    """Where ultralytics keeps (or would download) the CLIP ViT-B/32 weights."""
    from ultralytics.utils import WEIGHTS_DIR

    return Path(WEIGHTS_DIR) / "clip" / "ViT-B-32.pt"


def clip_usable(allow_download: bool) -> bool:
    """CLIP can encode text: the package imports and its weights are on disk (or may be fetched)."""
    if importlib.util.find_spec("clip") is None:
        return False
    return allow_download or clip_weights_path().is_file()


def _clip_text_embeddings(texts: list[str], device: Any) -> torch.Tensor:
    """``N x 512`` unit CLIP ViT-B/32 text embeddings (ultralytics' own encoder wrapper)."""
    from ultralytics.nn.text_model import build_text_model

    encoder = build_text_model(CLIP_VARIANT, device=device)
    return encoder.encode_text(encoder.tokenize(texts)).detach().float().cpu()


def text_table(names: list[str], *, dim: int, use_clip: bool, device: Any) -> dict[str, torch.Tensor]:
    """Text -> ``dim`` embedding for every prompt ultralytics may look up for ``names``.

    With CLIP each synonym (``a/b``) gets its own embedding. Without it a class gets one hash
    vector (of its first synonym) shared by all its synonyms: hash vectors carry no meaning,
    so synonyms must not become unrelated prompts.

    Raises:
        PipelineError: CLIP's embedding size differs from the model's text head (``dim``).
    """
    texts = prompt_texts(names)
    if use_clip:
        feats = _clip_text_embeddings(texts, device)
        if feats.shape[-1] != dim:
            raise PipelineError(f"CLIP gives {feats.shape[-1]}-d text embeddings but the model's text head takes {dim}")
        return dict(zip(texts, feats))
    table = {}
    for name, vec in zip(names, hash_text_embeddings([class_prompt(n) for n in names], dim=dim)):
        for text in prompt_texts([name]):
            table.setdefault(text, vec)
    return table


def prompt_texts(names: list[str]) -> list[str]:
    """Every text ultralytics may look up for these class names: synonyms split on ``/``, raw and stripped."""
    out: list[str] = []
    for name in names:
        for part in name.split("/"):
            for text in (part, part.strip()):
                if text not in out:
                    out.append(text)
    return out


def class_prompt(name: str) -> str:
    """The prompt that stands for a class at validation and prediction: its first synonym."""
    return name.split("/", 1)[0].strip()


def text_dim(model: Any) -> int:
    """Size of the text embeddings a YOLO-World model takes (the guide channels of its attention blocks).

    Raises:
        PipelineError: the model has no text-guided attention block (not YOLO-World).
    """
    from ultralytics.nn.modules.block import MaxSigmoidAttnBlock

    for module in model.modules():
        if isinstance(module, MaxSigmoidAttnBlock):
            return int(module.gl.in_features)
    raise PipelineError("the model has no text-guided attention blocks: it is not a YOLO-World model")


def save_embeddings(path: Path, *, names: list[str], table: dict, source: str) -> None:
    """Write ``{names, embeddings (nc x dim float32), texts, text_embeddings (len(texts) x dim), source,
    open_vocabulary}`` to ``path`` (torch.save, atomically). ``embeddings`` row ``i`` is class ``i``'s
    :func:`class_prompt`; ``source`` is :data:`CLIP_VARIANT` or :data:`HASH_SOURCE`."""
    texts = list(table)
    payload = {
        "names": list(names),
        "embeddings": torch.stack([table[class_prompt(n)] for n in names]).float().cpu(),
        "texts": texts,
        "text_embeddings": torch.stack([table[t] for t in texts]).float().cpu(),
        "source": source,
        "open_vocabulary": source == CLIP_VARIANT,
    }
    atomic_torch_save(path, payload)


def load_embeddings(path: Path) -> dict:
    """Read a class-embeddings file written by :func:`save_embeddings` (``weights_only``, on the CPU).

    Raises:
        PipelineError: unreadable file, or not a dict with ``names`` and ``embeddings``.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file
        raise PipelineError(f"{path}: unreadable class-embeddings file ({exc})") from None
    if not isinstance(payload, dict) or not {"names", "embeddings"} <= set(payload):
        raise PipelineError(f"{path}: expected a dict with 'names' and 'embeddings' (a class-embeddings file)")
    return payload


def embeddings_beside(weights: Path) -> Path:
    """The class-embeddings file of a run's checkpoint: ``weights/class_embeddings.pt``."""
    return Path(weights).parent / EMBEDDINGS_FILE
