"""The image-id rule across families: every prediction file names each image by the id that
``coco/<subset>.json`` from convert-masks gives it, also when made from a standalone ``split.json``
(no ``coco/`` beside it). The classifier's side is in tests/models/classifier; detector and SAM
results are made against a split's COCO ground truth, so they carry its ids by construction."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest


def _pipeline(*args):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_patchcore_ids_from_a_standalone_split_match_coco(synth_category, tmp_path):
    from pipeline.models import backbones

    if backbones.available().get("efficientnet_lite0") is None:
        pytest.skip("efficientnet_lite0 weights package not installed")
    ann = tmp_path / "ann"
    _pipeline("convert-masks", synth_category, "--out", ann)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ann / "split.json", alone / "split.json")
    _pipeline(
        "finetune",
        "anomaly",
        synth_category,
        "--split",
        alone / "split.json",
        "--out",
        tmp_path / "pc",
        "--backbone",
        "efficientnet_lite0",
        "--imgsz",
        64,
        "--coreset-ratio",
        0.05,
    )
    for subset in ("val", "test"):
        out = tmp_path / f"pred_{subset}"
        _pipeline(
            "predict",
            "anomaly",
            tmp_path / "pc",
            "--split",
            alone / "split.json",
            "--subset",
            subset,
            "--out",
            out,
            "--overlays",
            0,
        )
        coco = {im["file_name"]: im["id"] for im in json.loads((ann / "coco" / f"{subset}.json").read_text())["images"]}
        preds = json.loads((out / "predictions.json").read_text())["predictions"]
        assert {p["image"]: p["image_id"] for p in preds} == coco
        regions = json.loads((out / "coco_results.json").read_text())
        assert {r["image_id"] for r in regions} <= set(coco.values())
