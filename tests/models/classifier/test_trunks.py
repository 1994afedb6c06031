"""Classifier trunks: ResNet-18 (published), EfficientNet-Lite0 and MobileNetV2 with registry ImageNet weights.

Each attempt's per-stage design maps onto the trunk's stages by output stride (4, 8, 16, 32). Tiny
inputs (32-64 px) and one optimiser step; the registry weight files are installed with the project.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")

from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.data.mvtec import scan_category  # noqa: E402
from pipeline.data.split import make_split, write_split  # noqa: E402
from pipeline.models.backbones import TF_LITE_MEAN, weights_file  # noqa: E402
from pipeline.models.classifier.config import load_config  # noqa: E402
from pipeline.models.classifier.engine import make_optimizer  # noqa: E402
from pipeline.models.classifier.model import (  # noqa: E402
    AvgPool,
    DropBlock,
    GeM,
    SelfAttention2d,
    build_model,
    load_checkpoint,
    model_from_checkpoint,
    resolve_init_weights,
)

REGISTRY = ["efficientnet_lite0", "mobilenet_v2"]
TRUNKS = ["resnet18", *REGISTRY]
TRUNK_PARTS = ("stem", "layer1", "layer2", "layer3", "layer4")
FROZEN = ("stem", "layer1", "layer2")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(attempt: str, backbone: str, **extra):
    return load_config(attempt, {"model.backbone": backbone, "train.device": "cpu", **extra})


def _registry_model(attempt: str, backbone: str, num_classes: int = 4):
    cfg = _cfg(attempt, backbone)
    path, note = resolve_init_weights("imagenet", backbone=backbone)
    return build_model(cfg.model, num_classes, init_weights=path), cfg, path, note


def _trunk_state(model) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in model.state_dict().items() if k.split(".")[0] in TRUNK_PARTS]


@pytest.mark.parametrize("backbone", REGISTRY)
def test_imagenet_weights_are_the_registry_file_tensor_by_tensor(backbone):
    model, _, path, note = _registry_model("attempt1_resnet18", backbone)
    assert path == weights_file(backbone) and note == f"imagenet ({path})"
    shipped = [(k, v) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()]
    shipped = [(k, v) for k, v in shipped if not k.startswith("_fc.")]  # Lite0's ImageNet classifier is dropped
    ours = _trunk_state(model)
    assert len(ours) == len(shipped) == {"efficientnet_lite0": 294, "mobilenet_v2": 312}[backbone]
    for (k, v), (sk, sv) in zip(ours, shipped):
        assert k.split(".")[-1] == sk.split(".")[-1] and torch.equal(v, sv), (k, sk)
    random = build_model(_cfg("attempt1_resnet18", backbone).model, 4)  # and not what a random init gives
    differ = [k for k, v in _trunk_state(random) if v.is_floating_point() and not torch.equal(v, model.state_dict()[k])]
    assert len(differ) > 0.9 * sum(v.is_floating_point() for _, v in ours)


@pytest.mark.parametrize("backbone", TRUNKS)
@pytest.mark.parametrize("attempt", ["attempt3_dropblock", "attempt4_gem"])
def test_frozen_stages_and_their_bn_statistics_stay_bit_identical(attempt, backbone):
    cfg = _cfg(attempt, backbone)
    m = build_model(cfg.model, 4)
    assert cfg.model.freeze == FROZEN
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = make_optimizer(cfg, m)
    m.train()
    assert all(not mod.training for s in FROZEN for mod in getattr(m, s).modules())  # BN in eval mode
    loss = torch.nn.functional.cross_entropy(m(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 3]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = m.state_dict()
    frozen = [k for k in before if k.split(".")[0] in FROZEN]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)
    assert any("running_mean" in k for k in frozen)
    for stage in ("layer3", "layer4", "head"):
        changed = [k for k in before if k.split(".")[0] == stage and not torch.equal(after[k], before[k])]
        assert any("weight" in k for k in changed), stage
        if stage != "head":
            assert any("running_mean" in k for k in changed), stage  # trained stages update their statistics
    assert all(not p.requires_grad for s in FROZEN for p in getattr(m, s).parameters())


def test_gem_p_has_no_weight_decay_and_stays_at_least_one():
    cfg = _cfg("attempt4_gem", "mobilenet_v2")
    m = build_model(cfg.model, 4)
    opt = make_optimizer(cfg, m)
    assert opt.param_groups[0]["weight_decay"] == cfg.train.weight_decay == 1.6e-3
    (gem_group,) = [g for g in opt.param_groups if any(p is m.pool.p for p in g["params"])]
    assert gem_group["weight_decay"] == 0.0 and gem_group["params"] == [m.pool.p]
    # a step with zero gradients: AdamW's decoupled decay shrinks the head, never p
    head_w = m.head[1].weight.detach().clone()
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    assert float(m.pool.p.detach()) == 3.0 and not torch.equal(m.head[1].weight.detach(), head_w)
    # a large step pushing p below 1 ends at exactly 1
    for g in opt.param_groups:
        g["lr"] = 10.0
    m.pool.p.grad = torch.tensor(1.0)
    opt.step()
    assert float(m.pool.p.detach()) == GeM.P_MIN == 1.0
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    g = GeM(p=3.0)
    with torch.no_grad():
        g.p.fill_(0.25)  # even a p set below 1 by hand pools as p = 1 (average)
    assert torch.allclose(g(x), torch.tensor([[2.5]]))
    with pytest.raises(PipelineError, match=r"model.gem_p = 0.5 \(expected an exponent >= 1"):
        load_config("attempt4_gem", {"model.gem_p": 0.5})


def _stage_inputs(m, x) -> dict[str, tuple]:
    """Shape of what reaches each stage's extras and the pooling (forward pre-hooks)."""
    seen: dict[str, tuple] = {}
    hooks = [m.extras[s].register_forward_pre_hook(lambda _, a, s=s: seen.__setitem__(s, a[0].shape)) for s in m.extras]
    hooks.append(m.pool.register_forward_pre_hook(lambda _, a: seen.__setitem__("pool", a[0].shape)))
    m.eval()
    with torch.no_grad():
        m(x)
    for h in hooks:
        h.remove()
    return seen


WIDTHS = {
    "resnet18": (64, 128, 256, 512),
    "efficientnet_lite0": (24, 40, 112, 1280),
    "mobilenet_v2": (24, 32, 96, 1280),
}


@pytest.mark.parametrize("backbone", TRUNKS)
def test_each_attempt_maps_onto_the_stages_by_stride(backbone):
    x = torch.randn(2, 3, 64, 64)
    w = WIDTHS[backbone]
    expect = {f"layer{i + 1}": (2, c, 64 // s, 64 // s) for i, (c, s) in enumerate(zip(w, (4, 8, 16, 32)))}
    # attempt 1: average pooling of the stride-32 stage, dropout + linear head
    m = build_model(_cfg("attempt1_resnet18", backbone).model, 4)
    seen = _stage_inputs(m, x)
    assert {k: seen[k] for k in expect} == expect and seen["pool"] == expect["layer4"]
    assert isinstance(m.pool, AvgPool) and [type(x).__name__ for x in m.head] == ["Dropout", "Linear"]
    assert m.head[1].in_features == w[3] and all(p.requires_grad for p in m.parameters())
    # attempt 2: self-attention after the stride-4 and stride-8 stages, sized to their channels
    m = build_model(_cfg("attempt2_selfattention", backbone).model, 4)
    seen = _stage_inputs(m, x)
    where = {s: seq[0] for s, seq in m.extras.items() for mod in seq if isinstance(mod, SelfAttention2d)}
    assert set(where) == {"layer1", "layer2"}
    assert [seen[s][2] for s in ("layer1", "layer2")] == [16, 8]  # strides 4 and 8 of 64 px
    assert [where[s].out.out_channels for s in ("layer1", "layer2")] == [seen["layer1"][1], seen["layer2"][1]]
    # attempt 3: DropBlock after the stride-16 and stride-32 stages; stem-stride 8 frozen; redesigned head
    m = build_model(_cfg("attempt3_dropblock", backbone).model, 4)
    seen = _stage_inputs(m, x)
    assert {s for s, seq in m.extras.items() for mod in seq if isinstance(mod, DropBlock)} == {"layer3", "layer4"}
    assert [seen[s][2] for s in ("layer3", "layer4")] == [4, 2]
    assert m.frozen == FROZEN and seen["layer2"][2] == 8  # the last frozen stage ends at stride 8
    assert [type(x).__name__ for x in m.head][:2] == ["Linear", "BatchNorm1d"] and m.head[0].in_features == w[3]
    # attempt 4: GeM over the stride-32 stage, stem-stride 8 frozen
    m = build_model(_cfg("attempt4_gem", backbone).model, 4)
    seen = _stage_inputs(m, x)
    assert isinstance(m.pool, GeM) and seen["pool"] == expect["layer4"] and m.frozen == FROZEN
    assert m(x).shape == (2, 4)


def _no_weights_anywhere(monkeypatch, tmp_path) -> None:
    for name in ("w", "torch", "ultra"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultra"))
    monkeypatch.chdir(tmp_path)


def test_missing_resnet18_file_names_the_offline_trunk(monkeypatch, tmp_path):
    _no_weights_anywhere(monkeypatch, tmp_path)
    with pytest.raises(PipelineError) as err:
        resolve_init_weights("imagenet", backbone="resnet18")
    line = str(err.value)
    assert "\n" not in line and "'resnet18-f37072fd.pth' (torchvision ResNet-18, ImageNet-1k) not found" in line
    assert "or --backbone efficientnet_lite0 (ImageNet weights installed with the project, offline)" in line
    assert line.endswith("or --weights none to train from scratch")
    for backbone in REGISTRY:  # the registry trunks need no cache at all
        assert resolve_init_weights("imagenet", backbone=backbone)[0] == weights_file(backbone)
    with pytest.raises(PipelineError, match="expected 'imagenet', 'none' or a MobileNetV2 state-dict file"):
        resolve_init_weights(str(tmp_path / "nope.pt"), backbone="mobilenet_v2")


@pytest.mark.parametrize(
    "backbone, overrides, mean",
    [
        ("efficientnet_lite0", {}, (0.5, 0.5, 0.5)),  # TF Lite: (x - 127) / 128
        ("mobilenet_v2", {}, (0.485, 0.456, 0.406)),
        ("resnet18", {}, (0.485, 0.456, 0.406)),
        ("efficientnet_lite0", {"data.mean": [0.1, 0.2, 0.3]}, (0.1, 0.2, 0.3)),  # an explicit value wins
    ],
)
def test_normalisation_is_the_trunks_unless_given(backbone, overrides, mean):
    cfg = _cfg("attempt4_gem", backbone, **overrides)
    assert cfg.data.mean == mean and len(cfg.data.std) == 3


def test_bad_mean_length_is_one_line():
    with pytest.raises(PipelineError, match=r"data.mean = \[0.5, 0.5\] \(expected a list of 3 numbers"):
        load_config("attempt4_gem", {"data.mean": [0.5, 0.5]})


def _cli(monkeypatch, capsys, *args):
    from pipeline.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


@pytest.fixture(scope="module")
def split_path(synth_category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trunks") / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), path)
    return path


def test_cli_registry_trunk_checkpoint_predicts_with_its_normalisation(monkeypatch, capsys, split_path, tmp_path):
    from pipeline.core.io import read_rgb
    from pipeline.inspection.steps import ClassifierStep
    from pipeline.models.classifier.data import load_resized, normalize

    run = tmp_path / "run"
    args = ["--config", "attempt4_gem", "--backbone", "efficientnet_lite0", "--weights", "imagenet"]
    tiny = ["--epochs", "1", "--batch", "8", "--imgsz", "32", "--device", "cpu", "--set", "data.max_train_good=2"]
    code, text = _cli(
        monkeypatch, capsys, "finetune", "classifier", "--split", str(split_path), "--out", str(run), *args, *tiny
    )
    assert code == 0, text
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["model"]["backbone"] == "efficientnet_lite0" and resolved["frozen_random_stages"] == []
    assert resolved["data"]["mean"] == resolved["data"]["std"] == list(TF_LITE_MEAN)
    assert resolved["weights"] == f"imagenet ({weights_file('efficientnet_lite0')})"
    ck = load_checkpoint(run)
    assert ck["config"]["data"]["mean"] == [0.5, 0.5, 0.5]
    shipped = torch.load(weights_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert torch.equal(ck["model"]["stem.0.conv.weight"], shipped["_conv_stem.weight"])  # frozen: still ImageNet
    assert torch.equal(ck["model"]["layer2.1._bn2.running_var"], shipped["_blocks.4._bn2.running_var"])
    code, text = _cli(
        monkeypatch, capsys, "predict", "classifier", "--run", str(run), "--split", str(split_path),
        "--subset", "test", "--out", str(tmp_path / "pred"),
    )  # fmt: skip
    assert code == 0, text
    doc = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    model, cfg = model_from_checkpoint(ck)
    model.eval()
    root = Path(doc["root"])
    paths = [root / p["image"] for p in doc["predictions"]]
    x = torch.from_numpy(np.stack([load_resized(p, (32, 32)) for p in paths]))
    with torch.no_grad():
        ours = torch.softmax(model(normalize(x, (0.5,) * 3, (0.5,) * 3)), 1).numpy()
        imagenet = torch.softmax(model(normalize(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))), 1).numpy()
    got = np.array([[p["scores"][c] for c in doc["classes"]] for p in doc["predictions"]])
    assert np.allclose(got, ours, atol=1e-5) and not np.allclose(got, imagenet, atol=1e-3)
    step = ClassifierStep(run / "weights" / "best.pt", device="cpu")  # what bundle / inspect run
    probs = [r["probs"] for r in step([read_rgb(p) for p in paths])]
    assert np.allclose([[p[c] for c in doc["classes"]] for p in probs], ours, atol=1e-5)
