"""The pieces of one classifier epoch: optimizer, schedule, loss, batch order, the DDP loss scaling,
evaluation on the val set and the rule that picks the best epoch (used by :mod:`.train`).

Optimisation follows the published attempts: AdamW over the trainable parameters,
CosineAnnealingLR stepped per epoch, CrossEntropyLoss with label smoothing (class-balanced weights
with ``longtail.balance: reweight``, Cui et al., CVPR 2019).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipeline.core import distributed as D
from pipeline.data.mvtec import GOOD
from pipeline.models.classifier.config import ClassifierConfig
from pipeline.models.classifier.data import ImageSet
from pipeline.models.classifier.longtail import class_balanced_weights, sample_weights
from pipeline.models.classifier.model import GeM
from pipeline.models.classifier.predict import predict_probs

SELECT_KEY = {"balanced_accuracy": "val_balanced_accuracy", "accuracy": "val_accuracy", "loss": "val_loss"}


def make_optimizer(cfg: ClassifierConfig, model):
    """AdamW over the trainable parameters (``lr``, ``weight_decay`` from ``cfg.train``).

    GeM's exponent ``p`` goes in a second group without weight decay (decay would pull it towards 0,
    away from the learned pooling; Radenovic et al. train it without) and is clamped to
    ``GeM.P_MIN`` after every step (a post-step hook), so it stays a mean between average and max."""
    gems = [m for m in model.modules() if isinstance(m, GeM)]
    no_decay = {id(m.p) for m in gems}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in no_decay]
    groups = [{"params": params}]
    exps = [m.p for m in gems if m.p.requires_grad]
    if exps:
        groups.append({"params": exps, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if gems:
        opt.register_step_post_hook(lambda *_: [m.clamp_() for m in gems])
    return opt


def make_scheduler(cfg: ClassifierConfig, optimizer):
    """CosineAnnealingLR with ``T_max = epochs`` and ``eta_min`` from ``cfg.train`` (stepped per epoch)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs, eta_min=cfg.train.eta_min)


def make_loss(cfg: ClassifierConfig, class_counts: Sequence[int] | None = None, device: str = "cpu"):
    """CrossEntropyLoss(label_smoothing) with class-balanced weights when ``longtail.balance == reweight``.

    Raises:
        ValueError: ``reweight`` without ``class_counts``.
    """
    weight = None
    if cfg.longtail.balance == "reweight":
        if class_counts is None:
            raise ValueError("reweight needs class counts")
        weight = torch.tensor(
            class_balanced_weights(class_counts, cfg.longtail.cb_beta), dtype=torch.float32, device=device
        )
    return torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)


def batch_order(labels, cfg: ClassifierConfig, gen):
    """Sample indices for one epoch (``N`` int64): a permutation, or class-balanced draws with
    replacement when ``longtail.balance == resample``."""
    n = len(labels)
    if cfg.longtail.balance == "resample":
        counts = np.maximum(np.bincount(labels.numpy(), minlength=int(labels.max()) + 1), 1)
        w = sample_weights(labels.numpy(), class_balanced_weights(counts, cfg.longtail.cb_beta))
        return torch.multinomial(torch.tensor(w), n, replacement=True, generator=gen)
    return torch.randperm(n, generator=gen)


def loss_weight_sum(loss_fn, y) -> float:
    """What a mean-reduced (weighted) CrossEntropyLoss divides by for targets ``y``."""
    w = getattr(loss_fn, "weight", None)
    return float(len(y)) if w is None else float(w[y].sum())


def rank_loss_scale(loss_fn, y, n_local: int, n_global: int, world: int) -> float:
    """Factor on this rank's mean loss so that DDP's average over ranks is the global-batch mean."""
    if world <= 1:
        return 1.0
    if getattr(loss_fn, "weight", None) is None:
        return D.ddp_loss_scale(n_local, n_global)
    # class-weighted mean: the shares are sums of weights, known only after a reduction
    local_w = loss_weight_sum(loss_fn, y)
    return world * local_w / max(D.all_reduce_sums({"w": local_w})["w"], 1e-12)


def skips_batch(n_global: int, world: int, *, has_bn1d: bool, trains_bn: bool) -> bool:
    """Every rank needs at least one image (two with training BatchNorm, which fails on one image
    with a 1x1 feature map); a head with BatchNorm1d needs two. DDP ranks skip together."""
    return (n_global < 2 and has_bn1d) or n_global < world or (world > 1 and trains_bn and n_global // world < 2)


def evaluate(model, data: ImageSet, cfg: ClassifierConfig, loss_fn, device: str, *, shard: bool = False) -> dict:
    """Loss and classification metrics of ``model`` on ``data`` (see ``pipeline.evaluation.classification``):
    ``val_loss`` (NLL of the softmax, no label smoothing), ``val_accuracy``, ``val_balanced_accuracy``,
    ``val_macro_f1``, ``val_recall`` (per class), ``val_auroc`` (good vs defect); None values when empty.

    ``shard``: score a shard per rank and gather (every rank must call; see :func:`predict_probs`)."""
    from pipeline.evaluation.classification import classification_metrics

    if len(data) == 0:
        return {"val_loss": None, "val_accuracy": None, "val_balanced_accuracy": None}
    probs = predict_probs(model, data, cfg, device, shard=shard)
    loss = float(torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), data.labels))
    pred = probs.argmax(1).numpy()
    names = data.classes
    m = classification_metrics(
        [names[i] for i in data.labels.numpy()],
        [names[i] for i in pred],
        probs[:, 0].numpy() if names[0] == GOOD else None,
        names,
    )
    return {
        "val_loss": loss,
        "val_accuracy": m["accuracy"],
        "val_balanced_accuracy": m["balanced_accuracy"],
        "val_macro_f1": m["macro_f1"],
        "val_recall": {c: v["recall"] for c, v in m["per_class"].items()},
        "val_auroc": m["auroc_good_vs_defect"],
    }


def selection_value(metric: str, tr: dict, ev: dict) -> float:
    """The value ``train.select_metric`` compares epochs by; without val images, the train loss
    (negated for the accuracies, so that a lower loss still wins), which keeps the last epoch."""
    value = ev.get(SELECT_KEY[metric])
    if value is None:
        value = -tr["train_loss"] if metric != "loss" else tr["train_loss"]
    return value


def is_better(value: float | None, best: float | None, metric: str) -> bool:
    """Whether ``value`` beats ``best`` (lower loss, higher accuracy); the first value always does."""
    if value is None:
        return best is None
    if best is None:
        return True
    return value < best if metric == "loss" else value > best
