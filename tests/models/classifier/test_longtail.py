"""Long-tail methods of the classifier family: interpolated features, the DLSA flow, filter and
cascade, the methods against plain training on a known problem, and ``finetune classifier`` with
``--feature-synthesis interpolate`` / ``--longtail dlsa`` for every attempt (tiny: 32 px, one epoch)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.data.mvtec import scan_category  # noqa: E402
from pipeline.data.split import make_split, write_split  # noqa: E402
from pipeline.models.classifier.config import LongTailConfig, load_config  # noqa: E402
from pipeline.models.classifier.dlsa import (  # noqa: E402
    MADE,
    DLSASettings,
    GaussianMixtureFlow,
    build_head,
    fit_dlsa,
)
from pipeline.models.classifier.longtail import FEATURE_METHODS, fit_feature_head, synthesize  # noqa: E402
from pipeline.models.classifier.synthesis import MEAN, interpolate_balanced  # noqa: E402

ATTEMPTS = ["attempt1_resnet18", "attempt2_selfattention", "attempt3_dropblock", "attempt4_gem"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _long_tailed(seed: int = 0, n=(200, 4, 4), n_test: int = 300, d: int = 8):
    """Three unit Gaussians in ``d`` dimensions, tails 1.2 away from the head along their own axis."""
    rng = np.random.default_rng(seed)
    means = np.zeros((3, d))
    means[1, 0] = means[2, 1] = 1.2
    x = np.concatenate([rng.normal(means[c], 1, (n[c], d)) for c in range(3)]).astype(np.float32)
    y = np.concatenate([np.full(k, c) for c, k in enumerate(n)])
    xt = np.concatenate([rng.normal(means[c], 1, (n_test, d)) for c in range(3)]).astype(np.float32)
    return x, y, xt, np.repeat(np.arange(3), n_test)


# ----------------------------------------------------------------------------- interpolation


def test_interpolated_features_lie_on_their_recorded_segments():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (30, 5)), rng.normal(4, 1, (3, 5)), rng.normal(-4, 1, (1, 5))])
    y = np.array([0] * 30 + [1] * 3 + [2])
    b = interpolate_balanced(x, y, 3, mean_fraction=0.3, seed=2)
    assert b.counts(3).tolist() == [30, 30, 30] and int(b.synthetic.sum()) == 56
    assert np.array_equal(b.features[:34], x.astype(np.float32)) and not b.synthetic[:34].any()
    syn = np.flatnonzero(b.synthetic)
    i, j, lam = b.endpoints[syn, 0], b.endpoints[syn, 1], b.weights[syn]
    assert ((lam >= 0) & (lam <= 1)).all() and (i >= 0).all()
    assert (y[i] == b.labels[syn]).all()  # first endpoint: a real feature of the same class
    pair = j != MEAN
    assert (y[j[pair]] == b.labels[syn][pair]).all()
    assert (i[pair & (b.labels[syn] == 1)] != j[pair & (b.labels[syn] == 1)]).all()  # two different features
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    end_b = np.where(pair[:, None], x[np.maximum(j, 0)], means[b.labels[syn]])
    expected = (1 - lam[:, None]) * x[i] + lam[:, None] * end_b
    assert np.allclose(b.features[syn], expected, atol=1e-5)
    assert 0.1 < (~pair).mean() < 0.5  # about mean_fraction of them go towards the class mean
    # the single-sample class can only repeat its feature
    assert np.allclose(b.features[syn][b.labels[syn] == 2], x[33], atol=1e-5)
    assert np.array_equal(interpolate_balanced(x, y, 3, mean_fraction=0.3, seed=2).features, b.features)


def test_target_ratio_and_count_for_both_generators():
    x, y, _, _ = _long_tailed()
    for method in ("interpolate", "gaussian"):
        lt = LongTailConfig(feature_synthesis=method, target_ratio=0.25)
        assert synthesize(x, y, 3, lt, 0).counts(3).tolist() == [200, 50, 50]
        lt = LongTailConfig(feature_synthesis=method, fr_target=20)
        assert synthesize(x, y, 3, lt, 0).counts(3).tolist() == [200, 20, 20]


def test_feature_rebalance_is_the_gaussian_alias_and_conflicts_are_one_line():
    assert load_config("attempt1_resnet18", {"longtail.feature_rebalance": True}).longtail.synthesis == "gaussian"
    assert load_config("attempt1_resnet18").longtail.synthesis == "none"
    with pytest.raises(PipelineError, match="longtail.method dlsa and longtail.feature_synthesis interpolate"):
        load_config("attempt1_resnet18", {"longtail.method": "dlsa", "longtail.feature_synthesis": "interpolate"})
    with pytest.raises(PipelineError, match=r"longtail.dlsa_ratio = 1.0 \(expected a fraction in \(0, 1\)\)"):
        load_config("attempt1_resnet18", {"longtail.dlsa_ratio": 1.0})


# ----------------------------------------------------------------------------- the flow


def _trained_flow(dim: int = 5) -> GaussianMixtureFlow:
    torch.manual_seed(0)
    flow = GaussianMixtureFlow(dim, 3, blocks=2, hidden=16, hidden_layers=1)
    flow.train()
    flow(torch.randn(64, dim) * 2 + 1)  # running statistics away from (0, 1)
    flow.eval()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return flow


def test_flow_is_invertible_and_its_log_det_is_the_full_jacobians():
    flow = _trained_flow().double()
    x = torch.randn(6, 5, dtype=torch.float64) * 2
    u, logdet = flow.transform(x)
    assert torch.allclose(flow.inverse(u), x, atol=1e-9)
    for row in range(3):
        jac = torch.autograd.functional.jacobian(lambda z: flow.transform(z[None])[0][0], x[row])
        assert torch.isclose(torch.slogdet(jac)[1], logdet[row], atol=1e-9)
    # the mixture log-likelihood is the log-sum of the components: log p(x) = log sum_k p(x, k)
    _, log_p_xk, log_p_x = flow(x)
    assert torch.allclose(log_p_x, torch.log(torch.exp(log_p_xk).sum(1)), atol=1e-9)


def test_made_is_autoregressive():
    made = MADE(4, 12, 2, torch.tensor([2, 0, 3, 1]))
    jac = torch.autograd.functional.jacobian(lambda z: made(z[None])[0][0], torch.randn(4))
    order = torch.tensor([2, 0, 3, 1])
    for i in range(4):
        for j in range(4):
            if i != j and order[j] >= order[i]:
                assert jac[i, j] == 0  # u_i never depends on a variable of equal or later degree


def test_flow_density_integrates_to_one_in_two_dimensions():
    flow = _trained_flow(dim=2).double()
    g = torch.linspace(-30, 30, 601, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        _, _, log_p = flow(torch.stack([xx.flatten(), yy.flatten()], 1))
    assert abs(float(torch.exp(log_p).sum() * (g[1] - g[0]) ** 2) - 1.0) < 0.02


# ----------------------------------------------------------------------------- filter and cascade

SMALL = DLSASettings(stages=3, ratio=0.3, flow_hidden=16, flow_epochs=20, cls_epochs=30, cls_lr=1e-2)


def test_filter_stages_partition_the_training_set():
    x, y, _, _ = _long_tailed()
    head, rep = fit_dlsa(x, y, 3, SMALL, seed=0)
    stage_of = np.asarray(rep["stage_of"])
    assert stage_of.shape == (len(y),) and set(stage_of.tolist()) <= {0, 1, 2, 3}
    entering = len(y)
    for s in range(3):  # each stage takes the top 30% by likelihood of what enters it, exactly once
        taken = int((stage_of == s).sum())
        assert taken == entering - int(entering * 0.7)
        assert sum(rep["stage_counts"][s]) == entering
        entering -= taken
    assert int((stage_of == 3).sum()) == entering == sum(rep["stage_counts"][3])
    # the cascade at prediction sends each training sample to the stage the filter gave it
    stage, _ = head.route(torch.tensor(x))
    assert (stage.numpy() == stage_of).mean() > 0.99


def test_dlsa_head_round_trips_through_its_spec():
    x, y, xt, _ = _long_tailed()
    head, _ = fit_dlsa(x, y, 3, SMALL, seed=0)
    again = build_head(json.loads(json.dumps(head.spec())))
    again.load_state_dict(head.state_dict())
    again.eval()
    with torch.no_grad():
        assert torch.equal(again(torch.tensor(xt)), head(torch.tensor(xt)))


def test_each_method_beats_plain_training_on_tail_recall():
    x, y, xt, yt = _long_tailed()
    lt = LongTailConfig(
        fr_epochs=60, fr_lr=1e-2, fr_batch_size=512, dlsa_flow_hidden=16, dlsa_flow_epochs=30, dlsa_cls_epochs=60
    )
    lt = __import__("dataclasses").replace(lt, dlsa_cls_lr=1e-2)
    recall = {}
    for method in FEATURE_METHODS:
        head, _ = fit_feature_head(method, x, y, 3, lt, seed=0)
        with torch.no_grad():
            pred = head(torch.tensor(xt)).argmax(1).numpy()
        recall[method] = float(np.mean([(pred[yt == c] == c).mean() for c in (1, 2)]))
    assert recall["plain"] < 0.1, recall
    for method in FEATURE_METHODS[1:]:
        assert recall[method] > recall["plain"] + 0.1, (method, recall)


# ----------------------------------------------------------------------------- finetune classifier end to end


@pytest.fixture(scope="module")
def split_path(synth_category, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lt") / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), path)
    return path


def _cli(monkeypatch, capsys, *args):
    from pipeline.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    out = capsys.readouterr()
    return exc.value.code, out.out + out.err


TINY_CLI = ("--epochs", "1", "--batch", "8", "--imgsz", "32", "--device", "cpu", "--weights", "none")
OPTIONS = {
    "dlsa": ("--longtail", "dlsa", "--set", "longtail.dlsa_flow_hidden=8", "--set", "longtail.dlsa_flow_epochs=2"),
    "interpolate": ("--feature-synthesis", "interpolate", "--target-ratio", "0.5"),
}


@pytest.mark.parametrize("attempt", ATTEMPTS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_longtail_step_and_checkpoint_rebuild_for_every_attempt(attempt, option):
    """The step on each attempt's model (head shapes differ: attempt 3 has a BatchNorm1d hidden layer),
    and the checkpoint dict it leads to rebuilds a model with the same probabilities."""
    from pipeline.models.classifier.config import config_to_dict
    from pipeline.models.classifier.data import ImageSet
    from pipeline.models.classifier.longtail import longtail_step
    from pipeline.models.classifier.model import build_model, model_from_checkpoint
    from pipeline.models.classifier.predict import predict_probs

    overrides = {"data.input_size_hw": [32, 32], "train.batch_size": 8, "longtail.fr_epochs": 2}
    overrides.update(
        {
            "longtail.method": "dlsa",
            "longtail.dlsa_flow_hidden": 8,
            "longtail.dlsa_flow_epochs": 2,
            "longtail.dlsa_cls_epochs": 2,
        }
        if option == "dlsa"
        else {"longtail.feature_synthesis": "interpolate"}
    )
    cfg = load_config(attempt, overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, 3)
    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 255, (12, 3, 32, 32), generator=g, dtype=torch.uint8),
        torch.tensor([0] * 8 + [1, 1, 2, 2]),
        [f"x{i}.png" for i in range(12)],
        ["good", "a", "b"],
    )
    rep = longtail_step(model, data, cfg, "cpu")
    assert rep["step"] == option and rep["counts_before"] == [8, 2, 2]
    ck = {"model": model.state_dict(), "config": config_to_dict(cfg), "classes": data.classes}
    ck["longtail_head"] = rep.get("head")
    again, _ = model_from_checkpoint(ck)
    assert torch.allclose(predict_probs(again, data, cfg, "cpu"), predict_probs(model, data, cfg, "cpu"), atol=1e-6)


# one run per attempt through the command line, the two options taking turns
@pytest.mark.parametrize(
    "attempt, option",
    [(a, list(OPTIONS)[i % 2]) for i, a in enumerate(ATTEMPTS)],
)
def test_finetune_with_a_longtail_option_then_predict(monkeypatch, capsys, split_path, tmp_path, attempt, option):
    run = tmp_path / "run"
    code, text = _cli(
        monkeypatch,
        capsys,
        *("finetune", "classifier", "--config", attempt, "--split", str(split_path), "--out", str(run)),
        *TINY_CLI,
        *OPTIONS[option],
        *("--set", "longtail.fr_epochs=2", "--set", "longtail.dlsa_cls_epochs=2", "--set", "data.max_train_good=6"),
    )
    assert code == 0, text
    metrics = json.loads((run / "metrics.json").read_text())
    lt = metrics["longtail"]
    assert lt["step"] == option and metrics["val_after_longtail"]["val_accuracy"] is not None
    ck = torch.load(run / "weights" / "best.pt", weights_only=False)
    assert ck["longtail_step"] == option
    if option == "dlsa":
        assert ck["longtail_head"] == lt["head"] and lt["head"]["kind"] == "dlsa"
        assert sum(lt["train_stage_sizes"]) == sum(lt["counts_before"])
    else:
        head = max(lt["counts_before"])
        assert ck["longtail_head"] is None and min(lt["counts_after"]) == max(
            round(0.5 * head), *lt["counts_before"][1:]
        )
    # predict classifier rebuilds the checkpoint (for DLSA: the cascade from its spec) and gives the
    # val predictions written at the end of training
    code, text = _cli(
        monkeypatch,
        capsys,
        *("predict", "classifier", "--run", str(run), "--split", str(split_path), "--subset", "val"),
        *("--out", str(tmp_path / "pred_val"), "--device", "cpu"),
    )
    assert code == 0, text
    again = {
        p["image"]: p["scores"]
        for p in json.loads((tmp_path / "pred_val" / "predictions.json").read_text())["predictions"]
    }
    first = {p["image"]: p["scores"] for p in json.loads((run / "val_predictions.json").read_text())["predictions"]}
    assert again.keys() == first.keys() and len(first) > 0
    assert all(np.allclose(list(again[k].values()), list(first[k].values()), atol=1e-4) for k in first)


def test_dlsa_config_defaults_are_the_settings_defaults():
    """The ``longtail.dlsa_*`` config keys and :class:`DLSASettings` state the same defaults once each:
    a default changed in one place only would silently change the method for config users."""
    from pipeline.models.classifier.config import LongTailConfig
    from pipeline.models.classifier.dlsa import DLSASettings
    from pipeline.models.classifier.longtail import dlsa_settings

    from_config = dataclasses.asdict(dlsa_settings(LongTailConfig()))
    assert from_config == dataclasses.asdict(DLSASettings())
