"""Classifier inference: probabilities, pooled features, and ``kind: classification`` prediction files.

``pipeline predict classifier`` (:func:`predict_classifier`) writes a run folder (``RunDir`` kind
``predict-classifier``) holding ``predictions.json``, ``config.yaml`` and ``provenance.json``
(:func:`pipeline.data.predictions.write_provenance`; the same record is embedded in
``predictions.json`` under ``"provenance"``). The prediction file's
format is documented in ``pipeline.evaluation.classification``; its ``image_id`` values follow the
split manifest's image-id rule (:func:`pipeline.data.split.image_ids`), so they equal the ids of
``coco/<subset>.json`` whether or not that folder exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.core import distributed as D
from pipeline.core.device import resolve_device
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_json, read_json
from pipeline.core.runs import RunDir
from pipeline.data.predictions import write_provenance
from pipeline.data.split import image_ids as manifest_ids
from pipeline.data.split import load_split
from pipeline.models.classifier.config import ClassifierConfig
from pipeline.models.classifier.data import ImageSet, load_image_set, normalize, subset_entries
from pipeline.models.classifier.model import load_checkpoint, model_from_checkpoint

PREDICTIONS = "predictions.json"


def predict_probs(
    model, data: ImageSet, cfg: ClassifierConfig, device: str, *, batch_size: int | None = None, shard: bool = False
):
    """Softmax probabilities ``N x C`` (float32 CPU tensor) in eval mode, no augmentation.

    ``shard``: under DDP every rank must call this; each scores a strided shard and all get the
    gathered ``N x C`` in input order (a collective: never call it with ``shard`` from one rank only).
    """
    model = D.unwrap(model)
    model.eval()
    bs = batch_size or cfg.train.batch_size
    sharded = shard and D.info().world_size > 1
    rows = torch.as_tensor(D.shard_indices(len(data)) if sharded else range(len(data)), dtype=torch.int64)
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), bs):
            x = normalize(data.images[rows[i : i + bs]].to(device), cfg.data.mean, cfg.data.std)
            out.append(torch.softmax(model(x).float(), 1).cpu())
    local = torch.cat(out) if out else torch.zeros((0, len(data.classes)))
    if not sharded:
        return local
    parts = D.all_gather_objects((rows, local))
    probs = torch.zeros((len(data), len(data.classes)))
    for r, p in parts:
        probs[r] = p
    return probs


def extract_features(
    model, data: ImageSet, cfg: ClassifierConfig, device: str, *, batch_size: int | None = None
) -> np.ndarray:
    """Pooled features ``N x D`` (float32 numpy; D = 512 ResNet-18, 1280 Lite0 / MobileNetV2) in eval mode."""
    model = D.unwrap(model)
    model.eval()
    bs = batch_size or cfg.train.batch_size
    out = []
    with torch.inference_mode():
        for i in range(0, len(data), bs):
            x = normalize(data.images[i : i + bs].to(device), cfg.data.mean, cfg.data.std)
            out.append(model.embed(x).float().cpu())
    return torch.cat(out).numpy()


def image_ids(split_path: Path, paths: Sequence[str]) -> list[int]:
    """COCO image ids of ``paths`` (relative to the category root) by the manifest's image-id rule
    (:func:`pipeline.data.split.image_ids`), the ids ``coco/<subset>.json`` has for them.

    Raises:
        PipelineError: a path the manifest does not list.
    """
    ids = manifest_ids(read_json(split_path))
    missing = [p for p in paths if p not in ids]
    if missing:
        raise PipelineError(f"{split_path}: image {missing[0]!r} is not listed in the split manifest")
    return [ids[p] for p in paths]


def write_predictions(
    model,
    data: ImageSet,
    cfg: ClassifierConfig,
    device: str,
    out_path: Path,
    *,
    model_name: str,
    task: str,
    split_path: Path,
    subset: str,
    weights_note: str,
    run_dir: Path | None = None,
    batch_size: int | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write the ``kind: classification`` prediction JSON (format in ``pipeline.evaluation.classification``).

    Each prediction: ``image`` (path relative to the category root), ``image_id``, ``label`` (the
    argmax class) and ``scores`` (class -> softmax probability, 6 decimals). ``run_dir`` is the
    training run the model comes from (``None`` for a bare ``.pt``). ``provenance`` (the record of
    :func:`pipeline.data.predictions.write_provenance`) is embedded under ``"provenance"`` when given.
    """
    probs = predict_probs(model, data, cfg, device, batch_size=batch_size).numpy()
    ids = image_ids(split_path, data.paths)
    preds = []
    for path, iid, pr in zip(data.paths, ids, probs):
        preds.append(
            {
                "image": path,
                "image_id": iid,
                "label": data.classes[int(pr.argmax())],
                "scores": {c: round(float(v), 6) for c, v in zip(data.classes, pr)},
            }
        )
    doc = {
        "kind": "classification",
        "model": model_name,
        "task": task,
        "classes": data.classes,
        "root": str(load_split(split_path).root),
        "split_manifest": str(Path(split_path).resolve()),
        "subset": subset,
        "weights": weights_note,
        "run_dir": str(Path(run_dir).resolve()) if run_dir else None,
        **({"provenance": provenance} if provenance is not None else {}),
        "predictions": preds,
    }
    atomic_write_json(Path(out_path), doc)
    return Path(out_path)


def _training_run(checkpoint: Path) -> Path | None:
    """The run folder a checkpoint belongs to: itself, ``<run>/weights/*.pt``'s ``<run>``, else None."""
    if checkpoint.is_dir():
        return checkpoint
    return checkpoint.parent.parent if checkpoint.parent.name == "weights" else None


def predict_classifier(
    checkpoint: Path,
    split_path: Path,
    out: Path,
    *,
    subset: str = "test",
    device: str = "auto",
    batch_size: int | None = None,
    force: bool = False,
    root: Path | None = None,
    progress: bool = True,
) -> Path:
    """Run a trained classifier (run folder or ``.pt``) over a manifest subset and write a run folder.

    Args:
        checkpoint: a ``finetune classifier`` run folder (its ``weights/best.pt``) or a checkpoint file.
        split_path: the split manifest; ``subset`` is one of its splits.
        out: the folder to write: ``predictions.json``, ``config.yaml`` and ``provenance.json`` (refused
            when it holds another run unless ``force``; see :class:`pipeline.core.runs.RunDir`).
        device: ``--device`` spec (:func:`pipeline.core.device.resolve_device`).
        batch_size: images per forward pass (default: the checkpoint's ``train.batch_size``).
        root: the category folder, when the data moved since the manifest was written.

    Returns:
        The run folder ``out``.

    Raises:
        PipelineError: missing or invalid checkpoint, an existing ``out`` without ``force``, a bad split,
            an unknown device.
    """
    run = RunDir.open(out, kind="predict-classifier", force=force)
    checkpoint, split_path = Path(checkpoint), Path(split_path)
    ck = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(ck)
    dev = resolve_device(device)
    split = load_split(split_path, root=root)
    classes = list(ck["classes"])
    entries = subset_entries(split, subset, classes)
    task, weights_note = ck.get("task", "multiclass"), ck.get("weights", "unknown")
    with run:
        run.write_config(
            {
                "checkpoint": str(checkpoint.resolve()),
                "split": str(split_path.resolve()),
                "subset": subset,
                "root": str(split.root),
                "device_resolved": dev,
                "batch_size": batch_size or cfg.train.batch_size,
                "model": cfg.name,
                "task": task,
                "classes": classes,
                "weights": weights_note,
            }
        )
        data = load_image_set(entries, classes, split.root, cfg.data.input_size_hw, progress=progress, desc=subset)
        weights_file = checkpoint / "weights" / "best.pt" if checkpoint.is_dir() else checkpoint
        records = write_provenance(
            run.path, family="classifier", model=weights_file, split=split_path, subset=subset, files={PREDICTIONS: {}}
        )
        write_predictions(
            model.to(dev),
            data,
            cfg,
            dev,
            run / PREDICTIONS,
            model_name=cfg.name,
            task=task,
            split_path=split_path,
            subset=subset,
            weights_note=weights_note,
            run_dir=_training_run(checkpoint),
            batch_size=batch_size,
            provenance=records[PREDICTIONS],
        )
    return run.path
