"""Label Studio export: percentages, config/labels agreement, URLs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.instances import decode_rle, encode_rle
from pipeline.review.export import (
    Source,
    export_tasks,
    image_uncertainty,
    image_url,
    rectangle_result,
    region_results,
    score_closeness,
)
from pipeline.review.labeling_config import config_class_names, config_controls, labeling_config, validate_tasks
from pipeline.review.reviewed import import_export, polygon_to_mask, rect_to_bbox_xywh, task_regions


def test_rectangle_in_percent_of_original_size():
    r = rectangle_result(bbox_xywh=[100, 50, 200, 25], label="scratch", size_hw=(500, 1000), score=0.7, rid="a")
    assert r["value"] == {
        "x": 10.0,
        "y": 10.0,
        "width": 20.0,
        "height": 5.0,
        "rotation": 0,
        "rectanglelabels": ["scratch"],
    }
    assert (r["original_width"], r["original_height"], r["score"]) == (1000, 500, 0.7)
    # a box hanging over the border is clipped to the image
    c = rectangle_result(bbox_xywh=[-10, 490, 20, 30], label="x", size_hw=(500, 1000), score=None, rid="b")
    assert c["value"]["x"] == 0.0 and c["value"]["width"] == 1.0 and c["value"]["y"] + c["value"]["height"] == 100.0


def test_config_and_validation():
    cfg = labeling_config(["broken large", "contamination"])
    assert {k: (c.to_name, set(c.labels)) for k, c in config_controls(cfg).items()} == {
        "label": ("image", {"broken large", "contamination"})
    }
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
    from pipeline.data.convert import convert_category

    ann = convert_category(synth_category, tmp_path / "ann").out
    gt = json.loads((ann / "coco" / "test.json").read_text())
    preds = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.8}
        for a in gt["annotations"]
    ]
    preds.append(
        {"image_id": gt["images"][0]["id"], "category_id": 1, "bbox": [0, 0, 4, 4], "score": 0.1}
    )  # below min_score
    (tmp_path / "p.json").write_text(json.dumps(preds))
    info = export_tasks(
        tmp_path / "p.json", gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls", min_score=0.25
    )
    tasks = json.loads(info["tasks"].read_text())
    assert len(tasks) == len(gt["images"]) and info["n_results"] == len(gt["annotations"])
    for t in tasks:
        assert t["data"]["image"] == f"/data/local-files/?d=synth/{t['data']['file_name']}"
        for r in t["predictions"][0]["result"]:
            img = next(i for i in gt["images"] if i["id"] == t["data"]["image_id"])
            ann_ = next(
                a
                for a in gt["annotations"]
                if a["image_id"] == img["id"] and abs(a["bbox"][0] / img["width"] * 100 - r["value"]["x"]) < 1e-9
            )
            assert r["value"]["width"] == pytest.approx(ann_["bbox"][2] / img["width"] * 100)
    validate_tasks(tasks, info["config"].read_text())
    with pytest.raises(PipelineError, match="--force"):
        export_tasks(tmp_path / "p.json", gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls", min_score=0.25)
    assert info["regions"] == [
        {
            "source": "p",
            "file": str(tmp_path / "p.json"),
            "kept": len(gt["annotations"]),
            "total": len(preds),
            "min_score": 0.25,
            "min_score_from": "--min-score",
            "best_score": 0.8,
        }
    ]


def _run_folder(tmp_path, name, results, **provenance):
    """``tmp_path/name/predictions.json`` holding ``results``, with a provenance record beside it."""
    from pipeline.data.predictions import write_provenance

    run = tmp_path / name
    run.mkdir()
    (run / "predictions.json").write_text(json.dumps(results))
    files = {"predictions.json": provenance.pop("file", {})}
    write_provenance(run, model=None, split=tmp_path / "gt.json", files=files, **provenance)
    return run / "predictions.json"


def test_export_min_score_auto_per_source(synth_category, tmp_path):
    """auto: a recorded val threshold where the provenance has one, else 0 (keep everything)."""
    from pipeline.data.convert import convert_category

    ann = convert_category(synth_category, tmp_path / "ann").out
    gt = json.loads((ann / "coco" / "test.json").read_text())
    a0 = gt["annotations"][0]
    low = [{"image_id": a0["image_id"], "category_id": 1, "bbox": a0["bbox"], "score": s} for s in (0.205, 0.1, 0.02)]
    yolo = _run_folder(tmp_path, "yolo_test", low, family="yolo")
    chosen = {"score_threshold": 0.5, "score_threshold_chosen_on": "val"}
    regions = [{**r, "score": s} for r, s in zip(low, (0.9, 0.6, 0.45))]
    ano = _run_folder(tmp_path, "patchcore_test", regions, family="anomaly", file=chosen)
    info = export_tasks([yolo, ano], gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls")
    assert [(c["source"], c["kept"], c["total"], c["min_score"], c["min_score_from"]) for c in info["regions"]] == [
        ("yolo_test", 3, 3, 0.0, "none recorded: every region kept"),
        ("patchcore_test", 2, 3, 0.5, "chosen on val"),
    ]
    tasks = json.loads(info["tasks"].read_text())
    (task,) = [t for t in tasks if t["data"]["image_id"] == a0["image_id"]]
    kept = {p["model_version"]: sorted(r["score"] for r in p["result"]) for p in task["predictions"]}
    assert kept == {"pipeline/predictions": [0.02, 0.1, 0.205], "pipeline/predictions#2": [0.6, 0.9]}
    assert info["n_results"] == 5
    # an explicit number applies to every source, whatever their provenance records
    info = export_tasks([yolo, ano], gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls2", min_score=0.3)
    assert [(c["kept"], c["min_score"]) for c in info["regions"]] == [(0, 0.3), (3, 0.3)]
    with pytest.raises(PipelineError, match="--min-score 'high': expected 'auto' or a number"):
        export_tasks([yolo], gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls3", min_score="high")
    assert not (tmp_path / "ls3").exists()


def test_region_lines_say_what_was_kept_and_warn_when_nothing_is():
    from pipeline.review.sources import region_lines

    kept = {"source": "yolo_test", "kept": 12, "total": 40, "min_score": 0.05, "min_score_from": "--min-score"}
    none = {**kept, "kept": 0, "min_score": 0.25, "best_score": 0.205}
    assert region_lines([kept]) == ["yolo_test: kept 12 of 40 regions (score >= 0.05, --min-score)"]
    assert region_lines([none]) == [
        "yolo_test: kept 0 of 40 regions (score >= 0.25, --min-score)",
        "WARNING: yolo_test: all 40 regions score below 0.25 (best 0.205), so the review queue shows none of them; "
        "lower --min-score or pass --min-score auto",
    ]
    assert region_lines([{**kept, "kept": 0, "total": 0}]) == [
        "yolo_test: kept 0 of 0 regions (score >= 0.05, --min-score)"
    ]


def test_export_refuses_sam_masks_from_ground_truth_boxes(synth_category, tmp_path):
    from pipeline.data.convert import convert_category

    ann = convert_category(synth_category, tmp_path / "ann").out
    gt = json.loads((ann / "coco" / "test.json").read_text())
    res = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")}, "score": 0.9}
        for a in gt["annotations"]
    ]
    upper = _run_folder(tmp_path, "sam_gt", res, family="sam", prompt="gt")
    own = _run_folder(tmp_path, "sam_det", res, family="sam", prompt=f"detector:{tmp_path / 'boxes.json'}")
    with pytest.raises(PipelineError) as err:
        export_tasks([own, upper], gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls")
    assert str(err.value) == (
        f"{upper}: SAM masks prompted with ground-truth boxes (an upper bound, not a model's own output); "
        "a Label Studio review queue (export labelstudio) needs predictions prompted by a detector "
        "(pipeline predict sam --boxes <detector predictions.json>)"
    )
    assert not (tmp_path / "ls").exists()
    assert export_tasks(own, gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls")["n_masks"] == len(res)


# ----------------------------------------------------------------------------- brush, polygons, queue, import


def _blob_mask(h=40, w=60):
    m = np.zeros((h, w), bool)
    m[5:15, 10:30] = True  # a block
    m[20:35, 40:50] = True  # a second component
    m[25, 5] = True  # a one-pixel part
    return m


@pytest.mark.parametrize(
    "mask",
    [
        _blob_mask(),  # several components
        np.zeros((7, 9), bool),  # empty
        np.ones((7, 9), bool),  # full, touching every border
        np.pad(np.ones((5, 5), bool), 3) ^ np.pad(np.pad(np.ones((1, 1), bool), 2), 3),  # a hole
    ],
)
def test_brush_rle_round_trip_is_exact_and_opaque(mask):
    from pipeline.review.brush import brush_decode, brush_encode

    rle = brush_encode(mask)
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in rle)
    alpha = brush_decode(rle, size_hw=mask.shape)
    assert alpha.shape == mask.shape and alpha.dtype == np.uint8
    assert set(np.unique(alpha)) <= {0, 255}  # painted pixels fully opaque (a 0/1 mask would be invisible)
    assert np.array_equal(alpha == 255, mask)
    with pytest.raises(PipelineError, match="expected"):
        brush_decode(rle, size_hw=(mask.shape[0] + 1, mask.shape[1]))


def test_region_results_ids_and_config():
    m = _blob_mask()
    rs = region_results(
        bbox_xywh=[10, 5, 40, 30], mask=m, label="spot", size_hw=m.shape, score=0.5, rid="0123456789", polygons=True
    )
    assert [r["type"] for r in rs][:2] == ["rectanglelabels", "brushlabels"]
    assert [r["id"] for r in rs] == ["0123456789", "0123456789_brush"] + [
        f"0123456789_poly{k}" for k in range(len(rs) - 2)
    ]
    assert len(rs) - 2 == 2  # two outer contours (the one-pixel part has too few points for a polygon)
    cfg = labeling_config(["ring", "spot"], brush=True, polygons=True, reason=True)
    assert {k: (c.kind, c.labels) for k, c in config_controls(cfg).items()} == {
        "label": ("rectanglelabels", ("ring", "spot")),
        "brush": ("brushlabels", ("ring", "spot")),
        "polygon": ("polygonlabels", ("ring", "spot")),
    }
    assert config_class_names(cfg) == ["ring", "spot"] and "$review_reason" in cfg
    validate_tasks([{"predictions": [{"result": rs}]}], cfg)
    # a brush result under the rectangle control's name is refused
    bad = dict(rs[1], from_name="label")
    with pytest.raises(PipelineError, match="result type 'brushlabels'"):
        validate_tasks([{"predictions": [{"result": [bad]}]}], cfg)
    with pytest.raises(PipelineError, match="from_name 'brush'"):
        validate_tasks([{"predictions": [{"result": rs}]}], labeling_config(["ring", "spot"]))
    with pytest.raises(PipelineError, match="does not match|not at the image size"):
        region_results(bbox_xywh=[0, 0, 1, 1], mask=m, label="spot", size_hw=(10, 10), score=1.0, rid="0123456789")


@pytest.mark.parametrize("bbox", [[0, 0, 60, 40], [10, 5, 1, 1], [17, 3, 25, 31], [59, 39, 1, 1]])
def test_rectangle_percent_round_trip_to_integer_pixels(bbox):
    r = rectangle_result(bbox_xywh=bbox, label="x", size_hw=(40, 60), score=None, rid="a")
    assert rect_to_bbox_xywh(r["value"], size_hw=(40, 60)) == bbox


def test_polygon_round_trip_for_hole_free_shapes():
    from pipeline.review.export import polygon_results

    m = _blob_mask()
    m[25, 5] = False  # a one-pixel part has no polygon
    m[30:33, 2:4] = True  # a 2-pixel-wide part has one
    polys = polygon_results(mask=m, label="x", score=None, rid="0123456789")
    back = np.zeros_like(m)
    for p in polys:
        back |= polygon_to_mask(p["value"]["points"], size_hw=m.shape)
    assert np.array_equal(back, m)


def test_uncertainty_score_definition():
    assert score_closeness(0.25, 0.25) == 1.0 and score_closeness(1.0, 0.25) == 0.0
    assert score_closeness(0.625, 0.25) == pytest.approx(0.5)
    names = {1: "ring", 2: "spot"}
    det = Source(
        "det",
        "detections",
        {
            1: [{"category_id": 1, "score": 0.9, "bbox": [0, 0, 1, 1]}],
            2: [{"category_id": 2, "score": 0.3, "bbox": [0, 0, 1, 1]}],
        },
    )
    u1, _ = image_uncertainty(1, [det], threshold=0.25, names=names)
    u2, why2 = image_uncertainty(2, [det], threshold=0.25, names=names)
    assert u1 == pytest.approx(1 - 0.65 / 0.75) and u2 == pytest.approx(1 - 0.05 / 0.75)
    assert "spot score 0.30 near threshold 0.25" in why2
    assert image_uncertainty(3, [det], threshold=0.25, names=names) == (0.0, "no predictions")
    # an anomaly model that calls image 1 good disagrees with the detector: uncertainty 1
    ano = Source("patchcore", "anomaly", {1: [{"score": 0.2}], 2: [{"score": 0.9}]}, threshold=0.5, scale=0.1)
    u, why = image_uncertainty(1, [det, ano], threshold=0.25, names=names)
    assert u == 1.0 and why.startswith("sources disagree: det=defect (ring 0.90), patchcore=good (0.2 < 0.5)")
    assert image_uncertainty(2, [ano], threshold=0.25, names=names)[0] == pytest.approx(np.exp(-4))
    # classifier: one minus the top-2 margin; a class conflict among defect verdicts scores 0.5
    cls = Source(
        "resnet", "classification", {1: [{"label": "spot", "scores": {"good": 0.05, "ring": 0.15, "spot": 0.8}}]}
    )
    assert image_uncertainty(1, [cls], threshold=0.25, names=names)[0] == pytest.approx(0.35)
    u, why = image_uncertainty(1, [det, cls], threshold=0.25, names=names)
    assert u == 0.5 and "disagree on the class" in why


def _exported(synth_category, tmp_path, **kw):
    from pipeline.data.convert import convert_category

    ann = tmp_path / "ann"
    if not ann.exists():
        convert_category(synth_category, ann)
    gt = json.loads((ann / "coco" / "test.json").read_text())
    preds = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
            "segmentation": a["segmentation"],
        }
        for a in gt["annotations"]
    ]
    good = next(i for i in gt["images"] if i["defect_type"] == "good")
    fp = np.zeros((good["height"], good["width"]), bool)
    fp[10:20, 30:50] = True
    preds.append(
        {
            "image_id": good["id"],
            "category_id": 1,
            "bbox": [30, 10, 20, 10],
            "score": 0.3,
            "segmentation": encode_rle(fp),
        }
    )
    (tmp_path / "sam.json").write_text(json.dumps(preds))
    files = [tmp_path / "sam.json"]
    if kw.pop("anomaly", False):
        recs = [
            {
                "image": i["file_name"],
                "image_id": i["id"],
                "score": 0.1 if i["defect_type"] == "good" else 0.9,
                "label": "good" if i["defect_type"] == "good" else "defect",
            }
            for i in gt["images"]
        ]
        (tmp_path / "ano.json").write_text(
            json.dumps({"kind": "anomaly", "model": "patchcore", "threshold": 0.5, "predictions": recs})
        )
        files.append(tmp_path / "ano.json")
    info = export_tasks(files, gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls", **kw)
    return gt, good, info, json.loads(info["tasks"].read_text())


def test_export_with_masks_order_and_reason(synth_category, tmp_path):
    from pipeline.review.brush import brush_decode

    gt, good, info, tasks = _exported(synth_category, tmp_path, polygons=True, order="uncertainty", anomaly=True)
    assert info["n_masks"] == info["n_results"] == len(gt["annotations"]) + 1
    ids = [r["id"] for t in tasks for p in t["predictions"] for r in p["result"]]
    assert len(ids) == len(set(ids))  # unique over the whole export
    for t in tasks:
        h, w = t["data"]["height"], t["data"]["width"]
        anns = [a for a in gt["annotations"] if a["image_id"] == t["data"]["image_id"]]
        brushes = [r for r in t["predictions"][0]["result"] if r["type"] == "brushlabels"]
        masks = [brush_decode(r["value"]["rle"], size_hw=(h, w)) == 255 for r in brushes]
        for a in anns:  # every true mask is one of the brush masks, pixel for pixel
            assert any(np.array_equal(decode_rle(a["segmentation"]), m) for m in masks)
    # queue: the good image with a detection the anomaly model rejects comes first, with its reason
    assert tasks[0]["data"]["image_id"] == good["id"] and tasks[0]["data"]["uncertainty"] == 1.0
    assert "sources disagree" in tasks[0]["data"]["review_reason"]
    us = [t["data"]["uncertainty"] for t in tasks]
    assert us == sorted(us, reverse=True) and [t["data"]["review_rank"] for t in tasks] == list(
        range(1, len(tasks) + 1)
    )
    validate_tasks(tasks, info["config"].read_text())


def _review(tasks, edit):
    """An LS export: every task gets an annotation copied from its prediction, then ``edit(task, result)``."""
    out = []
    for k, t in enumerate(tasks):
        result = json.loads(json.dumps(t["predictions"][0]["result"]))
        result = edit(t, result)
        out.append(
            dict(
                t,
                id=k + 1,
                annotations=[
                    {"id": k + 1, "result": result, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z"}
                ],
            )
        )
    return out


def test_import_round_trip_with_edits(synth_category, tmp_path):
    from pipeline.data.coco import load_coco_gt

    gt, good, info, tasks = _exported(synth_category, tmp_path, polygons=True)
    moved = {}

    def edit(task, result):
        if task["data"]["image_id"] == good["id"]:  # delete the false positive (all its results)
            return []
        if not moved and result:  # move one box: +2 px right, 3 px narrower
            r = result[0]
            w = r["original_width"]
            r["value"]["x"] += 200 / w
            r["value"]["width"] -= 300 / w
            moved[task["data"]["image_id"]] = r["id"]
        return result

    export = _review(tasks, edit)
    export.append(dict(tasks[0], id=999, annotations=[{"id": 999, "result": [], "was_cancelled": True}]))  # skipped
    (tmp_path / "export.json").write_text(json.dumps(export))
    info2 = import_export(tmp_path / "export.json", config_path=info["config"], out_path=tmp_path / "reviewed.json")
    assert info2["n_unreviewed"] == 1
    coco = json.loads((tmp_path / "reviewed.json").read_text())
    assert coco["info"]["image_root"] == gt["info"]["image_root"]
    assert [c["name"] for c in coco["categories"]] == [c["name"] for c in gt["categories"]]
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (i["id"], i["file_name"], i["width"], i["height"]) for i in sorted(gt["images"], key=lambda i: i["id"])
    ]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    assert len(coco["annotations"]) == len(gt["annotations"])
    (moved_img,) = moved
    gt_names = {c["id"]: c["name"] for c in gt["categories"]}
    for img in gt["images"]:
        want = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        got = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert len(got) == len(want)
        for k, (g, w) in enumerate(zip(got, want)):
            bbox = list(w["bbox"])
            if img["id"] == moved_img and k == 0:
                bbox = [bbox[0] + 2, bbox[1], bbox[2] - 3, bbox[3]]
            assert (g["category_id"], g["bbox"], g["area"], g["iscrowd"]) == (w["category_id"], bbox, w["area"], 0)
            assert np.array_equal(decode_rle(g["segmentation"]), decode_rle(w["segmentation"]))
        want_type = "good" if not want else gt_names[max(want, key=lambda a: a["area"])["category_id"]]
        assert next(i for i in coco["images"] if i["id"] == img["id"])["defect_type"] == want_type
    load_coco_gt(tmp_path / "reviewed.json")  # readable downstream
    with pytest.raises(PipelineError, match="--force"):
        import_export(tmp_path / "export.json", config_path=info["config"], out_path=tmp_path / "reviewed.json")


def test_import_reviewer_drawn_shapes():
    h, w = 30, 40
    m = np.zeros((h, w), bool)
    m[2:6, 3:9] = True
    m[20:25, 30:38] = True
    from pipeline.review.brush import brush_encode

    results = [
        # a brush painted by the reviewer (random id): one annotation per connected component
        {
            "id": "Xy_-k9LmQz",
            "type": "brushlabels",
            "from_name": "brush",
            "to_name": "image",
            "original_width": w,
            "original_height": h,
            "value": {"format": "rle", "rle": brush_encode(m), "brushlabels": ["spot"]},
        },
        # a box alone: filled rectangle as its mask
        {
            "id": "Ab3",
            "type": "rectanglelabels",
            "from_name": "label",
            "to_name": "image",
            "original_width": w,
            "original_height": h,
            "value": {"x": 25.0, "y": 50.0, "width": 10.0, "height": 10.0, "rotation": 0, "rectanglelabels": ["ring"]},
        },
        # a polygon alone (triangle)
        {
            "id": "P1",
            "type": "polygonlabels",
            "from_name": "polygon",
            "to_name": "image",
            "original_width": w,
            "original_height": h,
            "value": {"points": [[50.0, 10.0], [75.0, 10.0], [50.0, 40.0]], "polygonlabels": ["ring"]},
        },
    ]
    regs = task_regions(results, size_hw=(h, w), source="t")
    assert [(r["label"], r["bbox"], r["area"]) for r in regs[:3]] == [
        ("spot", [3, 2, 6, 4], 24),
        ("spot", [30, 20, 8, 5], 40),
        ("ring", [10, 15, 4, 3], 12),
    ]
    tri = decode_rle(regs[3]["segmentation"])
    assert regs[3]["bbox"] == [20, 3, 11, 10] and tri[3, 20] and tri[12, 20] and tri[3, 30] and not tri[12, 30]


def test_import_bad_inputs_write_nothing(tmp_path, synth_category):
    gt, good, info, tasks = _exported(synth_category, tmp_path)
    export = _review(tasks, lambda t, r: r)
    # an export from a project with another config
    other = labeling_config(["crack", "hole"], brush=True)
    (tmp_path / "other.xml").write_text(other)
    (tmp_path / "export.json").write_text(json.dumps(export))
    with pytest.raises(PipelineError, match="not in the config"):
        import_export(tmp_path / "export.json", config_path=tmp_path / "other.xml", out_path=tmp_path / "o.json")
    (tmp_path / "notes.json").write_text(json.dumps({"tasks": []}))
    with pytest.raises(PipelineError, match="not a Label Studio JSON export"):
        import_export(tmp_path / "notes.json", config_path=info["config"], out_path=tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()


def _cli(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)], env=e, capture_output=True, text=True, timeout=300
    )


def test_cli_push_failures_are_one_line_and_write_nothing(synth_category, tmp_path):
    import socket

    gt, good, info, tasks = _exported(synth_category, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    args = [
        "export",
        "labelstudio",
        tmp_path / "sam.json",
        "--gt",
        tmp_path / "ann/coco/test.json",
        "--out",
        tmp_path / "o",
        "--push",
        "--url",
        f"http://127.0.0.1:{port}",
    ]
    r = _cli(*args, env={"LABEL_STUDIO_API_KEY": "secret-token-123"})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "cannot reach Label Studio" in lines[0], r.stderr
    assert "secret-token-123" not in r.stdout + r.stderr and not (tmp_path / "o").exists()
    env = {k: v for k, v in os.environ.items() if k != "LABEL_STUDIO_API_KEY"}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1 and "LABEL_STUDIO_API_KEY" in r.stderr and not (tmp_path / "o").exists()
    # import: an export against another project's config, one line, no output
    (tmp_path / "export.json").write_text(json.dumps(_review(tasks, lambda t, res: res)))
    (tmp_path / "other.xml").write_text(labeling_config(["crack"], brush=True))
    r = _cli(
        "import",
        "labelstudio",
        tmp_path / "export.json",
        "--config",
        tmp_path / "other.xml",
        "--out",
        tmp_path / "c.json",
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert (
        r.returncode == 1 and len(lines) == 1 and "not in the config" in lines[0] and not (tmp_path / "c.json").exists()
    )


def test_prediction_segmentation_as_polygons_or_rle():
    from pipeline.review.export import _segmentation_mask

    m = np.zeros((20, 30), bool)
    m[4:10, 5:15] = True
    assert np.array_equal(_segmentation_mask(encode_rle(m), size_hw=(20, 30)), m)
    square = _segmentation_mask([[5, 4, 15, 4, 15, 10, 5, 10]], size_hw=(20, 30))  # COCO polygon (pixel edges)
    assert square.sum() == 60 and square[4:10, 5:15].all()
    with pytest.raises(PipelineError, match="not COCO RLE or polygons"):
        _segmentation_mask({"counts": "x"}, size_hw=(20, 30))


def test_review_reason_names_the_image_and_the_real_reason(tmp_path):
    from pipeline.review.client import local_files_start_command
    from pipeline.review.export import build_tasks

    names = {1: "ring"}
    # t = 0.6: 0.95 is far above it, 0.05 far below it (a low score), 0.55 near it
    det = Source(
        "det",
        "detections",
        {
            1: [{"category_id": 1, "score": 0.95, "bbox": [0, 0, 1, 1]}],
            2: [{"category_id": 1, "score": 0.05, "bbox": [0, 0, 1, 1]}],
            3: [{"category_id": 1, "score": 0.55, "bbox": [0, 0, 1, 1]}],
        },
    )
    assert image_uncertainty(1, [det], threshold=0.6, names=names)[1] == "det: ring score 0.95 above threshold 0.60"
    assert (
        image_uncertainty(2, [det], threshold=0.6, names=names)[1]
        == "det: ring score 0.05 below threshold 0.60 (low score)"
    )
    assert image_uncertainty(3, [det], threshold=0.6, names=names)[1] == "det: ring score 0.55 near threshold 0.60"
    ano = Source("patchcore", "anomaly", {1: [{"score": 0.9}]}, threshold=0.5, scale=0.1)
    assert (
        image_uncertainty(1, [ano], threshold=0.6, names=names)[1] == "patchcore: anomaly score 0.9 above threshold 0.5"
    )
    gt = {
        "info": {"image_root": str(tmp_path / "cat")},
        "categories": [{"id": 1, "name": "ring"}],
        "images": [{"id": 2, "file_name": "test/ring/002.png", "width": 8, "height": 8}],
    }
    (task,) = build_tasks(gt, [det], min_score=0.6)
    assert (
        task["data"]["review_reason"]
        == "test/ring/002.png: uncertainty 0.08: det: ring score 0.05 below threshold 0.60 (low score)"
    )
    cmd = local_files_start_command(tmp_path / "my data")
    assert cmd.endswith(" label-studio start") and f"DOCUMENT_ROOT='{tmp_path / 'my data'}' " in cmd


# ----------------------------------------------------------------------------- polygon fidelity, defect types


def test_polygon_iou_of_solid_and_holed_masks():
    from pipeline.review.results import polygon_iou, polygon_results, polygon_warning

    solid = np.zeros((40, 50), bool)
    solid[5:25, 10:30] = True  # 20 x 20, no hole: the polygon fills it back exactly
    ring = solid.copy()
    ring[8:22, 13:27] = False  # 14 x 14 hole, dropped by the polygon: IoU (400 - 196) / 400
    assert polygon_iou(solid, polygon_results(mask=solid, label="x", score=None, rid="0123456789")) == 1.0
    assert polygon_iou(ring, polygon_results(mask=ring, label="x", score=None, rid="0123456789")) == 204 / 400
    speck = np.zeros((40, 50), bool)
    speck[3, 3] = True  # too small for a polygon: nothing comes back
    assert polygon_iou(speck, polygon_results(mask=speck, label="x", score=None, rid="0123456789")) == 0.0
    assert polygon_warning([1.0, 0.85]) is None and polygon_warning([]) is None
    assert polygon_warning([1.0, 0.51, 0.79, 0.8]) == (
        "2 of 4 masks exported as polygons have IoU < 0.8 with their mask (worst 0.51): review them as brush "
        "masks (every mask is also exported as a brush region; leave out --polygons to export brush masks only)"
    )


def test_export_warns_once_about_polygons_far_from_their_masks(monkeypatch, capsys, synth_category, tmp_path):
    from pipeline.data.convert import convert_category

    convert_category(synth_category, tmp_path / "ann")
    gt_path = tmp_path / "ann" / "coco" / "test.json"
    gt = json.loads(gt_path.read_text())
    preds = []
    for k, img in enumerate(gt["images"][:3]):
        m = np.zeros((img["height"], img["width"]), bool)
        m[10:30, 10:30] = True
        if k < 2:  # two holed masks, one solid
            m[13:27, 13:27] = False
        preds.append(
            {
                "image_id": img["id"],
                "category_id": 1,
                "bbox": [10, 10, 20, 20],
                "score": 0.9,
                "segmentation": encode_rle(m),
            }
        )
    (tmp_path / "p.json").write_text(json.dumps(preds))
    info = export_tasks([tmp_path / "p.json"], gt_path=gt_path, out_dir=tmp_path / "ls", polygons=True)
    assert sorted(info["polygon_ious"]) == [204 / 400, 204 / 400, 1.0]
    line = (
        "2 of 3 masks exported as polygons have IoU < 0.8 with their mask (worst 0.51): review them as brush "
        "masks (every mask is also exported as a brush region; leave out --polygons to export brush masks only)"
    )
    assert info["warnings"] == [line]
    plain = export_tasks([tmp_path / "p.json"], gt_path=gt_path, out_dir=tmp_path / "ls2")
    assert plain["polygon_ious"] == [] and plain["warnings"] == []
    from pipeline.cli import app as cli

    args = ["pipeline", "export", "labelstudio", str(tmp_path / "p.json"), "--gt", str(gt_path), "--polygons"]
    monkeypatch.setattr(sys, "argv", [*args, "--out", str(tmp_path / "ls3")])
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    out = capsys.readouterr().out
    assert exc.value.code in (0, None) and out.count(f"warning: {line}") == 1


def _category_with_types(synth_category, tmp_path, names: dict[str, str]):
    """A copy of the synthetic category with its defect folders renamed (``ring`` -> ``big_ring``)."""
    import shutil

    cat = tmp_path / "cat"
    shutil.copytree(synth_category, cat)
    for old, new in names.items():
        (cat / "test" / old).rename(cat / "test" / new)
        (cat / "ground_truth" / old).rename(cat / "ground_truth" / new)
    return cat


def _reviewed_unchanged(cat, tmp_path, *, rename=None, drop_mapping=False, edit=lambda t, r: r):
    from pipeline.data.convert import convert_category

    ann = tmp_path / "ann"
    convert_category(cat, ann, rename=rename)
    gt = json.loads((ann / "coco" / "test.json").read_text())
    preds = [
        {k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")} | {"score": 0.9}
        for a in gt["annotations"]
    ]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    info = export_tasks([tmp_path / "p.json"], gt_path=ann / "coco" / "test.json", out_dir=tmp_path / "ls")
    tasks = json.loads(info["tasks"].read_text())
    if drop_mapping:  # tasks made before export wrote the mapping
        for t in tasks:
            del t["data"]["class_defect_types"]
    (tmp_path / "export.json").write_text(json.dumps(_review(tasks, edit)))
    import_export(tmp_path / "export.json", config_path=info["config"], out_path=tmp_path / "reviewed.json")
    return gt, json.loads((tmp_path / "reviewed.json").read_text())


@pytest.mark.parametrize(
    "rename, drop_mapping",
    [
        (None, False),  # class "big ring" <- folder big_ring: import writes big_ring, as convert-masks
        (None, True),  # no mapping in the tasks: convert's default naming, inverted
        ({"big_ring": "blob", "spot": "blob"}, False),  # two folders merged into one class: each image keeps its own
    ],
)
def test_import_spells_defect_type_as_convert_masks(synth_category, tmp_path, rename, drop_mapping):
    cat = _category_with_types(synth_category, tmp_path, {"ring": "big_ring"})
    gt, coco = _reviewed_unchanged(cat, tmp_path, rename=rename, drop_mapping=drop_mapping)
    want = {i["file_name"]: i["defect_type"] for i in gt["images"]}
    got = {i["file_name"]: i["defect_type"] for i in coco["images"]}
    assert got == want and "big_ring" in got.values() and "good" in got.values()
    if not drop_mapping:
        assert [(c["name"], c["defect_types"]) for c in coco["categories"]] == [
            (c["name"], c["defect_types"]) for c in gt["categories"]
        ]
    else:
        assert {c["name"]: c["defect_types"] for c in coco["categories"]}["big ring"] == ["big_ring"]


def test_relabelled_region_takes_the_new_class_defect_type(synth_category, tmp_path):
    cat = _category_with_types(synth_category, tmp_path, {"ring": "big_ring"})
    relabelled = set()

    def edit(task, result):
        if task["data"]["defect_type"] == "big_ring":
            for r in result:
                r["value"][r["type"]] = ["scratch"]
            relabelled.add(task["data"]["file_name"])
        return result

    gt, coco = _reviewed_unchanged(cat, tmp_path, edit=edit)
    assert relabelled
    for img in coco["images"]:
        if img["file_name"] in relabelled:
            assert img["defect_type"] == "scratch"
