"""The ultralytics multi-GPU launch file runs our offline trainer (generated for 2 GPUs, run as one
CPU process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


# ----------------------------------------------------------------------------- ultralytics DDP launch


def test_yolo_ddp_launch_runs_our_offline_trainer(tmp_path):
    """The multi-GPU launch file ultralytics runs under torchrun rebuilds *our* offline trainer.

    No GPUs here: the command is generated for a 2-GPU world, and the generated script is then run
    as a plain process (no torchrun, device cpu), which trains one epoch through run_ddp_worker.
    """
    import importlib

    from test_yolo import SIZE, make_yolo_dataset  # noqa: PLC0415 - pytest puts tests/ on sys.path
    from ultralytics.models.yolo.world.train import WorldTrainer

    from pipeline.core.runs import RunDir
    from pipeline.data.yolo import read_data_yaml
    from pipeline.models.yolo import ddp, offline, train
    from pipeline.models.yolo.prompts import EMBEDDINGS_FILE, HASH_SOURCE, load_embeddings

    trainer_cls = offline.OfflineWorldTrainer
    assert issubclass(trainer_cls, WorldTrainer) and trainer_cls.__module__ == "pipeline.models.yolo.offline"
    assert getattr(importlib.import_module(trainer_cls.__module__), trainer_cls.__qualname__) is trainer_cls
    data_yaml = make_yolo_dataset(tmp_path / "ds")
    out = (tmp_path / "run").resolve()
    out.mkdir()
    with offline.offline_ultralytics(), ddp.ddp_launch():
        import ultralytics.engine.trainer as engine_trainer
        from ultralytics.utils.dist import ddp_cleanup

        assert engine_trainer.generate_ddp_command is ddp.ddp_command  # what BaseTrainer.train calls for DDP
        data = read_data_yaml(data_yaml)
        config = {
            "model_resolved": train._resolve_model("yolov8n-worldv2.yaml", allow_download=False),
            "epochs": 1,
            "imgsz": SIZE,
            "batch": 8,
            "device": "cpu",
            "workers": 0,
            "seed": 0,
            "optimizer": "auto",
            "lr0": 0.01,
            "augmentation_overrides": {},
        }
        with RunDir.open(out, kind="yolo") as run:
            train._write_config(run, config, data, resume=False)
        with offline.torch_determinism_restored():
            trainer = train._build_trainer(config, out, resume=False, allow_download=False)
        trainer.world_size = 2  # as for device="0,1"
        cmd, script = ddp.ddp_command(trainer)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"] and cmd[-1] == script
    text = Path(script).read_text()
    assert "from pipeline.models.yolo.ddp import run_ddp_worker" in text
    assert "ultralytics" not in text.split("import sys", 1)[1]
    state = torch.load(Path(script).with_suffix(".pt"), map_location="cpu", weights_only=True)
    assert state["args"]["device"] == "cpu" and state["args"]["data"] == str(out / "data.yaml")
    assert state["use_clip"] is False and state["embeddings_path"] == str(out / "weights" / EMBEDDINGS_FILE)
    assert (out / "data.yaml").is_file()  # upstream's command deletes the save folder first; ours keeps it
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, script],
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedding_source"] == HASH_SOURCE and metrics["epochs"] == 1
    payload = load_embeddings(out / "weights" / EMBEDDINGS_FILE)
    assert payload["names"] == list(data["names"].values())
    assert "ultralytics" in (out / "log.txt").read_text().lower() or (out / "log.txt").stat().st_size > 0
    ddp_cleanup(trainer, script)
    assert not Path(script).exists() and not Path(script).with_suffix(".pt").exists()
