"""The main job on the real MVTec AD bottle category, through the CLI as a user runs it:
convert-masks -> finetune yolo (YOLO-World's neck and head on the ImageNet trunk of the README's CPU
recipe, few epochs, small images) -> predict -> evaluate -> export. Needs MVTEC_ROOT. It checks every
output for validity, not accuracy: after 2 CPU epochs (still ultralytics' warmup) the detector
predicts no boxes yet; the CPU recipe's 15 epochs at 320 px do (README, finetune yolo)."""

import json
import subprocess
import sys
from urllib.parse import unquote

import cv2
import pytest

pytestmark = pytest.mark.slow
TRUNK = "mobilenet_v2"  # the trunk with the best val AP50 on bottle (README, benchmarks/yolo_trunks.py)


def pipeline(*args):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, timeout=1200
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def run(mvtec_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    bottle = mvtec_root / "bottle"
    ann = tmp / "annotations" / "bottle"
    out = {"tmp": tmp, "bottle": bottle, "ann": ann}
    out["convert"] = pipeline("convert-masks", bottle, "--out", ann)
    pipeline(
        "finetune",
        "yolo",
        "--data",
        ann / "yolo/data.yaml",
        "--model",
        "yolov8n-worldv2.yaml",
        "--backbone",
        TRUNK,
        "--close-mosaic",
        2,
        "--nbs",
        8,
        "--epochs",
        2,
        "--imgsz",
        256,
        "--batch",
        8,
        "--out",
        tmp / "yolo",
    )
    pipeline(
        "predict",
        "yolo",
        "--weights",
        tmp / "yolo/weights/best.pt",
        "--gt",
        ann / "coco/test.json",
        "--imgsz",
        256,
        "--out",
        tmp / "pred",
    )
    out["evaluate"] = pipeline(
        "evaluate", tmp / "pred/predictions.json", "--gt", ann / "coco/test.json", "--out", tmp / "eval"
    )
    pipeline(
        "export",
        "labelstudio",
        tmp / "pred/predictions.json",
        "--gt",
        ann / "coco/test.json",
        "--out",
        tmp / "ls",
        "--min-score",
        0.0,
    )
    return out


def test_counts_equal_the_dataset(run):
    bottle, ann = run["bottle"], run["ann"]
    masks = sorted((bottle / "ground_truth").rglob("*_mask.png"))
    assert len(masks) == 63
    components = sum(
        cv2.connectedComponents((cv2.imread(str(m), 0) > 0).astype("uint8"), connectivity=8)[0] - 1 for m in masks
    )
    summary = json.loads((ann / "summary.json").read_text())
    assert sum(summary["masks"].values()) == 63
    assert sum(summary["instances"].values()) == components
    assert sum(summary["images"].values()) == 83
    assert summary["classes"] == ["broken large", "broken small", "contamination"]
    coco = [json.loads((ann / f"coco/{s}.json").read_text()) for s in ("train", "val", "test")]
    assert sum(len(c["annotations"]) for c in coco) == components
    assert sum(sum(1 for i in c["images"] if i["defect_type"] == "good") for c in coco) == 20


def test_training_run_folder(run):
    y = run["tmp"] / "yolo"
    for f in ("weights/best.pt", "weights/last.pt", "config.yaml", "metrics.json", "results.csv"):
        assert (y / f).is_file(), f
    m = json.loads((y / "metrics.json").read_text())
    assert 0.0 <= m["mAP50"] <= 1.0 and 0.0 <= m["mAP50-95"] <= m["mAP50"] + 1e-9


def test_predictions_and_metrics_are_valid(run):
    preds = json.loads((run["tmp"] / "pred/predictions.json").read_text())
    gt = json.loads((run["ann"] / "coco/test.json").read_text())
    ids = {i["id"]: i for i in gt["images"]}
    for p in preds:
        img = ids[p["image_id"]]
        x, y, w, h = p["bbox"]
        assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
        assert 0.0 <= p["score"] <= 1.0 and p["category_id"] in (1, 2, 3)
    metrics = json.loads((run["tmp"] / "eval/metrics_pred-predictions.json").read_text())
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert 0.0 <= metrics["bbox"][k] <= 1.0
    assert set(metrics["bbox"]["per_class_AP"]) == {"broken large", "broken small", "contamination"}
    print(f"\nbottle, YOLO-World n on {TRUNK}, 2 epochs @256:", run["evaluate"].strip().splitlines()[0])


def test_labelstudio_tasks_match_config_and_files(run):
    from pipeline.review.labeling_config import validate_tasks

    tasks = json.loads((run["tmp"] / "ls/tasks.json").read_text())
    config = (run["tmp"] / "ls/labeling_config.xml").read_text()
    validate_tasks(tasks, config)
    assert len(tasks) == 16
    root = run["bottle"].parent
    for t in tasks:
        rel = unquote(t["data"]["image"].split("?d=", 1)[1])
        assert (root / rel).is_file()
        for r in t["predictions"][0]["result"]:
            v = r["value"]
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and v["x"] + v["width"] <= 100 + 1e-6
            assert (r["original_width"], r["original_height"]) == (900, 900)


def test_every_json_written_is_strict_json(run):
    """NaN and infinities are not JSON (RFC 8259): every JSON file the main job wrote parses with a
    parser that refuses them."""

    def refuse(name):
        raise ValueError(f"bare {name}")

    files = [p for p in run["tmp"].rglob("*.json") if p.is_file()]
    assert len(files) >= 10
    for p in files:
        json.loads(p.read_text(), parse_constant=refuse)
