"""Multi-GPU YOLO-World training through ultralytics' own DDP launch, with this package's offline trainer.

For ``device="0,1,..."`` ultralytics' ``BaseTrainer.train`` calls ``generate_ddp_command`` and runs
the command it returns (``torch.distributed.run``, one process per GPU). Upstream pickles the trainer
class and launches a generated script that rebuilds it in each worker, without the offline patches,
the text-embedding table or the run log, and first deletes the save folder (the run's ``data.yaml``
lives there). Inside :func:`ddp_launch`, :func:`ddp_command` takes its place and the workers run
:func:`run_ddp_worker`.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from pipeline.core.io import atomic_torch_save, atomic_write_json, atomic_write_text
from pipeline.models.yolo.offline import (
    OfflineWorldTrainer,
    offline_ultralytics,
    patched,
    run_log,
    torch_determinism_restored,
)
from pipeline.models.yolo.prompts import HASH_SOURCE


def _plain_arg(v: Any) -> Any:
    """A trainer argument as plain Python values (paths and other objects as strings), for ``weights_only`` loading."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain_arg(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain_arg(x) for k, x in v.items()}
    return str(v)


@contextmanager
def ddp_launch() -> Iterator[None]:
    """While the block runs, ultralytics' multi-GPU launch goes through :func:`ddp_command`."""
    import ultralytics.engine.trainer as engine_trainer

    with patched(engine_trainer, "generate_ddp_command", ddp_command):
        yield


def ddp_command(trainer: Any) -> tuple[list[str], str]:
    """Stand-in for ``ultralytics.utils.dist.generate_ddp_command`` (patched in by :func:`ddp_launch`).

    Writes, into the run folder, ``ddp_launch_<id>.pt`` (the trainer arguments as plain values, the
    embedding settings) and ``ddp_launch_<id>.py`` (calls :func:`run_ddp_worker`); ultralytics'
    ``ddp_cleanup`` deletes both after the run.

    Returns:
        ``(command, script path)``: ``python -m torch.distributed.run --nproc_per_node <GPUs>
        --master_port <free port> <script>``.
    """
    from ultralytics.utils.dist import find_free_network_port

    save_dir = Path(trainer.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    stem = save_dir / f"ddp_launch_{id(trainer)}"
    state = {
        "args": {k: _plain_arg(v) for k, v in vars(trainer.args).items()},
        "use_clip": bool(getattr(trainer, "use_clip", False)),
        "embedding_source": str(getattr(trainer, "embedding_source", HASH_SOURCE)),
        "embeddings_path": getattr(trainer, "embeddings_path", None),
        "preset_path": getattr(trainer, "preset_path", None),
    }
    atomic_torch_save(stem.with_suffix(".pt"), state)
    script = (
        "# pipeline: ultralytics multi-GPU worker (deleted after the run)\n"
        'if __name__ == "__main__":\n'
        "    import sys\n"
        f"    sys.path = {sys.path!r}\n"
        "    from pipeline.models.yolo.ddp import run_ddp_worker\n"
        f"    run_ddp_worker({str(stem.with_suffix('.pt'))!r})\n"
    )
    atomic_write_text(stem.with_suffix(".py"), script)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(trainer.world_size),
        "--master_port",
        str(find_free_network_port()),
        str(stem.with_suffix(".py")),
    ]
    return cmd, str(stem.with_suffix(".py"))


def run_ddp_worker(state_path: str | Path) -> None:
    """Body of one ultralytics DDP worker process (started by ``torch.distributed.run``).

    Rebuilds :class:`OfflineWorldTrainer` from the state :func:`ddp_command` wrote, inside
    :func:`offline_ultralytics`, with the same text-embedding source (hash or CLIP, or the stored
    table of a resumed run) as the launching process, and trains. Rank 0 appends the log to the
    run's ``log.txt``, stores ``class_embeddings.pt`` and writes ``metrics.json``.
    """
    state = torch.load(Path(state_path), map_location="cpu", weights_only=True)
    rank0 = os.environ.get("RANK", "-1") in ("-1", "0")
    with offline_ultralytics(), torch_determinism_restored(), ExitStack() as stack:
        from ultralytics.utils import DEFAULT_CFG_DICT

        save_dir = Path(state["args"]["save_dir"])
        if rank0:
            stack.enter_context(run_log(save_dir / "log.txt"))
        cfg = DEFAULT_CFG_DICT.copy()
        cfg.update(save_dir="")  # the extra key 'save_dir', as upstream's DDP file does
        trainer = OfflineWorldTrainer(cfg=cfg, overrides=state["args"])
        trainer.use_clip = bool(state["use_clip"])
        if state.get("preset_path"):
            trainer.use_stored_prompts(Path(state["preset_path"]))
        trainer.embedding_source = state["embedding_source"]
        if state.get("embeddings_path"):
            trainer.store_prompts_on_start(Path(state["embeddings_path"]))
        trainer.train()
        if rank0:
            atomic_write_json(save_dir / "metrics.json", trainer.final_metrics())
