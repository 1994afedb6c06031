"""Ctrl-C during ``finetune yolo`` (64 px, 3 epochs, random init, offline): exit 130, one line with the
resume command, and ``--resume`` finishes the run with the uninterrupted run's epochs.

What a resumed ultralytics run does not reproduce, and why the later rows of ``results.csv`` differ
from an uninterrupted run's: ``last.pt`` holds the EMA weights and the optimizer state in float16
and the resumed model starts from the EMA (not from the live weights); ultralytics seeds every RNG
again at the start of ``train()`` (``init_seeds(seed + 1)``), so the resumed run draws the first
epoch's data order and augmentations again; its gradient-accumulation counter starts afresh. So
the loss columns after the Ctrl-C only agree in being finite. What does match: the epoch column,
the columns, the learning-rate schedule (``lr/pg*``, bit for bit), and the rows of the epochs before
the Ctrl-C (the same process's, equal to the uninterrupted run's).
"""

from __future__ import annotations

import csv
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ultralytics")

EPOCHS = 3
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
LOSSES = ("train/box_loss", "train/cls_loss", "train/dfl_loss", "val/box_loss", "val/cls_loss", "val/dfl_loss")


def _args(data_yaml: Path, out: Path) -> list[str]:
    return [
        "finetune",
        "yolo",
        "--data",
        str(data_yaml),
        "--model",
        "yolov8n-worldv2.yaml",
        "--out",
        str(out),
        "--epochs",
        str(EPOCHS),
        "--imgsz",
        "64",
        "--batch",
        "8",
        "--device",
        "cpu",
    ]


def _pipeline(args: list[str], log: Path) -> tuple[int, str]:
    """Run ``pipeline ARGS`` with stdout/stderr in files (ultralytics prints much: a pipe would fill)."""
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        code = subprocess.run([sys.executable, "-m", "pipeline", *args], stdout=out, stderr=err, env=ENV, timeout=900)
    return code.returncode, log.with_suffix(".err").read_text()


def _rows(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as fh:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(fh)]


def test_ctrl_c_then_resume_reaches_the_same_epochs(tmp_path):
    from test_yolo import make_yolo_dataset  # pytest puts this folder on sys.path

    data_yaml = make_yolo_dataset(tmp_path / "ds")
    code, err = _pipeline(_args(data_yaml, tmp_path / "full"), tmp_path / "full")
    assert code == 0, err[-2000:]

    cut = tmp_path / "cut"
    with open(tmp_path / "cut.out", "w") as out, open(tmp_path / "cut.err", "w") as errf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", *_args(data_yaml, cut)], stdout=out, stderr=errf, env=ENV
        )
        deadline = time.time() + 600
        while not ((cut / "results.csv").is_file() and len(_rows(cut)) >= 1):  # epoch 1 is written
            assert proc.poll() is None and time.time() < deadline, "no epoch finished"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=600)
    err = (tmp_path / "cut.err").read_text()
    assert proc.returncode == 130, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines.count("stopping after this epoch (Ctrl-C again to abort at once)") == 1
    assert lines[-1].startswith("interrupted: kept "), lines[-3:]
    kept, resume = lines[-1].split("; resume with: ")
    assert kept.startswith(f"interrupted: kept {cut / 'weights' / 'last.pt'} (epoch ")
    assert kept.endswith(f" of {EPOCHS})")
    stopped_at = int(kept.split("(epoch ")[1].split()[0])
    assert 1 <= stopped_at < EPOCHS
    assert [int(r["epoch"]) for r in _rows(cut)] == list(range(1, stopped_at + 1))
    assert not (cut / "metrics.json").exists()
    ck = torch.load(cut / "weights" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["epoch"] == stopped_at - 1 and ck["optimizer"] is not None  # resumable: not stripped by final_eval
    argv = shlex.split(resume)
    assert argv[0] == "pipeline" and argv[-1] == "--resume" and "--out" in argv

    code, err = _pipeline(argv[1:], tmp_path / "resumed")
    assert code == 0, err[-2000:]
    full, resumed = _rows(tmp_path / "full"), _rows(cut)
    assert [int(r["epoch"]) for r in resumed] == [int(r["epoch"]) for r in full] == list(range(1, EPOCHS + 1))
    assert list(resumed[0]) == list(full[0])  # the same columns
    for a, b in zip(full[:stopped_at], resumed[:stopped_at]):  # before the Ctrl-C: the same run
        assert [a[k] for k in LOSSES] == [b[k] for k in LOSSES]
    for row in resumed[stopped_at:]:  # after: see the module docstring
        assert all(math.isfinite(float(row[k])) for k in LOSSES)
    lrs = [k for k in full[0] if k.startswith("lr/")]
    assert lrs and [[r[k] for k in lrs] for r in resumed] == [[r[k] for k in lrs] for r in full]  # same schedule
    assert (cut / "metrics.json").is_file() and (cut / "weights" / "best.pt").is_file()
