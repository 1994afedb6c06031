"""HTML report: built from a fused evaluate run on the synthetic category, every image it references
exists, the JSON carries the same numbers, and headless Chromium renders it (when installed)."""

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src"))


def _img_srcs(html_path: Path) -> list[str]:
    p = _Imgs()
    p.feed(html_path.read_text(encoding="utf-8"))
    return p.srcs


def _check_images_exist(html_path: Path, srcs: list[str]) -> None:
    import base64

    for src in srcs:
        assert src, "an <img> without src"
        if src.startswith("data:"):
            assert ";base64," in src and len(base64.b64decode(src.split(",", 1)[1])) > 0
        else:
            assert "://" not in src and not src.startswith("/"), f"{src}: not a relative path"
            assert (html_path.parent / src).is_file(), f"{src} referenced by the report does not exist"


def _predictions(ann: Path, split: str, out: Path, rng) -> list[Path]:
    """A detector (boxes + RLE masks copied from the truth on most defect images, with a few noisy
    misses), and an anomaly file with .npy maps (24x32), for one split of a converted category."""
    import cv2

    from pipeline.data.instances import decode_rle

    gt = json.loads((ann / "coco" / f"{split}.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    det, preds = [], []
    (out / f"maps_{split}").mkdir()
    for k, im in enumerate(gt["images"]):
        defect = im["defect_type"] != "good"
        anns = [a for a in gt["annotations"] if a["image_id"] == im["id"]]
        if defect and k % 3:  # detector misses every third image
            for a in anns:
                det.append(
                    {
                        "image_id": im["id"],
                        "category_id": a["category_id"],
                        "bbox": a["bbox"],
                        "score": 0.6 + 0.3 * rng.random(),
                        "segmentation": a["segmentation"],
                    }
                )
        elif not defect and k % 2:  # weak false alarm on some good images
            det.append({"image_id": im["id"], "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.2 * rng.random()})
        amap = rng.random((24, 32)).astype(np.float32) * 0.3
        for a in anns:
            amap += cv2.resize(decode_rle(a["segmentation"]).astype(np.float32), (32, 24), interpolation=cv2.INTER_AREA)
        np.save(out / f"maps_{split}" / f"{im['id']}.npy", amap)
        preds.append(
            {
                "image": im["file_name"],
                "image_id": im["id"],
                "score": float(amap.max() + 0.1 * rng.random()),
                "label": "defect" if defect else "good",
                "map": f"maps_{split}/{im['id']}.npy",
            }
        )
    d = out / f"det_{split}.json"
    d.write_text(json.dumps(det))
    a = out / f"anomaly_{split}.json"
    a.write_text(
        json.dumps(
            {
                "kind": "anomaly",
                "model": "fake",
                "threshold": 0.8,
                "root": gt["info"]["image_root"],
                "predictions": preds,
            }
        )
    )
    return [d, a]


@pytest.fixture(scope="module")
def fused_run(synth_category, tmp_path_factory):
    from pipeline.core.io import atomic_write_json
    from pipeline.data.convert import convert_category
    from pipeline.evaluation.fusion import fuse_files

    tmp = tmp_path_factory.mktemp("report")
    ann = convert_category(synth_category, tmp / "ann").out
    rng = np.random.default_rng(0)
    val = _predictions(ann, "val", tmp / "preds", rng)
    test = _predictions(ann, "test", tmp / "preds", rng)
    run = tmp / "eval"
    run.mkdir()
    result = fuse_files(val, test, val_gt=ann / "coco" / "val.json", test_gt=ann / "coco" / "test.json")
    atomic_write_json(run / "fusion.json", result)
    atomic_write_json(run / "metrics_det_test.json", {"bbox": {"AP": 0.5, "AP50": 0.75}, "n": 3})
    return run, ann, result


def test_report_html_json_and_images(fused_run, tmp_path):
    from pipeline.evaluation.report import build_report

    run, ann, result = fused_run
    doc = build_report([run], tmp_path / "rep", gallery=3)
    html_path = tmp_path / "rep" / "report.html"
    srcs = _img_srcs(html_path)
    # 2 curves + gallery tiles (at most 3 errors + 3 uncertain correct)
    assert 3 <= len(srcs) <= 8 and set(srcs) == set(doc["images"])
    _check_images_exist(html_path, srcs)
    saved = json.loads((tmp_path / "rep" / "report.json").read_text())
    r0 = saved["runs"][0]
    # the same numbers as fusion.json
    assert [row["name"] for row in r0["image_level"]] == [s["name"] for s in result["sources"]] + [
        "fusion:or",
        "fusion:logistic",
    ]
    assert r0["image_level"][0]["test"] == result["sources"][0]["test"]
    assert r0["best"] == result["best"]
    # dataset counts per split and class, from the COCO files
    for split in ("train", "val", "test"):
        gt = json.loads((ann / "coco" / f"{split}.json").read_text())
        assert r0["counts"][split]["n_images"] == len(gt["images"])
        assert r0["counts"][split]["n_instances"] == len(gt["annotations"])
    assert r0["per_file"]["det_test"] == {"bbox.AP": 0.5, "bbox.AP50": 0.75, "n": 3.0}
    text = html_path.read_text()
    for needle in ("Dataset", "Confusion matrices", "ROC and PR curves", "Gallery", "fusion:logistic", "bbox.AP"):
        assert needle in text
    # gallery groups: errors sorted by decreasing confidence, correct by increasing
    # the gallery shows the fused decision chosen on val (the better fusion rule), not the best on test
    chosen = result["choices"]["gallery"]
    assert chosen == f"fusion:{result['better_fusion']}" and list(r0["gallery"]) == [chosen]
    g = r0["gallery"][chosen]
    conf = [x["confidence"] for x in g["errors"]]
    assert conf == sorted(conf, reverse=True)
    conf = [x["confidence"] for x in g["uncertain_correct"]]
    assert conf == sorted(conf)
    assert all(x["decision"] == (x["score"] >= x["threshold"]) for x in g["errors"] + g["uncertain_correct"])
    # overwrite needs force
    with pytest.raises(PipelineError, match="--force"):
        build_report([run], tmp_path / "rep")
    build_report(
        [run, run / "fusion.json"],
        tmp_path / "rep",
        force=True,
        gallery=1,  # a set of runs
        gallery_methods=["fusion:or", "fusion:logistic"],
    )
    runs = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    assert len(runs) == 2 and list(runs[1]["gallery"]) == ["fusion:or", "fusion:logistic"]
    with pytest.raises(PipelineError, match="no method 'nope'"):
        build_report([run], tmp_path / "rep2", gallery_methods=["nope"])


def test_overlay_draws_boxes_masks_and_heatmap(tmp_path):
    from pipeline.data.instances import encode_rle
    from pipeline.evaluation.report import draw_overlay

    img = np.full((40, 60, 3), 128, np.uint8)
    m = np.zeros((40, 60), np.uint8)
    m[10:20, 30:50] = 1
    np.save(tmp_path / "map.npy", np.pad(np.ones((5, 5), np.float32), ((0, 5), (0, 10))))
    sources = [
        {
            "threshold": 0.5,
            "color": (0, 0, 255),
            "results": {7: [{"bbox": [30, 10, 20, 10], "score": 0.9, "segmentation": encode_rle(m)}]},
        },
        {"threshold": 0.5, "color": (255, 0, 0), "maps": {7: tmp_path / "map.npy"}},
    ]
    out = draw_overlay(img, image_id=7, gt_anns=[{"bbox": [0, 0, 10, 10]}], sources=sources, max_side=60)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert (out[15, 40] != img[15, 40]).any()  # mask filled
    assert tuple(out[0, 5]) == (0, 200, 0)  # ground-truth box edge, green
    assert (out[35, 55] != out[5, 5]).any()  # heat-map: hot top-left vs cold bottom-right
    untouched = draw_overlay(img, image_id=8, gt_anns=[], sources=sources, max_side=30)
    assert untouched.shape == (20, 30, 3) and (untouched == 128).all()


def test_single_source_and_metrics_only_runs(fused_run, tmp_path):
    """One source: no fusion rows; a folder with only per-file metrics: just their table."""
    from pipeline.core.io import atomic_write_json
    from pipeline.evaluation.fusion import fuse_files
    from pipeline.evaluation.report import build_report

    _, ann, _ = fused_run
    preds = ann.parent / "preds"
    one = tmp_path / "one"
    r = fuse_files(
        [preds / "anomaly_val.json"],
        [preds / "anomaly_test.json"],
        val_gt=ann / "coco" / "val.json",
        test_gt=ann / "coco" / "test.json",
    )
    assert r["fusion"] == {} and r["better_fusion"] is None and r["best"] == "anomaly:anomaly_test"
    atomic_write_json(one / "fusion.json", r)
    only = tmp_path / "only"
    atomic_write_json(only / "metrics_x.json", {"bbox": {"AP": 0.25, "AP_small": 0.1}})
    doc = build_report([one, only], tmp_path / "rep", gallery=1)
    runs = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    assert [x["name"] for x in runs[0]["image_level"]] == ["anomaly:anomaly_test"]
    assert runs[1]["per_file"] == {"x": {"bbox.AP": 0.25}} and "image_level" not in runs[1]
    _check_images_exist(Path(doc["html"]), _img_srcs(Path(doc["html"])))


def test_run_without_results_is_an_error(tmp_path):
    from pipeline.evaluation.report import build_report

    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no fusion.json or metrics files"):
        build_report([tmp_path / "empty"], tmp_path / "rep")


def test_report_renders_in_headless_chromium(fused_run, tmp_path):
    from pipeline.evaluation.report import build_report

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium)")
    run, _, _ = fused_run
    build_report([run], tmp_path / "rep", gallery=2)
    html_path = (tmp_path / "rep" / "report.html").resolve()
    _check_images_exist(html_path, _img_srcs(html_path))
    png = tmp_path / "shot.png"
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}",
        "--window-size=1280,2000",
        html_path.as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.is_file(), r.stderr[-2000:]
    import cv2

    shot = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert shot is not None and shot.shape[:2] == (2000, 1280)
    # non-trivial: not a blank page; the dark text and coloured plots/gallery images show up
    assert shot.std() > 20 and (shot < 60).mean() > 0.002 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200


def test_cli_evaluate_fused_then_report(fused_run, tmp_path):
    """`pipeline evaluate --val-predictions ... --val-gt` writes fusion.json and prints the table;
    `pipeline report` turns the folder into report.html / report.json."""
    import sys

    _, ann, result = fused_run
    preds = ann.parent / "preds"
    ev, rep = tmp_path / "ev", tmp_path / "rep"

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True, timeout=300
        )

    r = run(
        "evaluate",
        preds / "det_test.json",
        preds / "anomaly_test.json",
        "--gt",
        ann / "coco" / "test.json",
        "--val-predictions",
        preds / "det_val.json",
        "--val-predictions",
        preds / "anomaly_val.json",
        "--val-gt",
        ann / "coco" / "val.json",
        "--out",
        ev,
    )
    assert r.returncode == 0, r.stderr
    assert "fusion:logistic" in r.stdout and "better fusion" in r.stdout
    fused = json.loads((ev / "fusion.json").read_text())
    assert fused["fusion"]["or"]["test"] == result["fusion"]["or"]["test"]
    r = run("report", ev, "--out", rep, "--gallery", "2")
    assert r.returncode == 0, r.stderr
    saved = json.loads((rep / "report.json").read_text())
    assert {"det_test", "preds-det_test"} & set(saved["runs"][0]["per_file"])  # COCO metrics of evaluate
    assert (
        saved["runs"][0]["per_file"]["preds-anomaly_test"]["overall.image_auroc"] == 1.0
    )  # anomaly metrics of evaluate, named per file
    _check_images_exist(rep / "report.html", _img_srcs(rep / "report.html"))
    # user errors are one line
    r = run(
        "evaluate",
        preds / "det_test.json",
        "--gt",
        ann / "coco" / "test.json",
        "--val-predictions",
        preds / "det_val.json",
        "--out",
        tmp_path / "ev2",
    )
    assert r.returncode == 1 and "--val-gt" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_report_on_real_bottle(mvtec_root, tmp_path):
    """Real 900x900 bottle images through convert -> fusion -> report: tiles are downscaled, every
    referenced image exists, counts match the split (predictions are made from the truth, with noise)."""
    from pipeline.core.io import atomic_write_json
    from pipeline.data.convert import convert_category
    from pipeline.evaluation.fusion import fuse_files
    from pipeline.evaluation.report import build_report

    ann = convert_category(mvtec_root / "bottle", tmp_path / "ann").out
    rng = np.random.default_rng(0)
    val = _predictions(ann, "val", tmp_path / "preds", rng)
    test = _predictions(ann, "test", tmp_path / "preds", rng)
    run = tmp_path / "eval"
    atomic_write_json(
        run / "fusion.json", fuse_files(val, test, val_gt=ann / "coco" / "val.json", test_gt=ann / "coco" / "test.json")
    )
    doc = build_report(
        [run], tmp_path / "rep", gallery=3, max_side=256, gallery_methods=["fusion:or", "fusion:logistic"]
    )
    html_path = Path(doc["html"])
    _check_images_exist(html_path, _img_srcs(html_path))
    import cv2

    tiles = [p for p in doc["images"] if p.endswith(".jpg")]
    assert tiles and all(max(cv2.imread(str(html_path.parent / p)).shape[:2]) == 256 for p in tiles)
    counts = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]["counts"]
    assert (
        sum(c["n_images"] for c in counts.values()) == 83
        and sum(c["images"].get("good", 0) for c in counts.values()) == 20
    )


def _small_fusion(tmp_path):
    """Source a is perfect on val and wrong on every test image, b the reverse (4 test images, no image
    files on disk: the gallery draws grey tiles)."""
    from pipeline.evaluation.fusion import fuse_files

    def gt(path, ids_types):
        images = [
            {"id": i, "file_name": f"test/{t}/{i:03d}.png", "width": 20, "height": 10, "defect_type": t}
            for i, t in ids_types
        ]
        anns = [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0}
            for i, t in ids_types
            if t != "good"
        ]
        doc = {"info": {"image_root": str(tmp_path)}, "images": images, "annotations": anns}
        path.write_text(json.dumps(doc | {"categories": [{"id": 1, "name": "ring"}]}))
        return path

    def det(name, scores):
        path = tmp_path / f"{name}.json"
        path.write_text(
            json.dumps([{"image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2], "score": s} for i, s in scores.items()])
        )
        return path

    val_gt = gt(tmp_path / "val.json", [(1, "good"), (2, "good"), (3, "ring"), (4, "ring"), (5, "ring"), (6, "good")])
    test_gt = gt(tmp_path / "test.json", [(11, "good"), (12, "ring"), (13, "ring"), (14, "good")])
    val = [
        det("a_val", {1: 0.1, 2: 0.1, 3: 0.9, 4: 0.9, 5: 0.9, 6: 0.1}),
        det("b_val", {1: 0.9, 2: 0.1, 3: 0.9, 4: 0.1, 5: 0.9, 6: 0.1}),
    ]
    test = [det("a_test", {11: 0.9, 12: 0.1, 13: 0.1, 14: 0.9}), det("b_test", {11: 0.1, 12: 0.9, 13: 0.9, 14: 0.1})]
    return fuse_files(val, test, val_gt=val_gt, test_gt=test_gt)


def test_gallery_shows_the_val_chosen_decision_and_its_errors(tmp_path):
    from pipeline.core.io import atomic_write_json
    from pipeline.evaluation.report import build_report

    result = _small_fusion(tmp_path)
    run = tmp_path / "eval"
    atomic_write_json(run / "fusion.json", result)
    errors_on_test = {
        m: sum(r["decisions"][m] != r["defect"] for r in result["images"]["test"]) for m in result["thresholds"]
    }
    assert errors_on_test["boxes:b_test"] == 0  # perfect on test: the old default, "none" errors
    chosen = result["choices"]["gallery"]
    assert chosen == "fusion:logistic" and errors_on_test[chosen] > 0
    doc = build_report([run], tmp_path / "rep", gallery=6)
    g = doc["runs"][0]["gallery"]
    assert list(g) == [chosen] and g[chosen]["chosen_on"] == "val"
    assert g[chosen]["n_errors"] == errors_on_test[chosen] == len(g[chosen]["errors"])
    assert {x["image_id"] for x in g[chosen]["errors"]} == {
        r["image_id"] for r in result["images"]["test"] if r["decisions"][chosen] != r["defect"]
    }
    text = (tmp_path / "rep" / "report.html").read_text()
    assert "no errors" not in text and f"Gallery: {chosen} on test (chosen on val)" in text
    assert f"{errors_on_test[chosen]} shown of {errors_on_test[chosen]} errors on 4 test images" in text
    # "no errors" only for a method that makes none on the split shown
    doc = build_report([run], tmp_path / "rep2", gallery=2, gallery_methods=["boxes:b_test"])
    g = doc["runs"][0]["gallery"]["boxes:b_test"]
    assert g["n_errors"] == 0 and g["errors"] == [] and g["chosen_on"] == "option"
    assert "no errors: all 4 test images decided correctly" in (tmp_path / "rep2" / "report.html").read_text()


def test_report_integers_plots_once_with_titles_and_train_good(fused_run, tmp_path):
    import shutil as sh

    from pipeline.evaluation.report import build_report

    run, ann, _ = fused_run
    folder = tmp_path / "eval"
    sh.copytree(run, folder)
    import cv2

    a = np.zeros((20, 30, 3), np.uint8)
    b = np.full((20, 30, 3), 255, np.uint8)
    cv2.imwrite(str(folder / "pr_bbox_det-x.png"), a)
    cv2.imwrite(str(folder / "pr_bbox_det-y.png"), a)  # the same bytes: shown once
    cv2.imwrite(str(folder / "pr_segm_det-x.png"), b)
    doc = build_report([folder], tmp_path / "rep", gallery=1)
    r0 = doc["runs"][0]
    assert r0["plots"] == [
        {"title": "bbox precision-recall at IoU 0.5: det-x", "image": "images/run0_pr_bbox_det-x.png"},
        {"title": "mask precision-recall at IoU 0.5: det-x", "image": "images/run0_pr_segm_det-x.png"},
    ]
    text = (tmp_path / "rep" / "report.html").read_text()
    assert (
        text.count("<figcaption>") == 2 and "<figcaption>bbox precision-recall at IoU 0.5: det-x</figcaption>" in text
    )
    # counts stay integers: "n" 3 prints as 3, not 3.0000
    assert r0["per_file"]["det_test"]["n"] == 3 and isinstance(r0["per_file"]["det_test"]["n"], int)
    assert "<td>3</td>" in text and "3.0000" not in text
    # train/good of the split manifest beside train/val/test
    n_good = len(json.loads((ann / "split.json").read_text())["train_good"])
    assert n_good > 0 and r0["train_good"]["n_images"] == n_good
    assert f"<tr><td class=l>train/good</td><td>{n_good}</td>" in text
