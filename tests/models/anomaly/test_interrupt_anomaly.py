"""Ctrl-C during ``finetune anomaly``: a PatchCore fit is one pass with nothing to resume, so it stops
at once, exits 130 with ``interrupted: nothing kept; start again with: ...`` and leaves no run folder."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch")

from pipeline.core.errors import PipelineError  # noqa: E402
from pipeline.models import backbones  # noqa: E402

BACKBONE = "efficientnet_lite0"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _have(name: str) -> bool:
    try:
        backbones.weights_file(name)
        return True
    except PipelineError:
        return False


@pytest.mark.skipif(not _have(BACKBONE), reason=f"{BACKBONE} weights not installed")
def test_ctrl_c_during_the_fit_leaves_no_run_folder(synth_category, tmp_path):
    run = tmp_path / "run"
    # 320 px, one image per batch: the feature extraction lasts seconds, not milliseconds
    args = ["finetune", "anomaly", str(synth_category), "--out", str(run), "--backbone", BACKBONE]
    args += ["--imgsz", "320", "--batch", "1", "--device", "cpu"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    deadline = time.time() + 300
    for line in proc.stdout:
        if line.startswith(f"backbone {BACKBONE} ("):  # the first log line: the run folder exists, features start
            assert run.is_dir()
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "no log line"
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: nothing kept; start again with: "), err[-2000:]
    again = shlex.split(last.split("start again with: ")[1])
    assert again == ["pipeline", *args]
    assert "wrote" not in out
    assert not run.exists()
