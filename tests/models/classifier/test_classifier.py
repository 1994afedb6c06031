"""ResNet-18 classifier attempts, config loader, long-tail options, metrics and CLI.

Unit tests use 32 px images and one or two optimiser steps; the real-data test is marked slow.
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
from pipeline.data.split import (
    make_split,
    write_split,  # noqa: E402
)
from pipeline.evaluation.classification import (
    auroc,
    classification_metrics,
    confusion_matrix,
    evaluate_classification,
    summarize_confusion,
)  # noqa: E402
from pipeline.models.classifier.config import load_config, parse_override  # noqa: E402
from pipeline.models.classifier.data import ImageSet  # noqa: E402
from pipeline.models.classifier.longtail import (
    class_balanced_weights,
    effective_number,
    retrain_head,
    synthesize_balanced,
)  # noqa: E402
from pipeline.models.classifier.model import (  # noqa: E402
    AvgPool,
    DropBlock,
    GeM,
    SelfAttention2d,
    build_model,
    load_checkpoint,
    model_from_checkpoint,
)
from pipeline.models.classifier.predict import predict_probs  # noqa: E402
from pipeline.models.classifier.train import (  # noqa: E402
    make_loss,
    make_optimizer,
    make_scheduler,
    train_classifier,
    train_one_epoch,
)

ATTEMPTS = ["attempt1_resnet18", "attempt2_selfattention", "attempt3_dropblock", "attempt4_gem"]
TINY = {"data.input_size_hw": [32, 32], "train.batch_size": 4, "train.device": "cpu"}

# Published settings of each attempt: batch, epochs, label smoothing, lr, weight decay, eta_min.
PUBLISHED = {
    "attempt1_resnet18": (48, 60, 0.10, 7e-4, 1e-3, 5e-6),
    "attempt2_selfattention": (32, 60, 0.13, 1.2e-3, 3.1e-4, 3e-6),
    "attempt3_dropblock": (48, 70, 0.05, 3e-3, 3e-4, 1e-6),
    "attempt4_gem": (48, 50, 0.11, 8.1e-4, 1.6e-3, 5e-6),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split_path(synth_category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cls") / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), path)
    return path


def _tiny_set(n_per_class: int = 4, seed: int = 0) -> ImageSet:
    """Two classes told apart by brightness: dark ``good`` and bright ``defect``, 32x32."""
    g = torch.Generator().manual_seed(seed)
    dark = torch.randint(0, 80, (n_per_class, 3, 32, 32), generator=g, dtype=torch.uint8)
    bright = torch.randint(170, 255, (n_per_class, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0] * n_per_class + [1] * n_per_class)
    return ImageSet(
        torch.cat([dark, bright]), labels, [f"x{i}.png" for i in range(2 * n_per_class)], ["good", "defect"]
    )


def _one_step(model, cfg):
    opt = make_optimizer(cfg, model)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 0, 1])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ATTEMPTS)
def test_yaml_values_reach_optimizer_scheduler_and_loss(name):
    cfg = load_config(name)
    batch, epochs, smoothing, lr, wd, eta_min = PUBLISHED[name]
    assert (cfg.train.batch_size, cfg.train.epochs) == (batch, epochs)
    model = build_model(cfg.model, 4)
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt)
    loss = make_loss(cfg, [10, 2, 2, 2])
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == lr and opt.param_groups[0]["weight_decay"] == wd
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert sched.eta_min == eta_min and sched.T_max == epochs
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == smoothing and loss.weight is None
    # only trainable parameters are handed to the optimiser
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.dropot": 0.1}, "unknown key(s) model.dropot (valid keys in model: variant, freeze, dropout"),  # typo
        ({"colour": 1}, "unknown key(s) colour (valid keys: name, model, train, data, longtail)"),  # top level
        ({"train.lr": "fast"}, "train.lr = 'fast' (expected a number)"),  # wrong type
        ({"train.epochs": 2.5}, "train.epochs = 2.5 (expected an integer)"),  # float for int
        ({"train.epochs": True}, "train.epochs = True (expected an integer)"),  # bool is not an int
        ({"model.variant": "vit"}, "model.variant = 'vit' (expected one of 'avgpool'"),  # bad choice
        ({"model.freeze": ["layer9"]}, "model.freeze has 'layer9'"),  # unknown stage
        ({"data.input_size_hw": [32]}, "data.input_size_hw = [32] (expected a list of 2 integers)"),  # wrong length
        ({"model.dropblock.block_size": 4}, "expected an odd integer"),  # torchvision needs odd
        ({"longtail.balance": "smote"}, "longtail.balance = 'smote'"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, message):
    with pytest.raises(PipelineError) as err:
        load_config("attempt1_resnet18", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_attempt_lists_known_ones():
    with pytest.raises(PipelineError, match="attempt9: no such classifier config .*attempt4_gem"):
        load_config("attempt9")


def test_overrides_parse_yaml_values():
    assert parse_override("train.lr=1.0e-3") == ("train.lr", 1e-3)
    assert load_config("attempt1_resnet18", {"train.lr": "1e-3"}).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert parse_override("data.input_size_hw=[64, 48]") == ("data.input_size_hw", [64, 48])
    cfg = load_config(
        "attempt4_gem", dict([parse_override("train.epochs=3"), parse_override("longtail.balance=reweight")])
    )
    assert cfg.train.epochs == 3 and cfg.longtail.balance == "reweight" and cfg.train.lr == 8.1e-4


# ----------------------------------------------------------------------------- model structure


def test_attempt1_structure_avgpool_dropout_linear_all_trainable():
    cfg = load_config("attempt1_resnet18")
    m = build_model(cfg.model, 4)
    assert isinstance(m.pool, AvgPool)
    assert [type(x).__name__ for x in m.head] == ["Dropout", "Linear"]
    assert m.head[0].p == 0.3 and (m.head[1].in_features, m.head[1].out_features) == (512, 4)
    assert all(p.requires_grad for p in m.parameters())
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 4)


def test_attempt2_attention_after_layer1_layer2_gate_starts_at_zero():
    cfg = load_config("attempt2_selfattention")
    m = build_model(cfg.model, 4)
    SA = SelfAttention2d
    where = {k for k, seq in m.extras.items() for mod in seq if isinstance(mod, SA)}
    assert where == {"layer1", "layer2"}
    for stage, ch in (("layer1", 64), ("layer2", 128)):
        block = m.extras[stage][0]
        assert float(block.gamma.detach()) == 0.0 and block.gamma.requires_grad
        assert block.theta.out_channels == ch // 8 and block.out.out_channels == ch
        x = torch.randn(2, ch, 8, 8)
        block.train()
        assert torch.equal(block(x), x)  # gate 0: the block starts as the identity
    _one_step(m, cfg)
    assert float(m.extras["layer1"][0].gamma.detach()) != 0.0  # the gate learns


@pytest.mark.parametrize("name", ["attempt3_dropblock", "attempt4_gem"])
def test_frozen_stages_unchanged_after_a_step(name):
    cfg = load_config(name)
    m = build_model(cfg.model, 4)
    assert cfg.model.freeze == ("stem", "layer1", "layer2")
    frozen = {k: v.clone() for k, v in m.state_dict().items() if k.split(".")[0] in ("stem", "layer1", "layer2")}
    trained = {k: v.clone() for k, v in m.named_parameters() if k.split(".")[0] in ("layer3", "layer4", "head", "pool")}
    assert all(not p.requires_grad for k, p in m.named_parameters() if k.split(".")[0] in ("stem", "layer1", "layer2"))
    _one_step(m, cfg)
    after = m.state_dict()
    for k, v in frozen.items():  # weights and BatchNorm running statistics
        assert torch.equal(after[k], v), k
    changed = [k for k, v in trained.items() if not torch.equal(after[k], v)]
    assert any(k.startswith("layer3") for k in changed) and any(k.startswith("layer4") for k in changed)
    assert any(k.startswith("head") for k in changed)


def test_attempt3_dropblock_active_in_train_identity_in_eval():
    cfg = load_config("attempt3_dropblock")
    m = build_model(cfg.model, 4)
    DB = DropBlock
    from torchvision.ops import DropBlock2d

    where = {k for k, seq in m.extras.items() for mod in seq if isinstance(mod, DB)}
    assert where == {"layer3", "layer4"} and isinstance(m.extras["layer3"][0], DropBlock2d)
    assert [type(x).__name__ for x in m.head] == ["Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    db = DB(p=0.5, block_size=3)
    x = torch.ones(2, 8, 16, 16)
    db.eval()
    assert torch.equal(db(x), x)
    db.train()
    torch.manual_seed(0)
    y = db(x)
    assert (y == 0).any() and not torch.equal(y, x)
    assert DB(p=0.5, block_size=5).train()(torch.ones(1, 2, 2, 2)).shape == (1, 2, 2, 2)  # block clipped to map


def test_attempt4_gem_exponent_learnable_and_gem_p1_is_average():
    cfg = load_config("attempt4_gem")
    m = build_model(cfg.model, 4)
    assert isinstance(m.pool, GeM) and m.pool.p.requires_grad and float(m.pool.p.detach()) == 3.0
    assert [type(x).__name__ for x in m.head] == ["Dropout", "Linear"]
    p0 = float(m.pool.p.detach())
    _one_step(m, cfg)
    assert float(m.pool.p.detach()) != p0
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(GeM(p=1.0)(x), torch.tensor([[2.5]]))
    assert torch.allclose(GeM(p=2.0)(x), torch.tensor([[(7.5) ** 0.5]]))


def test_imagenet_weights_load_from_a_state_dict_file(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    m = build_model(load_config("attempt4_gem").model, 3, init_weights=path)
    assert torch.equal(m.stem[0].weight, ref.conv1.weight) and torch.equal(
        m.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var
    )
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(PipelineError, match="not a torchvision ResNet-18 state dict"):
        build_model(load_config("attempt4_gem").model, 3, init_weights=tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- training


def test_short_training_on_tiny_data_reduces_loss():
    cfg = load_config("attempt1_resnet18", {**TINY, "train.lr": 1e-3, "data.augment.rotate_deg": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg.model, 2)
    data = _tiny_set()
    opt = make_optimizer(cfg, model)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    full = load_config("attempt1_resnet18", {**TINY, "train.batch_size": 8})
    losses = [train_one_epoch(model, data, full, opt, loss_fn, "cpu", gen)["train_loss"] for _ in range(4)]
    assert losses[-1] < losses[0]


def test_train_checkpoint_round_trip_and_resume(split_path, tmp_path):
    cfg = load_config("attempt4_gem", {**TINY, "train.epochs": 1, "data.max_train_good": 4})
    run = tmp_path / "run"
    res = train_classifier(cfg, split_path, run, weights="none", progress=False, echo=False)
    for f in (
        "config.yaml",
        "log.txt",
        "history.json",
        "metrics.json",
        "training_curves.png",
        "weights/best.pt",
        "weights/last.pt",
        "val_predictions.json",
        "val_eval/confusion_matrix.png",
    ):
        assert (run / f).is_file(), f
    assert "none (trained from scratch" in res.metrics["weights"]
    assert res.metrics["train_counts"] == {"good": 4 + 4, "ring": 4, "scratch": 4, "spot": 4}
    # round trip: a model rebuilt from best.pt reproduces the recorded predictions
    model, cfg2 = model_from_checkpoint(load_checkpoint(run))
    assert cfg2 == cfg
    preds = json.loads((run / "val_predictions.json").read_text())
    assert preds["kind"] == "classification" and "none" in preds["weights"]
    from pipeline.data.split import load_split
    from pipeline.models.classifier.data import class_names, load_image_set, subset_entries

    split = load_split(split_path)
    classes = class_names(split, "multiclass")
    data = load_image_set(subset_entries(split, "val", classes), classes, split.root, (32, 32), progress=False)
    probs = predict_probs(model, data, cfg2, "cpu").numpy()
    for p, row in zip(preds["predictions"], probs):
        assert p["image"] == data.paths[preds["predictions"].index(p)]
        assert np.allclose([p["scores"][c] for c in classes], row, atol=1e-5)
    # refusing to overwrite, then resuming one more epoch
    with pytest.raises(PipelineError, match="already exists"):
        train_classifier(cfg, split_path, run, weights="none", progress=False, echo=False)
    with pytest.raises(PipelineError, match="nothing to resume"):
        train_classifier(cfg, split_path, tmp_path / "empty", resume=True, weights="none", progress=False, echo=False)
    cfg3 = load_config("attempt4_gem", {**TINY, "train.epochs": 2, "data.max_train_good": 4})
    train_classifier(cfg3, split_path, run, resume=True, weights="none", progress=False, echo=False)
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2]


def test_split_with_empty_class_is_rejected(split_path, tmp_path):
    m = json.loads(split_path.read_text())
    m["splits"]["train"] = [e for e in m["splits"]["train"] if e["label"] != "ring"]
    bad = tmp_path / "split.json"
    bad.write_text(json.dumps(m))
    with pytest.raises(PipelineError, match=r"class\(es\) ring have no images in the train split"):
        train_classifier(
            load_config("attempt1_resnet18", TINY), bad, tmp_path / "run", weights="none", progress=False, echo=False
        )
    assert not (tmp_path / "run").exists()


def test_decode_cache_on_disk_round_trip(synth_category, tmp_path):
    from pipeline.core.io import read_image
    from pipeline.models.classifier import data as C

    img = next((synth_category / "test" / "ring").iterdir())
    a = C.load_resized(img, (24, 40), cache_dir=tmp_path)
    assert a.shape == (3, 24, 40) and a.dtype == np.uint8
    assert len(list(tmp_path.glob("*.npy"))) == 1
    C._MEMORY_CACHE.clear()
    assert np.array_equal(C.load_resized(img, (24, 40), cache_dir=tmp_path), a)  # read back from disk
    rgb = read_image(img)[..., ::-1]  # BGR -> RGB
    import cv2

    assert np.array_equal(
        a, cv2.resize(np.ascontiguousarray(rgb), (40, 24), interpolation=cv2.INTER_AREA).transpose(2, 0, 1)
    )


def test_force_refuses_a_folder_that_is_not_a_run(split_path, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(
        PipelineError, match="not a folder a pipeline command wrote; refusing to replace it even with --force"
    ):
        train_classifier(
            load_config("attempt1_resnet18", TINY),
            split_path,
            tmp_path,
            force=True,
            weights="none",
            progress=False,
            echo=False,
        )
    assert (tmp_path / "notes.txt").is_file()


def test_binary_task_folds_defects(split_path):
    from pipeline.data.split import load_split
    from pipeline.models.classifier.data import class_names, subset_entries

    split = load_split(split_path)
    classes = class_names(split, "binary")
    assert classes == ["good", "defect"]
    labels = [i for _, i in subset_entries(split, "train", classes)]
    assert set(labels) == {0, 1} and labels.count(1) == 12


# ----------------------------------------------------------------------------- long tail


def test_class_balanced_weights_known_values():
    e = effective_number([1, 10], 0.9)
    assert np.allclose(e, [1.0, (1 - 0.9**10) / 0.1])
    w = class_balanced_weights([100, 10], beta=0.9)
    e100, e10 = (1 - 0.9**100) / 0.1, (1 - 0.9**10) / 0.1
    assert np.isclose(w.sum(), 2.0) and np.isclose(w[1] / w[0], e100 / e10)
    assert np.allclose(class_balanced_weights([100, 10], beta=1e-9), [1, 1])  # beta -> 0: no re-weighting
    assert np.isclose(
        *(class_balanced_weights([100, 10], beta=0.999999) * [100, 10]), rtol=1e-3
    )  # beta -> 1: inverse frequency


def test_reweight_loss_and_resample_order():
    from pipeline.models.classifier.train import batch_order

    cfg = load_config("attempt1_resnet18", {"longtail.balance": "reweight", "longtail.cb_beta": 0.99})
    loss = make_loss(cfg, [90, 10])
    assert torch.allclose(loss.weight, torch.tensor(class_balanced_weights([90, 10], 0.99), dtype=torch.float32))
    cfg = load_config("attempt1_resnet18", {"longtail.balance": "resample", "longtail.cb_beta": 0.9999})
    labels = torch.tensor([0] * 90 + [1] * 10)
    order = batch_order(labels, cfg, torch.Generator().manual_seed(0))
    assert len(order) == 100 and 0.3 < float((labels[order] == 1).float().mean()) < 0.7  # about half tail


def test_synthesize_balanced_counts_and_determinism():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (50, 4)), rng.normal(5, 1, (3, 4))]).astype(np.float32)
    y = np.array([0] * 50 + [1] * 3)
    b = synthesize_balanced(x, y, 2, seed=1)
    assert b.counts(2).tolist() == [50, 50] and b.synthetic.sum() == 47
    assert np.array_equal(b.features[:53], x) and not b.synthetic[:53].any()
    assert np.allclose(b.features[b.synthetic].mean(0), x[50:].mean(0), atol=0.6)
    assert np.array_equal(synthesize_balanced(x, y, 2, seed=1).features, b.features)
    assert synthesize_balanced(x, y, 2, target=60).counts(2).tolist() == [60, 60]
    assert (synthesize_balanced(np.abs(x), y, 2).features >= 0).all()  # clipped at the real minimum


def test_feature_rebalancing_raises_tail_recall():
    rng = np.random.default_rng(0)
    d = 8
    x = np.concatenate([rng.normal(0, 1, (200, d)), rng.normal(0.6, 1, (5, d))]).astype(np.float32)
    y = np.array([0] * 200 + [1] * 5)
    xt = np.concatenate([rng.normal(0, 1, (300, d)), rng.normal(0.6, 1, (300, d))]).astype(np.float32)

    def tail_recall(features, labels):
        torch.manual_seed(0)
        head = torch.nn.Linear(d, 2)
        retrain_head(head, features, labels, epochs=60, lr=1e-2, batch_size=512)
        with torch.no_grad():
            return float((head(torch.tensor(xt[300:])).argmax(1) == 1).float().mean())

    b = synthesize_balanced(x, y, 2, seed=0)
    before, after = tail_recall(x, y), tail_recall(b.features, b.labels)
    assert before < 0.1 and after > 0.4


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    "true, pred, acc, bal, f1",
    [
        ([0, 0, 1, 1], [0, 0, 1, 1], 1.0, 1.0, 1.0),  # perfect
        ([0, 0, 0, 1], [0, 0, 0, 0], 0.75, 0.5, (2 * 0.75 / 1.75 + 0) / 2),  # head-only predictor
        ([0, 1, 2, 2], [0, 2, 2, 1], 0.5, (1 + 0 + 0.5) / 3, (1 + 0 + 0.5) / 3),  # three classes
    ],
)
def test_summary_known_values(true, pred, acc, bal, f1):
    s = summarize_confusion(
        confusion_matrix(true, pred, 3 if max(true) == 2 else 2), ["a", "b", "c"][: 3 if max(true) == 2 else 2]
    )
    assert np.isclose(s["accuracy"], acc) and np.isclose(s["balanced_accuracy"], bal) and np.isclose(s["macro_f1"], f1)


def test_confusion_and_per_class():
    cm = confusion_matrix([0, 0, 1, 2], [0, 1, 1, 1], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    s = summarize_confusion(cm, ["good", "a", "b"])
    assert s["per_class"]["a"] == {"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1}
    assert s["per_class"]["b"]["precision"] is None and s["per_class"]["b"]["recall"] == 0.0


@pytest.mark.parametrize(
    "scores, positive, expected",
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # separated
        ([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 0.0),  # reversed
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),  # classic 4-point example
        ([0.3, 0.5, 0.5, 0.7], [0, 0, 1, 1], (1 + 1 + 0.5 + 1) / 4),  # one tie across groups
        ([0.3, 0.4], [0, 0], None),  # one group empty: undefined
    ],
)
def test_auroc_known_values(scores, positive, expected):
    got = auroc(scores, [bool(p) for p in positive])
    assert got == expected if expected is None else np.isclose(got, expected)


def test_evaluate_classification_file(tmp_path):
    preds = [
        ("test/good/000.png", "good", 0.9),
        ("test/good/001.png", "ring", 0.4),
        ("test/ring/000.png", "ring", 0.2),
        ("test/spot/000.png", "good", 0.6),
    ]
    doc = {
        "kind": "classification",
        "model": "m",
        "classes": ["good", "ring", "spot"],
        "weights": "none (from scratch)",
        "predictions": [
            {
                "image": i,
                "image_id": k + 1,
                "label": lab,
                "scores": {"good": g, "ring": (1 - g) / 2, "spot": (1 - g) / 2},
            }
            for k, (i, lab, g) in enumerate(preds)
        ],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    m = evaluate_classification(path, tmp_path / "eval")
    assert m["accuracy"] == 0.5 and m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert np.isclose(m["balanced_accuracy"], (0.5 + 1 + 0) / 3)
    assert np.isclose(m["auroc_good_vs_defect"], 0.75) and m["weights"].startswith("none")
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000
    doc["kind"] = "anomaly"
    path.write_text(json.dumps(doc))
    with pytest.raises(PipelineError, match="not a classification prediction file"):
        evaluate_classification(path, tmp_path / "eval")


def test_classification_metrics_binary_strings():
    m = classification_metrics(
        ["good", "defect", "defect"], ["good", "defect", "good"], [0.9, 0.1, 0.6], ["good", "defect"]
    )
    assert np.isclose(m["accuracy"], 2 / 3) and m["auroc_good_vs_defect"] == 1.0


# ----------------------------------------------------------------------------- CLI


def _cli(monkeypatch, capsys, *args):
    from pipeline.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--config", "attempt7_vit"], "attempt7_vit: no such classifier config"),  # attempt that does not exist
        (
            ["--config", "attempt1_resnet18", "--set", "train.lrate=1"],
            "unknown key(s) train.lrate (valid keys in train: batch_size",
        ),
        (
            ["--config", "attempt1_resnet18", "--set", "train.batch_size=big"],
            "train.batch_size = 'big' (expected an integer)",
        ),
        (["--config", "attempt1_resnet18", "--task", "ternary"], "task 'ternary': expected multiclass or binary"),
    ],
)
def test_cli_bad_input_one_line_nonzero(monkeypatch, capsys, split_path, tmp_path, extra, message):
    code, text = _cli(
        monkeypatch, capsys, "finetune", "classifier", "--split", str(split_path), "--out", str(tmp_path / "r"), *extra
    )
    assert code == 1 and message in text
    assert len([ln for ln in text.splitlines() if ln.strip()]) == 1


def test_cli_finetune_predict_evaluate(monkeypatch, capsys, split_path, tmp_path):
    run = tmp_path / "run"
    code, text = _cli(
        monkeypatch,
        capsys,
        "finetune",
        "classifier",
        "--config",
        "attempt1_resnet18",
        "--split",
        str(split_path),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch",
        "8",
        "--imgsz",
        "32",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--task",
        "binary",
        "--set",
        "data.max_train_good=2",
        "--balance",
        "reweight",
        "--weights",
        "none",
    )
    assert code == 0, text
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert (
        resolved["train"]["epochs"] == 1
        and resolved["train"]["seed"] == 3
        and resolved["data"]["input_size_hw"] == [32, 32]
    )
    assert (
        resolved["task"] == "binary"
        and resolved["weights"].startswith("none")
        and resolved["longtail"]["balance"] == "reweight"
    )
    pred_run = tmp_path / "preds"
    code, text = _cli(
        monkeypatch,
        capsys,
        "predict",
        "classifier",
        "--run",
        str(run),
        "--split",
        str(split_path),
        "--subset",
        "test",
        "--out",
        str(pred_run),
    )
    assert code == 0, text
    preds = pred_run / "predictions.json"
    assert str(preds) in text and (pred_run / "config.yaml").is_file()
    doc = json.loads(preds.read_text())
    assert doc["classes"] == ["good", "defect"] and len(doc["predictions"]) == 4
    p = doc["predictions"][0]
    assert set(p) >= {"image", "image_id", "label", "scores"} and np.isclose(sum(p["scores"].values()), 1.0, atol=1e-4)
    m = evaluate_classification(preds, tmp_path / "eval")
    assert (
        m["n"] == 4 and m["auroc_good_vs_defect"] is not None and (tmp_path / "eval" / "training_curves.png").is_file()
    )


def test_image_ids_from_a_standalone_split_match_convert_masks_coco(monkeypatch, capsys, synth_category, tmp_path):
    """Prediction files made from a split.json with no coco/ beside it name each image by the id
    coco/<subset>.json of convert-masks gives the same file (the manifest's image-id rule)."""
    import shutil

    from pipeline.data.convert import convert_category

    ann = tmp_path / "ann"
    convert_category(synth_category, ann)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ann / "split.json", alone / "split.json")
    run = tmp_path / "run"
    code, text = _cli(
        monkeypatch,
        capsys,
        "finetune",
        "classifier",
        "--config",
        "attempt1_resnet18",
        "--split",
        str(alone / "split.json"),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch",
        "8",
        "--imgsz",
        "32",
        "--device",
        "cpu",
        "--weights",
        "none",
        "--set",
        "data.max_train_good=2",
    )
    assert code == 0, text
    code, text = _cli(
        monkeypatch,
        capsys,
        "predict",
        "classifier",
        "--run",
        str(run),
        "--split",
        str(alone / "split.json"),
        "--subset",
        "test",
        "--out",
        str(tmp_path / "pred"),
    )
    assert code == 0, text
    for subset, pred_file in (("val", run / "val_predictions.json"), ("test", tmp_path / "pred" / "predictions.json")):
        coco_ids = {
            im["file_name"]: im["id"] for im in json.loads((ann / "coco" / f"{subset}.json").read_text())["images"]
        }
        preds = json.loads(pred_file.read_text())["predictions"]
        assert sorted(p["image"] for p in preds) == sorted(coco_ids), subset  # every image of the subset, once
        assert all(p["image_id"] == coco_ids[p["image"]] for p in preds), subset


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.parametrize("name", ATTEMPTS)
def test_each_attempt_trains_on_real_bottle(name, mvtec_root, tmp_path_factory):
    """Two epochs per attempt on the real bottle split, 128 px, from scratch (no ImageNet file here)."""
    base = tmp_path_factory.getbasetemp() / "bottle_split.json"
    if not base.is_file():
        write_split(make_split(scan_category(mvtec_root / "bottle"), seed=0), base)
    cfg = load_config(
        name,
        {
            "train.epochs": 2,
            "data.input_size_hw": [128, 128],
            "train.batch_size": 16,
            "data.max_train_good": 40,
            "train.device": "cpu",
        },
    )
    res = train_classifier(cfg, base, tmp_path_factory.mktemp(name) / "run", weights="none", progress=False, echo=False)
    m = res.metrics
    assert m["train_counts"]["good"] == 12 + 40 and set(m["classes"]) == {
        "good",
        "broken_large",
        "broken_small",
        "contamination",
    }
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert len(hist) == 2 and all(np.isfinite(h["train_loss"]) for h in hist)
    assert m["val"]["n"] == 16 and 0.0 <= m["val"]["accuracy"] <= 1.0


@pytest.mark.parametrize("category, flips", [("cable", False), ("synth", True)])
def test_no_flip_reaches_a_cable_image(synth_category, tmp_path, monkeypatch, category, flips):
    """Label-safe augmentation: a cable run never flips or rotates a training batch (cable_swap is the
    colour order); a category without restrictions keeps the attempt's flips."""
    import json

    import torch

    import pipeline.models.classifier.train as tr

    manifest = make_split(scan_category(synth_category), seed=0)
    write_split({**manifest, "category": category}, tmp_path / "split.json")
    flipped, configs = [], []
    real_flip = torch.Tensor.flip
    real_augment = tr.augment

    def spy_augment(x, aug, gen, **kw):
        configs.append(aug)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "flip", lambda self, *d: flipped.append(d) or real_flip(self, *d))
            return real_augment(x, aug, gen, **kw)

    monkeypatch.setattr(tr, "augment", spy_augment)
    cfg = load_config("attempt4_gem", {**TINY, "train.epochs": 1, "data.max_train_good": 4, "data.augment.vflip": 0.5})
    train_classifier(cfg, tmp_path / "split.json", tmp_path / "run", weights="none", progress=False, echo=False)
    assert configs, "no training batch was augmented"
    assert bool(flipped) == flips
    assert all((a.hflip == 0 and a.vflip == 0 and a.rotate_deg == 0) == (not flips) for a in configs)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["augmentation"]["flips"] is flips and saved["augmentation"]["category"] == category
    assert (saved["data"]["augment"]["hflip"] == 0.0) == (not flips)
    assert json.loads(json.dumps(saved["augmentation"]))["source"].startswith("augmentation.yaml")


# ----------------------------------------------------------------------------- initial weights


def _no_weights_anywhere(monkeypatch, tmp_path) -> list[Path]:
    """Empty weights folders and working directory; returns every path the resolver looks at for the
    ImageNet file, in order."""
    for name in ("w", "torch", "ultra"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "ultra"))  # no settings.json: ./weights
    monkeypatch.chdir(tmp_path)
    f = "resnet18-f37072fd.pth"
    return [tmp_path / f, tmp_path / "w" / f, tmp_path / "torch" / "hub" / "checkpoints" / f, tmp_path / "weights" / f]


def test_cli_default_is_imagenet_and_a_missing_file_is_one_line(monkeypatch, capsys, split_path, tmp_path):
    places = _no_weights_anywhere(monkeypatch, tmp_path)
    code, text = _cli(
        monkeypatch,
        capsys,
        "finetune",
        "classifier",
        "--config",
        "attempt4_gem",
        "--split",
        str(split_path),
        "--out",
        str(tmp_path / "run"),
        "--imgsz",
        "32",
        "--device",
        "cpu",
    )
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1, text
    line = lines[0]
    assert "'resnet18-f37072fd.pth' (torchvision ResNet-18, ImageNet-1k) not found" in line
    for p in places:
        assert str(p) in line, (p, line)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in line
    assert "--allow-download to fetch it" in line and line.rstrip().endswith("--weights none to train from scratch")
    assert not (tmp_path / "run").exists()


def test_library_default_is_imagenet(monkeypatch, split_path, tmp_path):
    from pipeline.models.classifier.train import train_from_config

    _no_weights_anywhere(monkeypatch, tmp_path)
    cfg = load_config("attempt1_resnet18", TINY)
    with pytest.raises(PipelineError, match="resnet18-f37072fd.pth.*--weights none to train from scratch"):
        train_classifier(cfg, split_path, tmp_path / "a", progress=False, echo=False)
    with pytest.raises(PipelineError, match="resnet18-f37072fd.pth.*--weights none to train from scratch"):
        train_from_config("attempt1_resnet18", split_path, tmp_path / "b", overrides=TINY)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "attempt, weights, frozen_random",
    [
        ("attempt4_gem", "none", ["stem", "layer1", "layer2"]),  # frozen and random: not the published attempt
        ("attempt3_dropblock", "none", ["stem", "layer1", "layer2"]),
        ("attempt1_resnet18", "none", []),  # nothing frozen: from scratch is honest
        ("attempt4_gem", "file", []),  # frozen stages come from a ResNet-18 state dict
    ],
)
def test_frozen_random_stages_warned_and_recorded(capsys, split_path, tmp_path, attempt, weights, frozen_random):
    import torchvision

    if weights == "file":
        weights = str(tmp_path / "r18.pth")
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = load_config(attempt, {**TINY, "train.epochs": 1, "data.max_train_good": 2})
    res = train_classifier(cfg, split_path, tmp_path / "run", weights=weights, progress=False, echo=True)
    out = capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["frozen_random_stages"] == frozen_random and metrics["frozen_random_stages"] == frozen_random
    assert res.metrics["frozen_random_stages"] == frozen_random
    warning = (
        "warning: frozen stages stem, layer1, layer2 are randomly initialised: this is not the published attempt; "
        "train them (--set model.freeze=[]) or use --weights imagenet"
    )
    log = (tmp_path / "run" / "log.txt").read_text()
    if frozen_random:
        assert out.count(warning) == 1 and log.count(warning) == 1
    else:
        assert "randomly initialised" not in out and "randomly initialised" not in log


def test_predict_classifier_records_provenance(monkeypatch, capsys, split_path, tmp_path):
    import hashlib

    from pipeline.data.predictions import load_predictions
    from pipeline.models.classifier.predict import predict_classifier

    run = tmp_path / "run"
    code, text = _cli(
        monkeypatch,
        capsys,
        *("finetune", "classifier", "--config", "attempt1_resnet18", "--split", str(split_path), "--out", str(run)),
        *("--epochs", "1", "--batch", "8", "--imgsz", "32", "--device", "cpu", "--weights", "none"),
        *("--set", "data.max_train_good=2"),
    )
    assert code == 0, text
    out = predict_classifier(run, split_path, tmp_path / "pred", subset="val", device="cpu", progress=False)
    weights = run / "weights" / "best.pt"
    record = {
        "family": "classifier",
        "model": str(weights.resolve()),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "prompt": None,
        "split": str(split_path.resolve()),
        "subset": "val",
        "created_by": "pipeline predict classifier",
    }
    unset = {"score_threshold": None, "score_threshold_chosen_on": None}
    assert json.loads((out / "provenance.json").read_text()) == {**record, "files": {"predictions.json": unset}}
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["provenance"] == {**record, **unset}
    assert load_predictions(out / "predictions.json").provenance == {**record, **unset}
