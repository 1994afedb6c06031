"""YOLO-World on an ImageNet trunk (``finetune yolo --backbone``): the registry weights reach the built
detector, the trunk normalises its input, a frozen trunk stays bit-identical, and a trunk run is
interrupted, resumed and predicted from a fresh process with the network cut.

Tiny on purpose: 64 px images, one or two epochs (about 35 s in all on two CPU cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

from pipeline.models import backbones, trunks  # noqa: E402

TRUNKS = ("mobilenet_v2", "efficientnet_lite0")
#: each trunk's own BatchNorm eps (torchvision MobileNetV2; TF EfficientNet-Lite0), not ultralytics' 1e-3
TRUNK_EPS = {"mobilenet_v2": 1e-5, "efficientnet_lite0": 1e-3}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _trunk(model):
    from pipeline.models.yolo.trunk import trunks_of

    (trunk,) = trunks_of(model)
    return trunk


@pytest.fixture(scope="module")
def yolo_data(tmp_path_factory) -> Path:
    from test_yolo import make_yolo_dataset  # pytest puts this folder on sys.path

    return make_yolo_dataset(tmp_path_factory.mktemp("trunk") / "ds")


@pytest.mark.parametrize("name", TRUNKS)
def test_registry_weights_reach_the_built_detector(name, yolo_data, tmp_path, one_torch_thread):
    """Built and initialised by ultralytics (the trainer's ``get_model``), the trunk holds the registry
    file's tensors exactly, in the file's order, and its BatchNorm eps is its own again."""
    from torch import nn

    from pipeline.models.yolo.offline import OfflineWorldTrainer, offline_ultralytics
    from pipeline.models.yolo.trunk import write_trunk_yaml

    yaml_path = write_trunk_yaml(tmp_path, "yolov8n-worldv2.yaml", name)
    with offline_ultralytics():
        trainer = OfflineWorldTrainer(
            overrides={"model": str(yaml_path), "data": str(yolo_data), "project": str(tmp_path), "name": "t"}
        )
        model = trainer.get_model(cfg=str(yaml_path), verbose=False)
    trunk = _trunk(model)
    assert model.model[0] is trunk
    got = list(trunk.state_dict().items())
    registry = list(torch.load(backbones.weights_file(name), map_location="cpu", weights_only=True).items())
    assert 0 < len(got) < len(registry)  # the trunk stops at stride 32: the file's last layers are left out
    for (k, v), (rk, rv) in zip(got, registry):
        assert k.split(".")[-1] == rk.split(".")[-1], (k, rk)
        assert v.dtype == rv.dtype and torch.equal(v, rv), (k, rk)
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and {m.eps for m in bns} == {TRUNK_EPS[name]} and {m.momentum for m in bns} == {0.1}
    neck = [m for m in model.model[1:].modules() if isinstance(m, nn.BatchNorm2d)]
    assert neck and {m.eps for m in neck} == {1e-3}  # ultralytics' own layers keep ultralytics' init


@pytest.mark.parametrize("name", TRUNKS)
def test_trunk_normalises_its_input(name, one_torch_thread):
    """ultralytics feeds RGB in [0, 1]: the trunk's first activation is the ImageNet network's first layer
    on the mean/std-normalised image (the PatchCore extractor of the same weights as the reference)."""
    from pipeline.models.yolo.trunk import ImageNetTrunk

    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    trunk = ImageNetTrunk(name).eval()
    ref = backbones.load_backbone(name).model  # eval, same registry weights
    spec = backbones.SPECS[name]
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    first_layer = ref.stages[0][0]  # MobileNetV2 features.0 / EfficientNet-Lite0 stem
    with torch.no_grad():
        out = trunk(x)
        expected = first_layer((x - mean) / std)
        raw = first_layer(x)
    assert out[0] is x and len(out) == len(trunk.stages) + 1
    assert out[1].shape == expected.shape == (1, 32, 32, 48)
    torch.testing.assert_close(out[1], expected, rtol=0, atol=1e-6)
    assert (out[1] - raw).abs().max() > 0.1  # normalising matters
    taps, channels = trunks.DETECTION_TAPS[name]
    assert [tuple(out[i].shape[1:]) for i in taps] == [(c, 64 // s, 96 // s) for c, s in zip(channels, (8, 16, 32))]


def test_frozen_trunk_stays_bit_identical(yolo_data, tmp_path, monkeypatch, one_torch_thread):
    """``freeze_trunk_epochs=1``: after the frozen epoch the live trunk (weights and BatchNorm statistics)
    equals the registry weights bit for bit and got no gradient, while the head moved. (That the trunk
    trains after its frozen epochs, also across a resume, is checked by the command-line test below.)"""
    import pipeline.models.yolo.train as train

    snapshots: list[dict] = []

    def trunk_state(trainer) -> dict:
        trunk = _trunk(trainer.model)
        state = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
        state["grad"] = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in trunk.parameters())
        return state

    def neck_state(trainer) -> dict:
        return {k: v.detach().clone() for k, v in trainer.model.model[-1].state_dict().items()}

    original = train._train

    def recording(trainer, out_dir):
        trainer.add_callback("on_train_start", lambda t: snapshots.append((trunk_state(t), neck_state(t))))
        trainer.add_callback("on_train_epoch_end", lambda t: snapshots.append((trunk_state(t), neck_state(t))))
        return original(trainer, out_dir)

    monkeypatch.setattr(train, "_train", recording)
    out = train.train_yolo_world(
        data_yaml=yolo_data,
        model="yolov8n-worldv2.yaml",
        backbone="efficientnet_lite0",
        freeze_trunk_epochs=1,
        out_dir=tmp_path / "run",
        epochs=1,
        imgsz=64,
        batch=8,
        close_mosaic=1,
        nbs=8,
    )
    (start, neck0), (after1, neck1) = snapshots
    registry = torch.load(backbones.weights_file("efficientnet_lite0"), map_location="cpu", weights_only=True)
    assert not start.pop("grad") and not after1.pop("grad")
    assert [torch.equal(a, b) for a, b in zip(start.values(), registry.values())] == [True] * len(start)
    assert all(torch.equal(start[k], after1[k]) for k in start), "the frozen trunk changed in epoch 1"
    assert any(not torch.equal(neck0[k], neck1[k]) for k in neck0), "the head did not train in epoch 1"
    config = (out / "config.yaml").read_text()
    assert "backbone: efficientnet_lite0" in config and "freeze_trunk_epochs: 1" in config
    assert (out / "yolov8n-worldv2-efficientnet_lite0.yaml").is_file()
    args = yaml.safe_load((out / "args.yaml").read_text())  # what ultralytics trained with
    assert args["freeze"] == [0] and args["close_mosaic"] == 1 and args["nbs"] == 8
    assert args["model"] == str(out / "yolov8n-worldv2-efficientnet_lite0.yaml")


def test_bad_trunk_options_are_refused_before_anything_is_written(yolo_data, tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.models.yolo.train import train_yolo_world

    cases = [
        ({"model": "yolov8n-worldv2.yaml", "backbone": "resnet18"}, "--backbone resnet18: expected one of"),
        ({"model": "yolov8s-worldv2.pt", "backbone": "mobilenet_v2"}, "replaces the backbone of a model YAML"),
        ({"model": "yolov8n-worldv2.yaml", "freeze_trunk_epochs": 2}, "and a --backbone to freeze"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PipelineError, match=message):
            train_yolo_world(data_yaml=yolo_data, out_dir=tmp_path / "run", epochs=1, imgsz=64, **kwargs)
        assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------- a trunk run from the command line

OFFLINE_PIPELINE = (  # `python -m pipeline` with every socket connection and DNS lookup refused
    "import socket, runpy\n"
    "def refuse(*a, **k):\n"
    "    raise OSError('network access is forbidden in this test')\n"
    "socket.socket.connect = socket.socket.connect_ex = refuse\n"
    "socket.getaddrinfo = socket.create_connection = refuse\n"
    "runpy.run_module('pipeline', run_name='__main__', alter_sys=True)\n"
)


def _pipeline(args: list, log: Path) -> tuple[int, str]:
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        code = subprocess.run(
            [sys.executable, "-c", OFFLINE_PIPELINE, *map(str, args)], stdout=out, stderr=err, env=ENV, timeout=600
        )
    return code.returncode, log.with_suffix(".err").read_text()


def _registry_trunk_stats(name: str) -> list:
    sd = torch.load(backbones.weights_file(name), map_location="cpu", weights_only=True)
    return [v for k, v in sd.items() if k.endswith("running_mean")]


def _ema_trunk_stats(checkpoint: Path) -> list:
    """The BatchNorm running means of the trunk in a checkpoint's EMA model (float16), in order."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ema = ck.get("ema") or ck["model"]  # a finished run's last.pt keeps the EMA as "model"
    return [v.float() for k, v in _trunk(ema).state_dict().items() if k.endswith("running_mean")]


def _running_means_close(got: list, registry: list) -> bool:
    return all(torch.allclose(a, b, rtol=2e-3, atol=1e-3) for a, b in zip(got, registry))


def test_trunk_run_interrupted_resumed_and_predicted_offline(tmp_path):
    """synth-mvtec -> convert-masks -> ``finetune yolo --backbone mobilenet_v2`` (2 epochs at 64 px, frozen
    for the first), Ctrl-C after epoch 1, ``--resume`` to the end, then ``predict yolo`` in a fresh process:
    all with the network cut and no CLIP."""
    from pipeline.models.yolo.prompts import HASH_SOURCE

    cat, ann, run = tmp_path / "synth", tmp_path / "ann", tmp_path / "yolo"
    for step, cmd in (
        ("synth", ["synth-mvtec", cat, "--n-per-defect", "3", "--n-test-good", "2", "--height", 48, "--width", 64]),
        ("convert", ["convert-masks", cat, "--out", ann]),
    ):
        code, err = _pipeline(cmd, tmp_path / step)
        assert code == 0, err[-2000:]
    args = [
        *("finetune", "yolo", "--data", ann / "yolo/data.yaml", "--backbone", "mobilenet_v2"),
        *("--freeze-trunk-epochs", 1, "--close-mosaic", 2, "--nbs", 8),
        *("--epochs", 2, "--imgsz", 64, "--batch", 8, "--device", "cpu", "--out", run),
    ]
    with open(tmp_path / "cut.out", "w") as out, open(tmp_path / "cut.err", "w") as errf:
        proc = subprocess.Popen(
            [sys.executable, "-c", OFFLINE_PIPELINE, *map(str, args)], stdout=out, stderr=errf, env=ENV
        )
        deadline = time.time() + 600
        while not ((run / "results.csv").is_file() and len((run / "results.csv").read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "cut.err").read_text()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=600)
    err = (tmp_path / "cut.err").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted: kept " in err and "(epoch 1 of 2)" in err
    assert not (run / "metrics.json").exists()
    registry = _registry_trunk_stats("mobilenet_v2")
    assert _running_means_close(_ema_trunk_stats(run / "weights/last.pt"), registry)  # epoch 1: frozen

    code, err = _pipeline([*args, "--resume"], tmp_path / "resumed")
    assert code == 0, err[-2000:]
    assert not _running_means_close(_ema_trunk_stats(run / "weights/last.pt"), registry)  # epoch 2: trains
    assert len((run / "results.csv").read_text().splitlines()) == 3  # header + epochs 1, 2
    trained = yaml.safe_load((run / "args.yaml").read_text())
    assert (trained["freeze"], trained["close_mosaic"], trained["nbs"]) == ([0], 2, 8)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["embedding_source"] == HASH_SOURCE

    code, err = _pipeline(
        ["predict", "yolo", "--weights", run / "weights/best.pt", "--gt", ann / "coco/test.json"]
        + ["--imgsz", 64, "--out", tmp_path / "pred"],
        tmp_path / "pred",
    )
    assert code == 0, err[-2000:]
    preds = json.loads((tmp_path / "pred/predictions.json").read_text())
    gt = json.loads((ann / "coco/test.json").read_text())
    ids = {im["id"] for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    assert all(p["image_id"] in ids and p["category_id"] in cats and 0 <= p["score"] <= 1 for p in preds)
    provenance = json.loads((tmp_path / "pred/provenance.json").read_text())
    assert provenance["family"] == "yolo"
