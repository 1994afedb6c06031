"""What a classifier run keeps between epochs: the :class:`Training` state, ``weights/last.pt`` (written
after every epoch, read by ``--resume``) and ``weights/best.pt``.

``weights/last.pt`` holds model, optimizer, scheduler, the batch-order generator, the global RNG
states, epoch, history (JSON text), the best value and epoch so far, plus ``meta`` (config, classes,
task, weights note); ``weights/best.pt`` holds model, epoch and ``meta``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import distributed as D
from pipeline.core.io import atomic_torch_save, atomic_write_json, load_torch_file
from pipeline.core.runs import RunDir
from pipeline.models.classifier.config import ClassifierConfig

LAST = "weights/last.pt"
BEST = "weights/best.pt"


@dataclass
class Training:
    """The objects one run trains and the state ``weights/last.pt`` keeps for ``--resume``.

    ``model`` is the bare module; ``net`` what is trained (``model`` inside DDP and/or torch.compile).
    """

    model: Any
    optimizer: Any
    scheduler: Any
    loss_fn: Any
    gen: Any
    net: Any = None
    pinned: dict | None = None
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 1
    best_value: float | None = None
    best_epoch: int | None = None


def resume_training(t: Training, path: Path, cfg: ClassifierConfig) -> None:
    """Restore model, optimizer, scheduler, generator, history and the best epoch from ``weights/last.pt``."""
    ck = load_torch_file(path, what="classifier checkpoint")
    t.model.load_state_dict(ck["model"])
    t.optimizer.load_state_dict(ck["optimizer"])
    t.scheduler.load_state_dict(ck["scheduler"])
    t.scheduler.T_max = cfg.train.epochs  # resuming with more epochs stretches the cosine to the new end
    t.gen.set_state(ck["generator"])
    if "rng" in ck:  # global states (dropout, DropBlock) as they were after that epoch
        D.set_rng_states(ck["rng"])
    t.history = json.loads(ck["history"])
    t.start_epoch = int(ck["epoch"]) + 1
    t.best_value, t.best_epoch = ck.get("best_value"), ck.get("best_epoch")


def save_checkpoints(run: RunDir, t: Training, meta: dict, epoch: int, improved: bool) -> None:
    """Rank 0, after each epoch: ``weights/best.pt`` (when improved), ``weights/last.pt``, ``history.json``."""
    if improved:
        atomic_torch_save(run / BEST, {"model": t.model.state_dict(), "epoch": epoch, **meta})
    atomic_torch_save(
        run / LAST,
        {
            "model": t.model.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "generator": t.gen.get_state(),
            "rng": D.rng_states(),
            "epoch": epoch,
            "history": json.dumps(t.history),
            "best_value": t.best_value,
            "best_epoch": t.best_epoch,
            **meta,
        },
    )
    atomic_write_json(run / "history.json", t.history)
    run.save_manifest()  # an interrupted run's files are known as this run's (for --force)
