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

Validation IoU/Dice are always measured at the original resolution, as predictions are.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_savefig, atomic_write_json, atomic_write_text, check_can_write

TRAINABLE = ("mask_decoder", "prompt_encoder", "image_encoder")


@dataclass(frozen=True)
class SamTrainConfig:
    """Everything that defines a SAM fine-tuning run (written as the run's ``config.yaml``).

    Attributes:
        train_records, val_records: SAM JSON Lines (``annotations/<cat>/sam/{train,val}.jsonl``).
        model_type: ``tiny`` (random init, tests/smoke runs) or ``vit_b|vit_l|vit_h``.
        checkpoint: full SAM checkpoint (name resolved by ``pipeline.core.weights`` or a path); required for vit_*.
        tiny_seed: seed of the model's random init (defines the tiny model's frozen parts).
        train: modules that train; ``mask_decoder`` by default (``prompt_encoder``, ``image_encoder`` optional;
            training the image encoder disables the embedding cache).
        epochs, lr, weight_decay: AdamW with a per-step cosine schedule from ``lr`` to ``lr * min_lr_ratio``.
        box_jitter_px: each box coordinate moves by a uniform random ``[-j, j]`` original pixels (0: off).
        mask_loss: ``focal`` (alpha 0.25, gamma 2) or ``bce``; weights ``mask_loss_weight`` (default 20
            for focal, 1 for bce), ``dice_weight``, ``iou_weight``.
        loss_resolution: ``lowres`` (decoder frame, soft area-pooled target) or ``native`` (original pixels).
        max_boxes: at most this many components of one image per step (a random subset beyond).
        cache_dir: embedding cache folder (``None``: :func:`pipeline.models.sam.predict.default_cache_dir`).
        use_cache: ``False`` recomputes every embedding every epoch (benchmark baseline only).
        images_per_step: images per optimizer step (the global batch; default 1 = one step per image).
            The step loss is the mean of the per-image losses. Under ``torchrun`` the images of a step are
            split over the ranks, so a run gives the same result for any world size that keeps this value
            (use a multiple of the number of processes, or some ranks idle on part of every step).
        amp: bf16 autocast for the decoder on CUDA (ignored on CPU).
    """

    train_records: str
    val_records: str
    model_type: str = "tiny"
    checkpoint: str | None = None
    tiny_seed: int = 0
    train: tuple[str, ...] = ("mask_decoder",)
    epochs: int = 10
    lr: float = 1e-4
    weight_decay: float = 1e-4
    min_lr_ratio: float = 0.01
    seed: int = 0
    box_jitter_px: float = 0.0
    mask_loss: str = "focal"
    mask_loss_weight: float | None = None
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    max_boxes: int = 32
    loss_resolution: str = "lowres"
    cache_dir: str | None = None
    use_cache: bool = True
    device: str | None = None
    allow_download: bool = False
    images_per_step: int = 1
    amp: bool = True

    def check(self) -> None:
        """Raise :class:`PipelineError` for values out of range."""
        from pipeline.models.sam.model import MODEL_TYPES

        if self.model_type not in MODEL_TYPES:
            raise PipelineError(f"--model-type {self.model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
        bad = sorted(set(self.train) - set(TRAINABLE))
        if bad or not self.train:
            raise PipelineError(f"train modules {list(self.train)}: expected a non-empty subset of {', '.join(TRAINABLE)}")
        if self.loss_resolution not in ("lowres", "native"):
            raise PipelineError(f"--loss-resolution {self.loss_resolution!r}: expected lowres or native")
        if self.mask_loss not in ("focal", "bce"):
            raise PipelineError(f"--mask-loss {self.mask_loss!r}: expected focal or bce")
        if self.epochs < 1 or self.lr <= 0 or self.max_boxes < 1 or self.box_jitter_px < 0:
            raise PipelineError("epochs, lr, max_boxes must be positive and box_jitter_px >= 0")
        if self.images_per_step < 1:
            raise PipelineError(f"--images-per-step {self.images_per_step}: expected at least 1")

    @property
    def pixel_weight(self) -> float:
        if self.mask_loss_weight is not None:
            return self.mask_loss_weight
        return 20.0 if self.mask_loss == "focal" else 1.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = list(self.train)
        return d


# ----------------------------------------------------------------------------- loss


def mask_losses(logits, true, iou_pred, *, mask_loss: str = "focal", weight=None) -> dict:
    """Per-batch mask losses.

    Args:
        logits: ``Bx1xHxW`` mask logits at the loss resolution.
        true: ``Bx1xHxW`` float true masks in [0, 1] (soft at low resolution), same frame.
        iou_pred: ``Bx1`` IoU head output.
        mask_loss: ``focal`` (Lin et al. 2017; alpha 0.25, gamma 2) or ``bce``, mean over pixels.
        weight: optional ``1x1xHxW`` per-pixel weight in [0, 1] (0 on padding); ``None`` = all 1.

    Returns:
        ``{"pixel", "dice", "iou_mse", "iou"}`` scalar tensors; ``iou`` is the real IoU of
        ``logits > 0`` with ``true >= 0.5`` (mean, no gradient), the target of the IoU head.
    """
    import torch
    import torch.nn.functional as F
    from torchvision.ops import sigmoid_focal_loss

    w = torch.ones_like(true) if weight is None else weight.to(true).expand_as(true)
    if mask_loss == "focal":
        pix = sigmoid_focal_loss(logits, true, alpha=0.25, gamma=2.0, reduction="none")
    else:
        pix = F.binary_cross_entropy_with_logits(logits, true, reduction="none")
    norm = w.flatten(1).sum(1).clamp(min=1e-6)
    pixel = ((pix * w).flatten(1).sum(1) / norm).mean()
    p = (torch.sigmoid(logits) * w).flatten(1)
    t = (true * w).flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    with torch.no_grad():
        hard = ((logits > 0) & (w > 0)).flatten(1).float()
        th = ((true >= 0.5) & (w > 0)).flatten(1).float()
        inter = (hard * th).sum(1)
        union = hard.sum(1) + th.sum(1) - inter
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    iou_mse = F.mse_loss(iou_pred[:, 0].float(), iou)
    return {"pixel": pixel, "dice": dice.mean(), "iou_mse": iou_mse, "iou": iou.mean()}


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
            use = on and not (name == "mask_decoder" and k.startswith("output_hypernetworks_mlps.") and not k.startswith("output_hypernetworks_mlps.0."))
            p.requires_grad_(use)
            if use:
                params.append(p)
    return params


def _embedding(sam, embedder, group, cfg: SamTrainConfig):
    if "image_encoder" in cfg.train:  # encoder trains: no cache, forward with gradients
        from pipeline.models.sam.model import image_to_input, read_rgb

        embedder.encoder_calls += 1
        return sam.image_encoder(image_to_input(sam, read_rgb(group.image)))
    return embedder(group.image)


def _step_tensors(sam, group, cfg: SamTrainConfig, gen, *, train: bool):
    """Boxes (input frame) for one image, with subset and jitter when training; indices used."""
    import torch

    from pipeline.models.sam.model import boxes_to_input

    idx = torch.arange(len(group.records))
    if train and len(idx) > cfg.max_boxes:
        idx = torch.randperm(len(idx), generator=gen)[: cfg.max_boxes].sort().values
    boxes = torch.as_tensor(group.bbox_xyxy())[idx]
    h, w = group.size_hw
    if train and cfg.box_jitter_px > 0:
        boxes = boxes + (torch.rand(boxes.shape, generator=gen) * 2 - 1) * cfg.box_jitter_px
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([w, h, w, h], dtype=boxes.dtype))
    return boxes_to_input(boxes, size_hw=group.size_hw, img_size=sam.image_encoder.img_size), idx.tolist()


def _native_true(group, idx: list[int]):
    import torch

    masks = group.true_masks()
    return torch.from_numpy(np.stack([masks[i] for i in idx])[:, None].astype(np.float32))


def _loss(sam, low, iou_pred, group, idx: list[int], cfg: SamTrainConfig) -> tuple:
    """Weighted total loss and its parts at ``cfg.loss_resolution``."""
    import torch

    from pipeline.models.sam.model import logits_to_native, lowres_target

    if cfg.loss_resolution == "native":
        logits, true, weight = logits_to_native(sam, low, size_hw=group.size_hw), _native_true(group, idx), None
    else:
        if "lowres" not in group.extra:  # once per image: targets in the decoder frame
            pairs = [lowres_target(m, img_size=sam.image_encoder.img_size) for m in group.true_masks()]
            group.extra["lowres"] = (torch.from_numpy(np.stack([t for t, _ in pairs])[:, None]),
                                     torch.from_numpy(pairs[0][1])[None, None])
        targets, valid = group.extra["lowres"]
        logits, true, weight = low, targets[idx], valid
    parts = mask_losses(logits, true.to(logits.device), iou_pred, mask_loss=cfg.mask_loss, weight=weight)
    loss = cfg.pixel_weight * parts["pixel"] + cfg.dice_weight * parts["dice"] + cfg.iou_weight * parts["iou_mse"]
    return loss, parts


def _decoder_module():
    """``nn.Module`` whose forward is :func:`pipeline.models.sam.model.decode`, so DDP can wrap the decoder step."""
    import torch.nn as nn

    from pipeline.models.sam.model import decode

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


def train_one_epoch(sam, groups, embedder, optimizer, scheduler, cfg: SamTrainConfig, gen, *, bar=None, step_module=None,
                    timing: dict | None = None) -> dict:
    """One pass over the training images: one optimizer step per ``cfg.images_per_step`` images
    (all components of each image against its embedding; step loss = mean of the image losses).

    Distributed (``step_module`` wrapped in DDP): every rank draws the same order, box subsets and
    jitter from ``gen`` for every image of a step, computes only its share
    (:func:`pipeline.core.distributed.rank_slice`) and weights each image loss by ``world / n_step`` so
    DDP's gradient average is the step mean; a rank without images joins with a zero-weighted
    pass. Gradients of a rank's images accumulate under ``no_sync`` until its last one.

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
    task = bar.add_task("train", total=len(order)) if bar is not None else None
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
                loss, parts = _loss(sam, low.float(), iou_pred.float(), g, idx, cfg)
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
        if bar is not None:
            bar.update(task, advance=len(step), description=f"train loss {sums.get('loss', 0.0) / max(n_img, 1):.4f}")
    if bar is not None:
        bar.remove_task(task)
    keys = ["loss", "pixel", "dice", "iou_mse", "iou"]
    red = D.all_reduce_sums({**{k: sums.get(k, 0.0) for k in keys}, "n": float(n_img)})
    out = {k: red[k] / max(red["n"], 1) for k in keys}
    out.update(seconds=D.all_reduce_max(time.perf_counter() - t0), encoder_calls=embedder.encoder_calls - calls0,
               cache_hits=embedder.cache_hits - hits0)
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
    from pipeline.models.sam.model import decode, logits_to_native

    was = {m: getattr(sam, m).training for m in TRAINABLE}
    sam.eval()
    ious, dices, losses = [], [], []
    with torch.no_grad():
        for gi in D.shard_indices(len(groups)):  # under DDP each rank takes a strided shard
            g = groups[gi]
            emb = embedder(g.image)
            boxes, idx = _step_tensors(sam, g, cfg, None, train=False)
            low, iou_pred = decode(sam, emb, boxes.to(emb.device))
            loss, _ = _loss(sam, low, iou_pred, g, idx, cfg)
            losses.append(float(loss))
            logits = logits_to_native(sam, low, size_hw=g.size_hw)
            true = _native_true(g, idx).to(logits.device)
            p, t = (logits > 0).flatten(1).float(), true.flatten(1)
            inter, ps, ts = (p * t).sum(1), p.sum(1), t.sum(1)
            ious += (inter / (ps + ts - inter).clamp(min=1)).tolist()
            dices += (2 * inter / (ps + ts).clamp(min=1)).tolist()
    for m, on in was.items():
        getattr(sam, m).train(on)
    if D.info().world_size > 1:
        parts = D.all_gather_objects((losses, ious, dices))
        losses, ious, dices = ([v for part in parts for v in part[k]] for k in range(3))
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "mIoU": float(np.mean(ious)) if ious else float("nan"),
            "mDice": float(np.mean(dices)) if dices else float("nan"), "n": len(ious)}


def prepare(cfg: SamTrainConfig):
    """Validate records, build the model and optimizer: everything that can fail on bad input.

    Returns:
        ``(sam, train_groups, val_groups, params)``.

    Raises:
        PipelineError: bad records (missing image, box outside image, empty mask), empty splits,
            checkpoint missing or not matching ``model_type``.
    """
    import torch

    from pipeline.core import distributed as D
    from pipeline.models.sam.model import build_sam, default_device
    from pipeline.models.sam.predict import group_by_image, read_records, resolve_base_checkpoint

    cfg.check()
    train = group_by_image(read_records(Path(cfg.train_records)))
    val = group_by_image(read_records(Path(cfg.val_records)))
    if not train:
        raise PipelineError(f"{cfg.train_records}: no records (expected one line per defect component)")
    if not val:
        raise PipelineError(f"{cfg.val_records}: no records (the val split needs defect images to validate on)")
    base = resolve_base_checkpoint(cfg.model_type, cfg.checkpoint, allow_download=cfg.allow_download)
    torch.manual_seed(cfg.seed)
    sam = build_sam(cfg.model_type, checkpoint=base, tiny_seed=cfg.tiny_seed, device=D.local_device(cfg.device or default_device()))
    params = _set_trainable(sam, cfg.train)
    return sam, train, val, params


def finetune_sam(cfg: SamTrainConfig, out: Path, *, resume: bool = False, force: bool = False, progress: bool = True) -> Path:
    """Fine-tune SAM and write a run folder.

    Run folder ``out``: ``config.yaml`` (resolved config), ``best.pt`` (best val mIoU) and ``last.pt``
    (trained modules + config; ``last.pt`` also optimizer, scheduler, RNG and history for
    ``resume``), ``metrics.json``, ``curves.png``, ``log.txt``. Bad input fails before ``out`` is
    created. ``resume`` continues ``out/last.pt`` with the config stored there (``cfg`` is ignored).

    Under ``torchrun`` (``pipeline.core.distributed``): DDP over the trained modules, NCCL on CUDA / gloo
    on CPU, the embedding cache filled by all ranks in shards, the images of each step split over
    ranks (see :func:`train_one_epoch`), validation sharded and gathered, rank 0 alone writes.

    Raises:
        PipelineError: see :func:`prepare`; ``out`` exists without ``force``/``resume``.
    """
    import shutil

    import torch
    import yaml

    from pipeline.core import distributed as D
    from pipeline.models.sam.model import Embedder, default_device
    from pipeline.models.sam.predict import default_cache_dir, read_finetuned, save_finetuned

    out = Path(out)
    state = None
    if resume:
        state = read_finetuned(out / "last.pt")
        c = dict(state["config"])
        c["train"] = tuple(c["train"])
        cfg = SamTrainConfig(**c)
    else:
        check_can_write(out, force=force)
    dist = D.init_from_env(cfg.device or default_device())
    sam, train, val, params = prepare(cfg)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * steps_per_epoch(len(train), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    best = {"mIoU": -1.0, "epoch": 0}
    start = 1
    if state is not None:
        for name, sd in state["state"].items():
            getattr(sam, name).load_state_dict(sd, strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        best = dict(state["best"])
        start = int(state["epoch"]) + 1
    D.barrier()  # every rank validated its inputs before rank 0 replaces anything
    if D.is_main():
        if state is None and out.exists():
            shutil.rmtree(out)  # force: replace the old run
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", yaml.safe_dump({**cfg.as_dict(), "world_size": dist.world_size}, sort_keys=False))
    D.barrier()
    # A training image encoder changes every step: its embeddings cannot be cached.
    cached = cfg.use_cache and "image_encoder" not in cfg.train
    cache = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) if cached else None
    embedder = Embedder(sam, cache_dir=cache)
    config = cfg.as_dict()
    from pipeline.models.sam.predict import _progress

    t_run = time.perf_counter()
    step_module = train_step_module(sam, str(sam.device), train=cfg.train)
    with _progress(progress and D.is_main()) as bar:
        if cache is not None:
            everything = train + val
            mine = D.shard_indices(len(everything))  # each rank fills its shard of the cache
            task = bar.add_task("embeddings", total=len(mine))
            for i in mine:  # fill the cache once; epochs then do no encoder work
                embedder(everything[i].image)
                bar.advance(task)
            bar.remove_task(task)
            D.barrier()
        for epoch in range(start, cfg.epochs + 1):
            tr = train_one_epoch(sam, train, embedder, optimizer, scheduler, cfg, gen, bar=bar, step_module=step_module)
            va = evaluate_groups(sam, val, embedder, cfg)
            row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in tr.items()},
                   **{f"val_{k}": v for k, v in va.items()}}
            history.append(row)
            improved = va["mIoU"] > best["mIoU"]
            if improved:
                best = {"mIoU": va["mIoU"], "epoch": epoch}
            line = (f"epoch {epoch}/{cfg.epochs} train loss {tr['loss']:.4f} iou {tr['iou']:.4f} "
                    f"| val loss {va['loss']:.4f} mIoU {va['mIoU']:.4f} mDice {va['mDice']:.4f} "
                    f"| {tr['seconds']:.1f}s, encoder calls {tr['encoder_calls']}")
            with D.main_only() as main:  # rank 0 writes; the others wait for the files
                if main:
                    if improved:
                        save_finetuned(out / "best.pt", sam=sam, config=config, trained=list(cfg.train),
                                       extra={"epoch": epoch, "metrics": row})
                    save_finetuned(out / "last.pt", sam=sam, config=config, trained=list(cfg.train),
                                   extra={"epoch": epoch, "metrics": row, "optimizer": optimizer.state_dict(),
                                          "scheduler": scheduler.state_dict(), "generator": gen.get_state(),
                                          "torch_rng": torch.get_rng_state(), "history": history, "best": best})
                    with open(out / "log.txt", "a", encoding="utf-8") as fh:
                        fh.write(line + "\n")
                    if progress:
                        bar.console.print(line, soft_wrap=True, highlight=False)
    if not D.is_main():
        D.barrier()
        return out
    metrics = {"best_epoch": best["epoch"], "best_val_mIoU": best["mIoU"], "last": history[-1] if history else None,
               "history": history, "embedding_cache": str(cache) if cache else None,
               "encoder_calls": embedder.encoder_calls, "cache_hits": embedder.cache_hits,
               "seconds": time.perf_counter() - t_run, "n_train_images": len(train), "n_val_images": len(val),
               "n_train_components": sum(len(g.records) for g in train), "n_val_components": sum(len(g.records) for g in val)}
    metrics["world_size"] = dist.world_size
    atomic_write_json(out / "metrics.json", metrics)
    plot_curves(history, out / "curves.png")
    D.barrier()
    return out


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
