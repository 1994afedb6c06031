"""Configuration of the image classifier (ResNet-18 trunk by default): frozen dataclasses loaded from YAML.

One YAML file per published attempt lives in ``configs/classifier/`` (``attempt1_resnet18``,
``attempt2_selfattention``, ``attempt3_dropblock``, ``attempt4_gem``). A file has four sections,
``model``, ``train``, ``data`` and ``longtail`` (plus ``name``), each mapped onto one frozen
dataclass below. Unknown keys are rejected with the list of valid ones, values are type-checked
(an ``int`` is accepted where a ``float`` is expected, never a ``bool``; so is ``1e-3``, which
PyYAML reads as a string without a dot), and choices are checked.

Command-line overrides are dotted paths (``train.epochs=3``) applied to the raw mapping before
validation, so they pass the same checks as the file.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from pipeline.core.errors import PipelineError

_SCI = re.compile(r"^[+-]?\d+(\.\d*)?[eE][+-]?\d+$")
VARIANTS = ("avgpool", "selfattention", "dropblock", "gem")
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")  # layer1-4 end at output strides 4, 8, 16, 32
BACKBONES = ("resnet18", "efficientnet_lite0", "mobilenet_v2")


@dataclass(frozen=True)
class DropBlockConfig:
    """DropBlock (Ghiasi et al., NeurIPS 2018) after the named stages; ``block_size`` in feature-map cells."""

    after: tuple[str, ...] = ("layer3", "layer4")
    p: float = 0.1
    block_size: int = 5


@dataclass(frozen=True)
class ModelConfig:
    """The network.

    Attributes:
        variant: ``avgpool`` (attempt 1), ``selfattention`` (2), ``dropblock`` (3), ``gem`` (4).
        freeze: stages whose parameters are frozen (and whose BatchNorm stays in eval mode).
        dropout: dropout probability in the classifier head.
        head_hidden: 0 for a ``dropout + linear`` head; otherwise the width of the hidden layer of
            the redesigned head ``linear -> BN -> ReLU -> dropout -> linear`` (attempt 3).
        attention_after: stages followed by a SAGAN self-attention block (Zhang et al., ICML 2019).
        attention_pool: max-pool factor of keys/values inside the attention block (1 = none; 2 as in
            the official SAGAN code), which divides the attention matrix by ``pool**2``.
        attention_dropout: dropout on the attention output (attempt 2's "plus dropout").
        dropblock: DropBlock settings (used by the ``dropblock`` variant).
        gem_p: initial GeM exponent (Radenovic et al., TPAMI 2018); learnable.
        gem_eps: clamp of activations before the power.
        backbone: the trunk, cut into ``stem`` and four stages ``layer1``-``layer4`` ending at output
            strides 4, 8, 16, 32 (``pipeline.models.trunks.classifier_stages``): ``resnet18`` (the
            published attempts), ``efficientnet_lite0`` or ``mobilenet_v2`` (ImageNet weights installed
            from the package registry, so they work offline).
    """

    variant: Literal["avgpool", "selfattention", "dropblock", "gem"] = "avgpool"
    freeze: tuple[str, ...] = ()
    dropout: float = 0.3
    head_hidden: int = 0
    attention_after: tuple[str, ...] = ()
    attention_pool: int = 2
    attention_dropout: float = 0.1
    dropblock: DropBlockConfig = field(default_factory=DropBlockConfig)
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    backbone: Literal["resnet18", "efficientnet_lite0", "mobilenet_v2"] = "resnet18"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW + CosineAnnealingLR(T_max=epochs) + CrossEntropyLoss(label_smoothing)."""

    batch_size: int = 48
    epochs: int = 60
    lr: float = 7e-4
    weight_decay: float = 1e-3
    eta_min: float = 5e-6
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"
    select_metric: Literal["balanced_accuracy", "accuracy", "loss"] = "balanced_accuracy"


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentations applied on the cached, resized uint8 batch (on the training device)."""

    hflip: float = 0.5
    vflip: float = 0.0
    rotate_deg: float = 0.0
    translate_frac: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    """Input pipeline.

    Attributes:
        input_size_hw: network input (height, width) in pixels; images are resized once and cached.
        mean, std: RGB normalisation of [0, 1] pixels; empty (the default) means the trunk's own
            (``pipeline.models.backbones.SPECS``: ImageNet statistics, 0.5 / 0.5 for EfficientNet-Lite0),
            filled in when the config is built, so config.yaml and checkpoints hold the values used.
        use_train_good: add ``train/good`` (the manifest's ``train_good``) as extra ``good`` images.
        max_train_good: use a seeded random subset of N of those (-1 = all).
        cache_dir: folder for the on-disk cache of decoded, resized images ("" = memory only).
    """

    input_size_hw: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    use_train_good: bool = True
    max_train_good: int = -1
    cache_dir: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class LongTailConfig:
    """Long-tail options (``good`` is the head, defect types the tail; ``pipeline.models.classifier.longtail``).

    Attributes:
        balance: ``none``; ``reweight`` (class-balanced loss weights); ``resample`` (class-balanced
            sampling); both by the effective number of samples (Cui et al., CVPR 2019).
        cb_beta: the beta of the effective number ``(1 - beta**n) / (1 - beta)``.
        feature_synthesis: after training, retrain the head on real + synthetic features of the
            frozen embedding: ``interpolate`` (segments between same-class features, the design's
            method; ``pipeline.models.classifier.synthesis``), ``gaussian`` (one shrunk Gaussian per
            class, after distribution calibration, Yang et al., ICLR 2021) or ``none``.
        feature_rebalance: legacy alias of ``feature_synthesis: gaussian`` (older configs and checkpoints).
        method: ``dlsa`` replaces the head by the DLSA cascade (Xu et al., ECCV 2022;
            ``pipeline.models.classifier.dlsa``) fitted on the frozen features; ``none``.
        fr_epochs, fr_lr, fr_batch_size: head retraining settings (feature synthesis).
        fr_shrinkage: covariance shrinkage towards the pooled covariance, in [0, 1] (gaussian).
        fr_target: per-class feature count after synthesis (0: ``target_ratio`` times the head's count).
        target_ratio: per-class count after synthesis as a fraction of the head class's count.
        interp_mean_fraction: share of interpolated features drawn towards the class mean, in [0, 1].
        dlsa_*: the :class:`pipeline.models.classifier.dlsa.DLSASettings` of the same names.
    """

    balance: Literal["none", "reweight", "resample"] = "none"
    cb_beta: float = 0.999
    feature_synthesis: Literal["none", "gaussian", "interpolate"] = "none"
    feature_rebalance: bool = False
    method: Literal["none", "dlsa"] = "none"
    fr_epochs: int = 200
    fr_lr: float = 1e-3
    fr_batch_size: int = 128
    fr_shrinkage: float = 0.5
    fr_target: int = 0
    target_ratio: float = 1.0
    interp_mean_fraction: float = 0.0
    dlsa_stages: int = 3
    dlsa_ratio: float = 0.3
    dlsa_flow_blocks: int = 2
    dlsa_flow_hidden: int = 0
    dlsa_flow_hidden_layers: int = 1
    dlsa_flow_epochs: int = 50
    dlsa_flow_lr: float = 1e-3
    dlsa_center_std: float = 1.0
    dlsa_weight_q: float = 2.0
    dlsa_cls_epochs: int = 150
    dlsa_cls_lr: float = 1e-3

    @property
    def synthesis(self) -> str:
        """The feature-synthesis method in effect (``feature_rebalance: true`` means ``gaussian``)."""
        return "gaussian" if self.feature_rebalance and self.feature_synthesis == "none" else self.feature_synthesis


def _check_longtail(lt: LongTailConfig, fail) -> None:
    """Value checks of the long-tail section (``fail(message)`` raises)."""
    if lt.feature_rebalance and lt.feature_synthesis == "interpolate":
        fail("longtail.feature_rebalance (gaussian) contradicts longtail.feature_synthesis = interpolate")
    if lt.method == "dlsa" and lt.synthesis != "none":
        fail(f"longtail.method dlsa and longtail.feature_synthesis {lt.synthesis} exclude each other (choose one)")
    for key, v in (("longtail.target_ratio", lt.target_ratio), ("longtail.dlsa_flow_lr", lt.dlsa_flow_lr)):
        if v <= 0:
            fail(f"{key} = {v} (expected a positive number)")
    for key, v in (("longtail.dlsa_cls_lr", lt.dlsa_cls_lr), ("longtail.dlsa_center_std", lt.dlsa_center_std)):
        if v <= 0:
            fail(f"{key} = {v} (expected a positive number)")
    if not 0.0 <= lt.interp_mean_fraction <= 1.0:
        fail(f"longtail.interp_mean_fraction = {lt.interp_mean_fraction} (expected a fraction in [0, 1])")
    if not 0.0 < lt.dlsa_ratio < 1.0:
        fail(f"longtail.dlsa_ratio = {lt.dlsa_ratio} (expected a fraction in (0, 1))")
    for key in ("dlsa_stages", "dlsa_flow_blocks", "dlsa_flow_hidden_layers", "dlsa_flow_epochs", "dlsa_cls_epochs"):
        if getattr(lt, key) < 1:
            fail(f"longtail.{key} = {getattr(lt, key)} (expected a positive integer)")
    if lt.dlsa_flow_hidden < 0 or lt.dlsa_weight_q < 0:
        fail("longtail.dlsa_flow_hidden and longtail.dlsa_weight_q must be >= 0")


@dataclass(frozen=True)
class ClassifierConfig:
    name: str = "classifier"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    longtail: LongTailConfig = field(default_factory=LongTailConfig)

    def __post_init__(self) -> None:
        from pipeline.models.backbones import SPECS

        spec = SPECS[self.model.backbone]  # an empty mean/std is the trunk's own normalisation
        data = dataclasses.replace(self.data, mean=self.data.mean or spec.mean, std=self.data.std or spec.std)
        object.__setattr__(self, "data", data)


def configs_dir() -> Path:
    """``configs/classifier`` of the source checkout (the package is installed editable)."""
    return Path(__file__).resolve().parents[3] / "configs" / "classifier"


def attempt_names() -> list[str]:
    d = configs_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or an attempt name such as ``attempt4_gem`` looked up in ``configs/classifier``.

    Raises:
        PipelineError: neither an existing file nor a known attempt name (lists the known ones).
    """
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    cand = configs_dir() / f"{p.stem}.yaml"
    if p.parent == Path(".") and cand.is_file():
        return cand
    raise PipelineError(
        f"{name_or_path}: no such classifier config (expected a YAML file or one of: "
        f"{', '.join(attempt_names()) or 'none found'})"
    )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural.get(args[0], _type_name(args[0]))}"
        return f"a list of {len(args)} " + "/".join(sorted({plural.get(a, _type_name(a)) for a in args}))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    bad = PipelineError(f"{source}: {where} = {value!r} (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, source)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_convert(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str) and _SCI.match(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp!r}")  # programming error, not user input


def _build(cls: type, raw: Any, where: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise PipelineError(f"{source}: {where or 'top level'} must be a mapping (got {type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise PipelineError(
            f"{source}: unknown key(s) {', '.join(prefix + str(k) for k in unknown)} "
            f"(valid keys{' in ' + where if where else ''}: {', '.join(names)})"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k, source) for k, v in raw.items()}
    return cls(**kwargs)


def _check_values(cfg: ClassifierConfig, source: str) -> None:
    def fail(msg: str) -> None:
        raise PipelineError(f"{source}: {msg}")

    m, t, d, lt = cfg.model, cfg.train, cfg.data, cfg.longtail
    for key, stages in (("model.freeze", m.freeze), ("model.attention_after", m.attention_after)):
        for s in stages:
            if s not in STAGES:
                fail(f"{key} has {s!r} (expected stages among {', '.join(STAGES)})")
    for s in m.dropblock.after:
        if s not in STAGES[1:]:
            fail(f"model.dropblock.after has {s!r} (expected stages among {', '.join(STAGES[1:])})")
    if m.variant == "selfattention" and not m.attention_after:
        fail("model.variant selfattention needs model.attention_after (e.g. [layer1, layer2])")
    for key, v in (
        ("model.dropout", m.dropout),
        ("model.attention_dropout", m.attention_dropout),
        ("model.dropblock.p", m.dropblock.p),
        ("longtail.fr_shrinkage", lt.fr_shrinkage),
    ):
        if not 0.0 <= v <= 1.0 or (key != "longtail.fr_shrinkage" and v >= 1.0):
            fail(f"{key} = {v} (expected a probability in [0, 1))")
    if not 0.0 <= t.label_smoothing < 1.0:
        fail(f"train.label_smoothing = {t.label_smoothing} (expected a value in [0, 1))")
    for key, v in (
        ("train.batch_size", t.batch_size),
        ("train.epochs", t.epochs),
        ("model.dropblock.block_size", m.dropblock.block_size),
        ("model.attention_pool", m.attention_pool),
        ("longtail.fr_epochs", lt.fr_epochs),
        ("longtail.fr_batch_size", lt.fr_batch_size),
    ):
        if v < 1:
            fail(f"{key} = {v} (expected a positive integer)")
    for key, v in (("train.lr", t.lr), ("longtail.fr_lr", lt.fr_lr)):
        if v <= 0:
            fail(f"{key} = {v} (expected a positive number)")
    if t.weight_decay < 0 or t.eta_min < 0 or m.head_hidden < 0 or lt.fr_target < 0:
        fail("train.weight_decay, train.eta_min, model.head_hidden and longtail.fr_target must be >= 0")
    if d.max_train_good < -1:
        fail(f"data.max_train_good = {d.max_train_good} (expected -1 for all, or a count >= 0)")
    if m.dropblock.block_size % 2 == 0:
        fail(
            f"model.dropblock.block_size = {m.dropblock.block_size} (expected an odd integer, as torchvision's "
            "DropBlock2d requires)"
        )
    if m.gem_p < 1:
        fail(f"model.gem_p = {m.gem_p} (expected an exponent >= 1: 1 is average pooling, GeM keeps p >= 1)")
    if not 0.0 < lt.cb_beta < 1.0:
        fail(f"longtail.cb_beta = {lt.cb_beta} (expected a value in (0, 1))")
    _check_longtail(lt, fail)
    if min(d.input_size_hw) < 16:
        fail(f"data.input_size_hw = {list(d.input_size_hw)} (expected at least 16 pixels per side)")
    for key, v in (("data.mean", d.mean), ("data.std", d.std)):
        if len(v) != 3:
            fail(f"{key} = {list(v)} (expected a list of 3 numbers, or [] for the trunk's own normalisation)")
    if min(d.std) <= 0:
        fail(f"data.std = {list(d.std)} (expected positive values)")
    if t.device != "auto" and not (t.device == "cpu" or t.device.startswith("cuda") or t.device == "mps"):
        fail(f"train.device = {t.device!r} (expected auto, cpu, cuda, cuda:N or mps)")


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=3"`` -> ``("train.epochs", 3)``; the value is parsed as YAML."""
    import yaml

    if "=" not in text:
        raise PipelineError(f"override {text!r}: expected KEY=VALUE with a dotted key such as train.epochs=3")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def command_line_overrides(sets: Sequence[str] = (), named: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Dotted overrides from the command line: the ``--set KEY=VALUE`` texts, then the named options
    (dotted key -> value, ``None`` meaning "not given"), which win over a ``--set`` of the same key.

    Raises:
        PipelineError: a ``--set`` text without ``=``.
    """
    out = dict(parse_override(text) for text in sets)
    out.update({k: v for k, v in (named or {}).items() if v is not None})
    return out


def apply_overrides(raw: dict, overrides: Mapping[str, Any]) -> dict:
    """Set dotted keys in a copy of the raw mapping (creating sections as needed)."""
    import copy

    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise PipelineError(f"override {key}: {p} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def config_from_dict(raw: Mapping, *, source: str = "config") -> ClassifierConfig:
    """Validate a raw mapping into a :class:`ClassifierConfig`.

    Raises:
        PipelineError: one line naming ``source``, the key and what was expected.
    """
    cfg = _build(ClassifierConfig, raw, "", source)
    _check_values(cfg, source)
    return cfg


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> ClassifierConfig:
    """Load a classifier YAML (path or attempt name) and apply dotted-key overrides.

    Raises:
        PipelineError: unknown attempt, unreadable YAML, unknown keys, wrong types or values.
    """
    import yaml

    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping with sections model, train, data, longtail")
    raw.setdefault("name", path.stem)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, source=str(path))


def config_to_dict(cfg: ClassifierConfig) -> dict:
    """Plain dict (tuples as lists) for ``config.yaml`` in the run folder."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))
