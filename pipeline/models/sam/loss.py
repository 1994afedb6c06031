"""The fine-tuning loss of SAM's mask decoder: ``pixel_weight * focal (or BCE) + dice_weight * Dice +
iou_weight * MSE(iou_pred, real IoU)`` at ``loss_resolution`` (see :mod:`pipeline.models.sam.train`)."""

from __future__ import annotations

import numpy as np

from pipeline.models.sam.config import SamTrainConfig
from pipeline.models.sam.model import logits_to_native, lowres_target


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


def native_true(group, idx: list[int]):
    """``Kx1xHxW`` float32 true masks (0/1) of components ``idx`` of ``group`` at the original size."""
    import torch

    masks = group.true_masks()
    return torch.from_numpy(np.stack([masks[i] for i in idx])[:, None].astype(np.float32))


def step_loss(sam, low, iou_pred, group, idx: list[int], cfg: SamTrainConfig) -> tuple:
    """Weighted total loss and its parts at ``cfg.loss_resolution``."""
    import torch

    if cfg.loss_resolution == "native":
        logits, true, weight = logits_to_native(sam, low, size_hw=group.size_hw), native_true(group, idx), None
    else:
        if "lowres" not in group.extra:  # once per image: targets in the decoder frame
            pairs = [lowres_target(m, img_size=sam.image_encoder.img_size) for m in group.true_masks()]
            group.extra["lowres"] = (
                torch.from_numpy(np.stack([t for t, _ in pairs])[:, None]),
                torch.from_numpy(pairs[0][1])[None, None],
            )
        targets, valid = group.extra["lowres"]
        logits, true, weight = low, targets[idx], valid
    parts = mask_losses(logits, true.to(logits.device), iou_pred, mask_loss=cfg.mask_loss, weight=weight)
    loss = cfg.pixel_weight * parts["pixel"] + cfg.dice_weight * parts["dice"] + cfg.iou_weight * parts["iou_mse"]
    return loss, parts
