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
