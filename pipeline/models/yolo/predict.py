"""YOLO-World prediction with a fine-tuned checkpoint, offline: images -> boxes, and a COCO split ->
a run folder of COCO results.

Coordinates: predictions are ``bbox_xyxy`` in absolute pixels of the original image (x right, y down,
origin top-left); the COCO results of :func:`predict_split` are ``bbox`` ``[x, y, w, h]`` in the same
frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json
from pipeline.core.runs import RunDir
from pipeline.data.coco import class_index_to_category, detections_to_results, load_coco_gt, split_images
from pipeline.data.predictions import write_provenance
from pipeline.models.yolo.offline import first_line, offline_ultralytics, ultralytics_device
from pipeline.models.yolo.prompts import EMBEDDINGS_FILE, embeddings_beside, load_embeddings, text_dim


def load_class_names(weights: Path) -> list[str]:
    """The trained class names, in YOLO index order, for a checkpoint written by ``train_yolo_world``.

    Read from ``class_embeddings.pt`` beside the weights, else from the checkpoint itself.

    Raises:
        PipelineError: the weights file is missing or holds no class names.
    """
    weights = Path(weights)
    _check_weights(weights)
    if embeddings_beside(weights).is_file():
        return list(load_embeddings(embeddings_beside(weights))["names"])
    with offline_ultralytics():
        from ultralytics.nn.tasks import load_checkpoint

        model = load_checkpoint(str(weights), device="cpu")[0]
    names = getattr(model, "names", None)
    if not names:
        raise PipelineError(f"{weights}: the checkpoint holds no class names")
    return list(names.values()) if isinstance(names, dict) else list(names)


def _check_weights(weights: Path) -> None:
    if not weights.is_file():
        raise PipelineError(f"{weights}: file not found (expected YOLO-World weights, e.g. weights/best.pt)")


def _check_inputs(weights: Path, images: list[Path], *, imgsz: int, conf: float, batch: int) -> None:
    _check_weights(weights)
    for p in images:
        if not p.is_file():
            raise PipelineError(f"{p}: file not found (expected an image)")
    if not 0.0 <= conf <= 1.0 or imgsz < 32 or batch < 1:
        raise PipelineError(
            f"conf={conf}, imgsz={imgsz}, batch={batch}: expected conf in [0, 1], imgsz >= 32, batch >= 1"
        )


def predict_yolo_world(
    *,
    weights: Path,
    images: list[Path],
    imgsz: int = 640,
    conf: float = 0.001,
    device: str | None = None,
    batch: int = 8,
) -> list[list[dict]]:
    """Detect the trained classes in images with a fine-tuned YOLO-World checkpoint, offline.

    The class prompts are the stored embeddings (``class_embeddings.pt`` beside the weights) in
    the trained order; without that file, those kept in the checkpoint. Images are letterboxed
    to ``imgsz`` by ultralytics and boxes are mapped back to the original image.

    Args:
        weights: ``weights/best.pt`` (or ``last.pt``) of a ``train_yolo_world`` run.
        images: image files (any size, grey or colour).
        imgsz: inference size in pixels (long side after letterbox).
        conf: minimum score kept, in [0, 1].
        device: ``"cpu"``, ``"0"``/``"cuda:0"``, ``"auto"``; ``None`` picks the first GPU, else the CPU
            (:func:`pipeline.core.device.resolve_device`, one device).
        batch: images per forward pass.

    Returns:
        One list per input image, in input order, of detections
        ``{"bbox_xyxy": [x0, y0, x1, y1], "class_index": int, "score": float}``: box corners in
        absolute pixels of the original image (float, clipped to it), ``class_index`` 0-based
        into :func:`load_class_names`, score in [0, 1].

    Raises:
        PipelineError: missing weights or image file, bad arguments, an unavailable device.
    """
    weights = Path(weights)
    images = [Path(p) for p in images]
    _check_inputs(weights, images, imgsz=imgsz, conf=conf, batch=batch)
    if not images:
        return []
    device = ultralytics_device(device)
    with offline_ultralytics():
        yolo = _load_for_prediction(weights)
        results = yolo.predict(
            source=[str(p) for p in images],
            imgsz=imgsz,
            conf=conf,
            device=device,
            batch=batch,
            stream=True,
            verbose=False,
            save=False,
        )
        return [_detections(r) for r in results]


def _load_for_prediction(weights: Path) -> Any:
    """ultralytics model for ``weights`` with the stored class prompts and names set (no CLIP)."""
    from ultralytics import YOLO
    from ultralytics.nn.tasks import WorldModel

    try:
        yolo = YOLO(str(weights), task="detect")
    except Exception as exc:  # ultralytics raises many types for a foreign or corrupt file
        raise PipelineError(f"{weights}: not a loadable YOLO checkpoint ({first_line(exc)})") from None
    net = yolo.model
    if not isinstance(net, WorldModel):
        raise PipelineError(f"{weights}: a {type(net).__name__} checkpoint, expected YOLO-World (WorldModel)")
    stored = embeddings_beside(weights)
    if stored.is_file():
        payload = load_embeddings(stored)
        names, emb = list(payload["names"]), payload["embeddings"]
        if emb.ndim != 2 or emb.shape[0] != len(names) or emb.shape[1] != text_dim(net):
            raise PipelineError(f"{stored}: embeddings {tuple(emb.shape)} do not fit {len(names)} names and the model")
        net.txt_feats = emb[None].to(torch.float32)
        net.model[-1].nc = len(names)
        net.names = dict(enumerate(names))
    elif getattr(net, "txt_feats", None) is None:
        raise PipelineError(f"{weights}: no {EMBEDDINGS_FILE} beside it and no class prompts in the checkpoint")
    return yolo


def _detections(result: Any) -> list[dict]:
    """One ultralytics ``Results`` -> ``[{"bbox_xyxy", "class_index", "score"}]`` (original-image pixels)."""
    boxes = result.boxes
    if boxes is None or len(boxes) == 0:
        return []
    xyxy = boxes.xyxy.detach().cpu().numpy().astype(float)
    cls = boxes.cls.detach().cpu().numpy().astype(int)
    score = boxes.conf.detach().cpu().numpy().astype(float)
    return [
        {"bbox_xyxy": [float(v) for v in b], "class_index": int(c), "score": float(s)}
        for b, c, s in zip(xyxy, cls, score)
    ]


# ----------------------------------------------------------------------------- a COCO split -> run folder


@dataclass(frozen=True)
class SplitPrediction:
    """What :func:`predict_split` wrote: the run folder and the counts behind ``predictions.json``."""

    run: Path
    n_images: int
    n_detections: int

    @property
    def predictions(self) -> Path:
        return self.run / "predictions.json"


def predict_split(
    *,
    weights: Path,
    gt: Path,
    out: Path,
    imgsz: int = 640,
    conf: float = 0.001,
    device: str | None = None,
    batch: int = 8,
    force: bool = False,
) -> SplitPrediction:
    """Detect defects on every image of a COCO split; write a run folder ``out`` (kind ``predict-yolo``).

    ``out`` gets ``predictions.json``: COCO results ``{"image_id", "category_id", "bbox": [x, y, w, h]
    (pixels, clipped to the image, 2 decimals), "score" (5 decimals)}`` with the ground truth's ids,
    classes matched by name; ``config.yaml`` (these arguments, resolved); and ``provenance.json``
    (:func:`pipeline.data.predictions.write_provenance`: family ``yolo``, the weights and their SHA-256,
    the ground truth; no score threshold). Nothing is written until every prediction is made.

    Args:
        weights: ``weights/best.pt`` of a ``train_yolo_world`` run.
        gt: COCO ground truth of the split, written by ``convert-masks`` (its ``info.image_root``
            locates the images).
        out: the run folder.
        imgsz, conf, device, batch: as :func:`predict_yolo_world`.
        force: replace an earlier ``predict yolo`` run in ``out``.

    Raises:
        PipelineError: a non-empty ``out`` without ``force``; unreadable ground truth; missing weights
            or images; a ground-truth class the model was not trained on; bad arguments.
    """
    run = RunDir.open(Path(out), kind="predict-yolo", force=force)
    gt_data = load_coco_gt(gt).dataset
    images = split_images(gt_data)
    names = load_class_names(weights)
    index_to_cat = class_index_to_category(names, gt_data, source=Path(weights))
    _check_inputs(Path(weights), [p for _, p, _ in images], imgsz=imgsz, conf=conf, batch=batch)
    resolved = ultralytics_device(device)
    dets = predict_yolo_world(
        weights=weights, images=[p for _, p, _ in images], imgsz=imgsz, conf=conf, device=resolved, batch=batch
    )
    results = detections_to_results(dets, images, index_to_cat)
    config = {
        "weights": str(Path(weights).resolve()),
        "gt": str(Path(gt).resolve()),
        "out": str(run.path),
        "imgsz": int(imgsz),
        "conf": float(conf),
        "device": resolved,
        "batch": int(batch),
        "force": bool(force),
        "names": names,
        "n_images": len(images),
        "n_detections": len(results),
    }
    with run:
        run.write_config(config)
        atomic_write_json(run / "predictions.json", results, indent=None)
        write_provenance(run.path, family="yolo", model=Path(weights), split=Path(gt))
    return SplitPrediction(run.path, len(images), len(results))
