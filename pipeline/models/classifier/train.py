"""Training the image classifier: a readable loop in the style of torchvision's
``references/classification/train.py``.

:func:`train_classifier` is ``main``: :func:`check_inputs`, :func:`resolve_runtime`,
:func:`load_data`, :func:`build_training` (model, optimizer, scheduler, loss; :func:`resume_training`),
then per epoch :func:`train_one_epoch`, :func:`evaluate` and :func:`save_checkpoints`, and
:func:`finish` (best weights, optional long-tail step, val predictions, metrics). The model is in
``model.py``, images in ``data.py``, optimizer / loss / evaluation in ``engine.py``, the state kept
between epochs in ``checkpoint.py``, inference and prediction files in ``predict.py``.

The run folder goes through :class:`pipeline.core.runs.RunDir` (kind ``classifier``): ``config.yaml``,
``log.txt``, ``history.json``, ``weights/last.pt`` (every epoch: model, optimizer, scheduler, generator,
epoch, history, best so far, config, classes), ``weights/best.pt``, ``val_predictions.json``,
``val_eval/``, ``training_curves.png`` and ``metrics.json``. ``--resume`` continues from ``weights/last.pt``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.core import distributed as D
from pipeline.core.console import Interrupted, stop_on_interrupt
from pipeline.core.console import progress as progress_bar
from pipeline.core.device import is_cuda, resolve_device
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_torch_save, load_torch_file
from pipeline.core.runs import RunDir
from pipeline.data.split import Split, load_split
from pipeline.models.classifier.checkpoint import BEST, LAST, Training, resume_training, save_checkpoints
from pipeline.models.classifier.config import ClassifierConfig, config_to_dict, load_config
from pipeline.models.classifier.data import (
    ImageSet,
    augment,
    batch_to_device,
    check_classes_present,
    class_names,
    load_image_set,
    normalize,
    subset_entries,
)
from pipeline.models.classifier.engine import (
    batch_order,
    evaluate,
    is_better,
    make_loss,
    make_optimizer,
    make_scheduler,
    rank_loss_scale,
    selection_value,
    skips_batch,
)
from pipeline.models.classifier.longtail import longtail_step
from pipeline.models.classifier.model import (
    build_model,
    frozen_random_stages,
    frozen_random_warning,
    resolve_init_weights,
)
from pipeline.models.classifier.predict import write_predictions

TASKS = ("multiclass", "binary")


def train_one_epoch(
    model,
    data: ImageSet,
    cfg: ClassifierConfig,
    optimizer,
    loss_fn,
    device: str,
    gen,
    *,
    progress: bool = False,
    amp: bool = True,
    channels_last: bool = False,
    pinned: dict | None = None,
) -> dict:
    """One pass over ``data``; returns ``{"train_loss", "train_accuracy", "images_per_s", "data_s", "step_s"}``.

    Batches too small to train (see :func:`_skips_batch`) are skipped.

    Distributed (``pipeline.core.distributed``, ``model`` wrapped in DDP): every rank draws the same
    global order from ``gen``; each global batch of ``train.batch_size`` is sliced per rank, the
    rank's loss is scaled so DDP's gradient average equals the global-batch mean gradient, and the
    returned loss/accuracy/throughput are reduced over ranks. ``amp``: bf16 autocast on CUDA only.
    """
    model.train()
    order = batch_order(data.labels, cfg, gen)
    bs = cfg.train.batch_size
    total, correct, seen = 0.0, 0, 0
    data_s = step_s = 0.0
    has_bn1d = any(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules())
    trains_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    world = D.info().world_size
    starts = range(0, len(order), bs)
    t_epoch = time.perf_counter()
    with progress_bar("train", len(starts), enabled=progress and D.is_main(), transient=True) as advance:
        for i in starts:
            advance()
            t0 = time.perf_counter()
            gidx = order[i : i + bs]
            if skips_batch(len(gidx), world, has_bn1d=has_bn1d, trains_bn=trains_bn):
                continue
            rows = D.rank_slice(len(gidx))
            idx = gidx[rows]
            x = normalize(batch_to_device(data.images, idx, device, pinned), cfg.data.mean, cfg.data.std)
            x = augment(x, cfg.data.augment, gen, global_n=len(gidx), rows=rows)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = data.labels[idx].to(device)
            scale = rank_loss_scale(loss_fn, y, len(idx), len(gidx), world)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            with D.autocast(device, amp):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            (loss * scale).backward()
            optimizer.step()
            # summed over ranks this is the global batch mean times its size
            total += float(loss.detach()) * scale * len(gidx) / world
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            data_s += t1 - t0
            step_s += time.perf_counter() - t1
    wall = D.all_reduce_max(time.perf_counter() - t_epoch)
    r = D.all_reduce_sums({"total": total, "correct": correct, "seen": seen})
    return {
        "train_loss": r["total"] / max(r["seen"], 1),
        "train_accuracy": r["correct"] / max(r["seen"], 1),
        "images_per_s": r["seen"] / wall if wall > 0 else None,
        "data_s": data_s,
        "step_s": step_s,
    }


# ----------------------------------------------------------------------------- steps of a run


@dataclass(frozen=True)
class RunResult:
    """What :func:`train_classifier` wrote: the run folder and its final metrics (every rank gets
    rank 0's metrics; ``main`` tells whether this process is rank 0)."""

    run_dir: Path
    metrics: dict
    main: bool = True

    def summary(self) -> str | None:
        """One line with the val accuracies for the terminal (rank 0, when there was a val split)."""
        val = self.metrics.get("val") or {}
        if not self.main or not val:
            return None
        return (
            f"val accuracy {val.get('accuracy'):.4f}, balanced accuracy {val.get('balanced_accuracy'):.4f} "
            f"(weights: {self.metrics['weights']})"
        )


@dataclass(frozen=True)
class Inputs:
    """The checked inputs of a run: manifest, class list, entries, initial weights, and the frozen
    stages that stay randomly initialised (``--weights none`` with ``model.freeze``)."""

    split_path: Path
    split: Split
    classes: list[str]
    train_entries: list[tuple[Path, int]]
    val_entries: list[tuple[Path, int]]
    init_path: Path | None
    weights_note: str
    frozen_random_stages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains: device (``cuda:LOCAL_RANK`` under torchrun), process group,
    bf16 autocast (CUDA only), channels_last and torch.compile (both resolved to False off CUDA)."""

    device: str
    dist: D.DistInfo
    amp: bool
    channels_last: bool
    compile: bool

    @property
    def on_cuda(self) -> bool:
        return is_cuda(self.device)


def check_inputs(
    cfg: ClassifierConfig, split_path: Path, *, task: str, weights: str, allow_download: bool, root: Path | None
) -> Inputs:
    """Load the manifest, the class list and the train/val entries; resolve the initial weights.

    Raises:
        PipelineError: bad manifest, a class without training images, missing weights.
    """
    split = load_split(Path(split_path), root=root)
    classes = class_names(split, task)
    train_entries = subset_entries(
        split,
        "train",
        classes,
        use_train_good=cfg.data.use_train_good,
        max_train_good=cfg.data.max_train_good,
        seed=cfg.train.seed,
    )
    check_classes_present(split, train_entries, classes, "train")
    val_entries = subset_entries(split, "val", classes)
    init_path, weights_note = resolve_init_weights(weights, backbone=cfg.model.backbone, allow_download=allow_download)
    frozen = tuple(frozen_random_stages(cfg.model.freeze, weights))
    return Inputs(Path(split_path), split, classes, train_entries, val_entries, init_path, weights_note, frozen)


def label_safe(cfg: ClassifierConfig, category: str):
    """``cfg`` with the augmentations that could change a label of ``category`` switched off
    (:mod:`pipeline.data.augmentation`), and the policy applied."""
    from dataclasses import replace

    from pipeline.data.augmentation import policy_for, restrict_classifier_augment
    from pipeline.models.classifier.config import AugmentConfig

    policy = policy_for(category)
    augment = AugmentConfig(**restrict_classifier_augment(asdict(cfg.data.augment), policy))
    return replace(cfg, data=replace(cfg.data, augment=augment)), policy


def resolve_runtime(cfg: ClassifierConfig, *, amp: bool, channels_last: bool | None, compile: bool) -> Runtime:
    """Resolve ``train.device`` and join the torchrun process group when there is one."""
    device = resolve_device(cfg.train.device)
    dist = D.init_from_env(device)
    on_cuda = is_cuda(device)
    channels_last = on_cuda if channels_last is None else (channels_last and on_cuda)
    return Runtime(device, dist, amp, bool(channels_last), bool(compile and on_cuda))


def resolved_config(cfg: ClassifierConfig, inputs: Inputs, rt: Runtime, *, task: str) -> dict:
    """What ``config.yaml`` records: the config plus task, weights note, manifest, classes and runtime."""
    return {
        **config_to_dict(cfg),
        "task": task,
        "weights": inputs.weights_note,
        "frozen_random_stages": list(inputs.frozen_random_stages),
        "split": str(inputs.split_path.resolve()),
        "classes": inputs.classes,
        "device_resolved": rt.device,
        "world_size": rt.dist.world_size,
        "amp_bf16": bool(rt.amp and rt.on_cuda),
        "channels_last": rt.channels_last,
        "compile": rt.compile,
    }


def load_data(cfg: ClassifierConfig, inputs: Inputs, *, progress: bool) -> tuple[ImageSet, ImageSet, float]:
    """Decode and resize the train and val images (cached); returns them and the seconds it took."""
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else None
    t0 = time.perf_counter()
    sets = [
        load_image_set(
            entries,
            inputs.classes,
            inputs.split.root,
            cfg.data.input_size_hw,
            cache_dir=cache_dir,
            progress=progress,
            desc=desc,
        )
        for entries, desc in ((inputs.train_entries, "train"), (inputs.val_entries, "val"))
    ]
    return sets[0], sets[1], time.perf_counter() - t0


def build_training(cfg: ClassifierConfig, inputs: Inputs, train_set: ImageSet, rt: Runtime) -> Training:
    """Model (on the device, channels_last, SyncBatchNorm under DDP on CUDA), optimizer, scheduler,
    loss (class counts of ``train_set``) and the generator of batch orders and augmentations."""
    model = build_model(cfg.model, len(inputs.classes), init_weights=inputs.init_path).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if rt.dist.distributed and rt.on_cuda:  # BatchNorm statistics over the global batch (CUDA only in torch)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # identical init on every rank (same seed); stochastic layers (dropout, DropBlock) then draw per rank
    torch.manual_seed(cfg.train.seed + rt.dist.rank)
    optimizer = make_optimizer(cfg, model)
    return Training(
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(cfg, optimizer),
        loss_fn=make_loss(cfg, train_set.counts(), rt.device),
        gen=torch.Generator().manual_seed(cfg.train.seed),
        pinned={} if rt.on_cuda else None,
    )


def wrap_for_training(t: Training, rt: Runtime) -> None:
    """``t.net``: ``t.model`` inside DDP (distributed) and/or ``torch.compile`` (CUDA, ``--compile``)."""
    net = D.wrap_ddp(t.model, rt.device) if rt.dist.distributed else t.model
    t.net = torch.compile(net) if rt.compile else net


def fit(
    t: Training,
    run: RunDir,
    cfg: ClassifierConfig,
    train_set: ImageSet,
    val_set: ImageSet,
    rt: Runtime,
    meta: dict,
    *,
    progress: bool,
    echo: bool,
) -> None:
    """The epoch loop from ``t.start_epoch`` to ``train.epochs``: train, evaluate, step the schedule,
    checkpoint. A Ctrl-C finishes the epoch, checkpoints it and raises :class:`Interrupted`."""
    with stop_on_interrupt("this epoch") as stop:
        for epoch in range(t.start_epoch, cfg.train.epochs + 1):
            _fit_epoch(t, run, cfg, train_set, val_set, rt, meta, epoch, progress=progress, echo=echo)
            if stop and epoch < cfg.train.epochs:
                raise Interrupted(f"{run / LAST} (epoch {epoch} of {cfg.train.epochs})", resumable=True)


def _fit_epoch(
    t: Training,
    run: RunDir,
    cfg: ClassifierConfig,
    train_set: ImageSet,
    val_set: ImageSet,
    rt: Runtime,
    meta: dict,
    epoch: int,
    *,
    progress: bool,
    echo: bool,
) -> None:
    """One epoch of :func:`fit`."""
    tr = train_one_epoch(
        t.net,
        train_set,
        cfg,
        t.optimizer,
        t.loss_fn,
        rt.device,
        t.gen,
        progress=progress,
        amp=rt.amp,
        channels_last=rt.channels_last,
        pinned=t.pinned,
    )
    ev = evaluate(t.model, val_set, cfg, t.loss_fn, rt.device, shard=True)
    lr = t.optimizer.param_groups[0]["lr"]
    t.scheduler.step()
    row = {"epoch": epoch, "lr": lr, **tr, **ev}
    if cfg.model.variant == "gem":
        row["gem_p"] = float(t.model.pool.p.detach())
    t.history.append(row)
    value = selection_value(cfg.train.select_metric, tr, ev)
    improved = is_better(value, t.best_value, cfg.train.select_metric)
    if improved:
        t.best_value, t.best_epoch = value, epoch
    with D.main_only() as main:  # rank 0 writes; the others wait until the files exist
        if main:
            save_checkpoints(run, t, meta, epoch, improved)
    va, vb = ev.get("val_accuracy"), ev.get("val_balanced_accuracy")
    _log(
        run,
        f"epoch {epoch}/{cfg.train.epochs} lr {lr:.2e} loss {tr['train_loss']:.4f} "
        f"acc {tr['train_accuracy']:.3f} val acc {va if va is None else round(va, 4)} "
        f"bal {vb if vb is None else round(vb, 4)} {tr['images_per_s'] or 0:.1f} img/s{' *' if improved else ''}",
        echo,
    )


def finish(
    t: Training,
    run: RunDir,
    cfg: ClassifierConfig,
    inputs: Inputs,
    train_set: ImageSet,
    val_set: ImageSet,
    rt: Runtime,
    meta: dict,
    *,
    task: str,
    decode_s: float,
    echo: bool,
) -> dict:
    """Rank 0, after the last epoch: reload the best weights, evaluate (before and after the optional
    long-tail step: feature synthesis or DLSA), write ``val_predictions.json``, ``val_eval/``, curves
    and ``metrics.json``."""
    from pipeline.evaluation.classification import evaluate_classification, plot_history

    classes, note, model = inputs.classes, inputs.weights_note, t.model
    best = load_torch_file(run / BEST, what="classifier checkpoint")
    model.load_state_dict(best["model"])
    metrics: dict = {
        "name": cfg.name,
        "task": task,
        "weights": note,
        "frozen_random_stages": list(inputs.frozen_random_stages),
        "classes": classes,
        "best_epoch": best["epoch"],
        "train_counts": dict(zip(classes, train_set.counts())),
        "val_counts": dict(zip(classes, val_set.counts())),
        "decode_resize_s": decode_s,
    }
    if t.history:
        ips = [h["images_per_s"] for h in t.history if h.get("images_per_s")]
        metrics["train_images_per_s"] = float(np.median(ips)) if ips else None
    metrics["val_before_longtail"] = evaluate(model, val_set, cfg, t.loss_fn, rt.device) if len(val_set) else None
    lt = longtail_step(model, train_set, cfg, rt.device)
    if lt is not None:  # the head is replaced or retrained: best.pt keeps it (and how to rebuild it)
        metrics["longtail"] = lt
        extra = {"longtail_step": lt["step"], "longtail_head": lt.get("head")}
        atomic_torch_save(run / BEST, {"model": model.state_dict(), "epoch": best["epoch"], **extra, **meta})
        metrics["val_after_longtail"] = evaluate(model, val_set, cfg, t.loss_fn, rt.device) if len(val_set) else None
        _log(run, f"long tail ({lt['step']}): {lt['counts_before']} training features per class", echo)
    if len(val_set):
        pred_path = run / "val_predictions.json"
        write_predictions(
            model,
            val_set,
            cfg,
            rt.device,
            pred_path,
            model_name=cfg.name,
            task=task,
            split_path=inputs.split_path,
            subset="val",
            weights_note=note,
            run_dir=run.path,
        )
        metrics["val"] = evaluate_classification(pred_path, run / "val_eval")
    plot_history(t.history, run / "training_curves.png", title=f"{cfg.name} (weights: {note.split(' ')[0]})")
    metrics["world_size"] = rt.dist.world_size
    run.write_metrics(metrics)
    _log(run, f"wrote {run.path}", echo)
    return metrics


def _log(run: RunDir, msg: str, echo: bool) -> None:
    """One line in the run's ``log.txt`` (rank 0 only), printed as plain text when ``echo``."""
    if not D.is_main():
        return
    run.log(msg, echo=echo)


@contextlib.contextmanager
def _rank0_owns(run: RunDir):
    """Rank 0 creates the run folder (removing the old run's files on --force) and records what it
    wrote on the way out; the other ranks wait until the folder exists and write nothing."""
    if not D.is_main():
        D.barrier()
        yield run
        return
    with run:
        D.barrier()
        yield run


# ----------------------------------------------------------------------------- main


def train_classifier(
    cfg: ClassifierConfig,
    split_path: Path,
    out_dir: Path,
    *,
    task: str = "multiclass",
    weights: str = "imagenet",
    allow_download: bool = False,
    force: bool = False,
    resume: bool = False,
    root: Path | None = None,
    progress: bool = True,
    echo: bool = True,
    amp: bool = True,
    channels_last: bool | None = None,
    compile: bool = False,
) -> RunResult:
    """Train one classifier and write a run folder (files: module docstring).

    Runs single-process, or under ``torchrun`` on several GPUs/nodes (``pipeline.core.distributed``:
    DDP, NCCL on CUDA / gloo on CPU, SyncBatchNorm on CUDA, global batch ``train.batch_size`` split
    over ranks, metrics reduced over ranks, rank 0 alone writes). ``amp`` (bf16 autocast),
    ``channels_last`` (default: on for CUDA) and ``compile`` (``torch.compile``) act on CUDA only.
    ``weights/best.pt`` is the best epoch by ``train.select_metric`` on val (with the retrained head
    after ``longtail.feature_synthesis``, or the DLSA cascade with ``longtail.method: dlsa``).

    Args:
        cfg: the validated configuration.
        split_path: split manifest (``annotations/<category>/split.json``).
        out_dir: run folder; refused when non-empty unless ``force`` or ``resume`` (RunDir rules).
        task: ``multiclass`` (good + each defect type) or ``binary`` (good vs defect).
        weights: ``imagenet`` (the trunk's ImageNet file: ResNet-18's via :mod:`pipeline.core.weights`,
            the published attempts; the registry trunks' installed files), ``none`` (from scratch: frozen
            stages then stay random, which the run warns about and records as ``frozen_random_stages`` in
            config.yaml and metrics.json) or a state-dict path of the trunk (``model.backbone``).
        resume: continue from ``out_dir/weights/last.pt``.

    Raises:
        PipelineError: bad task or split (a class without training images), missing weights, an
            existing output without ``force``/``resume``, nothing to resume, an unavailable device.
    """
    if task not in TASKS:
        raise PipelineError(f"task {task!r}: expected multiclass or binary")
    run = RunDir.open(out_dir, kind="classifier", force=force, resume=resume, resume_file=LAST)
    inputs = check_inputs(cfg, split_path, task=task, weights=weights, allow_download=allow_download, root=root)
    cfg, policy = label_safe(cfg, inputs.split.category)
    rt = resolve_runtime(cfg, amp=amp, channels_last=channels_last, compile=compile)
    progress = progress and rt.dist.rank == 0
    D.barrier()  # every rank has checked the inputs before rank 0 replaces anything
    with _rank0_owns(run):
        if D.is_main():
            run.write_config({**resolved_config(cfg, inputs, rt, task=task), "augmentation": policy.as_dict()})
        D.seed_all(cfg.train.seed)
        train_set, val_set, decode_s = load_data(cfg, inputs, progress=progress)
        _log(
            run,
            f"[{cfg.name}] task={task} classes={inputs.classes} weights={inputs.weights_note} device={rt.device}",
            echo,
        )
        if inputs.frozen_random_stages:
            _log(run, f"warning: {frozen_random_warning(inputs.frozen_random_stages)}", echo)
        _log(run, f"augmentation for {inputs.split.category!r} from {policy.source}: {asdict(cfg.data.augment)}", echo)
        _log(
            run,
            f"train images per class {dict(zip(inputs.classes, train_set.counts()))}; "
            f"val {dict(zip(inputs.classes, val_set.counts()))}; decode+resize {decode_s:.1f}s",
            echo,
        )
        t = build_training(cfg, inputs, train_set, rt)
        if resume:
            resume_training(t, run / LAST, cfg)
            _log(run, f"resumed from {run / LAST} at epoch {t.start_epoch}", echo)
        wrap_for_training(t, rt)
        meta = {"config": config_to_dict(cfg), "classes": inputs.classes, "task": task, "weights": inputs.weights_note}
        fit(t, run, cfg, train_set, val_set, rt, meta, progress=progress, echo=echo)
        if not D.is_main():  # the final evaluation and files are rank 0's (other nodes may not see them)
            metrics = D.broadcast_object(None)
            D.barrier()
            return RunResult(run.path, metrics, main=False)
        metrics = finish(t, run, cfg, inputs, train_set, val_set, rt, meta, task=task, decode_s=decode_s, echo=echo)
        D.broadcast_object(metrics)
        D.barrier()
        return RunResult(run.path, metrics)


def train_from_config(
    config: str | Path,
    split_path: Path,
    out_dir: Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    task: str = "multiclass",
    weights: str = "imagenet",
    allow_download: bool = False,
    force: bool = False,
    resume: bool = False,
    root: Path | None = None,
    amp: bool = True,
    channels_last: bool | None = None,
    compile: bool = False,
) -> RunResult:
    """``pipeline finetune classifier``: load ``config`` (attempt name or YAML) with dotted ``overrides``
    and train into ``out_dir`` (default ``runs/classifier/<config name>``); see :func:`train_classifier`.

    Raises:
        PipelineError: a bad config or override (one line), and everything :func:`train_classifier` raises.
    """
    cfg = load_config(config, overrides)
    out = Path(out_dir) if out_dir is not None else Path("runs") / "classifier" / cfg.name
    return train_classifier(
        cfg,
        split_path,
        out,
        task=task,
        weights=weights,
        allow_download=allow_download,
        force=force,
        resume=resume,
        root=root,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
    )
