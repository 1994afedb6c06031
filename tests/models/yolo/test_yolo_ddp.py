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
    from test_yolo import SIZE, make_yolo_dataset  # noqa: PLC0415 - pytest puts tests/ on sys.path

    import pipeline.models.yolo.train as det

    assert det.OfflineWorldTrainer is det._trainer_class()
    assert det.OfflineWorldTrainer.__module__ == "pipeline.models.yolo.train"
    data_yaml = make_yolo_dataset(tmp_path / "ds")
    out = (tmp_path / "run").resolve()
    out.mkdir()
    with det._offline_ultralytics():
        import ultralytics.engine.trainer as engine_trainer
        from ultralytics.utils.dist import ddp_cleanup

        assert engine_trainer.generate_ddp_command is det._ddp_command  # what BaseTrainer.train calls for DDP
        data = det._read_data_yaml(data_yaml)
        config = {"model_resolved": det._resolve_model("yolov8n-worldv2.yaml", allow_download=False), "epochs": 1,
                  "imgsz": SIZE, "batch": 8, "device": "cpu", "workers": 0, "seed": 0, "optimizer": "auto", "lr0": 0.01}
        det._write_config(out, config, data, resume=False)
        with det._torch_determinism_restored():
            trainer = det._build_trainer(config, out, resume=False, allow_download=False)
        trainer.world_size = 2  # as for device="0,1"
        cmd, script = det._ddp_command(trainer)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"] and cmd[-1] == script
    text = Path(script).read_text()
    assert "from pipeline.models.yolo.train import run_ddp_worker" in text and "ultralytics" not in text.split("import sys", 1)[1]
    state = torch.load(Path(script).with_suffix(".pt"), map_location="cpu", weights_only=True)
    assert state["args"]["device"] == "cpu" and state["args"]["data"] == str(out / "data.yaml")
    assert state["use_clip"] is False and state["embeddings_path"] == str(out / "weights" / det.EMBEDDINGS_FILE)
    assert (out / "data.yaml").is_file()  # upstream's command deletes the save folder first; ours keeps it
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, script], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["embedding_source"] == det.HASH_SOURCE and metrics["epochs"] == 1
    payload = det._load_embeddings(out / "weights" / det.EMBEDDINGS_FILE)
    assert payload["names"] == list(data["names"].values())
    assert "ultralytics" in (out / "train.log").read_text().lower() or (out / "train.log").stat().st_size > 0
    ddp_cleanup(trainer, script)
    assert not Path(script).exists() and not Path(script).with_suffix(".pt").exists()
