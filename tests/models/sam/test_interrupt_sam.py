"""Ctrl-C during ``finetune sam`` (tiny SAM, synthetic category): exit 130, one line with the resume
command, and a resumed run whose decoder weights equal an uninterrupted run's bit for bit (CPU)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

EPOCHS = 4
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def ann(synth_category, tmp_path_factory) -> Path:
    from pipeline.data.convert import convert_category

    out = tmp_path_factory.mktemp("sam-int") / "ann"
    convert_category(synth_category, out)
    return out


def _args(ann: Path, out: Path, cache: Path) -> list[str]:
    return [
        "finetune",
        "sam",
        str(ann),
        "--model-type",
        "tiny",
        "--epochs",
        str(EPOCHS),
        "--lr",
        "1e-3",
        "--box-jitter",
        "2",
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--device",
        "cpu",
    ]


def _pipeline(args):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=ENV, timeout=600
    )


def _start(args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )


def test_ctrl_c_then_resume_equals_an_uninterrupted_run(ann, tmp_path):
    cache = tmp_path / "cache"
    full = _pipeline(_args(ann, tmp_path / "full", cache))
    assert full.returncode == 0, full.stderr[-2000:]

    proc = _start(_args(ann, tmp_path / "cut", cache))
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
    assert len(lines) == 2 and lines[1].startswith("interrupted: kept "), lines
    kept, resume = lines[1].split("; resume with: ")
    assert kept.startswith(f"interrupted: kept {tmp_path / 'cut' / 'last.pt'} (epoch ") and kept.endswith(
        f" of {EPOCHS})"
    )
    stopped_at = int(kept.split("(epoch ")[1].split()[0])
    assert 1 <= stopped_at < EPOCHS
    assert not (tmp_path / "cut" / "metrics.json").exists()
    ck = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == stopped_at and set(ck["rng"]) == {"python", "numpy", "torch", "cuda"}
    argv = shlex.split(resume)
    assert argv[0] == "pipeline" and argv[-1] == "--resume" and "--out" in argv

    resumed = _pipeline(argv[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS
    assert a["state"]["mask_decoder"].keys() == b["state"]["mask_decoder"].keys()
    for k, v in a["state"]["mask_decoder"].items():
        assert torch.equal(v, b["state"]["mask_decoder"][k]), k
    assert str(a["optimizer"]["state"]) == str(b["optimizer"]["state"])
    assert a["scheduler"] == b["scheduler"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_ctrl_c_twice_before_a_checkpoint_leaves_no_folder(ann, tmp_path):
    """The first Ctrl-C comes as epoch 1 starts (the flag), the second aborts it before ``last.pt`` exists."""
    proc = _start(_args(ann, tmp_path / "run", tmp_path / "cache"))
    for line in proc.stdout:
        if line.startswith("embeddings"):  # the cache is filled, epoch 1 is starting
            proc.send_signal(signal.SIGINT)
            break
    first = proc.stderr.readline()
    assert first == "stopping after this epoch (Ctrl-C again to abort at once)\n"
    proc.send_signal(signal.SIGINT)  # the second Ctrl-C aborts epoch 1 at once
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("aborted (Ctrl-C): a run folder without a checkpoint is removed")
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_ctrl_c_while_filling_the_cache_keeps_only_the_embeddings(ann, tmp_path, monkeypatch):
    """A Ctrl-C during the embedding cache fill stops after the image being embedded: no run folder
    (nothing to resume), the embeddings computed so far stay in the cache for the next run."""
    import pipeline.models.sam.train as st
    from pipeline.core.console import Interrupted
    from pipeline.models.sam.config import SamTrainConfig

    class CtrlCOnThirdImage(st.Embedder):
        def __call__(self, image):
            out = super().__call__(image)
            if self.encoder_calls == 3:
                os.kill(os.getpid(), signal.SIGINT)  # handled in this (main) thread: sets the stop flag
            return out

    monkeypatch.setattr(st, "Embedder", CtrlCOnThirdImage)
    cfg = SamTrainConfig(
        train_records=str(ann / "sam" / "train.jsonl"),
        val_records=str(ann / "sam" / "val.jsonl"),
        model_type="tiny",
        epochs=2,
        cache_dir=str(tmp_path / "cache"),
        device="cpu",
    )
    with pytest.raises(Interrupted) as info:
        st.finetune_sam(cfg, tmp_path / "run", progress=False)
    n_images = len(st.group_by_image(st.read_records(ann / "sam" / "train.jsonl"))) + len(
        st.group_by_image(st.read_records(ann / "sam" / "val.jsonl"))
    )
    assert info.value.kept == f"3 of {n_images} image embeddings in {tmp_path / 'cache'}"
    assert info.value.resumable is False
    assert not (tmp_path / "run").exists()
    assert len([p for p in (tmp_path / "cache").rglob("*.pt")]) == 3
