"""SAM masks from boxes: records, fine-tuned checkpoints, prediction to COCO results, overlays.

Segment Anything (Kirillov et al., ICCV 2023) turns a box into a mask. Here the boxes come from
a detector's COCO results or from the ground truth, the image embedding comes from a disk cache
(:class:`pipeline.models.sam.model.Embedder`) and the mask decoder is the official one or a fine-tuned one
(:mod:`pipeline.models.sam.train`). Masks are written as COCO RLE at the original image size.

Model code and geometry live in :mod:`pipeline.models.sam.model` (the only module importing
``segment_anything``); the training loop in :mod:`pipeline.models.sam.train`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    atomic_write_bytes, atomic_write_json, atomic_write_text, image_size_hw, load_torch_file, read_json, staged_dir,
)

CKPT_FORMAT = "pipeline.sam-finetune"
CKPT_VERSION = 1
PREDICTABLE_MODULES = ("mask_decoder", "prompt_encoder", "image_encoder")


def default_cache_dir() -> Path:
    """``$PIPELINE_CACHE/sam-embeddings``, else ``$XDG_CACHE_HOME/pipeline/sam-embeddings`` (``~/.cache``)."""
    if os.environ.get("PIPELINE_CACHE"):
        return Path(os.environ["PIPELINE_CACHE"]).expanduser() / "sam-embeddings"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "pipeline" / "sam-embeddings"


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SamRecord:
    """One defect component: the prompt box and its true mask (a line of ``sam/<split>.jsonl``).

    Attributes:
        image: absolute image path.
        size_hw: original image ``(H, W)`` in pixels.
        bbox_xyxy: ``(x0, y0, x1, y1)`` original pixels, ``x1``/``y1`` exclusive.
        segmentation: COCO compressed RLE of the component mask, size ``size_hw``.
    """

    image: Path
    image_id: int
    annotation_id: int
    size_hw: tuple[int, int]
    category_id: int
    category: str
    bbox_xyxy: tuple[float, float, float, float]
    segmentation: dict


@dataclass
class ImageGroup:
    """All records of one image: one embedding, a batch of ``B`` boxes, ``B`` true masks."""

    image: Path
    image_id: int
    size_hw: tuple[int, int]
    records: list[SamRecord]
    masks: list[np.ndarray] | None = None  # HxW bool each, decoded lazily
    extra: dict = field(default_factory=dict)  # derived per-image data (e.g. low-res loss targets)

    def bbox_xyxy(self) -> np.ndarray:
        """``Bx4`` float32 boxes, original pixels."""
        return np.array([r.bbox_xyxy for r in self.records], np.float32).reshape(-1, 4)

    def true_masks(self) -> list[np.ndarray]:
        from pipeline.data.instances import decode_rle

        if self.masks is None:
            self.masks = [decode_rle(r.segmentation) for r in self.records]
        return self.masks


def read_records(path: Path) -> list[SamRecord]:
    """Read and validate SAM records (JSON Lines written by ``pipeline convert-masks``).

    Checks each record: keys present, image file exists with size ``size_hw``, box inside the
    image with positive width and height, RLE of size ``size_hw`` and not empty.

    Raises:
        PipelineError: one line ``<file>:<line>: <what is wrong>`` for the first bad record.
    """
    from pipeline.data.instances import decode_rle

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: file not found (expected SAM records sam/<split>.jsonl from convert-masks)")
    records: list[SamRecord] = []
    sizes: dict[Path, tuple[int, int]] = {}
    keys = ("image", "image_id", "annotation_id", "size_hw", "category_id", "bbox_xyxy", "segmentation")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{where}: not valid JSON ({exc})") from None
        if not isinstance(d, dict) or not all(k in d for k in keys):
            raise PipelineError(f"{where}: expected a SAM record with keys {', '.join(keys)}")
        image = Path(d["image"])
        if not image.is_file():
            raise PipelineError(f"{where}: image {image} not found")
        if image not in sizes:
            sizes[image] = image_size_hw(image)
        h, w = (int(v) for v in d["size_hw"])
        if sizes[image] != (h, w):
            raise PipelineError(f"{where}: image {image} is {sizes[image][1]}x{sizes[image][0]}, record says size_hw {[h, w]}")
        try:
            x0, y0, x1, y1 = (float(v) for v in d["bbox_xyxy"])
        except (TypeError, ValueError):
            raise PipelineError(f"{where}: bbox_xyxy {d['bbox_xyxy']!r} (expected four numbers x0, y0, x1, y1)") from None
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise PipelineError(f"{where}: bbox_xyxy {[x0, y0, x1, y1]} outside the {w}x{h} image or empty (expected 0 <= x0 < x1 <= W, 0 <= y0 < y1 <= H)")
        seg = d["segmentation"]
        if not isinstance(seg, dict) or list(seg.get("size", [])) != [h, w] or "counts" not in seg:
            raise PipelineError(f"{where}: segmentation is not an RLE of size {[h, w]}")
        try:
            m = decode_rle(seg)
        except Exception as exc:  # pycocotools raises bare errors for bad counts
            raise PipelineError(f"{where}: segmentation RLE does not decode ({exc})") from None
        if not m.any():
            raise PipelineError(f"{where}: empty mask (annotation {d['annotation_id']} has no pixels)")
        records.append(
            SamRecord(image=image, image_id=int(d["image_id"]), annotation_id=int(d["annotation_id"]), size_hw=(h, w),
                      category_id=int(d["category_id"]), category=str(d.get("category", d["category_id"])),
                      bbox_xyxy=(x0, y0, x1, y1), segmentation=seg)
        )
    return records


def group_by_image(records: list[SamRecord]) -> list[ImageGroup]:
    """Records grouped per image, in order of first appearance."""
    groups: dict[Path, ImageGroup] = {}
    for r in records:
        g = groups.setdefault(r.image, ImageGroup(image=r.image, image_id=r.image_id, size_hw=r.size_hw, records=[]))
        g.records.append(r)
    return list(groups.values())


# ----------------------------------------------------------------------------- checkpoints


def resolve_base_checkpoint(model_type: str, checkpoint: str | None, *, allow_download: bool = False) -> Path | None:
    """The full SAM checkpoint to start from: required for vit_b/l/h (name or path), optional for tiny.

    Raises:
        PipelineError: vit_* without a checkpoint, or the file not found (see ``pipeline.core.weights``).
    """
    from pipeline.models.sam.model import MODEL_TYPES, OFFICIAL_CHECKPOINTS
    from pipeline.core.weights import resolve_weights

    if model_type not in MODEL_TYPES:
        raise PipelineError(f"--model-type {model_type!r}: expected one of {', '.join(MODEL_TYPES)}")
    if checkpoint is None:
        if model_type == "tiny":
            return None
        raise PipelineError(f"--model-type {model_type} needs --checkpoint (the official file is {OFFICIAL_CHECKPOINTS[model_type]})")
    return resolve_weights(checkpoint, allow_download=allow_download)


def save_finetuned(path: Path, *, sam, config: dict, trained: list[str], extra: dict | None = None) -> None:
    """Write a fine-tuned checkpoint: the trained modules' state dicts and the config, atomically.

    Content: ``{"format", "version", "config", "trained", "state": {module: state_dict}, **extra}``;
    loadable with ``torch.load(..., weights_only=True)``.
    """
    import io

    import torch

    obj = {"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": config, "trained": list(trained),
           "state": {m: {k: v.detach().cpu() for k, v in getattr(sam, m).state_dict().items()} for m in trained}}
    obj.update(extra or {})
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def read_finetuned(path: Path) -> dict:
    """Load a fine-tuned checkpoint's dict (``map_location="cpu"``, ``weights_only=True``).

    Raises:
        PipelineError: missing, unreadable, or not written by :func:`save_finetuned`.
    """
    obj = load_torch_file(path, what="fine-tuned SAM checkpoint")
    if not isinstance(obj, dict) or obj.get("format") != CKPT_FORMAT:
        raise PipelineError(f"{path}: not a fine-tuned SAM checkpoint (expected one written by pipeline finetune sam)")
    if obj.get("version") != CKPT_VERSION:
        raise PipelineError(f"{path}: checkpoint version {obj.get('version')} (expected {CKPT_VERSION})")
    return obj


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
        device: default CUDA when present.

    Returns:
        ``(sam, info)``: model in eval mode, and a dict saying what was loaded.

    Raises:
        PipelineError: type mismatch, missing files, keys or shapes not matching (strict).
    """
    from pipeline.models.sam.model import build_sam, default_device, load_state_strict

    device = device or default_device()
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
    info = {"model_type": model_type, "checkpoint": str(base) if base else None, "tiny_seed": tiny_seed or 0,
            "weights": str(weights) if weights else None, "fine_tuned": sorted(ckpt["state"]) if ckpt else []}
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

    from pipeline.models.sam.model import boxes_to_input, decode, logits_to_native

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


def _prompts_from_gt(gt: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": None}
            for a in gt["annotations"]]


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
        out.append({"image_id": r["image_id"], "category_id": r["category_id"], "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "score": float(r["score"])})
    return out


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
        out: run folder to create: ``predictions.json`` (COCO results: ``image_id``,
            ``category_id``, ``bbox`` [x, y, w, h] = the prompt box, ``score``, ``segmentation``
            RLE at the original size, ``iou_pred``), ``config.yaml``, ``overlays/*.png``.
        boxes: a detector's COCO results; boxes are clipped to the image, scores kept.
            With ground-truth boxes, ``score = (1 + clip(iou_pred, 0, 1)) / 2``: every mask passes
            a 0.5 score threshold and COCOeval still ranks by SAM's own quality estimate.
        weights: fine-tuned checkpoint; ``None`` is the zero-shot baseline (``model_type`` + ``checkpoint``).
        cache_dir: image-embedding cache (default :func:`default_cache_dir`).
        min_score: detector boxes scoring lower are skipped.
        n_overlays: images drawn (predicted vs true masks), evenly spread over the split.

    Returns:
        ``out``.

    Raises:
        PipelineError: bad files or boxes, missing images, model mismatch; nothing is written then.
    """
    import yaml

    from pipeline.data.instances import encode_rle
    from pipeline.models.sam.model import Embedder

    gt_data = read_json(gt)
    if not isinstance(gt_data, dict) or not {"images", "annotations", "categories"} <= set(gt_data):
        raise PipelineError(f"{gt}: not COCO ground truth (expected images, annotations, categories)")
    root = Path(gt_data.get("info", {}).get("image_root", Path(gt).parent))
    images = {im["id"]: (root / im["file_name"], (int(im["height"]), int(im["width"]))) for im in gt_data["images"]}
    for img_id, (p, _) in images.items():
        if not p.is_file():
            raise PipelineError(f"{gt}: image {p} (id {img_id}) not found")
    prompts = _prompts_from_results(Path(boxes), gt_data, min_score=min_score) if boxes else _prompts_from_gt(gt_data)
    for p in prompts:
        h, w = images[p["image_id"]][1]
        x, y, bw, bh = p["bbox"]
        if not (bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w + 1e-6 and y + bh <= h + 1e-6):
            raise PipelineError(f"{boxes or gt}: box {p['bbox']} on image {p['image_id']} outside the {w}x{h} image or empty")
    sam, info = load_sam(weights=weights, model_type=model_type, checkpoint=checkpoint, device=device,
                         allow_download=allow_download)
    embedder = Embedder(sam, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir())
    by_image: dict[int, list[dict]] = {}
    for p in prompts:
        by_image.setdefault(p["image_id"], []).append(p)
    results: list[dict] = []
    ids = sorted(by_image)
    pick = {ids[int(i)] for i in np.unique(np.linspace(0, len(ids) - 1, num=min(n_overlays, len(ids))).round())} if ids else set()
    pred_masks: dict[int, list[np.ndarray]] = {}
    with staged_dir(Path(out), force=force) as tmp, _progress(progress) as bar:
        task = bar.add_task("SAM predict", total=len(by_image))
        for img_id in sorted(by_image):
            path, size_hw = images[img_id]
            ps = by_image[img_id]
            xyxy = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (p["bbox"] for p in ps)], np.float32)
            masks, ious = predict_group(sam, embedder(path), xyxy, size_hw=size_hw)
            if img_id in pick:
                pred_masks[img_id] = list(masks)
            for p, m, iou in zip(ps, masks, ious):
                q = float(np.clip(iou, 0.0, 1.0))
                score = p["score"] if p["score"] is not None else (1.0 + q) / 2.0
                results.append({"image_id": img_id, "category_id": p["category_id"],
                                "bbox": [round(float(v), 3) for v in p["bbox"]], "score": round(score, 6),
                                "segmentation": encode_rle(m), "iou_pred": round(float(iou), 6)})
            bar.advance(task)
        atomic_write_json(tmp / "predictions.json", results, indent=None)
        config = {"gt": str(gt), "boxes": str(boxes) if boxes else "ground truth", "min_score": min_score,
                  "cache_dir": str(embedder.cache_dir), "device": str(sam.device), **info}
        atomic_write_text(tmp / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        atomic_write_json(tmp / "summary.json", {"images": len(images), "images_with_boxes": len(by_image),
                                                 "masks": len(results), "encoder_calls": embedder.encoder_calls,
                                                 "cache_hits": embedder.cache_hits})
        for img_id in sorted(pick):
            path, size_hw = images[img_id]
            true = [a for a in gt_data["annotations"] if a["image_id"] == img_id]
            write_overlay(tmp / "overlays" / f"{img_id:05d}_{path.stem}.png", path, pred=pred_masks[img_id],
                          true=true, boxes=[p["bbox"] for p in by_image[img_id]])
    return Path(out)


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def write_overlay(path: Path, image: Path, *, pred: list[np.ndarray], true: list[dict], boxes: list) -> None:
    """PNG of the image with true masks (green fill + outline), predictions (red outline), prompt boxes (yellow)."""
    import cv2

    from pipeline.data.instances import decode_rle
    from pipeline.core.io import read_image

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
