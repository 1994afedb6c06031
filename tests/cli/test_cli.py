"""The CLI: instant help, one-line errors with non-zero exit, no partial output."""

import os
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest


def run(*args, cwd=None, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=300
    )


def test_help_is_instant_and_imports_nothing_heavy():
    t = time.perf_counter()
    r = run("--help")
    assert r.returncode == 0 and "convert-masks" in r.stdout and "finetune" in r.stdout
    heavy = "('torch','cv2','ultralytics','segment_anything','pycocotools','matplotlib')"
    code = f"import sys, pipeline.cli.app; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert out == "[]"
    assert time.perf_counter() - t < 30  # generous; the real number is well under a second


@pytest.fixture()
def cat(synth_category, tmp_path):
    return shutil.copytree(synth_category, tmp_path / "synth")


def _one_line_error(r, *needles):
    assert r.returncode == 1, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "breakage, needles",
    [
        # missing category folder
        (lambda c: shutil.rmtree(c), ["category folder not found"]),
        # a defect image without its mask
        (lambda c: (c / "ground_truth/spot/004_mask.png").unlink(), ["spot/004.png: no mask"]),
        # an orphan mask
        (
            lambda c: shutil.copy(c / "ground_truth/spot/000_mask.png", c / "ground_truth/spot/050_mask.png"),
            ["orphan mask"],
        ),
        # a mask of another size than its image
        (
            lambda c: cv2.imwrite(str(c / "ground_truth/ring/000_mask.png"), np.zeros((10, 10), np.uint8)),
            ["ring/000_mask.png", "differs"],
        ),
        # a mask with values other than {0, 255} or {0, 1}
        (
            lambda c: cv2.imwrite(
                str(c / "ground_truth/ring/000_mask.png"), np.arange(96 * 128).reshape(96, 128).astype(np.uint8)
            ),
            ["expected only 0/255 or 0/1"],
        ),
        # a truncated PNG
        (
            lambda c: (c / "test/ring/001.png").write_bytes((c / "test/ring/001.png").read_bytes()[:300]),
            ["ring/001.png", "truncated"],
        ),
    ],
)
def test_convert_bad_input(cat, tmp_path, breakage, needles):
    breakage(cat)
    r = run("convert-masks", cat, "--out", tmp_path / "out")
    _one_line_error(r, *needles)
    assert not (tmp_path / "out").exists()


def test_convert_existing_output_needs_force(cat, tmp_path):
    assert run("convert-masks", cat, "--out", tmp_path / "out").returncode == 0
    _one_line_error(run("convert-masks", cat, "--out", tmp_path / "out"), "--force")
    assert run("convert-masks", cat, "--out", tmp_path / "out", "--force").returncode == 0


def test_empty_split(tmp_path):
    assert run("synth-mvtec", tmp_path / "small", "--n-per-defect", "2", "--n-test-good", "2").returncode == 0
    _one_line_error(run("convert-masks", tmp_path / "small", "--out", tmp_path / "out"), "is empty")


def test_missing_weights_without_allow_download(cat, tmp_path):
    assert run("convert-masks", cat, "--out", tmp_path / "ann").returncode == 0
    r = run(
        "finetune",
        "yolo",
        "--data",
        tmp_path / "ann/yolo/data.yaml",
        "--model",
        "yolov8s-worldv2.pt",
        "--out",
        tmp_path / "run",
        env={"PIPELINE_WEIGHTS": str(tmp_path / "w"), "TORCH_HOME": str(tmp_path / "t")},
    )
    _one_line_error(r, "yolov8s-worldv2.pt", "--allow-download")
    assert not (tmp_path / "run").exists()


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "convert-masks", tmp_path / "nope")
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["convert-masks"], "Missing argument 'category'"),  # a missing argument
        (["evaluate", "x.json", "--nope"], "No such option: --nope"),  # an unknown option
        (["finetune", "yolo", "--data", "d.yaml", "--epochs", "abc"], "Invalid value for '--epochs'"),  # a wrong type
        (["nosuch"], "No such command 'nosuch'"),  # an unknown command
    ],
)
def test_usage_errors_are_one_line(args, needle):
    r = run(*args)
    assert r.returncode == 2
    _one_line_error_text(r.stderr, needle)


def _one_line_error_text(stderr, needle):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], stderr


def test_no_help_shows_a_value_for_a_flag():
    """Flags read as flags: ``--force``, never ``--force <bool>``, in every command's --help."""
    import typer
    from typer.testing import CliRunner

    from pipeline.cli.app import app

    def paths(cmd, prefix):
        yield prefix
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from paths(sub, [*prefix, name])

    runner = CliRunner()
    seen = 0
    for args in paths(typer.main.get_command(app), []):
        r = runner.invoke(app, [*args, "--help"], terminal_width=200)
        assert r.exit_code == 0, (args, r.output)
        assert "<bool>" not in r.output, (args, r.output)
        seen += 1
    assert seen >= 15


def test_evaluate_per_file_matching_and_mask_threshold_options(synth_category, tmp_path):
    """`--class-agnostic FILE` / `--class-aware FILE` name files; `--mask-score-threshold` reaches the metrics."""
    import json

    from pipeline.data.convert import convert_category

    ann = convert_category(synth_category, tmp_path / "ann").out
    gt = json.loads((ann / "coco" / "test.json").read_text())
    res = [
        {
            "image_id": a["image_id"],
            "category_id": 1,
            "bbox": a["bbox"],
            "score": 0.9,
            "segmentation": a["segmentation"],
        }
        for a in gt["annotations"]
    ]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(res))
    b.write_text(json.dumps(res))
    out = tmp_path / "ev"
    r = run(
        "evaluate",
        a,
        b,
        "--gt",
        ann / "coco/test.json",
        "--class-agnostic",
        a,
        "--mask-score-threshold",
        0.95,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    ma = json.loads((out / f"metrics_{tmp_path.name}-a.json").read_text())
    mb = json.loads((out / f"metrics_{tmp_path.name}-b.json").read_text())
    assert (ma["class_agnostic"], ma["class_agnostic_reason"]) == (True, "option")
    assert (mb["class_agnostic"], mb["class_agnostic_reason"]) == (False, "auto: class-aware source")
    assert ma["mask_score_threshold"] == 0.95 and ma["masks"]["mIoU"] == 0.0
    r = run("evaluate", a, "--gt", ann / "coco/test.json", "--class-aware", b, "--out", tmp_path / "ev2")
    _one_line_error(r, "--class-aware", "not one of the prediction files")
    assert not (tmp_path / "ev2").exists()


def _yolo_run(tmp_path, gt_path, scores):
    """A ``predict yolo``-like run folder: COCO results with ``scores`` on the first annotated image, and
    its provenance (no score threshold recorded)."""
    import json

    from pipeline.data.predictions import write_provenance

    a0 = json.loads(gt_path.read_text())["annotations"][0]
    run = tmp_path / "yolo_test"
    run.mkdir()
    res = [{"image_id": a0["image_id"], "category_id": 1, "bbox": a0["bbox"], "score": s} for s in scores]
    (run / "predictions.json").write_text(json.dumps(res))
    write_provenance(run, family="yolo", model=None, split=gt_path)
    return run / "predictions.json"


def test_export_prints_kept_regions_and_warns_when_it_drops_them_all(cat, tmp_path):
    assert run("convert-masks", cat, "--out", tmp_path / "ann").returncode == 0
    gt = tmp_path / "ann/coco/test.json"
    pred = _yolo_run(tmp_path, gt, [0.205, 0.1, 0.02])  # the CPU recipe's best score is 0.205
    r = run("export", "labelstudio", pred, "--gt", gt, "--out", tmp_path / "ls")
    assert r.returncode == 0, r.stderr
    assert "yolo_test: kept 3 of 3 regions (score >= 0, none recorded: every region kept)" in r.stdout
    assert "WARNING" not in r.stdout
    r = run("export", "labelstudio", pred, "--gt", gt, "--out", tmp_path / "ls2", "--min-score", "0.25")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # rich wraps long lines
    assert "yolo_test: kept 0 of 3 regions (score >= 0.25, --min-score)" in out
    assert "WARNING: yolo_test: all 3 regions score below 0.25 (best 0.205)" in out and "--min-score auto" in out
    r = run("export", "labelstudio", pred, "--gt", gt, "--out", tmp_path / "ls3", "--min-score", "abc")
    _one_line_error(r, "--min-score 'abc': expected 'auto' or a number")
    assert not (tmp_path / "ls3").exists()


def test_evaluate_prints_the_upper_bound_label(cat, tmp_path):
    import json

    from pipeline.data.predictions import write_provenance

    assert run("convert-masks", cat, "--out", tmp_path / "ann").returncode == 0
    gt = tmp_path / "ann/coco/test.json"
    res = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")}, "score": 0.9}
        for a in json.loads(gt.read_text())["annotations"]
    ]
    (tmp_path / "sam_gt").mkdir()
    (tmp_path / "sam_gt/predictions.json").write_text(json.dumps(res))
    write_provenance(tmp_path / "sam_gt", family="sam", model=None, split=gt, prompt="gt")
    r = run("evaluate", tmp_path / "sam_gt/predictions.json", "--gt", gt, "--out", tmp_path / "ev")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0].startswith("[upper bound: ground-truth prompts] sam_gt-predictions: bbox AP 1.0000")
    r = run("export", "labelstudio", tmp_path / "sam_gt/predictions.json", "--gt", gt, "--out", tmp_path / "ls")
    _one_line_error(r, "SAM masks prompted with ground-truth boxes", "pipeline predict sam --boxes")
    assert not (tmp_path / "ls").exists()
