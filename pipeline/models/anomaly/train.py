"""``pipeline finetune anomaly``: fit PatchCore on ``train/good``, calibrate on the split's ``val``.

The run folder holds ``model.pt`` (the artefact, :func:`pipeline.models.anomaly.patchcore.save_artefact`),
``config.yaml`` (category, split and every :class:`PatchCoreConfig` field), ``metrics.json`` (fit
times, memory-bank size, validation metrics), ``split.json`` (the manifest used, so that ``predict
anomaly RUN`` finds its images) and ``log.txt``. A fit has no resumable state: ``--force`` starts again,
and Ctrl-C stops at once and removes the run folder.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.console import Interrupted
from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunDir
from pipeline.data.mvtec import GOOD
from pipeline.models.anomaly.patchcore import PatchCore, PatchCoreConfig, fit_patchcore, resolve_backbone, save_artefact
from pipeline.models.anomaly.predict import resolve_split


def fit_run(
    category_dir: Path | None,
    *,
    out: Path,
    config: PatchCoreConfig | None = None,
    split_path: Path | None = None,
    force: bool = False,
    progress: bool = True,
    allow_download: bool = False,
    device: str | None = None,
    echo: bool = True,
) -> dict:
    """``pipeline finetune anomaly``: fit on ``train/good``, calibrate on the split's ``val``, write the
    run folder ``out`` (module docstring).

    Args:
        category_dir: the category folder (MVTec AD layout); ``None`` when ``split_path`` names it.
        split_path: a split manifest; default a seed-0 60/20/20 split drawn from ``category_dir``.
        device: a ``--device`` value (:func:`pipeline.core.device.resolve_device`).
        echo: print the log lines as they are written.

    Returns:
        The metrics dict (``{}`` on ``torchrun`` ranks other than 0, which only share the feature
        extraction; rank 0 writes the run). Two times, in seconds: ``fit_seconds`` (features and
        coreset, from :func:`fit_patchcore`) and ``fit_wall_seconds``, the whole command from this call
        on: checks, imports, backbone loading, the fit, scoring and calibrating on val, and writing the
        run folder (every file but ``metrics.json``, which holds the number).

    Raises:
        PipelineError: neither a category nor a split, missing/empty ``train/good``, empty ``val``,
            bad settings, unknown backbone or missing weights, ``out`` not writable under the
            run-folder rules (:class:`pipeline.core.runs.RunDir`). All raised before ``out`` is touched.
        Interrupted: Ctrl-C (the first one: a fit cannot resume, so it stops at once), after the run
            folder was removed (``interrupted: nothing kept; start again with: ...``).
    """
    t_start = time.perf_counter()
    from pipeline.core import distributed as D
    from pipeline.data.split import write_split

    run = RunDir.open(out, kind="anomaly", force=force, resume_file=None)
    split = resolve_split(category_dir, split_path)
    train = _train_good(split, category_dir)
    val = split.samples("val")
    if not val:
        raise PipelineError(f"{split.path}: the val split is empty (expected images to choose the threshold on)")
    config = resolve_backbone(config or PatchCoreConfig(), allow_download=allow_download)
    device = resolve_device(device)
    D.init_from_env(device)
    if not D.is_main():  # under torchrun: share the feature extraction, rank 0 writes the run
        fit_patchcore(train, config, progress=False, allow_download=allow_download, device=device)
        return {}
    try:
        with run:
            model = fit_patchcore(
                train,
                config,
                log=lambda msg: run.log(msg, echo=echo),
                progress=progress,
                allow_download=allow_download,
                device=device,
            )
            metrics = {**model_facts(model), "val": evaluate_val(model, val)}
            model.info["val"] = metrics["val"]
            save_artefact(model, run / "model.pt")
            write_split(split.manifest, run / "split.json")
            run.write_config({"category": str(split.root), "split": str(split.path), **asdict(model.config)})
            run.log(
                f"threshold {model.threshold:.4g} (F1-optimal on {len(val)} val images), "
                f"pixel threshold {model.pixel_threshold:.4g}",
                echo=echo,
            )
            metrics["fit_wall_seconds"] = round(time.perf_counter() - t_start, 3)
            run.write_metrics(metrics)
    except KeyboardInterrupt:  # one pass, nothing to resume: the run folder is removed, start again
        run.discard()
        raise Interrupted(None, resumable=False) from None
    except BaseException:
        run.discard()  # nothing to resume: a failed fit leaves no partial run folder
        raise
    return metrics


def _train_good(split, category_dir: Path | None) -> list[Path]:
    """The image files of ``<category>/train/good``, sorted.

    Raises:
        PipelineError: the folder is missing or holds no images.
    """
    from pipeline.data.mvtec import IMAGE_SUFFIXES

    folder = (Path(category_dir) if category_dir else split.root) / "train" / GOOD
    if not folder.is_dir():
        raise PipelineError(f"{folder}: missing (expected the good training images in <category>/train/good)")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise PipelineError(f"{folder}: no images (expected good training images: .png/.jpg files)")
    return paths


def model_facts(model: PatchCore) -> dict:
    """What ``metrics.json`` says about the fitted model: backbone, layers, weights file, memory bank
    (shape, MiB) and the facts recorded at fit time (:attr:`PatchCore.info`)."""
    return {
        "backbone": model.config.backbone,
        "layers": list(model.backbone.spec.layers),
        "image_size": model.config.image_size,
        "resize": model.config.resize,
        "upsample": model.config.upsample,
        "feature_dim": model.memory_bank.shape[1],
        "weights": str(model.backbone.weights_path),
        "memory_bank": list(model.memory_bank.shape),
        "memory_bank_mb": round(model.memory_bank.nbytes / 2**20, 2),
        **model.info,
    }


def evaluate_val(model: PatchCore, val: Sequence) -> dict:
    """Score the validation samples, :func:`calibrate` the model on them (in place) and report.

    Returns:
        ``{"n_images", "image_auroc", "image_f1_max", "seconds_per_image", "image_f1", "threshold",
        "pixel_f1", "pixel_threshold"}``.
    """
    from pipeline.data.mvtec import read_mask
    from pipeline.evaluation.anomaly import auroc, f1_max

    t0 = time.perf_counter()
    scores, maps, sizes = model.score_paths([s.image for s in val])
    per_image = (time.perf_counter() - t0) / len(val)
    masks = [read_mask(s.mask) if s.mask else None for s in val]
    cal = calibrate(model, scores, maps, [s.label for s in val], masks, sizes)
    y = np.array([s.label != GOOD for s in val])
    return {
        "n_images": len(val),
        "image_auroc": auroc(scores, y),
        "image_f1_max": f1_max(scores, y)[0],
        "seconds_per_image": round(per_image, 4),
        **cal,
    }


def calibrate(
    model: PatchCore,
    scores: np.ndarray,
    maps: np.ndarray,
    labels: Sequence[str],
    masks: Sequence[np.ndarray | None],
    sizes: Sequence[tuple[int, int]],
) -> dict:
    """Choose the thresholds and normalisation on a validation set (in place on ``model``).

    Image threshold: F1-optimal on ``scores`` (defect = label other than ``GOOD``); pixel threshold:
    F1-optimal over validation pixels at native mask resolution. With no defect in the set the
    image threshold is just above the highest good score (so no validation image is flagged) and the
    pixel threshold the highest map value; with only defects, the lowest defect score.

    Args:
        scores: ``B`` image scores; maps: ``BxSxS`` float maps; masks: native ``HxW`` bool masks
            (``None`` for good images); sizes: native ``(H, W)`` of each image.

    Returns:
        ``{"image_f1": ..., "pixel_f1": ..., "threshold": ..., "pixel_threshold": ...}``.

    Raises:
        PipelineError: no validation images.
    """
    from pipeline.evaluation.anomaly import PixelHist, f1_max, resize_map

    y = np.array([lab != GOOD for lab in labels])
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
