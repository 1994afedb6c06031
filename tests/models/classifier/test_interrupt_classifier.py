"""Ctrl-C during ``finetune classifier``: exit 130, one line with the resume command, and a resumed
run whose weights equal an uninterrupted run's bit for bit (CPU)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from pipeline.data.mvtec import scan_category  # noqa: E402
from pipeline.data.split import make_split, write_split  # noqa: E402

EPOCHS = 4
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _args(split, out):
    return [
        "finetune",
        "classifier",
        "-c",
        "attempt1_resnet18",
        "--split",
        str(split),
        "--out",
        str(out),
        "--epochs",
        str(EPOCHS),
        "--imgsz",
        "32",
        "--batch",
        "4",
        "--device",
        "cpu",
        "--weights",
        "none",
        "--set",
        "data.max_train_good=4",
        "--set",
        "model.dropout=0.5",
    ]


def _pipeline(args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=ENV, timeout=600
    )


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(synth_category, tmp_path):
    split = tmp_path / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), split)
    full = _pipeline(_args(split, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *_args(split, tmp_path / "cut")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith("epoch 1/"):
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "no epoch line"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0] == "stopping after this epoch (Ctrl-C again to abort at once)"
    assert len(lines) == 2 and lines[1].startswith("interrupted: kept ")
    kept, resume = lines[1].split("; resume with: ")
    assert f"of {EPOCHS})" in kept and "weights/last.pt (epoch " in kept
    stopped_at = int(kept.split("(epoch ")[1].split()[0])
    assert 1 <= stopped_at < EPOCHS
    argv = shlex.split(resume)
    assert argv[0] == "pipeline" and argv[-1] == "--resume" and "--out" in argv

    resumed = _pipeline(argv[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "weights" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "cut" / "weights" / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for key in ("optimizer", "scheduler"):
        assert str(a[key]["state"] if key == "optimizer" else a[key]) == str(
            b[key]["state"] if key == "optimizer" else b[key]
        )


def test_ctrl_c_before_the_first_epoch_leaves_no_folder(synth_category, tmp_path):
    split = tmp_path / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), split)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *_args(split, tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    for line in proc.stdout:
        if "task=" in line:  # the run folder exists, no epoch has finished
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(("aborted", "interrupted: nothing kept"))
    assert not (tmp_path / "run").exists()
