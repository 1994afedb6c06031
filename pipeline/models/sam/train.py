"""Fine-tune SAM's mask decoder on defect components (box prompt -> mask), with cached embeddings.

Recipe (Kirillov et al., "Segment Anything", ICCV 2023, section 3 and appendix A; and the common
decoder-only fine-tuning practice, e.g. MedSAM, Ma et al. 2024): image encoder frozen, its
embedding computed once per image under ``no_grad`` and cached on disk; prompt = the true box of
each component (optionally jittered by a few pixels), all components of an image a batch against
one embedding; single-mask output; loss = ``20 * focal + 1 * Dice + 1 * MSE(iou_pred, real IoU)``.

Loss resolution (``loss_resolution``):

- ``lowres`` (default): the decoder's own ``img_size/4`` frame (256x256 for vit_*, 64x64 for tiny).
  The true mask follows the image's geometry (resize longest side, pad bottom/right, 4x4 area
  pooling: :func:`pipeline.models.sam.model.lowres_target`), a soft target in [0, 1]; padding cells get
  weight 0. Cheap: the loss costs less than the decoder.
- ``native``: logits go through the prediction path (``postprocess_masks``: low-res -> padded
  input -> crop -> ``HxW``) and meet the exact true mask; no mask is resized, but on 900x900
  images the loss costs more than the decoder.

Validation IoU/Dice are always measured at the original resolution, as predictions are. The loss
itself is in :mod:`pipeline.models.sam.loss`.

Ctrl-C finishes the current epoch, writes ``last.pt`` and stops (:class:`pipeline.core.console.Interrupted`);
``--resume`` continues it and ends with the decoder weights of an uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_savefig, read_rgb
from pipeline.data.sam_records import group_by_image, read_records
from pipeline.models.sam.config import TRAINABLE, SamTrainConfig
from pipeline.models.sam.loss import native_true, step_loss
from pipeline.models.sam.model import (
    Embedder,
    boxes_to_input,
    build_sam,
    decode,
    default_cache_dir,
    image_to_input,
    logits_to_native,
    read_finetuned,
    resolve_base_checkpoint,
    save_finetuned,
)

# ----------------------------------------------------------------------------- loop


def _set_trainable(sam, train: tuple[str, ...]) -> list:
    params = []
    for name in TRAINABLE:
        mod = getattr(sam, name)
        on = name in train
        mod.train(on)
        for k, p in mod.named_parameters():
            # Single-mask output uses mask token 0: the three multimask hypernetwork MLPs get no
            # signal, so they stay frozen (weight decay would otherwise shrink them for nothing).
            head = "output_hypernetworks_mlps."
            multimask_head = k.startswith(head) and not k.startswith(head + "0.")
            use = on and not (name == "mask_decoder" and multimask_head)
            p.requires_grad_(use)
            if use:
                params.append(p)
    return params


def _embedding(sam, embedder, group, cfg: SamTrainConfig):
    if "image_encoder" in cfg.train:  # encoder trains: no cache, forward with gradients
        embedder.encoder_calls += 1
        return sam.image_encoder(image_to_input(sam, read_rgb(group.image)))
    return embedder(group.image)


def _step_tensors(sam, group, cfg: SamTrainConfig, gen, *, train: bool):
    """Boxes (input frame) for one image, with subset and jitter when training; indices used."""
    import torch

    idx = torch.arange(len(group.records))
    if train and len(idx) > cfg.max_boxes:
        idx = torch.randperm(len(idx), generator=gen)[: cfg.max_boxes].sort().values
    boxes = torch.as_tensor(group.bbox_xyxy())[idx]
    h, w = group.size_hw
    if train and cfg.box_jitter_px > 0:
        boxes = boxes + (torch.rand(boxes.shape, generator=gen) * 2 - 1) * cfg.box_jitter_px
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=boxes.dtype))
    return boxes_to_input(boxes, size_hw=group.size_hw, img_size=sam.image_encoder.img_size), idx.tolist()


def _decoder_module():
    """``nn.Module`` whose forward is :func:`pipeline.models.sam.model.decode`, so DDP can wrap the decoder step."""
    import torch.nn as nn

    class Decoder(nn.Module):
        def __init__(self, sam) -> None:
            super().__init__()
            self.sam = sam

        def forward(self, embedding, boxes_input):
            return decode(self.sam, embedding, boxes_input)

    return Decoder


def train_step_module(sam, device: str, *, train: tuple[str, ...] = ("mask_decoder",)):
    """The module one training step calls: ``DDP(Decoder(sam))`` under ``torchrun``, else ``Decoder(sam)``.

    With a training prompt encoder its point/mask embeddings get no gradient from box prompts, so DDP
    is told to look for unused parameters."""
    from pipeline.core import distributed as D

    return D.wrap_ddp(_decoder_module()(sam), device, find_unused_parameters="prompt_encoder" in train)


def steps_per_epoch(n_images: int, cfg: SamTrainConfig) -> int:
    return math.ceil(n_images / cfg.images_per_step)


def train_one_epoch(
    sam,
    groups,
    embedder,
    optimizer,
    scheduler,
    cfg: SamTrainConfig,
    gen,
    *,
    advance=None,
    step_module=None,
    timing: dict | None = None,
) -> dict:
    """One pass over the training images: one optimizer step per ``cfg.images_per_step`` images
    (all components of each image against its embedding; step loss = mean of the image losses).

    Distributed (``step_module`` wrapped in DDP): every rank draws the same order, box subsets and
    jitter from ``gen`` for every image of a step, computes only its share
    (:func:`pipeline.core.distributed.rank_slice`) and weights each image loss by ``world / n_step`` so
    DDP's gradient average is the step mean; a rank without images joins with a zero-weighted
    pass. Gradients of a rank's images accumulate under ``no_sync`` until its last one.

    ``advance`` (optional, from :func:`pipeline.core.console.progress`) is called with the number of
    images of each step.

    Returns:
        Mean ``loss``, ``pixel``, ``dice``, ``iou_mse``, ``iou`` over images (all ranks); ``seconds``;
        ``encoder_calls`` and ``cache_hits`` during the epoch (this rank). ``timing`` (optional dict)
        receives ``data_s`` (embeddings, targets) and ``compute_s`` (forward/backward/step).
    """
    import contextlib

    import torch

    from pipeline.core import distributed as D

    step_module = step_module if step_module is not None else _decoder_module()(sam)
    world = D.info().world_size
    t0, calls0, hits0 = time.perf_counter(), embedder.encoder_calls, embedder.cache_hits
    order = torch.randperm(len(groups), generator=gen).tolist()
    sums: dict[str, float] = {}
    n_img = 0
    data_s = compute_s = 0.0
    per = cfg.images_per_step
    for s0 in range(0, len(order), per):
        step = order[s0 : s0 + per]
        draws = [_step_tensors(sam, groups[i], cfg, gen, train=True) for i in step]  # same draws on every rank
        mine = list(range(len(step)))[D.rank_slice(len(step))]
        weight = world / len(step)  # per image: DDP averages over ranks, the step is the mean over images
        jobs = [(j, weight) for j in mine] or [(0, 0.0)]  # idle rank: zero-weighted pass keeps DDP in step
        optimizer.zero_grad(set_to_none=True)
        for k, (j, w) in enumerate(jobs):
            ta = time.perf_counter()
            g = groups[step[j]]
            emb = _embedding(sam, embedder, g, cfg)
            boxes, idx = draws[j]
            dev = emb.device
            if dev.type == "cuda":
                torch.cuda.synchronize()
            tb = time.perf_counter()
            last = k == len(jobs) - 1
            sync = contextlib.nullcontext() if last or not hasattr(step_module, "no_sync") else step_module.no_sync()
            with sync:
                with D.autocast(str(dev), cfg.amp):
                    low, iou_pred = step_module(emb, boxes.to(dev))
                loss, parts = step_loss(sam, low.float(), iou_pred.float(), g, idx, cfg)
                (loss * w).backward()
            if w > 0:
                n_img += 1
                for key, v in {"loss": loss, **parts}.items():
                    sums[key] = sums.get(key, 0.0) + float(v.detach())
            if dev.type == "cuda":
                torch.cuda.synchronize()
            data_s += tb - ta
            compute_s += time.perf_counter() - tb
        tc = time.perf_counter()
        optimizer.step()
        scheduler.step()
        compute_s += time.perf_counter() - tc
        if advance is not None:
            advance(len(step))
    keys = ["loss", "pixel", "dice", "iou_mse", "iou"]
    red = D.all_reduce_sums({**{k: sums.get(k, 0.0) for k in keys}, "n": float(n_img)})
    out = {k: red[k] / max(red["n"], 1) for k in keys}
    out.update(
        seconds=D.all_reduce_max(time.perf_counter() - t0),
        encoder_calls=embedder.encoder_calls - calls0,
        cache_hits=embedder.cache_hits - hits0,
    )
    if timing is not None:
        timing["data_s"] = timing.get("data_s", 0.0) + data_s
        timing["compute_s"] = timing.get("compute_s", 0.0) + compute_s
    return out


def evaluate_groups(sam, groups, embedder, cfg: SamTrainConfig) -> dict:
    """Validation: true boxes, no jitter; loss (at ``cfg.loss_resolution``) and per-component IoU/Dice of
    ``logits > 0`` at the original size (as predictions).

    Returns:
        ``{"loss", "mIoU", "mDice", "n"}`` (means over components).
    """
    import torch

    from pipeline.core import distributed as D

    was = {m: getattr(sam, m).training for m in TRAINABLE}
    sam.eval()
    ious, dices, losses = [], [], []
    with torch.no_grad():
        for gi in D.shard_indices(len(groups)):  # under DDP each rank takes a strided shard
            g = groups[gi]
            emb = embedder(g.image)
            boxes, idx = _step_tensors(sam, g, cfg, None, train=False)
            low, iou_pred = decode(sam, emb, boxes.to(emb.device))
            loss, _ = step_loss(sam, low, iou_pred, g, idx, cfg)
            losses.append(float(loss))
            logits = logits_to_native(sam, low, size_hw=g.size_hw)
            true = native_true(g, idx).to(logits.device)
            p, t = (logits > 0).flatten(1).float(), true.flatten(1)
            inter, ps, ts = (p * t).sum(1), p.sum(1), t.sum(1)
            ious += (inter / (ps + ts - inter).clamp(min=1)).tolist()
            dices += (2 * inter / (ps + ts).clamp(min=1)).tolist()
    for m, on in was.items():
        getattr(sam, m).train(on)
    if D.info().world_size > 1:
        parts = D.all_gather_objects((losses, ious, dices))
        losses, ious, dices = ([v for part in parts for v in part[k]] for k in range(3))
    return {"loss": _mean(losses), "mIoU": _mean(ious), "mDice": _mean(dices), "n": len(ious)}


def _mean(values: list[float]) -> float:
    """Mean, or NaN for no values (written as null in metrics.json)."""
    return float(np.mean(values)) if values else float("nan")


def prepare(cfg: SamTrainConfig):
    """Validate records, build the model and optimizer: everything that can fail on bad input.

    Returns:
        ``(sam, train_groups, val_groups, params)``.

    Raises:
        PipelineError: bad records (missing image, box outside image, empty mask), empty splits,
            checkpoint missing or not matching ``model_type``, a ``device`` that is not there.
    """
    import torch

    from pipeline.core.device import resolve_device

    cfg.check()
    train = group_by_image(read_records(Path(cfg.train_records)))
    val = group_by_image(read_records(Path(cfg.val_records)))
    if not train:
        raise PipelineError(f"{cfg.train_records}: no records (expected one line per defect component)")
    if not val:
        raise PipelineError(f"{cfg.val_records}: no records (the val split needs defect images to validate on)")
    base = resolve_base_checkpoint(cfg.model_type, cfg.checkpoint, allow_download=cfg.allow_download)
    torch.manual_seed(cfg.seed)
    sam = build_sam(cfg.model_type, checkpoint=base, tiny_seed=cfg.tiny_seed, device=resolve_device(cfg.device))
    params = _set_trainable(sam, cfg.train)
    return sam, train, val, params


def _optimizer(cfg: SamTrainConfig, params, n_train_images: int):
    """AdamW and a per-step cosine schedule from ``lr`` to ``lr * min_lr_ratio`` over the whole run."""
    import torch

    steps = cfg.epochs * steps_per_epoch(n_train_images, cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def factor(s: int) -> float:
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def _restore(state: dict, sam, optimizer, scheduler, gen) -> tuple[list[dict], dict, int]:
    """Load ``last.pt``'s trained modules, optimizer, scheduler, generator (data order, box subsets, jitter)
    and global RNG states; ``(history, best, next epoch)``."""
    import torch

    from pipeline.core import distributed as D

    for name, sd in state["state"].items():
        getattr(sam, name).load_state_dict(sd, strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    if "rng" in state:  # python, numpy, torch and CUDA states as they were after that epoch
        D.set_rng_states(state["rng"])
    else:  # a last.pt written before the global states were kept: torch's CPU state only
        torch.set_rng_state(state["torch_rng"])
    return list(state["history"]), dict(state["best"]), int(state["epoch"]) + 1


def _fill_cache(embedder, groups, *, enabled: bool, stop) -> None:
    """Compute every image's embedding once (each rank its shard), so that epochs do no encoder work.

    Raises:
        Interrupted: after Ctrl-C (``stop`` set), once the image being embedded is cached; the run
            has no checkpoint yet (not resumable), the cached embeddings stay for the next run.
    """
    from pipeline.core import distributed as D
    from pipeline.core.console import Interrupted
    from pipeline.core.console import progress as progress_bar

    mine = D.shard_indices(len(groups))
    done = 0
    with progress_bar("embeddings", len(mine), enabled=enabled) as advance:
        for i in mine:
            if stop:
                break
            embedder(groups[i].image)
            advance()
            done += 1
    if D.all_reduce_max(float(bool(stop))) > 0:
        n = int(D.all_reduce_sums({"n": float(done)})["n"])
        raise Interrupted(f"{n} of {len(groups)} image embeddings in {embedder.cache_dir}", resumable=False)
    D.barrier()


def _save_epoch(
    run,
    sam,
    cfg: SamTrainConfig,
    *,
    epoch: int,
    row: dict,
    improved: bool,
    optimizer,
    scheduler,
    gen,
    history: list[dict],
    best: dict,
) -> None:
    """Rank 0: ``best.pt`` when val mIoU improved, and ``last.pt`` with everything ``resume`` needs."""
    from pipeline.core import distributed as D

    config, trained = cfg.as_dict(), list(cfg.train)
    if improved:
        save_finetuned(run / "best.pt", sam=sam, config=config, trained=trained, extra={"epoch": epoch, "metrics": row})
    save_finetuned(
        run / "last.pt",
        sam=sam,
        config=config,
        trained=trained,
        extra={
            "epoch": epoch,
            "metrics": row,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": gen.get_state(),
            "rng": D.rng_states(),
            "history": history,
            "best": best,
        },
    )
    run.save_manifest()  # a run killed later still knows which files are its own


def _epoch_line(epoch: int, cfg: SamTrainConfig, tr: dict, va: dict) -> str:
    return (
        f"epoch {epoch}/{cfg.epochs} train loss {tr['loss']:.4f} iou {tr['iou']:.4f} "
        f"| val loss {va['loss']:.4f} mIoU {va['mIoU']:.4f} mDice {va['mDice']:.4f} "
        f"| {tr['seconds']:.1f}s, encoder calls {tr['encoder_calls']}"
    )


def _run_epochs(
    run,
    sam,
    train,
    val,
    embedder,
    optimizer,
    scheduler,
    cfg: SamTrainConfig,
    gen,
    *,
    start: int,
    history: list[dict],
    best: dict,
    show: bool,
    echo: bool,
    stop,
) -> dict:
    """Epochs ``start..cfg.epochs``: train, validate, and on rank 0 checkpoint and log each one.

    Appends one row per epoch to ``history``; returns the best ``{"mIoU", "epoch"}`` so far.

    Raises:
        Interrupted: after Ctrl-C (``stop``, a :class:`pipeline.core.console.StopFlag`, set), once the
            current epoch is checkpointed (``last.pt``, resumable); a Ctrl-C in the last epoch lets
            the run finish.
    """
    from pipeline.core import distributed as D
    from pipeline.core.console import Interrupted
    from pipeline.core.console import progress as progress_bar

    step_module = train_step_module(sam, str(sam.device), train=cfg.train)
    for epoch in range(start, cfg.epochs + 1):
        with progress_bar(f"epoch {epoch}/{cfg.epochs}", len(train), enabled=show) as advance:
            tr = train_one_epoch(
                sam, train, embedder, optimizer, scheduler, cfg, gen, advance=advance, step_module=step_module
            )
        va = evaluate_groups(sam, val, embedder, cfg)
        row = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v for k, v in tr.items()},
            **{f"val_{k}": v for k, v in va.items()},
        }
        history.append(row)
        improved = va["mIoU"] > best["mIoU"]
        if improved:
            best = {"mIoU": va["mIoU"], "epoch": epoch}
        with D.main_only() as main:  # rank 0 writes; the others wait for the files
            if main:
                _save_epoch(
                    run,
                    sam,
                    cfg,
                    epoch=epoch,
                    row=row,
                    improved=improved,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    gen=gen,
                    history=history,
                    best=best,
                )
                run.log(_epoch_line(epoch, cfg, tr, va), echo=echo)
        # every rank stops at the same epoch, whichever of them saw the Ctrl-C
        if D.all_reduce_max(float(bool(stop))) > 0 and epoch < cfg.epochs:
            raise Interrupted(f"{run / 'last.pt'} (epoch {epoch} of {cfg.epochs})", resumable=True)
    return best


def _summary(history: list[dict], best: dict, embedder, train, val, *, seconds: float) -> dict:
    """The run's ``metrics.json`` content, without the world size."""
    return {
        "best_epoch": best["epoch"],
        "best_val_mIoU": best["mIoU"],
        "last": history[-1] if history else None,
        "history": history,
        "embedding_cache": str(embedder.cache_dir) if embedder.cache_dir else None,
        "encoder_calls": embedder.encoder_calls,
        "cache_hits": embedder.cache_hits,
        "seconds": seconds,
        "n_train_images": len(train),
        "n_val_images": len(val),
        "n_train_components": sum(len(g.records) for g in train),
        "n_val_components": sum(len(g.records) for g in val),
    }


def finetune_sam(
    cfg: SamTrainConfig | None, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True
) -> Path:
    """Fine-tune SAM and write a run folder.

    Run folder ``out`` (:class:`pipeline.core.runs.RunDir`, kind ``sam``): ``config.yaml`` (resolved
    config), ``best.pt`` (best val mIoU) and ``last.pt`` (trained modules + config; ``last.pt`` also
    optimizer, scheduler, RNG and history for ``resume``), ``metrics.json``, ``curves.png``,
    ``log.txt``. Bad input fails before ``out`` is created. ``resume`` continues ``out/last.pt``
    with the config stored there (``cfg`` is ignored).

    Under ``torchrun`` (``pipeline.core.distributed``): DDP over the trained modules, NCCL on CUDA / gloo
    on CPU, the embedding cache filled by all ranks in shards, the images of each step split over
    ranks (see :func:`train_one_epoch`), validation sharded and gathered, rank 0 alone writes.

    Raises:
        PipelineError: see :func:`prepare`; ``out`` not empty without ``force``/``resume``; ``resume``
            without ``out/last.pt``.
        Interrupted: Ctrl-C, after the epoch it came in was checkpointed (see :func:`_run_epochs`); a
            second Ctrl-C raises ``KeyboardInterrupt``, and a run without ``last.pt`` is then removed.
    """
    import contextlib

    import torch

    from pipeline.core import distributed as D
    from pipeline.core.console import stop_on_interrupt
    from pipeline.core.device import resolve_device
    from pipeline.core.runs import RunDir

    run = RunDir.open(out, kind="sam", force=force, resume=resume, resume_file="last.pt")
    state = None
    if resume:
        state = read_finetuned(run / "last.pt")
        cfg = SamTrainConfig.from_dict(state["config"])
    dist = D.init_from_env(resolve_device(cfg.device))
    sam, train, val, params = prepare(cfg)
    optimizer, scheduler = _optimizer(cfg, params, len(train))
    gen = torch.Generator().manual_seed(cfg.seed)
    history, best, start = [], {"mIoU": -1.0, "epoch": 0}, 1
    if state is not None:
        history, best, start = _restore(state, sam, optimizer, scheduler, gen)
    main = D.is_main()
    show = progress and main
    D.barrier()  # every rank validated its inputs before rank 0 replaces anything
    with stop_on_interrupt("this epoch") as stop, run if main else contextlib.nullcontext():
        if main:
            run.write_config({**cfg.as_dict(), "world_size": dist.world_size})
        D.barrier()
        # A training image encoder changes every step: its embeddings cannot be cached.
        cached = cfg.use_cache and "image_encoder" not in cfg.train
        cache = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) if cached else None
        embedder = Embedder(sam, cache_dir=cache)
        t_run = time.perf_counter()
        if cache is not None:
            _fill_cache(embedder, train + val, enabled=show, stop=stop)
        best = _run_epochs(
            run,
            sam,
            train,
            val,
            embedder,
            optimizer,
            scheduler,
            cfg,
            gen,
            start=start,
            history=history,
            best=best,
            show=show,
            echo=progress,
            stop=stop,
        )
        if not main:
            D.barrier()
            return Path(out)
        seconds = time.perf_counter() - t_run
        metrics = _summary(history, best, embedder, train, val, seconds=seconds)
        run.write_metrics({**metrics, "world_size": dist.world_size})
        plot_curves(history, run / "curves.png")
    D.barrier()
    return Path(out)


def plot_curves(history: list[dict], path: Path) -> None:
    """Train/val loss and val mIoU per epoch (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=110)
    a.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(ep, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(ep, [h["val_mIoU"] for h in history], "o-", label="val mIoU")
    b.plot(ep, [h["val_mDice"] for h in history], "o-", label="val mDice")
    b.set(xlabel="epoch", ylim=(0, 1), title="validation masks (native res.)")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)
