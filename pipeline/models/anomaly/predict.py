"""``pipeline predict anomaly``: score a split's images with a saved PatchCore artefact.

A prediction run folder holds ``predictions.json`` (``{"kind": "anomaly", ...}``, the project's
prediction-file contract, :mod:`pipeline.data.predictions`), ``maps/<image_id>.npy`` (raw float32
maps at the model's input size), ``overlays/*.png`` (heat maps over a sample of native images) and
``coco_results.json`` (each connected component of a thresholded map as a class-agnostic COCO box and
RLE mask, marked ``"class_agnostic": true``) and ``provenance.json``
(:func:`pipeline.data.predictions.write_provenance`; embedded in ``predictions.json`` too). Both
prediction files record their val-chosen score threshold in their own score units: the image
threshold for ``predictions.json``, the pixel threshold as a region score (0.5 after the min-max
normalisation) for ``coco_results.json``. Image ids follow :func:`pipeline.data.split.image_ids`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.console import progress as progress_bar
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, read_rgb
from pipeline.core.runs import RunDir
from pipeline.data.mvtec import GOOD
from pipeline.data.predictions import write_provenance
from pipeline.models.anomaly.patchcore import PatchCore, load_artefact, minmax_score

DEFECT = "defect"  # the label of an image whose score reaches the threshold


# ------------------------------------------------------------------------------ inputs
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
    return Split(
        path=Path(category_dir) / "split.json (in memory)",
        root=cat.root,
        category=cat.name,
        classes=tuple(m["classes"]),
        manifest=m,
    )


def resolve_artefact(model: Path, category_dir: Path | None, split_path: Path | None) -> tuple[Path, Path | None]:
    """``(artefact, split manifest)`` for ``model``, a ``model.pt`` or the run folder holding one:
    with neither a category nor a split given, the ``split.json`` saved beside the artefact."""
    model = Path(model)
    artefact = model / "model.pt" if model.is_dir() else model
    if split_path is None and category_dir is None and (artefact.parent / "split.json").is_file():
        split_path = artefact.parent / "split.json"
    return artefact, split_path


def select_samples(split, subset: str) -> list:
    """The samples of ``subset`` (a split name, or ``all`` for train, val and test in that order).

    Raises:
        PipelineError: the subset has no images.
    """
    from pipeline.data.split import SPLITS

    names = SPLITS if subset == "all" else (subset,)
    samples = [s for name in names for s in split.samples(name)]
    if not samples:
        raise PipelineError(f"{split.path}: split {subset!r} has no images")
    return samples


# ------------------------------------------------------------------------------ the command
def predict_run(
    model: Path,
    *,
    out: Path,
    category_dir: Path | None = None,
    split_path: Path | None = None,
    subset: str = "test",
    save_maps: bool = True,
    overlays: int = 8,
    coco: bool = True,
    force: bool = False,
    progress: bool = True,
    device: str | None = None,
    echo: bool = True,
) -> Path:
    """``pipeline predict anomaly``: score a split's images with a saved artefact into the run folder ``out``.

    Writes (see the module docstring): ``predictions.json``, ``maps/<image_id>.npy`` (skipped with
    ``save_maps=False``; needed for pixel metrics), ``overlays/*.png`` (``overlays`` images spread over
    the labels, ground truth outlined in green) and ``coco_results.json`` (``coco=True``: maps thresholded
    at the artefact's pixel threshold; ``score`` is the component's peak normalised to ``[0, 1]`` with
    the pixel threshold at 0.5, ``score_raw`` the peak in map units).

    Args:
        model: ``model.pt`` of ``finetune anomaly`` or its run folder.
        category_dir, split_path: the images (default: the run folder's ``split.json``).
        subset: ``train``, ``val``, ``test`` (split names) or ``all``.
        device: a ``--device`` value (:func:`pipeline.core.device.resolve_device`).
        echo: print a one-line summary.

    Returns:
        Path of ``predictions.json``.

    Raises:
        PipelineError: ``out`` not writable under the run-folder rules, unreadable artefact, bad split,
            empty subset.
    """
    run = RunDir.open(out, kind="predict-anomaly", force=force)
    artefact, split_path = resolve_artefact(model, category_dir, split_path)
    pc = load_artefact(artefact, device=device)
    split = resolve_split(category_dir, split_path)
    samples = select_samples(split, subset)
    with progress_bar("scoring", len(samples), enabled=progress, transient=True) as advance:
        scores, maps, sizes = pc.score_paths([s.image for s in samples], progress=advance)
    try:
        with run:
            preds, results = write_maps_and_regions(
                run, pc, split, samples, scores, maps, sizes, save_maps=save_maps, overlays=overlays, coco=coco
            )
            records = write_provenance(
                run.path,
                family="anomaly",
                model=Path(artefact),
                split=Path(split.path),
                subset=subset,
                files=_score_thresholds(pc, maps, coco=coco),
            )
            doc = {
                "kind": "anomaly",
                "model": str(Path(artefact).resolve()),
                "backbone": pc.config.backbone,
                "threshold": float(pc.threshold),
                "pixel_threshold": float(pc.pixel_threshold),
                "root": str(split.root),
                "split": str(split.path),
                "subset": subset,
                "image_size": pc.config.image_size,
                "provenance": records["predictions.json"],
                "predictions": preds,
            }
            atomic_write_json(run / "predictions.json", doc)
            if coco:
                atomic_write_json(run / "coco_results.json", results, indent=None)
    except BaseException:
        run.discard()  # nothing to resume: a failed prediction leaves no partial folder
        raise
    if echo:
        from pipeline.core.console import echo as say

        say(
            f"{len(preds)} predictions ({sum(p['label'] == DEFECT for p in preds)} defect) with backbone "
            f"{pc.config.backbone} -> {run / 'predictions.json'}"
        )
    return run / "predictions.json"


def _map_range(model: PatchCore, maps: np.ndarray) -> tuple[float, float]:
    """``(lo, hi)`` of the anomaly maps for display and region scores: the artefact's, else these maps'."""
    return model.norm.get("map_min", float(maps.min())), model.norm.get("map_max", float(maps.max()))


def _score_thresholds(model: PatchCore, maps: np.ndarray, *, coco: bool) -> dict[str, dict]:
    """Each prediction file's val-chosen score threshold, in that file's score units (``provenance.json``'s
    ``files``): the image threshold for ``predictions.json``; for ``coco_results.json`` the pixel threshold
    as a region score (0.5 once scores are min-max normalised, see :func:`map_to_coco`)."""

    def entry(t: float) -> dict:
        ok = bool(np.isfinite(t))
        return {"score_threshold": float(t) if ok else None, "score_threshold_chosen_on": "val" if ok else None}

    files = {"predictions.json": entry(model.threshold)}
    if coco:
        lo, hi = _map_range(model, maps)
        files["coco_results.json"] = entry(
            0.5 if hi > lo and np.isfinite(model.pixel_threshold) else model.pixel_threshold
        )
    return files


def write_maps_and_regions(
    run: RunDir,
    model: PatchCore,
    split,
    samples,
    scores: np.ndarray,
    maps: np.ndarray,
    sizes,
    *,
    save_maps: bool,
    overlays: int,
    coco: bool,
) -> tuple[list[dict], list[dict]]:
    """Per image: its prediction record, its map file, its COCO regions and (for a sample) its overlay.

    Args:
        samples: the scored samples; scores ``B``, maps ``BxSxS`` float32, sizes native ``(H, W)``.

    Returns:
        ``(predictions, coco_results)``; the records of ``predictions.json`` and the COCO result list.
    """
    from pipeline.data.mvtec import read_mask
    from pipeline.data.split import image_ids

    ids = image_ids(split.manifest)
    lo, hi = _map_range(model, maps)
    chosen = _sample_for_overlays(samples, overlays)
    preds, results = [], []
    for k, (s, sc, m, size) in enumerate(zip(samples, scores, maps, sizes)):
        rel = s.image.relative_to(split.root).as_posix()
        iid = ids.get(rel)
        p = {
            "image": rel,
            "image_id": iid,
            "score": float(sc),
            "score_norm": model.normalise_score(float(sc)),
            "label": DEFECT if sc >= model.threshold else GOOD,
        }
        stem = str(iid) if iid is not None else f"img{k:05d}"
        if save_maps:
            (run / "maps").mkdir(exist_ok=True)
            np.save(run / "maps" / f"{stem}.npy", m.astype(np.float32))
            p["map"] = f"maps/{stem}.npy"
        preds.append(p)
        if coco and iid is not None and np.isfinite(model.pixel_threshold):
            results += map_to_coco(
                m,
                image_id=iid,
                threshold=model.pixel_threshold,
                size_hw=tuple(size),
                norm=(lo, hi) if hi > lo else None,
            )
        if k in chosen:
            mask = read_mask(s.mask) if s.mask else None
            write_overlay(
                run / "overlays" / f"{s.label}_{s.image.stem}_{sc:.3g}.png",
                read_rgb(s.image),
                m,
                lo=lo,
                hi=hi,
                mask=mask,
            )
    return preds, results


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


# ------------------------------------------------------------------------------ maps -> regions, overlays
def map_to_coco(
    amap: np.ndarray,
    *,
    image_id: int,
    threshold: float,
    size_hw: tuple[int, int] | None = None,
    category_id: int = 1,
    min_area: int = 1,
    connectivity: int = 8,
    norm: tuple[float, float] | None = None,
) -> list[dict]:
    """Threshold an anomaly map into COCO result instances, one per connected component.

    Args:
        amap: ``hxw`` float map (model resolution); resized bilinearly to ``size_hw`` (H, W) first.
        threshold: pixels ``>= threshold`` are anomalous (raw map units).
        category_id: class-agnostic detections get this COCO category id (default 1); each record also
            carries ``"class_agnostic": true``, so ``pipeline evaluate`` matches them whatever the class.
        norm: ``(map_min, map_max)``: when given, ``score`` is the component's maximum mapped to
            ``[0, 1]`` with the threshold at 0.5 (``clip((v - threshold) / (max - min) + 0.5)``).

    Returns:
        ``[{"image_id", "category_id", "class_agnostic": True, "bbox": [x, y, w, h] px, "score", "score_raw":
        max map value in the component, "segmentation": compressed RLE, "area"}]``.
    """
    from pipeline.data.instances import encode_rle, mask_to_instances
    from pipeline.evaluation.anomaly import resize_map

    m = resize_map(amap, size_hw) if size_hw is not None else amap
    out = []
    for inst in mask_to_instances(m >= threshold, connectivity=connectivity, min_area=min_area):
        raw = float(m[inst.mask].max())
        score = minmax_score(raw, threshold, norm[0], norm[1]) if norm is not None else raw
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(category_id),
                "class_agnostic": True,
                "bbox": [float(v) for v in inst.bbox_xywh],
                "score": score,
                "score_raw": raw,
                "segmentation": encode_rle(inst.mask),
                "area": int(inst.area),
            }
        )
    return out


def overlay(
    image_rgb: np.ndarray, amap: np.ndarray, *, lo: float, hi: float, alpha: float = 0.5, mask: np.ndarray | None = None
) -> np.ndarray:
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


def write_overlay(
    path: Path, image_rgb: np.ndarray, amap: np.ndarray, *, lo: float, hi: float, mask: np.ndarray | None = None
) -> None:
    """:func:`overlay` written as a PNG (atomic)."""
    import cv2

    ok, buf = cv2.imencode(".png", overlay(image_rgb, amap, lo=lo, hi=hi, mask=mask))
    if not ok:
        raise PipelineError(f"{path}: could not encode the overlay as PNG")
    atomic_write_bytes(path, buf.tobytes())
