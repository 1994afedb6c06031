"""Label Studio export: percentages, config/labels agreement, URLs."""

import json

import pytest

from pipeline.errors import PipelineError
from pipeline.review import config_labels, export_tasks, image_url, labeling_config, rectangle_result, validate_tasks


def test_rectangle_in_percent_of_original_size():
    r = rectangle_result(bbox_xywh=[100, 50, 200, 25], label="scratch", size_hw=(500, 1000), score=0.7, rid="a")
    assert r["value"] == {"x": 10.0, "y": 10.0, "width": 20.0, "height": 5.0, "rotation": 0, "rectanglelabels": ["scratch"]}
    assert (r["original_width"], r["original_height"], r["score"]) == (1000, 500, 0.7)
    # a box hanging over the border is clipped to the image
    c = rectangle_result(bbox_xywh=[-10, 490, 20, 30], label="x", size_hw=(500, 1000), score=None, rid="b")
    assert c["value"]["x"] == 0.0 and c["value"]["width"] == 1.0 and c["value"]["y"] + c["value"]["height"] == 100.0


def test_config_and_validation():
    cfg = labeling_config(["broken large", "contamination"])
    assert config_labels(cfg) == {"label": ("image", {"broken large", "contamination"})}
    ok = rectangle_result(bbox_xywh=[0, 0, 1, 1], label="contamination", size_hw=(10, 10), score=1.0, rid="1")
    validate_tasks([{"predictions": [{"result": [ok]}]}], cfg)
    bad = dict(ok, id="2", value=dict(ok["value"], rectanglelabels=["crack"]))
    with pytest.raises(PipelineError, match="label 'crack' not in the config"):
        validate_tasks([{"predictions": [{"result": [bad]}]}], cfg)
    with pytest.raises(PipelineError, match="not unique"):
        validate_tasks([{"predictions": [{"result": [ok, ok]}]}], cfg)


def test_local_files_url(tmp_path):
    (tmp_path / "cat" / "test").mkdir(parents=True)
    assert image_url(tmp_path / "cat/test/a b.png", document_root=tmp_path) == "/data/local-files/?d=cat/test/a%20b.png"
    assert image_url(tmp_path / "x.png", url_prefix="http://h/img/", rel="test/x.png") == "http://h/img/test/x.png"
    with pytest.raises(PipelineError, match="not under the document root"):
        image_url("/elsewhere/x.png", document_root=tmp_path)


def test_export_tasks_end_to_end(synth_category, tmp_path):
    from pipeline.convert import convert_category

    ann = convert_category(synth_category, tmp_path / "ann").out
    gt = json.loads((ann / "coco" / "test.json").read_text())
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.8}
             for a in gt["annotations"]]
    preds.append({"image_id": gt["images"][0]["id"], "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.1})  # below min_score
    (tmp_path / "p.json").write_text(json.dumps(preds))
    info = export_tasks(tmp_path / "p.json", gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls")
    tasks = json.loads(info["tasks"].read_text())
    assert len(tasks) == len(gt["images"]) and info["n_results"] == len(gt["annotations"])
    for t in tasks:
        assert t["data"]["image"] == f"/data/local-files/?d=synth/{t['data']['file_name']}"
        for r in t["predictions"][0]["result"]:
            img = next(i for i in gt["images"] if i["id"] == t["data"]["image_id"])
            ann_ = next(a for a in gt["annotations"] if a["image_id"] == img["id"] and
                        abs(a["bbox"][0] / img["width"] * 100 - r["value"]["x"]) < 1e-9)
            assert r["value"]["width"] == pytest.approx(ann_["bbox"][2] / img["width"] * 100)
    validate_tasks(tasks, info["config"].read_text())
    with pytest.raises(PipelineError, match="--force"):
        export_tasks(tmp_path / "p.json", gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls")
