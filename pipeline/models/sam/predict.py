"""SAM masks from boxes: load a (fine-tuned) model, predict one mask per box, write COCO results and overlays.

Segment Anything (Kirillov et al., ICCV 2023) turns a box into a mask. Here the boxes come from
a detector's COCO results or from the ground truth, the image embedding comes from a disk cache
(:class:`pipeline.models.sam.model.Embedder`) and the mask decoder is the official one or a fine-tuned one
(:mod:`pipeline.models.sam.train`). Masks are written as COCO RLE at the original image size.

Model code, checkpoints and geometry live in :mod:`pipeline.models.sam.model` (the only module
importing ``segment_anything``); the training loop in :mod:`pipeline.models.sam.train`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, read_image, read_json
from pipeline.data.instances import decode_rle, encode_rle
from pipeline.data.predictions import write_provenance
from pipeline.models.sam.model import (
    Embedder,
    boxes_to_input,
    build_sam,
    decode,
    default_cache_dir,
    load_state_strict,
    logits_to_native,
    read_finetuned,
    resolve_base_checkpoint,
)

PREDICTABLE_MODULES = ("mask_decoder", "prompt_encoder", "image_encoder")


def load_sam(
    *,
    weights: Path | None = None,
    model_type: str | None = None,
    checkpoint: str | None = None,
    tiny_seed: int | None = None,
    device: str | None = None,
    allow_download: bool = False,
):
    """Build SAM for prediction: zero-shot (``weights=None``) or with a fine-tuned checkpoint.

    Args:
        weights: a checkpoint from ``pipeline finetune sam`` (``best.pt``/``last.pt``); its config
            names the model type, base checkpoint and tiny seed.
        model_type: ``tiny|vit_b|vit_l|vit_h``; with ``weights`` it must agree with the checkpoint.
        checkpoint: full SAM checkpoint (name or path) overriding the one recorded in ``weights``.
        device: a ``--device`` spec (:func:`pipeline.core.device.resolve_device`; default CUDA when present).

    Returns:
        ``(sam, info)``: model in eval mode, and a dict saying what was loaded.

    Raises:
        PipelineError: type mismatch, missing files, keys or shapes not matching (strict).
    """
    from pipeline.core.device import resolve_device

    device = resolve_device(device)
    ckpt = None
    if weights is not None:
        ckpt = read_finetuned(weights)
        cfg = ckpt["config"]
        if model_type is not None and model_type != cfg["model_type"]:
            raise PipelineError(f"{weights}: trained with --model-type {cfg['model_type']}, not {model_type}")
        model_type = cfg["model_type"]
        checkpoint = checkpoint or cfg.get("checkpoint")
        tiny_seed = cfg.get("tiny_seed", 0) if tiny_seed is None else tiny_seed
    if model_type is None:
        raise PipelineError("give --model-type (zero-shot) or --weights (a fine-tuned checkpoint)")
    base = resolve_base_checkpoint(model_type, checkpoint, allow_download=allow_download)
    sam = build_sam(model_type, checkpoint=base, tiny_seed=tiny_seed or 0, device="cpu")
    if ckpt is not None:
        for name, state in ckpt["state"].items():
            if name not in PREDICTABLE_MODULES:
                raise PipelineError(f"{weights}: unknown module {name!r} in checkpoint")
            load_state_strict(getattr(sam, name), state, where=str(weights), what=f"{model_type} {name}")
    info = {
        "model_type": model_type,
        "checkpoint": str(base) if base else None,
        "tiny_seed": tiny_seed or 0,
        "weights": str(weights) if weights else None,
        "fine_tuned": sorted(ckpt["state"]) if ckpt else [],
    }
    return sam.to(device).eval(), info


# ----------------------------------------------------------------------------- prediction


def predict_group(sam, embedding, bbox_xyxy: np.ndarray, *, size_hw: tuple[int, int], max_batch: int = 64):
    """Masks for ``B`` boxes on one image.

    Args:
        embedding: ``1xCxgxg`` image embedding.
        bbox_xyxy: ``Bx4`` boxes, original pixels.
        size_hw: original ``(H, W)``.

    Returns:
        ``(masks BxHxW bool, iou_pred B float32)`` at native resolution.
    """
    import torch

    masks, ious = [], []
    with torch.no_grad():
        for s in range(0, len(bbox_xyxy), max_batch):
            boxes = boxes_to_input(bbox_xyxy[s : s + max_batch], size_hw=size_hw, img_size=sam.image_encoder.img_size)
            low, iou = decode(sam, embedding, boxes.to(embedding.device))
            masks.append((logits_to_native(sam, low, size_hw=size_hw)[:, 0] > 0).cpu().numpy())
            ious.append(iou[:, 0].float().cpu().numpy())
    h, w = size_hw
    if not masks:
        return np.zeros((0, h, w), bool), np.zeros((0,), np.float32)
    return np.concatenate(masks), np.concatenate(ious)


def _read_gt(gt: Path) -> tuple[dict, dict[int, tuple[Path, tuple[int, int]]]]:
    """COCO ground truth and ``{image_id: (image path, size_hw)}``; every image must exist."""
    gt_data = read_json(gt)
    if not isinstance(gt_data, dict) or not {"images", "annotations", "categories"} <= set(gt_data):
        raise PipelineError(f"{gt}: not COCO ground truth (expected images, annotations, categories)")
    root = Path(gt_data.get("info", {}).get("image_root", Path(gt).parent))
    images = {im["id"]: (root / im["file_name"], (int(im["height"]), int(im["width"]))) for im in gt_data["images"]}
    for img_id, (p, _) in images.items():
        if not p.is_file():
            raise PipelineError(f"{gt}: image {p} (id {img_id}) not found")
    return gt_data, images


def _prompts_from_gt(gt: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": None}
        for a in gt["annotations"]
    ]


def _prompts_from_results(path: Path, gt: dict, *, min_score: float) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list):
        raise PipelineError(f"{path}: expected a JSON list of COCO results (image_id, category_id, bbox, score)")
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    cats = {c["id"] for c in gt["categories"]}
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            raise PipelineError(f"{path}: result {i} lacks image_id/category_id/bbox/score")
        if r["image_id"] not in sizes:
            raise PipelineError(f"{path}: result {i} has image_id {r['image_id']} not in the ground truth")
        if r["category_id"] not in cats:
            raise PipelineError(f"{path}: result {i} has category_id {r['category_id']} not in {sorted(cats)}")
        if r["score"] < min_score:
            continue
        x, y, bw, bh = (float(v) for v in r["bbox"])
        h, w = sizes[r["image_id"]]
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
        if not (x1 > x0 and y1 > y0):
            raise PipelineError(f"{path}: result {i} bbox {r['bbox']} is empty or outside the {w}x{h} image")
        out.append(
            {
                "image_id": r["image_id"],
                "category_id": r["category_id"],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(r["score"]),
            }
        )
    return out


def _prompts_by_image(prompts: list[dict], images: dict, *, source: Path) -> dict[int, list[dict]]:
    """Prompts grouped per image id, each box checked against its image (``bbox`` is XYWH pixels)."""
    by_image: dict[int, list[dict]] = {}
    for p in prompts:
        h, w = images[p["image_id"]][1]
        x, y, bw, bh = p["bbox"]
        if not (bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6):
            raise PipelineError(
                f"{source}: box {p['bbox']} on image {p['image_id']} outside the {w}x{h} image or empty"
            )
        by_image.setdefault(p["image_id"], []).append(p)
    return by_image


def _image_results(sam, embedder, path: Path, size_hw: tuple[int, int], prompts: list[dict], img_id: int):
    """COCO results (one per prompt) and the ``HxW`` bool masks of one image.

    With ground-truth prompts (``score`` None) the score is ``(1 + clip(iou_pred, 0, 1)) / 2``.
    """
    xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (p["bbox"] for p in prompts)], np.float32)
    masks, ious = predict_group(sam, embedder(path), xyxy, size_hw=size_hw)
    results = []
    for p, m, iou in zip(prompts, masks, ious):
        q = float(np.clip(iou, 0.0, 1.0))
        score = p["score"] if p["score"] is not None else (1.0 + q) / 2.0
        results.append(
            {
                "image_id": img_id,
                "category_id": p["category_id"],
                "bbox": [round(float(v), 3) for v in p["bbox"]],
                "score": round(score, 6),
                "segmentation": encode_rle(m),
                "iou_pred": round(float(iou), 6),
            }
        )
    return results, list(masks)


def predict_sam(
    *,
    gt: Path,
    out: Path,
    boxes: Path | None = None,
    weights: Path | None = None,
    model_type: str | None = None,
    checkpoint: str | None = None,
    cache_dir: Path | None = None,
    device: str | None = None,
    min_score: float = 0.0,
    n_overlays: int = 8,
    allow_download: bool = False,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Predict one mask per box on every image of a split; write COCO results with RLE masks.

    Args:
        gt: COCO ground truth of the split (``annotations/<cat>/coco/<split>.json``): images, sizes,
            image root; also the boxes when ``boxes`` is ``None`` (upper bound: perfect detector).
        out: run folder (:class:`pipeline.core.runs.RunDir`, kind ``predict-sam``): ``predictions.json``
            (COCO results: ``image_id``, ``category_id``, ``bbox`` [x, y, w, h] = the prompt box,
            ``score``, ``segmentation`` RLE at the original size, ``iou_pred``), ``config.yaml``
            (``prompt: gt`` or ``prompt: detector:<file>``, the model loaded), ``provenance.json``
            (:func:`pipeline.data.predictions.write_provenance`: family ``sam``, the fine-tuned weights,
            else the base checkpoint, else null for a random-init ``tiny``; ``prompt`` ``"gt"`` or
            ``"detector:<boxes file, absolute>"``), ``summary.json``, ``overlays/*.png``. Masks from
            ground-truth boxes are an upper bound: ``evaluate`` labels them, fusion and
            ``export labelstudio`` refuse them.
        boxes: a detector's COCO results; boxes are clipped to the image, scores kept.
            With ground-truth boxes, ``score = (1 + clip(iou_pred, 0, 1)) / 2``: every mask passes
            a 0.5 score threshold and COCOeval still ranks by SAM's own quality estimate.
        weights: fine-tuned checkpoint; ``None`` is the zero-shot baseline (``model_type`` + ``checkpoint``).
        cache_dir: image-embedding cache (default :func:`pipeline.models.sam.model.default_cache_dir`).
        min_score: detector boxes scoring lower are skipped.
        n_overlays: images drawn (predicted vs true masks), evenly spread over the split.
        force: replace an earlier ``predict sam`` run in ``out``.

    Returns:
        ``out``.

    Raises:
        PipelineError: ``out`` not empty without ``force``; bad files or boxes, missing images, model
            mismatch: nothing is written then. A failure while predicting removes what this run wrote.
    """
    from pipeline.core.console import progress as progress_bar
    from pipeline.core.runs import RunDir

    run = RunDir.open(out, kind="predict-sam", force=force)
    gt_data, images = _read_gt(gt)
    prompts = _prompts_from_results(Path(boxes), gt_data, min_score=min_score) if boxes else _prompts_from_gt(gt_data)
    by_image = _prompts_by_image(prompts, images, source=Path(boxes or gt))
    sam, info = load_sam(
        weights=weights, model_type=model_type, checkpoint=checkpoint, device=device, allow_download=allow_download
    )
    embedder = Embedder(sam, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir())
    ids = sorted(by_image)
    picks = np.unique(np.linspace(0, len(ids) - 1, num=min(n_overlays, len(ids))).round()) if ids else []
    pick = {ids[int(i)] for i in picks}
    results: list[dict] = []
    pred_masks: dict[int, list[np.ndarray]] = {}
    with run:
        try:
            with progress_bar("SAM predict", len(ids), enabled=progress) as advance:
                for img_id in ids:
                    path, size_hw = images[img_id]
                    res, masks = _image_results(sam, embedder, path, size_hw, by_image[img_id], img_id)
                    results += res
                    if img_id in pick:
                        pred_masks[img_id] = masks
                    advance()
            atomic_write_json(run / "predictions.json", results, indent=None)
            run.write_config(
                {
                    "gt": str(gt),
                    "boxes": str(boxes) if boxes else "ground truth",
                    "prompt": f"detector:{boxes}" if boxes else "gt",
                    "min_score": min_score,
                    "cache_dir": str(embedder.cache_dir),
                    "device": str(sam.device),
                    **info,
                }
            )
            model_file = weights or info["checkpoint"]
            write_provenance(
                run.path,
                family="sam",
                model=Path(model_file) if model_file else None,
                split=Path(gt),
                prompt=f"detector:{Path(boxes).resolve()}" if boxes else "gt",
            )
            atomic_write_json(
                run / "summary.json",
                {
                    "images": len(images),
                    "images_with_boxes": len(by_image),
                    "masks": len(results),
                    "encoder_calls": embedder.encoder_calls,
                    "cache_hits": embedder.cache_hits,
                },
            )
            for img_id in sorted(pick):
                path, _ = images[img_id]
                true = [a for a in gt_data["annotations"] if a["image_id"] == img_id]
                write_overlay(
                    run / "overlays" / f"{img_id:05d}_{path.stem}.png",
                    path,
                    pred=pred_masks[img_id],
                    true=true,
                    boxes=[p["bbox"] for p in by_image[img_id]],
                )
        except BaseException:
            run.discard()  # no half-written predictions: a failed run leaves only the user's files
            raise
    return Path(out)


def write_overlay(path: Path, image: Path, *, pred: list[np.ndarray], true: list[dict], boxes: list) -> None:
    """PNG of the image with true masks (green fill + outline), predictions (red outline), prompt boxes (yellow)."""
    import cv2

    img = read_image(image)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img[..., :3].copy()
    g = np.zeros(img.shape[:2], bool)
    for a in true:
        g |= decode_rle(a["segmentation"])
    img[g] = (0.5 * img[g] + 0.5 * np.array([0, 200, 0])).astype(np.uint8)
    t = max(1, round(max(img.shape[:2]) / 400))
    cs, _ = cv2.findContours(g.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(img, cs, -1, (0, 255, 0), t)
    for m in pred:
        cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, cs, -1, (0, 0, 255), t)
    for x, y, bw, bh in boxes:
        cv2.rectangle(img, (int(x), int(y)), (int(round(x + bw)) - 1, int(round(y + bh)) - 1), (0, 255, 255), t)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise PipelineError(f"{path}: could not encode overlay PNG")
    atomic_write_bytes(path, buf.tobytes())
