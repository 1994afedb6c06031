"""PatchCore: unsupervised anomaly detection and localisation from good images only.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, implemented from the
paper:

1. Features: two mid-level stages of an ImageNet CNN (:mod:`pipeline.models.backbones`, strides 8 and 16),
   each locally aggregated by a ``3x3`` average pool (stride 1, the paper's neighbourhood ``p = 3``),
   the deeper one upsampled bilinearly to the stride-8 grid, concatenated per patch, and optionally
   reduced to ``feature_dim`` channels by adaptive average pooling over channels (the paper's
   projection).
2. Memory bank: every patch feature of ``train/good``, reduced by greedy k-center coreset selection
   (``coreset_ratio`` of the patches) on a Johnson-Lindenstrauss random projection to
   ``projection_dim`` dimensions.
3. Scores: patch score = Euclidean distance to the nearest memory-bank feature (faiss exact search);
   image score = the maximum patch score ``s*`` times the paper's weight
   ``w = 1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||)`` where ``m*`` is the
   nearest bank feature of the most anomalous test patch ``m_test`` and ``N_b(m*)`` its ``b`` nearest
   bank neighbours (``m*`` included); anomaly map = patch scores upsampled bilinearly to the input size
   and smoothed by a Gaussian with ``sigma`` = 4 px.

Pre-processing: every image (any size, grey/BGR/BGRA) is converted to RGB and resized (area
interpolation, aspect ratio not kept) to ``image_size`` x ``image_size``; maps come back at that
size and are resized bilinearly to the native image size for overlays, boxes and metrics.

The artefact (``model.pt``, loadable with ``torch.load(weights_only=True)``) holds the memory bank,
the backbone's name, layers and cut weights, the pre-processing, the thresholds and the score
normalisation: :func:`load_artefact` needs nothing else.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import load_torch_file

ARTEFACT_FORMAT = "pipeline.patchcore"
ARTEFACT_VERSION = 1


@dataclass(frozen=True)
class PatchCoreConfig:
    """Settings of a PatchCore fit (all saved in the artefact).

    Attributes:
        backbone: backbone name (``None`` = :func:`pipeline.models.backbones.default_backbone`).
        weights: explicit weights file for the backbone (``None`` = its default location).
        image_size: side in pixels of the square network input.
        coreset_ratio: fraction of training patches kept in the memory bank, in ``(0, 1]``.
        projection_dim: random-projection dimension used only for coreset selection.
        feature_dim: channels after the optional adaptive-average-pool projection (``None`` = keep).
        num_neighbors: ``b`` of the image-score re-weighting.
        sigma: Gaussian smoothing of the map, in input pixels.
        batch_size: images per forward pass.
        seed: seeds the random projection and the coreset's first centre.
    """

    backbone: str | None = None
    weights: str | None = None
    image_size: int = 224
    coreset_ratio: float = 0.01
    projection_dim: int = 128
    feature_dim: int | None = None
    num_neighbors: int = 9
    sigma: float = 4.0
    batch_size: int = 16
    seed: int = 0

    def check(self) -> None:
        """Raise :class:`PipelineError` for values out of range."""
        if not 0 < self.coreset_ratio <= 1:
            raise PipelineError(f"coreset_ratio {self.coreset_ratio}: expected a fraction in (0, 1]")
        if self.image_size < 32:
            raise PipelineError(f"image_size {self.image_size}: expected at least 32 pixels")
        if self.num_neighbors < 1 or self.batch_size < 1 or self.projection_dim < 1:
            raise PipelineError("num_neighbors, batch_size and projection_dim must be positive")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise PipelineError(f"feature_dim {self.feature_dim}: expected a positive number of channels")


@dataclass
class PatchCore:
    """A fitted PatchCore model.

    Attributes:
        config: the :class:`PatchCoreConfig` (``backbone`` resolved).
        backbone: the loaded :class:`pipeline.models.backbones.Backbone`.
        memory_bank: ``MxD`` float32 array of patch features.
        grid_hw: feature-grid size ``(h, w)`` for one image.
        threshold: image-score threshold (``score >= threshold`` -> defect), ``nan`` until chosen.
        pixel_threshold: map threshold used for boxes/masks, ``nan`` until chosen.
        norm: score normalisation ``{"image_min", "image_max", "map_min", "map_max"}`` (raw units).
        info: free-form facts recorded at fit time (fit seconds, training images, sizes seen).
    """

    config: PatchCoreConfig
    backbone: object
    memory_bank: np.ndarray
    grid_hw: tuple[int, int]
    threshold: float = float("nan")
    pixel_threshold: float = float("nan")
    norm: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    _index: object = None

    @property
    def device(self) -> str:
        return str(next(self.backbone.model.parameters()).device)

    def index(self):
        """The faiss exact L2 index over the memory bank (built once)."""
        if self._index is None:
            self._index = build_index(self.memory_bank)
        return self._index

    def score_batch(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Score a pre-processed batch.

        Args:
            x: ``Bx3xSxS`` float tensor from :func:`preprocess`.

        Returns:
            ``(scores, maps)``: ``B`` float64 image scores and ``BxSxS`` float32 smoothed anomaly maps
            (distance units of the feature space).
        """
        feats, grid = patch_features(self.backbone, x, feature_dim=self.config.feature_dim)
        b = x.shape[0]
        dist, nn_idx = knn(self.index(), feats, k=1)
        patch = dist[:, 0].reshape(b, grid[0] * grid[1])
        nn_idx = nn_idx[:, 0].reshape(b, -1)
        feats = feats.reshape(b, grid[0] * grid[1], -1)
        scores = np.array([
            reweighted_score(self.memory_bank, self.index(), feats[i], patch[i], nn_idx[i], self.config.num_neighbors)
            for i in range(b)
        ])
        maps = patch_maps(patch.reshape(b, *grid), size=self.config.image_size, sigma=self.config.sigma)
        return scores, maps

    def score_paths(self, paths: Sequence[Path], *, progress: Callable | None = None) -> tuple[np.ndarray, np.ndarray, list]:
        """Score image files: ``(scores B, maps BxSxS float32, native sizes [(H, W)])``."""
        scores, maps, sizes = [], [], []
        bs = self.config.batch_size
        for i in range(0, len(paths), bs):
            x, sz = load_batch(paths[i:i + bs], size=self.config.image_size, spec=self.backbone.spec, device=self.device)
            s, m = self.score_batch(x)
            scores.append(s)
            maps.append(m)
            sizes += sz
            if progress:
                progress(len(sz))
        if not scores:
            return np.zeros(0), np.zeros((0, self.config.image_size, self.config.image_size), np.float32), []
        return np.concatenate(scores), np.concatenate(maps), sizes

    def normalise_score(self, score: float) -> float:
        """Image score mapped to ``[0, 1]`` with the threshold at 0.5 (anomalib's min-max rule)."""
        return _minmax(score, self.threshold, self.norm.get("image_min"), self.norm.get("image_max"))


def _minmax(v, thr, lo, hi):
    if lo is None or hi is None or not np.isfinite(thr) or hi <= lo:
        return float("nan")
    return float(np.clip((v - thr) / (hi - lo) + 0.5, 0.0, 1.0))


# ------------------------------------------------------------------------------ pre-processing
def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as ``HxWx3`` uint8 RGB (grey and BGRA converted)."""
    import cv2

    from pipeline.core.io import read_image

    img = read_image(path)
    if img.dtype != np.uint8:
        img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def preprocess(images_rgb: Iterable[np.ndarray], *, size: int, spec, device: str = "cpu"):
    """``HxWx3`` uint8 RGB images -> ``Bx3xSxS`` float32 tensor, resized (area) and normalised."""
    import cv2
    import torch

    arr = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images_rgb])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def load_batch(paths: Sequence[Path], *, size: int, spec, device: str = "cpu"):
    """Read and pre-process image files: ``(Bx3xSxS tensor, [(H, W) native sizes])``."""
    imgs = [read_rgb(p) for p in paths]
    return preprocess(imgs, size=size, spec=spec, device=device), [im.shape[:2] for im in imgs]


# ------------------------------------------------------------------------------ features
def patch_features(backbone, x, *, feature_dim: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Locally aware patch features of a batch.

    Args:
        backbone: a :class:`pipeline.models.backbones.Backbone`.
        x: ``Bx3xSxS`` pre-processed tensor.
        feature_dim: optional channel count after adaptive average pooling over channels.

    Returns:
        ``(features, (h, w))``: ``(B*h*w)xD`` float32 array in row-major order (image, row, column),
        and the stride-8 grid size.
    """
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        f1, f2 = backbone.model(x)
        f1 = F.avg_pool2d(f1, 3, stride=1, padding=1)
        f2 = F.avg_pool2d(f2, 3, stride=1, padding=1)
        f2 = F.interpolate(f2, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        f = torch.cat([f1, f2], dim=1)  # BxDxhxw
        b, d, h, w = f.shape
        f = f.permute(0, 2, 3, 1).reshape(-1, d)
        if feature_dim is not None and feature_dim != d:
            f = F.adaptive_avg_pool1d(f.unsqueeze(1), feature_dim).squeeze(1)
    return f.float().cpu().numpy(), (h, w)


# ------------------------------------------------------------------------------ coreset
def greedy_coreset(features: np.ndarray, n: int, *, projection_dim: int | None = 128, seed: int = 0,
                   start: int | None = None, device: str = "cpu", progress: Callable | None = None) -> np.ndarray:
    """Greedy k-center coreset (Sener & Savarese 2018; PatchCore Alg. 1).

    Starting from one centre, repeatedly adds the point farthest (Euclidean) from the chosen set.
    Distances are taken on a Gaussian random projection to ``projection_dim`` dimensions (skipped
    when ``None`` or not smaller than ``D``).

    Args:
        features: ``NxD`` float array.
        n: number of centres, ``1 <= n <= N``.
        start: index of the first centre (default drawn with ``seed``).

    Returns:
        ``n`` int64 indices into ``features``, in selection order.
    """
    import torch

    N, D = features.shape
    n = int(max(1, min(n, N)))
    g = torch.Generator().manual_seed(seed)
    z = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if projection_dim is not None and projection_dim < D:
        proj = torch.randn(D, projection_dim, generator=g) / np.sqrt(projection_dim)
        z = z @ proj
    z = z.to(device)
    if start is None:
        start = int(torch.randint(N, (1,), generator=g).item())
    chosen = np.empty(n, dtype=np.int64)
    chosen[0] = start
    sq = torch.sum(z * z, dim=1)  # ||z||^2; distances as ||z||^2 - 2 z.c + ||c||^2 (no NxD temporaries)

    def dist_to(j: int):
        return torch.clamp_(sq - 2.0 * (z @ z[j]) + sq[j], min=0.0)

    min_d = dist_to(start)
    min_d[start] = 0.0
    for i in range(1, n):
        j = int(torch.argmax(min_d).item())
        chosen[i] = j
        torch.minimum(min_d, dist_to(j), out=min_d)
        min_d[j] = 0.0
        if progress and i % 256 == 0:
            progress(256)
    return chosen


# ------------------------------------------------------------------------------ search and scores
def build_index(bank: np.ndarray):
    """faiss exact L2 index (``IndexFlatL2``) over ``bank`` (``MxD`` float32)."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    return index


def knn(index, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` nearest bank features of each query: ``(distances Qxk float64 Euclidean, indices Qxk)``."""
    d2, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return np.sqrt(np.maximum(d2.astype(np.float64), 0.0)), idx


def reweighted_score(bank: np.ndarray, index, feats: np.ndarray, patch_scores: np.ndarray,
                     nn_idx: np.ndarray, num_neighbors: int) -> float:
    """PatchCore image score of one image (Roth et al. 2022, Eq. 7).

    Args:
        bank: ``MxD`` memory bank; index: its faiss index.
        feats: ``PxD`` patch features of the image; patch_scores: ``P`` nearest distances;
        nn_idx: ``P`` nearest bank indices.

    Returns:
        ``w * s*`` with ``s*`` the largest patch score (see module docstring).
    """
    p = int(np.argmax(patch_scores))
    s_star = float(patch_scores[p])
    b = min(num_neighbors, bank.shape[0])
    if b <= 1:
        return s_star
    m_star = int(nn_idx[p])
    _, support = knn(index, bank[m_star:m_star + 1], k=b)
    others = [int(j) for j in support[0] if j != m_star and j >= 0][: b - 1]
    d = np.concatenate([[s_star], np.linalg.norm(bank[others].astype(np.float64) - feats[p].astype(np.float64), axis=1)])
    e = np.exp(d - d.max())
    w = 1.0 - e[0] / e.sum()
    return float(w * s_star)


def patch_maps(patch: np.ndarray, *, size: int, sigma: float) -> np.ndarray:
    """``Bxhxw`` patch scores -> ``BxSxS`` float32 maps: bilinear upsampling, Gaussian ``sigma`` px."""
    import cv2

    k = 2 * int(4 * sigma + 0.5) + 1
    out = np.empty((patch.shape[0], size, size), np.float32)
    for i, p in enumerate(patch.astype(np.float32)):
        up = cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR)
        out[i] = cv2.GaussianBlur(up, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT) if sigma > 0 else up
    return out


# ------------------------------------------------------------------------------ fit
def fit_patchcore(train_paths: Sequence[Path], config: PatchCoreConfig = PatchCoreConfig(), *,
                  device: str | None = None, log: Callable[[str], None] = lambda s: None,
                  progress: bool = False, allow_download: bool = False) -> PatchCore:
    """Fit PatchCore on good images.

    Args:
        train_paths: the good training images (any sizes; see module docstring).
        config: settings; ``config.backbone=None`` picks the best available backbone.
        device: ``"cuda"``/``"cpu"``; default CUDA when available.
        log: receives one-line notes (backbone chosen, mixed sizes, bank size).
        allow_download: let a missing torchvision ImageNet file be downloaded (off by default).

    Returns:
        A :class:`PatchCore` without thresholds (see :func:`calibrate`); ``None`` on ranks other
        than 0 of a ``torchrun`` launch.

    Under ``torchrun`` (``pipeline.core.distributed``) the feature extraction is split over the ranks
    (strided shards of the batches, one GPU each), the features are gathered on rank 0 in image
    order, and rank 0 alone selects the coreset, so the bank equals a single-process fit's.

    Raises:
        PipelineError: no training images, bad config, backbone unknown or its weights missing.
    """
    import torch

    from pipeline.models import backbones
    from pipeline.core import distributed as D

    config.check()
    if not train_paths:
        raise PipelineError("no training images (expected good images in <category>/train/good)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    D.init_from_env(device)
    device = D.local_device(device)
    name = config.backbone or backbones.default_backbone()
    config = PatchCoreConfig(**{**asdict(config), "backbone": name})
    bb = backbones.load_backbone(name, weights=config.weights, device=device, allow_download=allow_download)
    log(f"backbone {name} ({', '.join(bb.spec.layers)}) from {bb.weights_path}")
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    feats, sizes, grid = [], set(), None
    starts = list(range(0, len(train_paths), config.batch_size))
    mine = D.shard_indices(len(starts))  # all batches in a single process
    bar = _progress(progress and D.is_main(), "features", sum(len(train_paths[starts[b]:starts[b] + config.batch_size]) for b in mine))
    for b in mine:
        i = starts[b]
        x, sz = load_batch(train_paths[i:i + config.batch_size], size=config.image_size, spec=bb.spec, device=device)
        f, grid = patch_features(bb, x, feature_dim=config.feature_dim)
        feats.append((b, f))
        sizes.update(tuple(s) for s in sz)
        bar(len(sz))
    bar(None)
    parts = D.gather_to_main((feats, sorted(sizes), grid))
    if parts is None:  # not rank 0: its features went to rank 0, which builds the bank
        return None
    feats = [f for _, f in sorted((bf for part in parts for bf in part[0]), key=lambda bf: bf[0])]
    sizes = {tuple(s) for part in parts for s in part[1]}
    grid = next(part[2] for part in parts if part[2] is not None)
    if len(sizes) > 1:
        log(f"training images have {len(sizes)} different sizes; all are resized to {config.image_size}x{config.image_size}")
    feats = np.concatenate(feats)
    t_feat = time.perf_counter() - t0
    n = max(1, int(round(config.coreset_ratio * len(feats))))
    bar = _progress(progress, "coreset", n)
    if n < len(feats):
        idx = greedy_coreset(feats, n, projection_dim=config.projection_dim, seed=config.seed, device=device, progress=bar)
        bank = feats[idx]
    else:
        bank = feats
    bar(None)
    fit_s = time.perf_counter() - t0
    log(f"memory bank {bank.shape[0]} x {bank.shape[1]} from {len(feats)} patches of {len(train_paths)} images in {fit_s:.1f} s")
    info = {"train_images": len(train_paths), "train_patches": int(len(feats)), "fit_seconds": round(fit_s, 3),
            "feature_seconds": round(t_feat, 3), "native_sizes_hw": sorted([list(s) for s in sizes]),
            "device": device}
    return PatchCore(config=config, backbone=bb, memory_bank=np.ascontiguousarray(bank, np.float32), grid_hw=tuple(grid), info=info)


def _progress(enabled: bool, label: str, total: int):
    """A tiny rich progress bar: call with a step count, ``None`` to close."""
    if not enabled:
        return lambda k: None
    from rich.progress import Progress

    prog = Progress(transient=True)
    task = prog.add_task(label, total=total)
    prog.start()

    def step(k):
        if k is None:
            prog.stop()
        else:
            prog.advance(task, k)

    return step


def calibrate(model: PatchCore, scores: np.ndarray, maps: np.ndarray, labels: Sequence[str],
              masks: Sequence[np.ndarray | None], sizes: Sequence[tuple[int, int]]) -> dict:
    """Choose the thresholds and normalisation on a validation set (in place on ``model``).

    Image threshold: F1-optimal on ``scores`` (defect = label != "good"); pixel threshold:
    F1-optimal over validation pixels at native mask resolution. With no defect in the set the
    image threshold is just above the highest good score (so no validation image is flagged) and the
    pixel threshold the highest map value; with only defects, the lowest defect score.

    Returns:
        ``{"image_f1": ..., "pixel_f1": ..., "threshold": ..., "pixel_threshold": ...}``.
    """
    from pipeline.evaluation.anomaly import PixelHist, f1_max, resize_map

    y = np.array([lab != "good" for lab in labels])
    if len(scores) == 0:
        raise PipelineError("no validation images to choose a threshold on (expected a non-empty val split)")
    if y.any() and (~y).any():
        f1, thr = f1_max(scores, y)
    else:
        f1 = float("nan")
        thr = float(np.nextafter(np.max(scores), np.inf)) if not y.any() else float(np.min(scores))
    lo, hi = float(maps.min()), float(maps.max())
    hist = PixelHist(lo, hi)
    for m, mask, size in zip(maps, masks, sizes):
        hist.add(resize_map(m, size), mask)
    pm = hist.metrics()
    pthr = pm["pixel_threshold"] if np.isfinite(pm["pixel_threshold"]) else hi
    model.threshold = float(thr)
    model.pixel_threshold = float(pthr)
    model.norm = {"image_min": float(np.min(scores)), "image_max": float(np.max(scores)), "map_min": lo, "map_max": hi}
    return {"image_f1": f1, "threshold": float(thr), "pixel_f1": pm["pixel_f1_max"], "pixel_threshold": float(pthr)}


# ------------------------------------------------------------------------------ artefact
def save_artefact(model: PatchCore, path: Path) -> None:
    """Write the whole fitted model to one file (atomic), loadable with ``weights_only=True``."""
    import io

    import torch

    from pipeline.core.io import atomic_write_bytes

    spec = model.backbone.spec
    obj = {
        "format": ARTEFACT_FORMAT,
        "version": ARTEFACT_VERSION,
        "config": asdict(model.config),
        "backbone": {"name": spec.name, "layers": list(spec.layers), "channels": list(spec.channels),
                     "weights_file": str(model.backbone.weights_path), "provenance": spec.provenance,
                     "state_dict": {k: v.detach().cpu() for k, v in model.backbone.model.state_dict().items()}},
        "preprocess": {"resize": [model.config.image_size, model.config.image_size], "interpolation": "area",
                       "color": "RGB", "mean": list(spec.mean), "std": list(spec.std)},
        "memory_bank": torch.from_numpy(model.memory_bank),
        "grid_hw": list(model.grid_hw),
        "threshold": float(model.threshold),
        "pixel_threshold": float(model.pixel_threshold),
        "norm": dict(model.norm),
        "info": _plain(model.info),
    }
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def _plain(obj):
    """Only str/int/float/bool/None/list/dict survive ``weights_only`` loading."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def load_artefact(path: Path, *, device: str | None = None) -> PatchCore:
    """Load a PatchCore artefact written by :func:`save_artefact` (no weights file needed).

    Raises:
        PipelineError: missing file, not a PatchCore artefact, or a version this code cannot read.
    """
    import torch

    from pipeline.models import backbones

    path = Path(path)
    obj = load_torch_file(path, what="PatchCore artefact (model.pt from `pipeline finetune anomaly`)")
    if not isinstance(obj, dict) or obj.get("format") != ARTEFACT_FORMAT:
        raise PipelineError(f"{path}: not a PatchCore artefact (expected format {ARTEFACT_FORMAT!r})")
    if obj.get("version") != ARTEFACT_VERSION:
        raise PipelineError(f"{path}: artefact version {obj.get('version')} (this code reads {ARTEFACT_VERSION})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = PatchCoreConfig(**obj["config"])
    bname = obj["backbone"]["name"]
    model = backbones.build_stages(bname, stages_state=obj["backbone"]["state_dict"], source=path).to(device)
    bb = backbones.Backbone(spec=backbones.SPECS[bname], model=model, weights_path=Path(obj["backbone"]["weights_file"]))
    return PatchCore(config=config, backbone=bb, memory_bank=obj["memory_bank"].numpy().astype(np.float32),
                     grid_hw=tuple(obj["grid_hw"]), threshold=float(obj["threshold"]),
                     pixel_threshold=float(obj["pixel_threshold"]), norm=dict(obj["norm"]), info=dict(obj["info"]))


# ------------------------------------------------------------------------------ maps -> COCO
def map_to_coco(amap: np.ndarray, *, image_id: int, threshold: float, size_hw: tuple[int, int] | None = None,
                category_id: int = 1, min_area: int = 1, connectivity: int = 8,
                norm: tuple[float, float] | None = None) -> list[dict]:
    """Threshold an anomaly map into COCO result instances, one per connected component.

    Args:
        amap: ``hxw`` float map (model resolution); resized bilinearly to ``size_hw`` (H, W) first.
        threshold: pixels ``>= threshold`` are anomalous (raw map units).
        category_id: class-agnostic detections get this COCO category id (default 1; evaluate them
            with ``useCats = 0`` or map them to the one class).
        norm: ``(map_min, map_max)``: when given, ``score`` is the component's maximum mapped to
            ``[0, 1]`` with the threshold at 0.5 (``clip((v - threshold) / (max - min) + 0.5)``).

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h] px, "score", "score_raw": max map value
        in the component, "segmentation": compressed RLE, "area"}]``.
    """
    from pipeline.evaluation.anomaly import resize_map
    from pipeline.data.instances import encode_rle, mask_to_instances

    m = resize_map(amap, size_hw) if size_hw is not None else amap
    out = []
    for inst in mask_to_instances(m >= threshold, connectivity=connectivity, min_area=min_area):
        raw = float(m[inst.mask].max())
        score = _minmax(raw, threshold, norm[0], norm[1]) if norm is not None else raw
        out.append({"image_id": int(image_id), "category_id": int(category_id),
                    "bbox": [float(v) for v in inst.bbox_xywh], "score": score, "score_raw": raw,
                    "segmentation": encode_rle(inst.mask), "area": int(inst.area)})
    return out


def overlay(image_rgb: np.ndarray, amap: np.ndarray, *, lo: float, hi: float, alpha: float = 0.5,
            mask: np.ndarray | None = None) -> np.ndarray:
    """Heat-map overlay: ``HxWx3`` uint8 BGR (JET colours of the map scaled from ``lo`` to ``hi``),
    the ground-truth outline in green when ``mask`` is given."""
    import cv2

    from pipeline.evaluation.anomaly import resize_map

    h, w = image_rgb.shape[:2]
    m = resize_map(amap, (h, w))
    norm = np.clip((m - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), 1 - alpha, heat, alpha, 0)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), max(1, h // 300))
    return out


# ------------------------------------------------------------------------------ run folders (CLI)
def resolve_split(category_dir: Path | None, split_path: Path | None):
    """The :class:`pipeline.data.split.Split` to use: the manifest given (relocated to ``category_dir``
    when both are given), else a split drawn in memory with :func:`pipeline.data.split.make_split`
    (seed 0, 60/20/20, the ``convert-masks`` defaults) from ``category_dir``.

    Raises:
        PipelineError: neither given, or an invalid manifest/category.
    """
    from pipeline.data.mvtec import scan_category
    from pipeline.data.split import Split, load_split, make_split

    if split_path is not None:
        return load_split(Path(split_path), root=Path(category_dir) if category_dir else None)
    if category_dir is None:
        raise PipelineError("give a category folder or a split manifest (--split annotations/<category>/split.json)")
    cat = scan_category(Path(category_dir))
    m = make_split(cat)
    return Split(path=Path(category_dir) / "split.json (in memory)", root=cat.root, category=cat.name,
                 classes=tuple(m["classes"]), manifest=m)


def _train_good(split, category_dir: Path | None) -> list[Path]:
    from pipeline.data.mvtec import IMAGE_SUFFIXES

    folder = (Path(category_dir) if category_dir else split.root) / "train" / "good"
    if not folder.is_dir():
        raise PipelineError(f"{folder}: missing (expected the good training images in <category>/train/good)")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PipelineError(f"{folder}: no images (expected good training images: .png/.jpg files)")
    return paths


def fit_run(category_dir: Path | None, *, out: Path, config: PatchCoreConfig = PatchCoreConfig(),
            split_path: Path | None = None, force: bool = False, progress: bool = True,
            allow_download: bool = False, device: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """``pipeline finetune anomaly``: fit on ``train/good``, calibrate on the split's ``val``, write a run folder.

    The folder ``out`` holds ``model.pt`` (the artefact), ``config.yaml``, ``metrics.json``
    (fit time, memory-bank size, validation metrics), ``split.json`` (the manifest used) and ``log.txt``.

    Returns:
        The metrics dict.

    Raises:
        PipelineError: missing/empty ``train/good``, empty ``val``, unknown backbone or missing weights,
            existing ``out`` without ``force``.
    """
    import yaml

    from pipeline.evaluation.anomaly import auroc, f1_max
    from pipeline.core.io import atomic_write_json, atomic_write_text, check_can_write, staged_dir
    from pipeline.data.mvtec import read_mask

    out = Path(out)
    check_can_write(out, force=force)
    split = resolve_split(category_dir, split_path)
    train = _train_good(split, category_dir)
    val = split.samples("val")
    if not val:
        raise PipelineError(f"{split.path}: the val split is empty (expected images to choose the threshold on)")
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        echo(msg)

    from pipeline.core import distributed as D

    D.init_from_env(device)
    if not D.is_main():  # under torchrun: share the feature extraction, rank 0 writes the run
        fit_patchcore(train, config, progress=False, allow_download=allow_download, device=device)
        return {}
    with staged_dir(out, force=force) as tmp:
        model = fit_patchcore(train, config, log=log, progress=progress, allow_download=allow_download, device=device)
        t0 = time.perf_counter()
        scores, maps, sizes = model.score_paths([s.image for s in val])
        per_image = (time.perf_counter() - t0) / len(val)
        masks = [read_mask(s.mask) if s.mask else None for s in val]
        cal = calibrate(model, scores, maps, [s.label for s in val], masks, sizes)
        y = np.array([s.label != "good" for s in val])
        metrics = {
            "backbone": model.config.backbone,
            "layers": list(model.backbone.spec.layers),
            "weights": str(model.backbone.weights_path),
            "memory_bank": list(model.memory_bank.shape),
            "memory_bank_mb": round(model.memory_bank.nbytes / 2**20, 2),
            **model.info,
            "val": {"n_images": len(val), "image_auroc": auroc(scores, y), "image_f1_max": f1_max(scores, y)[0],
                    "seconds_per_image": round(per_image, 4), **cal},
        }
        model.info["val"] = metrics["val"]
        save_artefact(model, tmp / "model.pt")
        from pipeline.data.split import write_split

        write_split(split.manifest, tmp / "split.json")
        cfg = {"category": str(split.root), "split": str(split.path), **asdict(model.config)}
        atomic_write_text(tmp / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        atomic_write_json(tmp / "metrics.json", _json_safe(metrics))
        log(f"threshold {model.threshold:.4g} (F1-optimal on {len(val)} val images), pixel threshold {model.pixel_threshold:.4g}")
        atomic_write_text(tmp / "log.txt", "\n".join(lines) + "\n")
    return metrics


def _json_safe(obj):
    from pipeline.core.io import to_json_plain as _jsonable

    return _jsonable(obj)


def predict_run(artefact: Path, *, out: Path, category_dir: Path | None = None, split_path: Path | None = None,
                subset: str = "test", save_maps: bool = True, overlays: int = 8, coco: bool = True,
                force: bool = False, progress: bool = True, device: str | None = None,
                echo: Callable[[str], None] = print) -> Path:
    """``pipeline predict anomaly``: score a split's images with a saved artefact.

    Writes into ``out``: ``predictions.json`` (``{"kind": "anomaly", ...}``, see the project's
    prediction-file contract), ``maps/<image_id>.npy`` (float32 maps at the model's input size,
    needed for pixel metrics; ``save_maps=False`` skips them), ``overlays/*.png`` (heat maps over the
    native image for ``overlays`` images, spread over the labels, ground truth outlined in green) and
    ``coco_results.json`` (maps thresholded at the artefact's pixel threshold into boxes and RLE masks,
    one per connected component, ``category_id`` 1, class-agnostic; ``score`` is the component's peak
    normalised to ``[0, 1]`` with the pixel threshold at 0.5, ``score_raw`` the peak in map units).

    Args:
        subset: ``train``, ``val``, ``test`` (split names) or ``all``.

    Returns:
        Path of ``predictions.json``.
    """
    import cv2

    from pipeline.core.io import atomic_write_bytes, atomic_write_json, check_can_write, staged_dir
    from pipeline.data.mvtec import read_mask
    from pipeline.data.split import SPLITS

    out = Path(out)
    check_can_write(out, force=force)
    model = load_artefact(artefact, device=device)
    split = resolve_split(category_dir, split_path)
    if subset == "all":
        samples = [s for name in SPLITS for s in split.samples(name)]
    else:
        samples = split.samples(subset)
    if not samples:
        raise PipelineError(f"{split.path}: split {subset!r} has no images")
    from pipeline.data.split import image_ids

    ids = image_ids(split.manifest)
    bar = _progress(progress, "scoring", len(samples))
    scores, maps, sizes = model.score_paths([s.image for s in samples], progress=bar)
    bar(None)
    preds, results = [], []
    lo = model.norm.get("map_min", float(maps.min()))
    hi = model.norm.get("map_max", float(maps.max()))
    chosen = _sample_for_overlays(samples, overlays)
    with staged_dir(out, force=force) as tmp:
        for k, (s, sc, m, size) in enumerate(zip(samples, scores, maps, sizes)):
            rel = s.image.relative_to(split.root).as_posix()
            iid = ids.get(rel)
            p = {"image": rel, "image_id": iid, "score": float(sc), "score_norm": model.normalise_score(float(sc)),
                 "label": "defect" if sc >= model.threshold else "good"}
            stem = str(iid) if iid is not None else f"img{k:05d}"
            if save_maps:
                (tmp / "maps").mkdir(exist_ok=True)
                np.save(tmp / "maps" / f"{stem}.npy", m.astype(np.float32))
                p["map"] = f"maps/{stem}.npy"
            preds.append(p)
            if coco and iid is not None and np.isfinite(model.pixel_threshold):
                results += map_to_coco(m, image_id=iid, threshold=model.pixel_threshold, size_hw=tuple(size),
                                       norm=(lo, hi) if hi > lo else None)
            if k in chosen:
                img = read_rgb(s.image)
                mask = read_mask(s.mask) if s.mask else None
                ov = overlay(img, m, lo=lo, hi=hi, mask=mask)
                ok, buf = cv2.imencode(".png", ov)
                atomic_write_bytes(tmp / "overlays" / f"{s.label}_{s.image.stem}_{sc:.3g}.png", buf.tobytes())
        doc = {"kind": "anomaly", "model": str(Path(artefact).resolve()), "backbone": model.config.backbone,
               "threshold": float(model.threshold), "pixel_threshold": float(model.pixel_threshold),
               "root": str(split.root), "split": str(split.path), "subset": subset,
               "image_size": model.config.image_size, "predictions": preds}
        atomic_write_json(tmp / "predictions.json", _json_safe(doc))
        if coco:
            atomic_write_json(tmp / "coco_results.json", results, indent=None)
    echo(f"{len(preds)} predictions ({sum(p['label'] == 'defect' for p in preds)} defect) with backbone "
         f"{model.config.backbone} -> {out / 'predictions.json'}")
    return out / "predictions.json"


def _sample_for_overlays(samples, n: int) -> set[int]:
    """Indices of up to ``n`` samples taken round-robin over labels (deterministic)."""
    by: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by.setdefault(s.label, []).append(i)
    chosen: list[int] = []
    r = 0
    while len(chosen) < min(n, len(samples)):
        for lab in sorted(by):
            if r < len(by[lab]) and len(chosen) < n:
                chosen.append(by[lab][r])
        r += 1
    return set(chosen)
