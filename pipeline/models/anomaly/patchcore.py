"""PatchCore: unsupervised anomaly detection and localisation from good images only.

Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022, implemented from the
paper:

1. Features: two mid-level stages of an ImageNet CNN (:mod:`pipeline.models.backbones`; ``stages``,
   default the trunk's pair in :data:`TRUNK_DEFAULTS`, strides 8 and 16), each locally aggregated by
   a ``3x3`` average pool (stride 1, the paper's neighbourhood ``p = 3``), the deeper one upsampled
   bilinearly to the shallower one's grid, concatenated per patch, and optionally
   reduced to ``feature_dim`` channels by adaptive average pooling over channels (the paper's
   projection).
2. Memory bank: every patch feature of ``train/good``, reduced by greedy k-center coreset selection
   (``coreset_ratio`` of the patches) on a Johnson-Lindenstrauss random projection to
   ``projection_dim`` dimensions.
3. Scores: patch score = Euclidean distance to the nearest memory-bank feature (faiss exact search);
   image score = the maximum patch score ``s*`` times the paper's weight
   ``w = 1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||)`` where ``m*`` is the
   nearest bank feature of the most anomalous test patch ``m_test`` and ``N_b(m*)`` its ``b`` nearest
   bank neighbours (``m*`` included); anomaly map = patch scores upsampled to the input size
   (``upsample``: bilinear or nearest) and smoothed by a Gaussian with ``sigma`` = 4 px.

Pre-processing (:mod:`pipeline.models.anomaly.features`): every 8-bit image is converted to RGB and
resized (``resize``: area on 8-bit or antialiased bilinear on floats; aspect ratio not kept) to
``image_size`` x ``image_size``; maps come back at that size and are resized bilinearly to the
native image size for overlays, boxes and metrics.

The artefact (``model.pt``, loadable with ``torch.load(weights_only=True)``) holds the memory bank,
the backbone's name, layers and cut weights, the pre-processing, the thresholds and the score
normalisation: :func:`load_artefact` needs nothing else.

Run folders: :mod:`pipeline.models.anomaly.train` (``finetune anomaly``: fit, calibrate, write) and
:mod:`pipeline.models.anomaly.predict` (``predict anomaly``: score a split, maps to COCO regions).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from pipeline.core.console import progress as progress_bar
from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_torch_save, load_torch_file, to_json_plain
from pipeline.models.anomaly.features import (  # noqa: F401  (re-exported: the family's one entry point)
    RESIZE_METHODS,
    UPSAMPLE_METHODS,
    check_choice,
    load_batch,
    patch_features,
    patch_maps,
    preprocess,
)

ARTEFACT_FORMAT = "pipeline.patchcore"
ARTEFACT_VERSION = 2
# Version 1 artefacts predate these settings; they were fitted and must be scored this way.
V1_SETTINGS = {"resize": "area", "upsample": "bilinear"}

# Per trunk, the stage pair (names of backbones.STAGE_TAPS) and the resize method used unless the
# config says otherwise. The two registry trunks' values were chosen on bottle's val split
# (benchmarks/patchcore_sweep.py, README); the ResNets keep the paper's layer2 + layer3 and were not
# swept (no weights here).
TRUNK_DEFAULTS: dict[str, dict[str, str]] = {
    "wide_resnet50_2": {"stages": "layer2,layer3", "resize": "area"},
    "resnet18": {"stages": "layer2,layer3", "resize": "area"},
    "efficientnet_lite0": {"stages": "blocks.4,blocks.7", "resize": "area"},
    "mobilenet_v2": {"stages": "features.6,features.10", "resize": "bilinear_aa"},
}


@dataclass(frozen=True)
class PatchCoreConfig:
    """Settings of a PatchCore fit (all saved in the artefact).

    Attributes:
        backbone: backbone name (``None`` = :func:`pipeline.models.backbones.default_backbone`).
        weights: explicit weights file for the backbone (``None`` = its default location).
        image_size: side in pixels of the square network input.
        resize: ``"area"`` (8-bit) or ``"bilinear_aa"`` (antialiased bilinear on floats); see
            :mod:`pipeline.models.anomaly.features` (``None`` = the trunk's :data:`TRUNK_DEFAULTS`;
            :func:`resolve_backbone` fills it in).
        upsample: patch grid -> map before the blur, ``"nearest"`` or ``"bilinear"``.
        stages: the two backbone stages, comma-separated, shallower first (``None`` = the trunk's
            :data:`TRUNK_DEFAULTS`; :func:`resolve_backbone` fills it in).
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
    image_size: int = 256
    resize: str | None = None
    upsample: str = "nearest"
    stages: str | None = None
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
        if self.resize is not None:
            check_choice("resize", self.resize, RESIZE_METHODS)
        check_choice("upsample", self.upsample, UPSAMPLE_METHODS)

    def stage_names(self) -> tuple[str, ...] | None:
        """``stages`` as a tuple of names (``None`` when unset)."""
        return tuple(t.strip() for t in self.stages.split(",")) if self.stages else None


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
            x: ``Bx3xSxS`` float tensor from :meth:`preprocess`.

        Returns:
            ``(scores, maps)``: ``B`` float64 image scores and ``BxSxS`` float32 smoothed anomaly maps
            (distance units of the feature space).
        """
        feats, grid = patch_features(self.backbone, x, feature_dim=self.config.feature_dim)
        scores, patch = self.score_features(feats, x.shape[0], grid)
        maps = patch_maps(patch, size=self.config.image_size, sigma=self.config.sigma, upsample=self.config.upsample)
        return scores, maps

    def score_features(self, feats: np.ndarray, b: int, grid: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Image scores and patch-score grids of ``b`` images' patch features.

        Args:
            feats: ``(b*h*w)xD`` float32 from :func:`patch_features` (row-major: image, row, column).
            grid: ``(h, w)``.

        Returns:
            ``(scores, patch)``: ``b`` float64 re-weighted image scores, ``bxhxw`` float64 patch scores
            (nearest-neighbour distances, before upsampling and blur).
        """
        dist, nn_idx = knn(self.index(), feats, k=1)
        patch = dist[:, 0].reshape(b, grid[0] * grid[1])
        nn_idx = nn_idx[:, 0].reshape(b, -1)
        feats = feats.reshape(b, grid[0] * grid[1], -1)
        scores = np.array(
            [
                reweighted_score(
                    self.memory_bank, self.index(), feats[i], patch[i], nn_idx[i], self.config.num_neighbors
                )
                for i in range(b)
            ]
        )
        return scores, patch.reshape(b, *grid)

    def score_paths(
        self, paths: Sequence[Path], *, progress: Callable | None = None
    ) -> tuple[np.ndarray, np.ndarray, list]:
        """Score image files: ``(scores B, maps BxSxS float32, native sizes [(H, W)])``."""
        scores, maps, sizes = [], [], []
        bs = self.config.batch_size
        for i in range(0, len(paths), bs):
            x, sz = load_batch(
                paths[i : i + bs],
                size=self.config.image_size,
                spec=self.backbone.spec,
                device=self.device,
                resize=self.config.resize,
            )
            s, m = self.score_batch(x)
            scores.append(s)
            maps.append(m)
            sizes += sz
            if progress:
                progress(len(sz))
        if not scores:
            return np.zeros(0), np.zeros((0, self.config.image_size, self.config.image_size), np.float32), []
        return np.concatenate(scores), np.concatenate(maps), sizes

    def preprocess(self, images_rgb: Iterable[np.ndarray]):
        """``HxWx3`` uint8 RGB images -> the ``Bx3xSxS`` tensor :meth:`score_batch` takes (this model's
        size, resize method and normalisation, on its device)."""
        return preprocess(
            images_rgb,
            size=self.config.image_size,
            spec=self.backbone.spec,
            device=self.device,
            resize=self.config.resize,
        )

    def normalise_score(self, score: float) -> float:
        """Image score mapped to ``[0, 1]`` with the threshold at 0.5 (anomalib's min-max rule)."""
        return minmax_score(score, self.threshold, self.norm.get("image_min"), self.norm.get("image_max"))


def minmax_score(v: float, thr: float, lo: float | None, hi: float | None) -> float:
    """``v`` mapped to ``[0, 1]`` with ``thr`` at 0.5: ``clip((v - thr) / (hi - lo) + 0.5, 0, 1)``;
    ``nan`` when the range is unknown or empty or ``thr`` is not finite."""
    if lo is None or hi is None or not np.isfinite(thr) or hi <= lo:
        return float("nan")
    return float(np.clip((v - thr) / (hi - lo) + 0.5, 0.0, 1.0))


# ------------------------------------------------------------------------------ coreset
def greedy_coreset(
    features: np.ndarray,
    n: int,
    *,
    projection_dim: int | None = 128,
    seed: int = 0,
    start: int | None = None,
    device: str = "cpu",
    progress: Callable | None = None,
) -> np.ndarray:
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
    # The loop is one matrix-vector product per centre, bound by memory reads: a d x N copy (c @ zt) runs
    # about 2.5x faster on CPU than N x d (z @ c) for d = 128 and the same arithmetic.
    zt = z.T.contiguous()
    del z

    def dist_to(j: int):
        return torch.clamp_(sq - 2.0 * (zt[:, j] @ zt) + sq[j], min=0.0)

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


def reweighted_score(
    bank: np.ndarray, index, feats: np.ndarray, patch_scores: np.ndarray, nn_idx: np.ndarray, num_neighbors: int
) -> float:
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
    _, support = knn(index, bank[m_star : m_star + 1], k=b)
    others = [int(j) for j in support[0] if j != m_star and j >= 0][: b - 1]
    d_others = np.linalg.norm(bank[others].astype(np.float64) - feats[p].astype(np.float64), axis=1)
    d = np.concatenate([[s_star], d_others])
    e = np.exp(d - d.max())
    w = 1.0 - e[0] / e.sum()
    return float(w * s_star)


# ------------------------------------------------------------------------------ fit
def resolve_backbone(config: PatchCoreConfig, *, allow_download: bool = False) -> PatchCoreConfig:
    """``config`` checked and with its backbone named (``None`` -> the best one whose weights are on
    disk), after making sure the backbone's weights file can be found (or, with ``allow_download``,
    fetched). Lets a command refuse bad settings before it writes anything.

    Raises:
        PipelineError: values out of range, unknown backbone, or its weights missing.
    """
    from pipeline.models import backbones

    config.check()
    name = config.backbone or backbones.default_backbone()
    trunk = TRUNK_DEFAULTS[backbones.stage_spec(name).name]
    spec = backbones.stage_spec(name, tuple(t.strip() for t in (config.stages or trunk["stages"]).split(",")))
    backbones.weights_file(name, weights=config.weights, allow_download=allow_download)
    return replace(config, backbone=name, stages=",".join(spec.layers), resize=config.resize or trunk["resize"])


def fit_patchcore(
    train_paths: Sequence[Path],
    config: PatchCoreConfig = PatchCoreConfig(),
    *,
    device: str | None = None,
    log: Callable[[str], None] = lambda s: None,
    progress: bool = False,
    allow_download: bool = False,
) -> PatchCore:
    """Fit PatchCore on good images.

    Args:
        train_paths: the good training images (any sizes; see module docstring).
        config: settings; ``config.backbone=None`` picks the best available backbone.
        device: a ``--device`` value (:func:`pipeline.core.device.resolve_device`; default CUDA when
            available).
        log: receives one-line notes (backbone chosen, mixed sizes, bank size).
        progress: show progress bars (features, coreset).
        allow_download: let a missing torchvision ImageNet file be downloaded (off by default).

    Returns:
        A :class:`PatchCore` without thresholds (see :func:`pipeline.models.anomaly.train.calibrate`);
        ``None`` on ranks other than 0 of a ``torchrun`` launch.

    Under ``torchrun`` (``pipeline.core.distributed``) the feature extraction is split over the ranks
    (strided shards of the batches, one GPU each), the features are gathered on rank 0 in image
    order, and rank 0 alone selects the coreset, so the bank equals a single-process fit's.

    Raises:
        PipelineError: no training images, bad config, backbone unknown or its weights missing.
    """
    import torch

    from pipeline.core import distributed as D
    from pipeline.models import backbones

    config.check()
    if not train_paths:
        raise PipelineError("no training images (expected good images in <category>/train/good)")
    device = resolve_device(device)
    D.init_from_env(device)
    config = resolve_backbone(config, allow_download=allow_download)
    bb = backbones.load_backbone_at(
        config.backbone, config.stage_names(), weights=config.weights, device=device, allow_download=allow_download
    )
    log(f"backbone {config.backbone} ({', '.join(bb.spec.layers)}) from {bb.weights_path}")
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    gathered = train_features(bb, train_paths, config, device=device, progress=progress)
    if gathered is None:  # not rank 0: its features went to rank 0, which builds the bank
        return None
    feats, sizes, grid = gathered
    if len(sizes) > 1:
        log(
            f"training images have {len(sizes)} different sizes; "
            f"all are resized to {config.image_size}x{config.image_size}"
        )
    t_feat = time.perf_counter() - t0
    bank = coreset_bank(feats, config, device=device, progress=progress)
    fit_s = time.perf_counter() - t0
    log(
        f"memory bank {bank.shape[0]} x {bank.shape[1]} from {len(feats)} patches of {len(train_paths)} images "
        f"in {fit_s:.1f} s"
    )
    info = {
        "train_images": len(train_paths),
        "train_patches": int(len(feats)),
        "fit_seconds": round(fit_s, 3),
        "feature_seconds": round(t_feat, 3),
        "native_sizes_hw": sorted([list(s) for s in sizes]),
        "device": device,
    }
    return PatchCore(
        config=config, backbone=bb, memory_bank=np.ascontiguousarray(bank, np.float32), grid_hw=tuple(grid), info=info
    )


def train_features(
    backbone, paths: Sequence[Path], config: PatchCoreConfig, *, device: str = "cpu", progress: bool = False
) -> tuple[np.ndarray, set, tuple[int, int]] | None:
    """Patch features of the training images; under ``torchrun`` each rank extracts a strided shard
    of the batches and rank 0 gathers them.

    Returns:
        On rank 0 (or a single process): ``(features, sizes, grid)``, the ``NxD`` float32 features in
        image order (see :func:`patch_features`), the set of native ``(H, W)`` sizes seen and the
        feature grid ``(h, w)``; ``None`` on other ranks.
    """
    from pipeline.core import distributed as D

    bs = config.batch_size
    starts = list(range(0, len(paths), bs))
    mine = D.shard_indices(len(starts))  # all batches in a single process
    feats, sizes, grid = [], set(), None
    total = sum(len(paths[starts[b] : starts[b] + bs]) for b in mine)
    with progress_bar("features", total, enabled=progress and D.is_main(), transient=True) as advance:
        for b in mine:
            x, sz = load_batch(
                paths[starts[b] : starts[b] + bs],
                size=config.image_size,
                spec=backbone.spec,
                device=device,
                resize=config.resize,
            )
            f, grid = patch_features(backbone, x, feature_dim=config.feature_dim)
            feats.append((b, f))
            sizes.update(tuple(s) for s in sz)
            advance(len(sz))
    parts = D.gather_to_main((feats, sorted(sizes), grid))
    if parts is None:
        return None
    ordered = [f for _, f in sorted((bf for part in parts for bf in part[0]), key=lambda bf: bf[0])]
    sizes = {tuple(s) for part in parts for s in part[1]}
    grid = next(part[2] for part in parts if part[2] is not None)
    return np.concatenate(ordered), sizes, grid


def coreset_bank(
    features: np.ndarray, config: PatchCoreConfig, *, device: str = "cpu", progress: bool = False
) -> np.ndarray:
    """The memory bank: ``round(coreset_ratio * N)`` rows (at least 1) of the ``NxD`` ``features``
    chosen by :func:`greedy_coreset`, or all of them when that is not fewer."""
    n = max(1, int(round(config.coreset_ratio * len(features))))
    if n >= len(features):
        return features
    with progress_bar("coreset", n, enabled=progress, transient=True) as advance:
        idx = greedy_coreset(
            features, n, projection_dim=config.projection_dim, seed=config.seed, device=device, progress=advance
        )
    return features[idx]


# ------------------------------------------------------------------------------ artefact
def save_artefact(model: PatchCore, path: Path) -> None:
    """Write the whole fitted model to one file (atomic), loadable with ``weights_only=True``."""
    import torch

    spec = model.backbone.spec
    obj = {
        "format": ARTEFACT_FORMAT,
        "version": ARTEFACT_VERSION,
        "config": asdict(model.config),
        "backbone": {
            "name": spec.name,
            "layers": list(spec.layers),
            "channels": list(spec.channels),
            "weights_file": str(model.backbone.weights_path),
            "provenance": spec.provenance,
            "state_dict": {k: v.detach().cpu() for k, v in model.backbone.model.state_dict().items()},
        },
        "preprocess": {
            "resize": [model.config.image_size, model.config.image_size],
            "interpolation": model.config.resize,
            "map_upsampling": model.config.upsample,
            "color": "RGB",
            "mean": list(spec.mean),
            "std": list(spec.std),
        },
        "memory_bank": torch.from_numpy(model.memory_bank),
        "grid_hw": list(model.grid_hw),
        "threshold": float(model.threshold),
        "pixel_threshold": float(model.pixel_threshold),
        "norm": dict(model.norm),
        "info": to_json_plain(model.info),  # only plain Python values survive weights_only loading
    }
    atomic_torch_save(Path(path), obj)


def load_artefact(path: Path, *, device: str | None = None) -> PatchCore:
    """Load a PatchCore artefact written by :func:`save_artefact` (no weights file needed).

    Raises:
        PipelineError: missing file, not a PatchCore artefact, or a version this code cannot read.
    """
    from pipeline.models import backbones

    path = Path(path)
    obj = load_torch_file(path, what="PatchCore artefact (model.pt from `pipeline finetune anomaly`)")
    if not isinstance(obj, dict) or obj.get("format") != ARTEFACT_FORMAT:
        raise PipelineError(f"{path}: not a PatchCore artefact (expected format {ARTEFACT_FORMAT!r})")
    if obj.get("version") not in (1, ARTEFACT_VERSION):
        raise PipelineError(f"{path}: artefact version {obj.get('version')} (this code reads 1 and {ARTEFACT_VERSION})")
    device = resolve_device(device)
    bname = obj["backbone"]["name"]
    layers = tuple(obj["backbone"]["layers"])
    settings = {**V1_SETTINGS, "stages": ",".join(layers)} if obj["version"] == 1 else {}
    config = PatchCoreConfig(**{**settings, **obj["config"]})
    model = backbones.build_stages_at(bname, layers, stages_state=obj["backbone"]["state_dict"], source=path).to(device)
    bb = backbones.Backbone(
        spec=backbones.stage_spec(bname, layers), model=model, weights_path=Path(obj["backbone"]["weights_file"])
    )
    return PatchCore(
        config=config,
        backbone=bb,
        memory_bank=obj["memory_bank"].numpy().astype(np.float32),
        grid_hw=tuple(obj["grid_hw"]),
        threshold=float(obj["threshold"]),
        pixel_threshold=float(obj["pixel_threshold"]),
        norm=dict(obj["norm"]),
        info=dict(obj["info"]),
    )
