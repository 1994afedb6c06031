"""Review of an inspection (no ground truth): export -> simulated review -> import -> add-reviewed.

The inspection folder is written here the way ``pipeline inspect`` writes it (``images.json``,
``verdicts.jsonl``, ``predictions.json``, ``config.yaml`` naming the bundle), so this runs in
seconds; ``test_labelstudio_server.py`` runs the real models and a real server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pytest
import yaml

from pipeline.data.instances import encode_rle
from pipeline.data.synth import generate_category


def _blob(size_hw, bbox_xywh):
    m = np.zeros(size_hw, bool)
    x, y, w, h = bbox_xywh
    m[y : y + h, x : x + w] = True
    return m


def fake_inspection(tmp_path: Path, parent_split: Path) -> dict:
    """An inspect run on five new images in two folders (one unreadable), PatchCore regions only."""
    new = generate_category(tmp_path / "new" / "synth", seed=7, n_train_good=1, n_test_good=2, n_per_defect=1)
    incoming = tmp_path / "incoming"
    picks = {
        "x/sure.png": new / "test" / "scratch" / "000.png",
        "x/near.png": new / "test" / "spot" / "000.png",
        "y/fp.png": new / "test" / "good" / "000.png",
        "y/quiet.png": new / "test" / "good" / "001.png",
    }
    for rel, src in picks.items():
        (incoming / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, incoming / rel)
    (incoming / "y" / "broken.png").write_bytes(b"")
    h, w = 96, 128
    files = sorted((incoming / rel).resolve() for rel in [*picks, "y/broken.png"])
    ids = {p.relative_to(incoming.resolve()).as_posix(): k + 1 for k, p in enumerate(files)}
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.yaml").write_text(
        yaml.safe_dump(
            {"split": {"source": str(parent_split)}, "decision": {"thresholds": {"anomaly": 2.0, "classifier": 0.5}}}
        )
    )
    run = tmp_path / "inspect"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"bundle": str(bundle)}))
    # (verdict, defect type, confidence, anomaly score, classifier score, region bbox)
    spec = {
        "x/sure.png": ("defect", "scratch", 0.95, 5.0, 0.9, [10, 20, 30, 12]),
        "x/near.png": ("defect", "spot", 0.55, 2.1, 0.7, [60, 40, 14, 14]),
        "y/fp.png": ("defect", None, 0.6, 2.5, 0.2, [90, 70, 10, 8]),
        "y/quiet.png": ("good", None, 0.95, 1.0, 0.6, None),
    }
    recs, results, images = [], [], []
    for rel, img_id in sorted(ids.items(), key=lambda kv: kv[1]):
        path = (incoming / rel).resolve().as_posix()
        if rel == "y/broken.png":
            recs.append({"id": img_id, "path": path, "verdict": "error", "reason": "empty file", "regions": []})
            continue
        verdict, dtype, conf, a, c, box = spec[rel]
        regions = []
        if box:
            rle = encode_rle(_blob((h, w), box))
            regions.append({"source": "anomaly", "bbox_xywh": box, "class": None, "score": 0.8, "mask": rle})
            results.append({"image_id": img_id, "category_id": 1, "bbox": box, "score": 0.8, "segmentation": rle})
        recs.append(
            {
                "id": img_id,
                "path": path,
                "size_hw": [h, w],
                "verdict": verdict,
                "defect_type": dtype,
                "confidence": conf,
                "scores": {"anomaly": a, "classifier": c},
                "regions": regions,
            }
        )
        images.append({"id": img_id, "file_name": path, "width": w, "height": h, "name": rel.replace("/", "__")})
    (run / "verdicts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (run / "images.json").write_text(
        json.dumps(
            {
                "images": images,
                "categories": [{"id": 1, "name": "defect"}],
                "errors": [{"id": ids["y/broken.png"], "file_name": "broken.png", "reason": "empty file"}],
            }
        )
    )
    (run / "predictions.json").write_text(json.dumps(results))
    return {"run": run, "incoming": incoming.resolve(), "ids": ids, "spec": spec}


@pytest.fixture()
def parent(synth_category, tmp_path):
    from pipeline.data.convert import convert_category

    ann = tmp_path / "ann" / "synth"
    convert_category(synth_category, ann)
    return ann


def _review(tasks, edit):
    """A Label Studio JSON export: each task's annotation is its first prediction, then ``edit(task, result)``."""
    out = []
    for k, t in enumerate(tasks):
        result = edit(t, json.loads(json.dumps(t["predictions"][0]["result"])) if t["predictions"] else [])
        for r in result:
            r.pop("score", None)
        ann = {"id": k + 1, "result": result, "was_cancelled": False, "updated_at": "2026-01-01T00:00:00Z"}
        out.append(dict(t, id=k + 1, annotations=[ann]))
    return out


def test_inspection_export_review_import_add_reviewed(parent, tmp_path):
    from pipeline.data.dataset import add_reviewed
    from pipeline.review.export import export_tasks
    from pipeline.review.reviewed import import_export

    fx = fake_inspection(tmp_path, parent / "split.json")
    info = export_tasks(fx["run"] / "predictions.json", gt_path=None, out_dir=tmp_path / "ls")
    tasks = json.loads(info["tasks"].read_text())
    # one task per readable image, the unreadable one left out and counted; the common folder as root
    assert info["n_tasks"] == 4 and info["n_errors"] == 1 and info["order"] == "uncertainty"
    assert info["image_root"] == fx["incoming"] and info["document_root"] == fx["incoming"].parent
    assert info["classes_from"] == str(parent / "coco" / "train.json")
    assert sorted(t["data"]["file_name"] for t in tasks) == sorted(fx["spec"])
    for t in tasks:  # local-files URLs resolve under the document root
        d = parse_qs(urlparse(t["data"]["image"]).query)["d"][0]
        assert (info["document_root"] / unquote(d)).resolve() == fx["incoming"] / t["data"]["file_name"]
    # queue: confidence near the threshold first (0.55, then 0.6), then disagreement (quiet and sure both 0.95)
    assert [t["data"]["file_name"] for t in tasks] == ["x/near.png", "y/fp.png", "y/quiet.png", "x/sure.png"]
    assert tasks[0]["data"]["uncertainty"] == 0.9 and "near the threshold" in tasks[0]["data"]["review_reason"]
    assert "models disagree: anomaly 2.5 >= 2, classifier 0.2 < 0.5" in tasks[1]["data"]["review_reason"]
    assert tasks[0]["data"]["review_reason"].startswith("x/near.png: uncertainty 0.90: defect (spot)")
    # class-less PatchCore regions take the class the verdict names; labels are the parent's classes
    labels = {
        t["data"]["file_name"]: [r["value"]["rectanglelabels"][0] for r in t["predictions"][0]["result"][::2]]
        for t in tasks
    }
    assert labels == {"x/sure.png": ["scratch"], "x/near.png": ["spot"], "y/fp.png": ["defect"], "y/quiet.png": []}
    config = info["config"].read_text()
    assert all(f'value="{n}"' in config for n in ("ring", "scratch", "spot", "defect"))

    corrected = [58, 41, 17, 12]

    def edit(task, result):
        name = task["data"]["file_name"]
        if name == "y/fp.png":  # a false alarm: reviewed as good
            return []
        if name == "x/near.png":  # the box corrected, its wrong mask deleted
            r = next(r for r in result if r["type"] == "rectanglelabels")
            h, w = r["original_height"], r["original_width"]
            x, y, bw, bh = corrected
            r["value"] = dict(r["value"], x=100 * x / w, y=100 * y / h, width=100 * bw / w, height=100 * bh / h)
            return [r]
        return result  # accepted as predicted

    (tmp_path / "export.json").write_text(json.dumps(_review(tasks, edit)))
    imp = import_export(tmp_path / "export.json", config_path=info["config"], out_path=tmp_path / "reviewed.json")
    coco = json.loads((tmp_path / "reviewed.json").read_text())
    assert imp["n_images"] == 4 and coco["info"]["image_root"] == str(fx["incoming"])
    by_name = {i["file_name"]: i for i in coco["images"]}
    assert by_name["y/fp.png"]["defect_type"] == "good" and by_name["y/quiet.png"]["defect_type"] == "good"
    assert not [a for a in coco["annotations"] if a["image_id"] == by_name["y/fp.png"]["id"]]

    parent_bytes = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()}
    s = add_reviewed(parent, tmp_path / "reviewed.json", tmp_path / "v2")
    assert s.added["images"] == 4 and s.added["negatives"] == 2
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file()} == parent_bytes
    check_new_version(tmp_path / "v2", near="x/near.png", good="y/fp.png", corrected=corrected, cls="spot")


def check_new_version(v2: Path, *, near: str, good: str, corrected: list[int], cls: str) -> None:
    """The corrected box is in the version's COCO and YOLO labels exactly; the good-reviewed image is a negative."""
    train = json.loads((v2 / "coco" / "train.json").read_text())
    cat = {c["name"]: c["id"] for c in train["categories"]}
    img = next(i for i in train["images"] if i["file_name"].endswith("images/reviewed/" + near))
    (ann,) = [a for a in train["annotations"] if a["image_id"] == img["id"]]
    assert ann["bbox"] == corrected and ann["category_id"] == cat[cls] and ann["area"] == corrected[2] * corrected[3]
    neg = next(i for i in train["images"] if i["file_name"].endswith("images/reviewed/" + good))
    assert neg["defect_type"] == "good" and not [a for a in train["annotations"] if a["image_id"] == neg["id"]]
    stem = "reviewed_" + "_".join(Path(near).with_suffix("").parts)
    (line,) = (v2 / "yolo" / "labels" / "train" / f"{stem}.txt").read_text().splitlines()
    x, y, bw, bh = corrected
    h, w = img["height"], img["width"]
    want = f"{cat[cls] - 1} " + " ".join(f"{v:.6f}" for v in ((x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h))
    assert line == want
    neg_stem = "reviewed_" + "_".join(Path(good).with_suffix("").parts)
    assert (v2 / "yolo" / "labels" / "train" / f"{neg_stem}.txt").read_text() == ""
    assert (v2 / "images" / "reviewed" / good).is_file()


def test_inspection_export_without_images_json_says_what_to_pass(tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.review.export import export_tasks

    (tmp_path / "predictions.json").write_text("[]")
    with pytest.raises(PipelineError, match="no --gt and no images.json beside it"):
        export_tasks(tmp_path / "predictions.json", gt_path=None, out_dir=tmp_path / "ls")
    assert not (tmp_path / "ls").exists()
