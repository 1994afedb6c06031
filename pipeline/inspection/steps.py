"""The models of a bundle, each loaded once, fed decoded images (``HxWx3`` uint8 RGB) a batch at a time.

Each step reuses its family's own building blocks, so its numbers equal ``pipeline predict``'s on
the same files: the same resize, normalisation and network.

- :class:`AnomalyStep`: PatchCore :meth:`~pipeline.models.anomaly.patchcore.PatchCore.preprocess` +
  ``score_batch``; regions from :func:`pipeline.models.anomaly.predict.map_to_coco`.
- :class:`ClassifierStep`: the classifier's resize rule (area when shrinking, else bilinear, as in
  :func:`pipeline.models.classifier.data.load_resized`), ``normalize``, softmax.
- :class:`DetectorStep`: the fine-tuned YOLO-World with its stored class prompts, fed BGR arrays
  (ultralytics' own letterbox); boxes in original-image pixels.
- :class:`SamStep`: one image embedding per image, the detector's boxes as prompts
  (:func:`pipeline.models.sam.predict.predict_group`).

The family ``predict`` modules read files; these adapters live here so the families stay as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

#: the minimum detector score kept before the image-level threshold (``predict yolo``'s default)
DETECTOR_CONF = 0.001


class AnomalyStep:
    """PatchCore from ``model.pt``: per image ``{"score", "score_norm", "map" SxS float32, "map_range"
    (lo, hi) for colouring, "regions" (COCO results of the map at the pixel threshold)}``."""

    name = "anomaly"

    def __init__(self, artefact: Path, *, device: str):
        from pipeline.models.anomaly.patchcore import load_artefact

        self.model = load_artefact(Path(artefact), device=device)

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict]:
        from pipeline.models.anomaly.predict import map_to_coco

        pc = self.model
        out = []
        bs = pc.config.batch_size
        lo, hi = pc.norm.get("map_min"), pc.norm.get("map_max")
        norm = (lo, hi) if lo is not None and hi is not None and hi > lo else None
        for i in range(0, len(images), bs):
            chunk = images[i : i + bs]
            x = pc.preprocess(chunk)
            scores, maps = pc.score_batch(x)
            for im, s, m in zip(chunk, scores, maps):
                regions = []
                if np.isfinite(pc.pixel_threshold):
                    regions = map_to_coco(
                        m, image_id=0, threshold=pc.pixel_threshold, size_hw=tuple(im.shape[:2]), norm=norm
                    )
                rng = norm or (float(m.min()), float(m.max()))
                out.append(
                    {
                        "score": float(s),
                        "score_norm": pc.normalise_score(float(s)),
                        "map": m,
                        "map_range": rng,
                        "regions": regions,
                    }
                )
        return out


class ClassifierStep:
    """A ``finetune classifier`` checkpoint: per image ``{"probs": {class: p}, "label", "score"}``;
    ``score`` is the defect score ``1 - p(good)`` (``p(defect)`` without ``good``)."""

    name = "classifier"

    def __init__(self, checkpoint: Path, *, device: str, batch_size: int | None = None):
        from pipeline.models.classifier.model import load_checkpoint, model_from_checkpoint

        ck = load_checkpoint(Path(checkpoint))
        model, self.cfg = model_from_checkpoint(ck)
        self.model = model.to(device).eval()
        self.device = device
        self.classes = list(ck["classes"])
        self.batch_size = batch_size or self.cfg.train.batch_size

    def _resized(self, im: np.ndarray) -> np.ndarray:
        import cv2

        h, w = self.cfg.data.input_size_hw
        r = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA if im.shape[0] > h else cv2.INTER_LINEAR)
        return np.ascontiguousarray(r.transpose(2, 0, 1))

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict]:
        import torch

        from pipeline.data.mvtec import GOOD
        from pipeline.models.classifier.data import normalize

        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.stack([self._resized(im) for im in images[i : i + self.batch_size]]))
                x = normalize(x.to(self.device), self.cfg.data.mean, self.cfg.data.std)
                probs = torch.softmax(self.model(x).float(), 1).cpu().numpy()
                for pr in probs:
                    p = {c: float(v) for c, v in zip(self.classes, pr)}
                    score = 1.0 - p[GOOD] if GOOD in p else p.get("defect", float("nan"))
                    out.append({"probs": p, "label": self.classes[int(pr.argmax())], "score": float(score)})
        return out


class DetectorStep:
    """Fine-tuned YOLO-World: per image ``{"boxes": [{"bbox_xyxy", "class", "class_index", "score"}],
    "score"}`` (every box at or above :data:`DETECTOR_CONF`; ``score`` = the highest, 0 when none)."""

    name = "detector"

    def __init__(self, weights: Path, *, device: str, imgsz: int = 640, batch: int = 8):
        from pipeline.models.yolo.offline import offline_ultralytics, ultralytics_device
        from pipeline.models.yolo.predict import _load_for_prediction, load_class_names

        self.names = load_class_names(Path(weights))
        self.device = ultralytics_device(device)
        self.imgsz, self.batch = int(imgsz), int(batch)
        with offline_ultralytics():
            self.yolo = _load_for_prediction(Path(weights))

    def __call__(self, images: Sequence[np.ndarray]) -> list[dict]:
        import cv2

        from pipeline.models.yolo.offline import offline_ultralytics
        from pipeline.models.yolo.predict import _detections

        bgr = [cv2.cvtColor(im, cv2.COLOR_RGB2BGR) for im in images]
        with offline_ultralytics():
            results = self.yolo.predict(
                source=bgr,
                imgsz=self.imgsz,
                conf=DETECTOR_CONF,
                device=self.device,
                batch=self.batch,
                stream=True,
                verbose=False,
                save=False,
            )
            dets = [_detections(r) for r in results]
        out = []
        for boxes in dets:
            for b in boxes:
                b["class"] = self.names[b["class_index"]]
            out.append({"boxes": boxes, "score": max((b["score"] for b in boxes), default=0.0)})
        return out


class SamStep:
    """Fine-tuned SAM: masks (``HxW`` bool) and predicted IoUs for given ``bbox_xyxy`` boxes, one image at a time."""

    name = "sam"

    def __init__(self, weights: Path, *, device: str, checkpoint: Path | None = None):
        from pipeline.models.sam.predict import load_sam

        self.sam, self.info = load_sam(
            weights=Path(weights), checkpoint=str(checkpoint) if checkpoint else None, device=device
        )

    def masks(self, image: np.ndarray, bbox_xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from pipeline.models.sam.model import image_to_input
        from pipeline.models.sam.predict import predict_group

        h, w = image.shape[:2]
        if len(bbox_xyxy) == 0:
            return np.zeros((0, h, w), bool), np.zeros(0, np.float32)
        with torch.no_grad():
            emb = self.sam.image_encoder(image_to_input(self.sam, image))
        return predict_group(self.sam, emb, np.asarray(bbox_xyxy, np.float32), size_hw=(h, w))


# ------------------------------------------------------------------------------ the bundle's steps together
def load_steps(bundle_dir: Path, models: dict, *, device: str, batch: int | None = None) -> dict:
    """Each enabled model of ``bundle.yaml``'s ``models`` section, loaded once on ``device``:
    ``{"anomaly": AnomalyStep, "classifier": ..., "detector": ..., "sam": ...}`` (enabled ones only)."""
    b = Path(bundle_dir)

    def file_of(name: str, role: str) -> Path:
        return b / next(f["path"] for f in models[name]["files"] if f["role"] == role)

    steps: dict = {}
    if models.get("anomaly", {}).get("enabled"):
        steps["anomaly"] = AnomalyStep(file_of("anomaly", "weights"), device=device)
    if models.get("classifier", {}).get("enabled"):
        steps["classifier"] = ClassifierStep(file_of("classifier", "weights"), device=device, batch_size=batch)
    if models.get("detector", {}).get("enabled"):
        d = models["detector"]
        steps["detector"] = DetectorStep(
            file_of("detector", "weights"), device=device, imgsz=d.get("imgsz", 640), batch=batch or 8
        )
    if models.get("sam", {}).get("enabled"):
        roles = {f["role"] for f in models["sam"]["files"]}
        base = file_of("sam", "base_checkpoint") if "base_checkpoint" in roles else None
        steps["sam"] = SamStep(file_of("sam", "weights"), device=device, checkpoint=base)
    return steps


def run_steps(steps: dict, images: Sequence[np.ndarray], *, box_threshold: float | None = None) -> list[dict]:
    """Every step on one batch of decoded images.

    Args:
        steps: :func:`load_steps`' result.
        images: ``HxWx3`` uint8 RGB arrays (any sizes).
        box_threshold: detector boxes at or above it are the image's regions and SAM's prompts
            (``None``: no regions kept, SAM skipped; what the bundle's val scoring needs).

    Returns:
        Per image ``{"scores": {source: defect score}, "anomaly"?, "classifier"?, "detector"?,
        "masks"? (``Kx HxW`` bool, one per kept box), "mask_iou"?, "timing_ms": {step: ms per image}}``.
    """
    import time

    out: list[dict] = [{"scores": {}, "timing_ms": {}} for _ in images]
    for name in ("anomaly", "classifier", "detector"):
        if name not in steps:
            continue
        t0 = time.perf_counter()
        res = steps[name](images)
        ms = 1000.0 * (time.perf_counter() - t0) / max(1, len(images))
        for rec, r in zip(out, res):
            rec[name] = r
            rec["scores"][name] = r["score"]
            rec["timing_ms"][name] = round(ms, 3)
    for rec, im in zip(out, images):
        if "detector" in rec and box_threshold is not None:
            rec["detector"]["boxes"] = [b for b in rec["detector"]["boxes"] if b["score"] >= box_threshold]
            if "sam" in steps:
                t0 = time.perf_counter()
                xyxy = np.array([b["bbox_xyxy"] for b in rec["detector"]["boxes"]], np.float32).reshape(-1, 4)
                rec["masks"], rec["mask_iou"] = steps["sam"].masks(im, xyxy)
                rec["timing_ms"]["sam"] = round(1000.0 * (time.perf_counter() - t0), 3)
    return out
