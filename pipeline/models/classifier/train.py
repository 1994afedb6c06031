"""ResNet-18 image-level classifiers (good vs each defect type): the four published attempts,
a readable training loop, checkpoints, and prediction files.

Model variants (``ModelConfig.variant``; He et al., CVPR 2016 for ResNet-18):

- ``avgpool`` (attempt 1): adaptive average pooling, head ``dropout -> linear``.
- ``selfattention`` (attempt 2): SAGAN self-attention (Zhang et al., ICML 2019) after the named
  stages, with a learnable residual gate ``gamma`` initialised to 0 and dropout on its output.
- ``dropblock`` (attempt 3): DropBlock (Ghiasi et al., NeurIPS 2018; ``torchvision.ops.DropBlock2d``)
  after the named stages, average pooling, head ``linear -> BN -> ReLU -> dropout -> linear``.
- ``gem`` (attempt 4): generalised-mean pooling with a learnable exponent (Radenovic et al.,
  TPAMI 2018) instead of average pooling.

Stages listed in ``freeze`` have ``requires_grad=False``, stay out of the optimizer, and keep their
BatchNorm layers in eval mode, so their parameters and running statistics never change.

Images: the split manifest gives ``(image, label)``; labels are ``good`` or the defect type
(``task="binary"`` folds every defect into ``defect``). Images are decoded and resized once and
cached (in memory, and on disk under ``data.cache_dir``) as ``N x 3 x H x W`` uint8 RGB; augmentation
runs on whole batches on the training device.

The loop follows torchvision's ``references/classification/train.py``: :func:`train_one_epoch`,
:func:`evaluate`, :func:`train_classifier`; checkpoints hold model, optimizer, scheduler, epoch,
config, classes and history, and a run resumes from ``weights/last.pt``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.models.classifier.config import ClassifierConfig, ModelConfig, config_from_dict, config_to_dict
from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, check_can_write, load_torch_file, read_image,
)

GOOD = "good"
DEFECT = "defect"
RESNET18_IMAGENET = "resnet18-f37072fd.pth"
_MEMORY_CACHE: dict[tuple, "np.ndarray"] = {}


# ----------------------------------------------------------------------------- model parts


def _make_classes():
    """Module classes are created on first use so ``import pipeline.models.classifier.train`` stays light."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torchvision.ops import DropBlock2d, drop_block2d

    class GeM(nn.Module):
        """Generalised-mean pooling ``(mean(clamp(x, eps) ** p)) ** (1 / p)`` over H x W.

        Input ``B x C x H x W`` float; output ``B x C``. ``p`` is a learnable scalar (init ``p``);
        p = 1 is average pooling, p -> inf max pooling (Radenovic et al., TPAMI 2018).
        """

        def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.tensor(float(p)))
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)

    class AvgPool(nn.Module):
        """Adaptive average pooling to ``B x C``."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.adaptive_avg_pool2d(x, 1).flatten(1)

    class SelfAttention2d(nn.Module):
        """SAGAN self-attention block (Zhang et al., ICML 2019), as in the official code.

        ``theta = W_theta x`` (C/8 channels) attends over ``phi = maxpool(W_phi x)`` (C/8) and
        ``g = maxpool(W_g x)`` (C/2); ``o = W_o (softmax(theta^T phi) g)`` (back to C channels);
        output ``x + gamma * dropout(o)`` with ``gamma`` a learnable scalar initialised to 0, so the
        block starts as the identity. Input and output ``B x C x H x W``.
        """

        def __init__(self, channels: int, *, pool: int = 2, dropout: float = 0.0) -> None:
            super().__init__()
            c8, c2 = max(channels // 8, 1), max(channels // 2, 1)
            self.theta = nn.Conv2d(channels, c8, 1, bias=False)
            self.phi = nn.Conv2d(channels, c8, 1, bias=False)
            self.g = nn.Conv2d(channels, c2, 1, bias=False)
            self.out = nn.Conv2d(c2, channels, 1, bias=False)
            self.pool = pool
            self.drop = nn.Dropout(dropout)
            self.gamma = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, c, h, w = x.shape
            theta = self.theta(x).flatten(2)  # B x C/8 x N
            phi, g = self.phi(x), self.g(x)
            if self.pool > 1 and h >= self.pool and w >= self.pool:
                phi, g = F.max_pool2d(phi, self.pool), F.max_pool2d(g, self.pool)
            attn = torch.softmax(theta.transpose(1, 2) @ phi.flatten(2), dim=-1)  # B x N x M
            o = (g.flatten(2) @ attn.transpose(1, 2)).view(b, -1, h, w)  # B x C/2 x H x W
            return x + self.gamma * self.drop(self.out(o))

    class DropBlock(DropBlock2d):
        """``torchvision.ops.DropBlock2d`` whose block size is clipped to the largest odd size that
        fits the feature map, so small inputs (tests, 128 px) keep working; identity in eval mode."""

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            bs = min(self.block_size, input.shape[-2], input.shape[-1])
            bs -= 1 - bs % 2  # torchvision needs an odd block size
            return drop_block2d(input, self.p, bs, self.inplace, self.eps, self.training)

    class ResNetClassifier(nn.Module):
        """ResNet-18 trunk + per-stage extras + pooling + head.

        ``forward(x)``: ``B x 3 x H x W`` normalised float -> ``B x num_classes`` logits.
        ``embed(x)``: the pooled ``B x 512`` features the head reads.
        """

        def __init__(self, trunk: nn.Module, cfg: ModelConfig, num_classes: int) -> None:
            super().__init__()
            self.cfg = cfg
            self.stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
            self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
            widths = {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
            extras = {}
            for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
                mods = []
                if cfg.variant == "selfattention" and stage in cfg.attention_after:
                    mods.append(SelfAttention2d(widths[stage], pool=cfg.attention_pool, dropout=cfg.attention_dropout))
                if cfg.variant == "dropblock" and stage in cfg.dropblock.after:
                    mods.append(DropBlock(cfg.dropblock.p, cfg.dropblock.block_size))
                extras[stage] = nn.Sequential(*mods)
            self.extras = nn.ModuleDict(extras)
            self.pool = GeM(cfg.gem_p, cfg.gem_eps) if cfg.variant == "gem" else AvgPool()
            if cfg.head_hidden > 0:
                self.head = nn.Sequential(
                    nn.Linear(512, cfg.head_hidden), nn.BatchNorm1d(cfg.head_hidden), nn.ReLU(inplace=True),
                    nn.Dropout(cfg.dropout), nn.Linear(cfg.head_hidden, num_classes),
                )
            else:
                self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(512, num_classes))
            self.frozen = tuple(cfg.freeze)
            for stage in self.frozen:
                for p in getattr(self, stage).parameters():
                    p.requires_grad_(False)

        def train(self, mode: bool = True):
            super().train(mode)
            for stage in self.frozen:  # frozen stages: BatchNorm statistics stay fixed too
                getattr(self, stage).eval()
            return self

        def embed(self, x: torch.Tensor) -> torch.Tensor:
            for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
                x = self.extras[stage](getattr(self, stage)(x))
            return self.pool(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(x))

    return {"GeM": GeM, "AvgPool": AvgPool, "SelfAttention2d": SelfAttention2d, "DropBlock": DropBlock,
            "ResNetClassifier": ResNetClassifier}


_CLASSES: dict | None = None


def model_classes() -> dict:
    """The module classes (``GeM``, ``SelfAttention2d``, ``DropBlock``, ``ResNetClassifier``)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


def resolve_init_weights(weights: str, *, allow_download: bool = False) -> tuple[Path | None, str]:
    """``"none"`` | ``"imagenet"`` | a path -> (file or None, a note for every report).

    ``imagenet`` looks for torchvision's ``resnet18-f37072fd.pth`` in the weights caches
    (``pipeline.core.weights``); it is downloaded only with ``allow_download``.
    """
    from pipeline.core.weights import resolve_weights

    if weights == "none":
        return None, "none (trained from scratch, no ImageNet initialisation)"
    if weights == "imagenet":
        path = resolve_weights(RESNET18_IMAGENET, allow_download=allow_download)
        return path, f"imagenet ({path})"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise PipelineError(f"{weights}: weights file not found (expected 'imagenet', 'none' or a ResNet-18 state-dict file)")
    return path.resolve(), f"file ({path.resolve()})"


def build_model(cfg: ModelConfig, num_classes: int, *, init_weights: Path | None = None):
    """Build the classifier for ``cfg``; ``init_weights`` is a torchvision ResNet-18 state dict.

    Raises:
        PipelineError: the weights file is not a ResNet-18 state dict.
    """
    import torch
    import torchvision

    trunk = torchvision.models.resnet18(weights=None)
    if init_weights is not None:
        try:
            state = torch.load(init_weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable / not a torch file
            raise PipelineError(f"{init_weights}: not a readable torch state dict ({exc.__class__.__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise PipelineError(
                f"{init_weights}: not a torchvision ResNet-18 state dict ({len(missing)} missing, {len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:3]})"
            )
    return model_classes()["ResNetClassifier"](trunk, cfg, num_classes)


def make_optimizer(cfg: ClassifierConfig, model):
    """AdamW over the trainable parameters (``lr``, ``weight_decay`` from ``cfg.train``)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def make_scheduler(cfg: ClassifierConfig, optimizer):
    """CosineAnnealingLR with ``T_max = epochs`` and ``eta_min`` from ``cfg.train`` (stepped per epoch)."""
    import torch

    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs, eta_min=cfg.train.eta_min)


def make_loss(cfg: ClassifierConfig, class_counts: Sequence[int] | None = None, device: str = "cpu"):
    """CrossEntropyLoss(label_smoothing) with class-balanced weights when ``longtail.balance == reweight``."""
    import torch

    from pipeline.models.classifier.longtail import class_balanced_weights

    weight = None
    if cfg.longtail.balance == "reweight":
        if class_counts is None:
            raise ValueError("reweight needs class counts")
        weight = torch.tensor(class_balanced_weights(class_counts, cfg.longtail.cb_beta), dtype=torch.float32, device=device)
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} requested but CUDA is not available (use --device cpu or auto)")
    return name


# ----------------------------------------------------------------------------- data


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
        return np.bincount(self.labels.numpy(), minlength=len(self.classes)).tolist()


def class_names(split, task: str) -> list[str]:
    """``["good", *defect types]`` (multiclass) or ``["good", "defect"]`` (binary)."""
    if task == "binary":
        return [GOOD, DEFECT]
    return [GOOD] + sorted(c for c in split.classes if c != GOOD)


def subset_entries(split, subset: str, classes: Sequence[str], *, use_train_good: bool = False, max_train_good: int = -1,
                   seed: int = 0) -> list[tuple[Path, int]]:
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
            raise PipelineError(f"{split.path}: label {s.label!r} of {s.image} is not among the manifest classes {list(classes)}")
        out.append((s.image, index[lab]))
    if use_train_good and subset == "train":
        extra = split.train_good()
        if 0 <= max_train_good < len(extra):
            keep = np.sort(np.random.default_rng(seed).permutation(len(extra))[:max_train_good])
            extra = [extra[i] for i in keep]
        out += [(p, index[GOOD]) for p in extra]
    return out


def check_classes_present(split, entries: list[tuple[Path, int]], classes: Sequence[str], subset: str) -> None:
    """Every class needs at least one image in ``subset``; one line naming the empty ones."""
    counts = np.bincount([i for _, i in entries], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise PipelineError(
            f"{split.path}: class(es) {', '.join(empty)} have no images in the {subset} split (expected at least one per class; re-split or drop the class)"
        )


def _cache_key(path: Path, size_hw: tuple[int, int]) -> tuple:
    st = path.stat()
    return (str(path), st.st_mtime_ns, st.st_size, tuple(size_hw))


def load_resized(path: Path, size_hw: tuple[int, int], *, cache_dir: Path | None = None) -> np.ndarray:
    """Decode an image as RGB and resize it to ``size_hw`` (INTER_AREA): ``3 x H x W`` uint8.

    Results are kept in a process-wide memory cache and, with ``cache_dir``, as ``.npy`` files
    named by a hash of (path, mtime, size, target size).
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
            except (OSError, ValueError):
                pass
    img = read_image(path, flags=cv2.IMREAD_COLOR)
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = size_hw
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if img.shape[0] > h else cv2.INTER_LINEAR)
    arr = np.ascontiguousarray(img.transpose(2, 0, 1))
    _MEMORY_CACHE[key] = arr
    if disk is not None:
        import io

        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(disk, buf.getvalue())
    return arr


def load_image_set(entries: list[tuple[Path, int]], classes: Sequence[str], root: Path, size_hw: tuple[int, int], *,
                   cache_dir: Path | None = None, progress: bool = True, desc: str = "images") -> ImageSet:
    """Decode, resize and stack ``entries`` into an :class:`ImageSet` (cached; decoded in a thread pool)."""
    import torch

    import os
    from concurrent.futures import ThreadPoolExecutor

    # OpenCV releases the GIL while decoding and resizing, so threads fill the cache in parallel
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        it = pool.map(lambda e: load_resized(e[0], size_hw, cache_dir=cache_dir), entries)
        if progress and len(entries) > 20:
            from tqdm import tqdm

            it = tqdm(it, total=len(entries), desc=f"decode {desc}", leave=False)
        arrs = list(it)
    h, w = size_hw
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
    import torch

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
    import torch
    import torch.nn.functional as F

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


# ----------------------------------------------------------------------------- loop


def batch_order(labels, cfg: ClassifierConfig, gen):
    """Sample indices for one epoch: a permutation, or class-balanced draws with replacement."""
    import torch

    n = len(labels)
    if cfg.longtail.balance == "resample":
        from pipeline.models.classifier.longtail import class_balanced_weights, sample_weights

        counts = np.bincount(labels.numpy(), minlength=int(labels.max()) + 1)
        counts = np.maximum(counts, 1)
        w = sample_weights(labels.numpy(), class_balanced_weights(counts, cfg.longtail.cb_beta))
        return torch.multinomial(torch.tensor(w), n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


def _loss_weight_sum(loss_fn, y) -> float:
    """What a mean-reduced (weighted) CrossEntropyLoss divides by for targets ``y``."""
    w = getattr(loss_fn, "weight", None)
    return float(len(y)) if w is None else float(w[y].sum())


def _batch_to_device(images, idx, device: str, pinned: dict | None):
    """``images[idx]`` on ``device``; on CUDA through a reused pinned host buffer (async copy)."""
    import torch

    if pinned is None or not device.startswith("cuda"):
        return images[idx].to(device)
    buf = pinned.get("buf")
    if buf is None or buf.shape[0] < len(idx):
        buf = pinned["buf"] = torch.empty((max(len(idx), 1), *images.shape[1:]), dtype=images.dtype).pin_memory()
    out = buf[: len(idx)]
    torch.index_select(images, 0, idx, out=out)
    return out.to(device, non_blocking=True)


def train_one_epoch(model, data: ImageSet, cfg: ClassifierConfig, optimizer, loss_fn, device: str, gen, *, progress: bool = False,
                    amp: bool = True, channels_last: bool = False, pinned: dict | None = None) -> dict:
    """One pass over ``data``; returns ``{"train_loss", "train_accuracy", "images_per_s", "data_s", "step_s"}``.

    Batches of one image are skipped when the head has BatchNorm (it cannot train on one); under
    DDP a (last) global batch too small to give every rank one image, or two with training
    BatchNorm, is skipped on every rank.

    Distributed (``pipeline.core.distributed``, ``model`` wrapped in DDP): every rank draws the same
    global order from ``gen``; each global batch of ``train.batch_size`` is sliced per rank, the
    rank's loss is scaled so DDP's gradient average equals the global-batch mean gradient, and the
    returned loss/accuracy/throughput are reduced over ranks. ``amp``: bf16 autocast on CUDA only.
    """
    import torch

    from pipeline.core import distributed as D

    model.train()
    order = batch_order(data.labels, cfg, gen)
    bs = cfg.train.batch_size
    total, correct, seen = 0.0, 0, 0
    data_s = step_s = 0.0
    has_bn1d = any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    world = D.info().world_size
    # BatchNorm in training mode fails on one image per rank with a 1x1 feature map (small inputs)
    trains_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    starts = range(0, len(order), bs)
    if progress and D.is_main():
        from tqdm import tqdm

        starts = tqdm(starts, desc="train", leave=False)
    t_epoch = time.perf_counter()
    for i in starts:
        t0 = time.perf_counter()
        gidx = order[i : i + bs]
        if (len(gidx) < 2 and has_bn1d) or len(gidx) < world or (world > 1 and trains_bn and len(gidx) // world < 2):
            continue  # every rank needs at least one image (two with BatchNorm); DDP steps together
        rows = D.rank_slice(len(gidx))
        idx = gidx[rows]
        x = _batch_to_device(data.images, idx, device, pinned)
        x = normalize(x, cfg.data.mean, cfg.data.std)
        x = augment(x, cfg.data.augment, gen, global_n=len(gidx), rows=rows)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.labels[idx].to(device)
        scale = 1.0
        if world > 1:  # DDP averages over ranks: weight this rank's mean by its share of the global mean
            if getattr(loss_fn, "weight", None) is None:
                scale = D.ddp_loss_scale(len(idx), len(gidx))
            else:  # class-weighted mean: the shares are sums of weights, known only after a reduction
                local_w = _loss_weight_sum(loss_fn, y)
                scale = world * local_w / max(D.all_reduce_sums({"w": local_w})["w"], 1e-12)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        with D.autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        optimizer.step()
        total += float(loss.detach()) * scale * len(gidx) / world  # summed over ranks: the global batch mean x its size
        correct += int((logits.argmax(1) == y).sum())
        seen += len(idx)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        data_s += t1 - t0
        step_s += time.perf_counter() - t1
    wall = D.all_reduce_max(time.perf_counter() - t_epoch)
    r = D.all_reduce_sums({"total": total, "correct": correct, "seen": seen})
    return {
        "train_loss": r["total"] / max(r["seen"], 1),
        "train_accuracy": r["correct"] / max(r["seen"], 1),
        "images_per_s": r["seen"] / wall if wall > 0 else None,
        "data_s": data_s,
        "step_s": step_s,
    }


def predict_probs(model, data: ImageSet, cfg: ClassifierConfig, device: str, *, batch_size: int | None = None, shard: bool = False):
    """Softmax probabilities ``N x C`` (float32 CPU tensor) in eval mode, no augmentation.

    ``shard``: under DDP every rank must call this; each scores a strided shard and all get the
    gathered ``N x C`` in input order (a collective: never call it with ``shard`` from one rank only).
    """
    import torch

    from pipeline.core import distributed as D

    model = D.unwrap(model)
    model.eval()
    bs = batch_size or cfg.train.batch_size
    # under DDP each rank scores a strided shard; the shards are gathered back into input order
    sharded = shard and D.info().world_size > 1
    rows = torch.as_tensor(D.shard_indices(len(data)) if sharded else range(len(data)), dtype=torch.int64)
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), bs):
            x = normalize(data.images[rows[i : i + bs]].to(device), cfg.data.mean, cfg.data.std)
            out.append(torch.softmax(model(x).float(), 1).cpu())
    local = torch.cat(out) if out else torch.zeros((0, len(data.classes)))
    if not sharded:
        return local
    parts = D.all_gather_objects((rows, local))
    probs = torch.zeros((len(data), len(data.classes)))
    for r, p in parts:
        probs[r] = p
    return probs


def evaluate(model, data: ImageSet, cfg: ClassifierConfig, loss_fn, device: str, *, shard: bool = False) -> dict:
    """Loss and classification metrics of ``model`` on ``data`` (see ``pipeline.evaluation.classification``).

    ``shard``: score a shard per rank and gather (every rank must call; see :func:`predict_probs`)."""
    import torch

    from pipeline.evaluation.classification import classification_metrics

    if len(data) == 0:
        return {"val_loss": None, "val_accuracy": None, "val_balanced_accuracy": None}
    probs = predict_probs(model, data, cfg, device, shard=shard)
    loss = float(torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), data.labels))
    pred = probs.argmax(1).numpy()
    names = data.classes
    m = classification_metrics([names[i] for i in data.labels.numpy()], [names[i] for i in pred],
                               probs[:, 0].numpy() if names[0] == GOOD else None, names)
    return {
        "val_loss": loss,
        "val_accuracy": m["accuracy"],
        "val_balanced_accuracy": m["balanced_accuracy"],
        "val_macro_f1": m["macro_f1"],
        "val_recall": {c: v["recall"] for c, v in m["per_class"].items()},
        "val_auroc": m["auroc_good_vs_defect"],
    }


def extract_features(model, data: ImageSet, cfg: ClassifierConfig, device: str, *, batch_size: int | None = None) -> np.ndarray:
    """Pooled features ``N x 512`` (float32 numpy) in eval mode, no augmentation."""
    import torch

    from pipeline.core import distributed as D

    model = D.unwrap(model)
    model.eval()
    bs = batch_size or cfg.train.batch_size
    out = []
    with torch.inference_mode():
        for i in range(0, len(data), bs):
            x = normalize(data.images[i : i + bs].to(device), cfg.data.mean, cfg.data.std)
            out.append(model.embed(x).float().cpu())
    return torch.cat(out).numpy()


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, **state) -> None:
    """``torch.save`` into a temporary file and rename (atomic)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "weights" / "best.pt"
    ck = load_torch_file(path, what="classifier checkpoint (a run folder or a .pt file written by 'pipeline finetune classifier')")
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck or "classes" not in ck:
        raise PipelineError(f"{path}: not a classifier checkpoint (expected keys model, config, classes)")
    return ck


def model_from_checkpoint(ck: dict):
    """Rebuild the model of a checkpoint dict (from :func:`load_checkpoint`) with its weights."""
    cfg = config_from_dict(ck["config"], source="checkpoint config")
    model = build_model(cfg.model, len(ck["classes"]))
    model.load_state_dict(ck["model"])
    return model, cfg


@dataclass(frozen=True)
class RunResult:
    """What :func:`train_classifier` wrote: the run folder and its final metrics."""

    run_dir: Path
    metrics: dict


def _log(run_dir: Path, lines: list[str], msg: str, echo: bool) -> None:
    from pipeline.core import distributed as D

    if not D.is_main():  # one log per run, written by rank 0
        return
    lines.append(msg)
    atomic_write_text(run_dir / "log.txt", "\n".join(lines) + "\n")
    if echo:
        print(msg, flush=True)


def train_classifier(
    cfg: ClassifierConfig,
    split_path: Path,
    out_dir: Path,
    *,
    task: str = "multiclass",
    weights: str = "none",
    allow_download: bool = False,
    force: bool = False,
    resume: bool = False,
    root: Path | None = None,
    progress: bool = True,
    echo: bool = True,
    amp: bool = True,
    channels_last: bool | None = None,
    compile: bool = False,
) -> RunResult:
    """Train one classifier and write a run folder.

    Runs single-process, or under ``torchrun`` on several GPUs/nodes (``pipeline.core.distributed``:
    DDP, NCCL on CUDA / gloo on CPU, SyncBatchNorm on CUDA, global batch ``train.batch_size`` split
    over ranks, metrics reduced over ranks, rank 0 alone writes). ``amp`` (bf16 autocast),
    ``channels_last`` (default: on for CUDA) and ``compile`` (``torch.compile``) act on CUDA only.

    Run folder ``out_dir``: ``config.yaml`` (resolved config + task + weights note), ``log.txt``,
    ``history.json`` (per-epoch metrics), ``weights/last.pt`` (every epoch, for resuming),
    ``weights/best.pt`` (best epoch by ``train.select_metric`` on val; with the rebalanced head when
    ``longtail.feature_rebalance``), ``val_predictions.json`` and ``metrics.json``,
    ``confusion_matrix.png`` and ``training_curves.png``.

    Args:
        cfg: the validated configuration.
        split_path: split manifest (``annotations/<category>/split.json``).
        out_dir: run folder; refused when non-empty unless ``force`` or ``resume``.
        task: ``multiclass`` (good + each defect type) or ``binary`` (good vs defect).
        weights: ``none``, ``imagenet`` or a ResNet-18 state-dict path.
        resume: continue from ``out_dir/weights/last.pt``.

    Raises:
        PipelineError: bad split (a class without training images), missing weights, output exists.
    """
    import torch
    import yaml

    from pipeline.core import distributed as D
    from pipeline.evaluation.classification import evaluate_classification, plot_history
    from pipeline.data.split import load_split

    if task not in ("multiclass", "binary"):
        raise PipelineError(f"task {task!r}: expected multiclass or binary")
    out_dir = Path(out_dir)
    last_path = out_dir / "weights" / "last.pt"
    if resume:
        if not last_path.is_file():
            raise PipelineError(f"{last_path}: nothing to resume (no checkpoint in the run folder)")
    else:
        check_can_write(out_dir, force=force)
        replace_old = force and out_dir.is_dir() and any(out_dir.iterdir())
        if replace_old and not (out_dir / "config.yaml").is_file():
            raise PipelineError(f"{out_dir}: not a classifier run folder (no config.yaml); refusing to replace it even with --force")
    split = load_split(Path(split_path), root=root)
    classes = class_names(split, task)
    train_entries = subset_entries(split, "train", classes, use_train_good=cfg.data.use_train_good,
                                   max_train_good=cfg.data.max_train_good, seed=cfg.train.seed)
    check_classes_present(split, train_entries, classes, "train")
    val_entries = subset_entries(split, "val", classes)
    init_path, weights_note = resolve_init_weights(weights, allow_download=allow_download)
    device = pick_device(cfg.train.device)
    dist = D.init_from_env(device)
    device = D.local_device(device)
    progress = progress and dist.rank == 0
    on_cuda = device.startswith("cuda")
    channels_last = on_cuda if channels_last is None else (channels_last and on_cuda)
    D.barrier()  # every rank has checked the inputs before rank 0 replaces anything
    if D.is_main():
        if not resume and replace_old:  # only now that the inputs are known to be good
            import shutil

            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "weights").mkdir(exist_ok=True)
    D.barrier()
    log_lines: list[str] = []
    if resume and (out_dir / "log.txt").is_file():
        log_lines = (out_dir / "log.txt").read_text().splitlines()
    resolved = {**config_to_dict(cfg), "task": task, "weights": weights_note, "split": str(Path(split_path).resolve()),
                "classes": classes, "device_resolved": device, "world_size": dist.world_size,
                "amp_bf16": bool(amp and on_cuda), "channels_last": bool(channels_last), "compile": bool(compile and on_cuda)}
    if D.is_main():
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    seed_everything(cfg.train.seed)
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else None
    t0 = time.perf_counter()
    train_set = load_image_set(train_entries, classes, split.root, cfg.data.input_size_hw, cache_dir=cache_dir, progress=progress, desc="train")
    val_set = load_image_set(val_entries, classes, split.root, cfg.data.input_size_hw, cache_dir=cache_dir, progress=progress, desc="val")
    decode_s = time.perf_counter() - t0
    _log(out_dir, log_lines, f"[{cfg.name}] task={task} classes={classes} weights={weights_note} device={device}", echo)
    _log(out_dir, log_lines, f"train images per class {dict(zip(classes, train_set.counts()))}; val {dict(zip(classes, val_set.counts()))}; "
         f"decode+resize {decode_s:.1f}s", echo)

    model = build_model(cfg.model, len(classes), init_weights=init_path).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.distributed and on_cuda:  # BatchNorm statistics over the global batch (CUDA only in torch)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # identical init on every rank (same seed); stochastic layers (dropout, DropBlock) then draw per rank
    torch.manual_seed(cfg.train.seed + dist.rank)
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer)
    loss_fn = make_loss(cfg, train_set.counts(), device)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    history: list[dict] = []
    start_epoch, best_value, best_epoch = 1, None, None
    if resume:
        ck = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scheduler.T_max = cfg.train.epochs  # resuming with more epochs stretches the cosine to the new end
        gen.set_state(ck["generator"])
        history = json.loads(ck["history"])
        start_epoch = int(ck["epoch"]) + 1
        best_value, best_epoch = ck.get("best_value"), ck.get("best_epoch")
        _log(out_dir, log_lines, f"resumed from {last_path} at epoch {start_epoch}", echo)
    net = model  # the module that is trained: DDP and/or torch.compile around ``model``
    if dist.distributed:
        net = D.wrap_ddp(model, device)
    if compile and on_cuda:
        net = torch.compile(net)
    pinned: dict | None = {} if on_cuda else None

    def better(v: float | None) -> bool:
        if v is None:
            return best_value is None
        if best_value is None:
            return True
        return v < best_value if cfg.train.select_metric == "loss" else v > best_value

    meta = {"config": config_to_dict(cfg), "classes": classes, "task": task, "weights": weights_note}
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        tr = train_one_epoch(net, train_set, cfg, optimizer, loss_fn, device, gen, progress=progress, amp=amp,
                             channels_last=channels_last, pinned=pinned)
        ev = evaluate(model, val_set, cfg, loss_fn, device, shard=True)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        row = {"epoch": epoch, "lr": lr, **tr, **ev}
        if cfg.model.variant == "gem":
            row["gem_p"] = float(model.pool.p.detach())
        history.append(row)
        key = {"balanced_accuracy": "val_balanced_accuracy", "accuracy": "val_accuracy", "loss": "val_loss"}[cfg.train.select_metric]
        value = ev.get(key)
        if value is None:  # no validation images: keep the last epoch
            value = -tr["train_loss"] if cfg.train.select_metric != "loss" else tr["train_loss"]
        improved = better(value)
        if improved:
            best_value, best_epoch = value, epoch
        with D.main_only() as main:  # rank 0 writes; the others wait until the files exist
            if main:
                if improved:
                    save_checkpoint(out_dir / "weights" / "best.pt", model=model.state_dict(), epoch=epoch, **meta)
                save_checkpoint(last_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict(), generator=gen.get_state(), epoch=epoch,
                                history=json.dumps(history), best_value=best_value, best_epoch=best_epoch, **meta)
                atomic_write_json(out_dir / "history.json", history)
        va = ev.get("val_accuracy")
        vb = ev.get("val_balanced_accuracy")
        _log(out_dir, log_lines,
             f"epoch {epoch}/{cfg.train.epochs} lr {lr:.2e} loss {tr['train_loss']:.4f} acc {tr['train_accuracy']:.3f} "
             f"val acc {va if va is None else round(va, 4)} bal {vb if vb is None else round(vb, 4)} "
             f"{tr['images_per_s'] or 0:.1f} img/s{' *' if improved else ''}", echo)

    if not D.is_main():  # the final evaluation and files are rank 0's (other nodes may not see them); the others get its metrics
        metrics = D.broadcast_object(None)
        D.barrier()
        return RunResult(out_dir, metrics)
    best = torch.load(out_dir / "weights" / "best.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best["model"])
    metrics: dict = {"name": cfg.name, "task": task, "weights": weights_note, "classes": classes, "best_epoch": best["epoch"],
                     "train_counts": dict(zip(classes, train_set.counts())), "val_counts": dict(zip(classes, val_set.counts())),
                     "decode_resize_s": decode_s}
    if history:
        ips = [h["images_per_s"] for h in history if h.get("images_per_s")]
        metrics["train_images_per_s"] = float(np.median(ips)) if ips else None
    metrics["val_before_feature_rebalance"] = evaluate(model, val_set, cfg, loss_fn, device) if len(val_set) else None
    if cfg.longtail.feature_rebalance:
        fr = feature_rebalance(model, train_set, cfg, device)
        metrics["feature_rebalance"] = fr
        save_checkpoint(out_dir / "weights" / "best.pt", model=model.state_dict(), epoch=best["epoch"], feature_rebalanced=True, **meta)
        metrics["val_after_feature_rebalance"] = evaluate(model, val_set, cfg, loss_fn, device) if len(val_set) else None
        _log(out_dir, log_lines, f"feature rebalancing: {fr['counts_before']} -> {fr['counts_after']} features per class", echo)
    if len(val_set):
        pred_path = out_dir / "val_predictions.json"
        write_predictions(model, val_set, cfg, device, pred_path, model_name=cfg.name, task=task, split_path=Path(split_path),
                          subset="val", weights_note=weights_note, run_dir=out_dir)
        metrics["val"] = evaluate_classification(pred_path, out_dir / "val_eval")
    plot_history(history, out_dir / "training_curves.png", title=f"{cfg.name} (weights: {weights_note.split(' ')[0]})")
    metrics["world_size"] = dist.world_size
    atomic_write_json(out_dir / "metrics.json", metrics)
    _log(out_dir, log_lines, f"wrote {out_dir}", echo)
    D.broadcast_object(metrics)
    D.barrier()
    return RunResult(out_dir, metrics)


def feature_rebalance(model, train_set: ImageSet, cfg: ClassifierConfig, device: str) -> dict:
    """Xu et al.-style feature-space rebalancing (see ``pipeline.models.classifier.longtail``): retrain ``model.head``
    in place on real + synthetic tail features of the trained embedding."""
    from pipeline.models.classifier.longtail import retrain_head, synthesize_balanced

    lt = cfg.longtail
    feats = extract_features(model, train_set, cfg, device)
    labels = train_set.labels.numpy()
    bal = synthesize_balanced(feats, labels, len(train_set.classes), target=lt.fr_target, shrinkage=lt.fr_shrinkage, seed=cfg.train.seed)
    losses = retrain_head(model.head, bal.features, bal.labels, epochs=lt.fr_epochs, lr=lt.fr_lr, batch_size=lt.fr_batch_size,
                          label_smoothing=cfg.train.label_smoothing, weight_decay=cfg.train.weight_decay, seed=cfg.train.seed, device=device)
    model.eval()
    return {
        "counts_before": np.bincount(labels, minlength=len(train_set.classes)).tolist(),
        "counts_after": bal.counts(len(train_set.classes)).tolist(),
        "n_synthetic": int(bal.synthetic.sum()),
        "head_loss_first_last": [losses[0], losses[-1]] if losses else None,
    }


# ----------------------------------------------------------------------------- prediction files


def image_ids(split_path: Path, paths: Sequence[str]) -> list[int]:
    """COCO image ids of ``paths`` (relative to the category root) by the manifest's image-id rule
    (:func:`pipeline.data.split.image_ids`), the ids ``coco/<subset>.json`` has for them.

    Raises:
        PipelineError: a path the manifest does not list.
    """
    from pipeline.core.io import read_json
    from pipeline.data.split import image_ids as manifest_ids

    ids = manifest_ids(read_json(split_path))
    missing = [p for p in paths if p not in ids]
    if missing:
        raise PipelineError(f"{split_path}: image {missing[0]!r} is not listed in the split manifest")
    return [ids[p] for p in paths]


def write_predictions(model, data: ImageSet, cfg: ClassifierConfig, device: str, out_path: Path, *, model_name: str, task: str,
                      split_path: Path, subset: str, weights_note: str, run_dir: Path | None = None) -> Path:
    """Write the ``kind: classification`` prediction JSON (format in ``pipeline.evaluation.classification``)."""
    probs = predict_probs(model, data, cfg, device).numpy()
    ids = image_ids(split_path, data.paths)
    preds = []
    for path, iid, pr in zip(data.paths, ids, probs):
        preds.append({"image": path, "image_id": iid, "label": data.classes[int(pr.argmax())],
                      "scores": {c: round(float(v), 6) for c, v in zip(data.classes, pr)}})
    from pipeline.data.split import load_split

    doc = {"kind": "classification", "model": model_name, "task": task, "classes": data.classes,
           "root": str(load_split(split_path).root), "split_manifest": str(Path(split_path).resolve()), "subset": subset,
           "weights": weights_note, "run_dir": str(Path(run_dir).resolve()) if run_dir else None, "predictions": preds}
    atomic_write_json(Path(out_path), doc)
    return Path(out_path)


def predict_classifier(checkpoint: Path, split_path: Path, out_path: Path, *, subset: str = "test", device: str = "auto",
                       batch_size: int | None = None, force: bool = False, root: Path | None = None, progress: bool = True) -> Path:
    """Run a trained classifier (run folder or ``.pt``) over a manifest subset and write predictions.

    Raises:
        PipelineError: missing checkpoint, output exists without ``force``, bad split.
    """
    from pipeline.data.split import load_split

    out_path = Path(out_path)
    check_can_write(out_path, force=force)
    ck = load_checkpoint(Path(checkpoint))
    model, cfg = model_from_checkpoint(ck)
    dev = pick_device(device)
    model.to(dev)
    split = load_split(Path(split_path), root=root)
    classes = list(ck["classes"])
    entries = subset_entries(split, subset, classes)
    data = load_image_set(entries, classes, split.root, cfg.data.input_size_hw, progress=progress, desc=subset)
    ckp = Path(checkpoint)
    run_dir = ckp if ckp.is_dir() else (ckp.parent.parent if ckp.parent.name == "weights" else None)
    return write_predictions(model, data, cfg, dev, out_path, model_name=cfg.name, task=ck.get("task", "multiclass"),
                             split_path=Path(split_path), subset=subset, weights_note=ck.get("weights", "unknown"), run_dir=run_dir)
