"""YOLO-World on an ImageNet trunk: ultralytics' own model YAML with the backbone swapped for a pretrained
MobileNetV2 or EfficientNet-Lite0 (:mod:`pipeline.models.backbones`).

The detector keeps the neck, the text-guided attention (``C2fAttn``, ``ImagePoolingAttn``) and the
``WorldDetect`` head of ``yolov8<scale>-worldv2.yaml``; only its CSPDarknet rows are replaced by

    0  ImageNetTrunk [name]   every stage's output, index 0 the input (as ultralytics' TorchVision split)
    1  Index [c3, i3]         stride 8
    2  Index [c4, i4]         stride 16
    3  Index [c5, i5]         stride 32
    4  SPPF [1024, 5]         stride 32, as at the end of the CSPDarknet backbone

and the head's references to the old P3 / P4 / P5 rows (4, 6, 9) are renumbered. :class:`ImageNetTrunk`
is registered into ``ultralytics.nn.tasks`` (the namespace ``parse_model`` looks module names up in) when
this module is imported; :mod:`pipeline.models.yolo.offline` imports it, so every process that runs this
family can build such a YAML.

Two traps of putting an ImageNet trunk into ultralytics, handled here:

- ultralytics feeds RGB in [0, 1] without mean/std: the trunk normalises its input itself (the
  backbone spec's ``mean`` / ``std``);
- ultralytics' ``initialize_weights`` sets every ``BatchNorm2d`` to eps 1e-3, momentum 0.03 after
  building; :func:`restore_trunk_batchnorm` puts the trunk's own values back (torchvision MobileNetV2
  eps 1e-5; TF EfficientNet-Lite0 eps 1e-3; momentum 0.1).

Checkpoints are pickled modules. The trunk pickles as ``(backbone name, state_dict, attributes)`` and is
rebuilt by :func:`_rebuild_trunk` (no registry weights needed), so a ``best.pt`` loads in any process
that can import ``pipeline``, whatever the trunk's inner module classes are.
"""

from __future__ import annotations

from pathlib import Path

import torch
import ultralytics.nn.tasks as ul_tasks
from torch import nn

from pipeline.core.errors import PipelineError
from pipeline.models import backbones, trunks

#: backbones a YOLO-World detector can be built on (``finetune yolo --backbone``)
TRUNKS = tuple(trunks.DETECTION_TAPS)
#: rows of the CSPDarknet backbone the worldv2 head reads (P3, P4, P5 after SPPF) -> the new rows
_OLD_TAPS = {4: 1, 6: 2, 9: 4}
_OLD_BACKBONE_ROWS, _NEW_BACKBONE_ROWS = 10, 5


class ImageNetTrunk(nn.Module):
    """An ImageNet feature trunk as one ultralytics layer.

    ``forward(x)``: ``x`` ``Bx3xHxW`` float RGB in [0, 1] (ultralytics' input) -> a list: ``x`` itself,
    then the output of every stage of :func:`pipeline.models.trunks.detection_trunk` on the
    normalised input; :data:`pipeline.models.trunks.DETECTION_TAPS` says which entries are strides
    8, 16 and 32. With ``pretrained`` the registry ImageNet weights are loaded.

    Raises:
        PipelineError: unknown backbone, registry weights missing.
    """

    def __init__(self, name: str, pretrained: bool = True):
        super().__init__()
        if name not in trunks.DETECTION_TAPS:
            raise PipelineError(f"--backbone {name}: expected one of {', '.join(TRUNKS)}")
        spec = backbones.SPECS[name]
        self.name = name
        self.stages = nn.ModuleList(trunks.detection_trunk(name, pretrained=pretrained))
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)
        self.batchnorm = [[m.eps, m.momentum] for m in self.modules() if isinstance(m, nn.BatchNorm2d)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = [x]
        h = (x - self.mean) / self.std
        for stage in self.stages:
            h = stage(h)
            y.append(h)
        return y

    def restore_batchnorm(self) -> None:
        """Every ``BatchNorm2d`` of the trunk back to the eps and momentum it was built with."""
        bns = [m for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        for m, (eps, momentum) in zip(bns, self.batchnorm):
            m.eps, m.momentum = eps, momentum

    def __reduce_ex__(self, protocol):  # noqa: ANN001 - pickle protocol
        # Plain attributes too: parse_model sets i, f, type, np on every layer and the forward loop reads them.
        attrs = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "training"}
        flags = {
            "training": [m.training for m in self.modules()],
            "requires_grad": [p.requires_grad for p in self.parameters()],
            "batchnorm": [[m.eps, m.momentum] for m in self.modules() if isinstance(m, nn.BatchNorm2d)],
        }
        return _rebuild_trunk, (self.name, self.state_dict(), attrs, flags)


def _rebuild_trunk(name: str, state: dict, attrs: dict, flags: dict) -> ImageNetTrunk:
    """Unpickle (and deep-copy) an :class:`ImageNetTrunk`: build it without weights, then load ``state``
    on the device and in the dtype the tensors have."""
    trunk = ImageNetTrunk(name, pretrained=False)
    first = next((v for v in state.values() if v.is_floating_point()), None)
    if first is not None:
        trunk.to(device=first.device, dtype=first.dtype)
    trunk.load_state_dict(state, strict=True)
    for k, v in attrs.items():
        setattr(trunk, k, v)
    for m, mode in zip(trunk.modules(), flags["training"]):
        m.training = mode
    for p, req in zip(trunk.parameters(), flags["requires_grad"]):
        p.requires_grad_(req)
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, (eps, momentum) in zip(bns, flags["batchnorm"]):
        m.eps, m.momentum = eps, momentum
    return trunk


ul_tasks.ImageNetTrunk = ImageNetTrunk  # parse_model resolves YAML module names in this namespace


def trunks_of(model: nn.Module) -> list[ImageNetTrunk]:
    return [m for m in model.modules() if isinstance(m, ImageNetTrunk)]


def restore_trunk_batchnorm(model: nn.Module) -> None:
    """Undo ultralytics' BatchNorm settings on every :class:`ImageNetTrunk` of ``model`` (call after building)."""
    for trunk in trunks_of(model):
        trunk.restore_batchnorm()


def trunk_model_yaml(base: str, backbone: str) -> tuple[str, dict]:
    """The model dict of YOLO-World ``base`` (e.g. ``yolov8n-worldv2.yaml``) with its backbone replaced.

    Returns:
        ``(file name, model dict)``: the name ``<base stem>-<backbone>.yaml`` keeps the scale letter
        (ultralytics reads the scale from the file name); the dict holds only that scale.

    Raises:
        PipelineError: unknown backbone, or ``base`` is not a yolov8-worldv2-style YAML (10 backbone rows
            ending in SPPF, a WorldDetect head).
    """
    if backbone not in trunks.DETECTION_TAPS:
        raise PipelineError(f"--backbone {backbone}: expected one of {', '.join(TRUNKS)}")
    cfg = ul_tasks.yaml_model_load(base)
    rows, head = cfg.get("backbone", []), cfg.get("head", [])
    if len(rows) != _OLD_BACKBONE_ROWS or rows[-1][2] != "SPPF" or head[-1][2] != "WorldDetect":
        raise PipelineError(
            f"{base}: --backbone needs a yolov8-worldv2-style model YAML (10 backbone rows ending in SPPF, "
            "a WorldDetect head), e.g. yolov8n-worldv2.yaml"
        )
    scale = cfg.get("scale") or next(iter(cfg["scales"]))
    (i3, i4, i5), (c3, c4, c5) = trunks.DETECTION_TAPS[backbone]
    new_rows = [
        [-1, 1, "ImageNetTrunk", [backbone]],
        [0, 1, "Index", [c3, i3]],  # P3/8
        [0, 1, "Index", [c4, i4]],  # P4/16
        [0, 1, "Index", [c5, i5]],  # P5/32
        [-1, 1, "SPPF", [1024, 5]],
    ]

    def renumber(f):  # noqa: ANN001, ANN202 - an int or a list of ints
        if isinstance(f, list):
            return [renumber(x) for x in f]
        if f < 0:
            return f
        if f < _OLD_BACKBONE_ROWS:
            if f not in _OLD_TAPS:
                raise PipelineError(f"{base}: the head reads backbone row {f}; only P3/P4/P5 (4, 6, 9) can be remapped")
            return _OLD_TAPS[f]
        return f - _OLD_BACKBONE_ROWS + _NEW_BACKBONE_ROWS

    model = {
        "nc": cfg["nc"],
        "scales": {scale: cfg["scales"][scale]},
        "backbone": new_rows,
        "head": [[renumber(f), n, m, list(args)] for f, n, m, args in head],
    }
    stem = Path(str(cfg.get("yaml_file", base))).stem
    if not ul_tasks.guess_model_scale(stem):
        stem = stem.replace("yolov8", f"yolov8{scale}", 1)
    return f"{stem}-{backbone}.yaml", model


def write_trunk_yaml(folder: Path, base: str, backbone: str) -> Path:
    """Write :func:`trunk_model_yaml` into ``folder`` (a run folder: ultralytics rebuilds the model from
    this file when it resumes); return its path."""
    import yaml

    from pipeline.core.io import atomic_write_text

    name, model = trunk_model_yaml(base, backbone)
    path = Path(folder) / name
    atomic_write_text(path, yaml.safe_dump(model, sort_keys=False))
    return path


def trunk_unfreezer(epochs: int):
    """An ``on_train_epoch_start`` callback: from epoch ``epochs`` (0-based) on, the trunk (layer 0,
    frozen through ultralytics' ``freeze=[0]``) trains; ultralytics then also stops holding its BatchNorm
    statistics (``_model_train`` keeps the layers in ``freeze_layer_names`` in eval mode). Idempotent, so
    a resumed run past ``epochs`` unfreezes again at its first epoch."""

    def on_train_epoch_start(trainer) -> None:  # noqa: ANN001 - ultralytics trainer
        if trainer.epoch < epochs or "model.0." not in trainer.freeze_layer_names:
            return
        trainer.freeze_layer_names = [n for n in trainer.freeze_layer_names if n != "model.0."]
        for name, p in trainer.model.named_parameters():
            if "model.0." in name and p.dtype.is_floating_point:
                p.requires_grad_(True)

    return on_train_epoch_start
