"""YOLO-World fine-tuning with ultralytics, fully offline, into one run folder.

:func:`train_yolo_world` reads top to bottom: check the arguments and the dataset
(:mod:`pipeline.data.yolo`), resolve the model and the device, then, in the run folder
(:class:`pipeline.core.runs.RunDir`, kind ``yolo``), write the config, build the
:class:`~pipeline.models.yolo.offline.OfflineWorldTrainer`, train, and write the metrics. Everything
runs inside :func:`~pipeline.models.yolo.offline.offline_ultralytics`; several GPUs go through
:func:`~pipeline.models.yolo.ddp.ddp_launch`.

Coordinates: YOLO labels are ``cls cx cy w h`` normalised to [0, 1] (see :mod:`pipeline.data.yolo`).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any

from pipeline.core.console import Interrupted, stop_on_interrupt
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text, read_json
from pipeline.core.runs import RunDir
from pipeline.data.augmentation import policy_for, ultralytics_overrides
from pipeline.data.yolo import check_labels, read_data_yaml, split_image_files
from pipeline.models.yolo.ddp import ddp_launch
from pipeline.models.yolo.offline import (
    LOG,
    OfflineWorldTrainer,
    first_line,
    offline_ultralytics,
    run_log,
    torch_determinism_restored,
    ultralytics_device,
)
from pipeline.models.yolo.prompts import CLIP_VARIANT, EMBEDDINGS_FILE, HASH_SOURCE, clip_usable, clip_weights_path
from pipeline.models.yolo.trunk import TRUNKS, trunk_model_yaml, trunk_unfreezer, write_trunk_yaml

RESUME_FILE = "weights/last.pt"


def train_yolo_world(
    *,
    data_yaml: Path,
    model: str,
    out_dir: Path,
    epochs: int = 10,
    imgsz: int = 640,
    batch: int = 8,
    device: str | None = None,
    seed: int = 0,
    workers: int = 0,
    optimizer: str = "auto",
    lr0: float = 0.01,
    backbone: str | None = None,
    freeze_trunk_epochs: int = 0,
    close_mosaic: int | None = None,
    nbs: int | None = None,
    allow_download: bool = False,
    resume: bool = False,
    force: bool = False,
) -> Path:
    """Fine-tune YOLO-World on a YOLO dataset, offline, into one run folder.

    Args:
        data_yaml: YOLO ``data.yaml`` (``path``, ``train``, ``val`` [, ``test``] image folders
            with ``labels/`` siblings; ``names`` 0-based). Labels ``cls cx cy w h`` normalised.
        model: real weights (``yolov8s-worldv2.pt``: a path or a name looked up by
            :func:`pipeline.core.weights.resolve_weights`) or a model YAML from ultralytics' cfg for a
            random start (``yolov8s-worldv2.yaml``; the scale letter picks the size, e.g.
            ``yolov8n-worldv2.yaml``).
        out_dir: the run folder. Gets ``config.yaml`` (these arguments, resolved), ``data.yaml``
            (the dataset config as trained, absolute path), ``log.txt``, ultralytics' files
            (``weights/best.pt``, ``weights/last.pt``, ``results.csv``, ``args.yaml``, plots),
            ``weights/class_embeddings.pt`` and ``metrics.json`` (val mAP50, mAP50-95, precision,
            recall of ``best.pt``).
        epochs, imgsz, batch: training length, square input size in pixels, images per batch.
        device: ``"cpu"``, ``"0"``/``"cuda:0"``, or several GPUs ``"0,1,2,3"`` (ultralytics' own DDP:
            it launches ``torch.distributed.run`` with one process per GPU; ``batch`` is the global
            batch, a multiple of the GPU count; the offline patches and text embeddings reach the
            worker processes through :func:`pipeline.models.yolo.ddp.run_ddp_worker`); ``None`` picks
            the first GPU, else the CPU.
        seed: seeds Python, NumPy and torch; ultralytics' deterministic mode is on.
        workers: dataloader processes (ultralytics forces 0 on CPU).
        optimizer: ultralytics optimizer name (``auto``, ``SGD``, ``AdamW``, ...). With ``auto``
            ultralytics picks the optimizer and learning rate itself and ignores ``lr0``; short
            fine-tunes from real weights are steadier with e.g. ``AdamW`` and a small ``lr0``.
        lr0: initial learning rate (used unless ``optimizer="auto"``).
        backbone: ``None`` keeps the backbone of ``model``; ``"mobilenet_v2"`` or ``"efficientnet_lite0"``
            replaces the CSPDarknet rows of the model YAML ``model`` (its neck, text attention and
            WorldDetect head, at its scale) by that ImageNet trunk with its registry weights
            (:mod:`pipeline.models.yolo.trunk`); the model YAML built is written into ``out_dir``.
        freeze_trunk_epochs: with ``backbone``, the trunk's weights and BatchNorm statistics stay fixed
            for the first N epochs (ultralytics' ``freeze=[0]``), then train; 0: trains from the start.
        close_mosaic: epochs at the end trained without mosaic (ultralytics' ``close_mosaic``; ``None``:
            its default 10; ``>= epochs``: no mosaic at all). A category whose augmentation policy turns
            mosaic off never gets it.
        nbs: ultralytics' nominal batch size: gradients of ``round(nbs / batch)`` batches are summed
            before each optimizer step (``None``: its default 64). On a small dataset (bottle: 51 train
            images, 7 batches of 8 per epoch) 64 means about one step per epoch; ``nbs=batch`` steps
            after every batch.
        allow_download: let missing weights (and CLIP weights, when ``clip`` is installed) download.
        resume: continue ``out_dir/weights/last.pt`` with its stored arguments (ultralytics resume).
        force: replace the files of an earlier ``finetune yolo`` run in ``out_dir``.

    Returns:
        ``out_dir`` (absolute).

    Raises:
        PipelineError: bad ``data.yaml`` or labels, images ultralytics finds corrupt, weights or model
            YAML not found, a non-empty ``out_dir`` without ``force``/``resume``, nothing to resume,
            bad arguments; all before ``out_dir`` is touched.
        Interrupted: Ctrl-C, after the epoch it came in saved ``weights/last.pt`` (see :func:`_train`).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    run = RunDir.open(out_dir, kind="yolo", force=force, resume=resume, resume_file=RESUME_FILE)
    _check_numbers(epochs=epochs, imgsz=imgsz, batch=batch, workers=workers)
    _check_trunk_options(model, backbone=backbone, freeze_trunk_epochs=freeze_trunk_epochs, close_mosaic=close_mosaic)
    if nbs is not None and int(nbs) < 1:
        raise PipelineError(f"--nbs {nbs}: expected an integer >= 1")
    if resume and not (out_dir / "data.yaml").is_file():
        raise PipelineError(
            f"{out_dir / 'data.yaml'}: not found (resume needs the run folder of an earlier train_yolo_world)"
        )
    with offline_ultralytics():
        data = _check_dataset(Path(data_yaml))
        model_ref = _resolve_model(model, allow_download=allow_download)
        device = _training_device(device, batch=batch)
        if freeze_trunk_epochs and len(device.split(",")) > 1:
            raise PipelineError(
                f"--freeze-trunk-epochs {freeze_trunk_epochs}: single-process training only "
                f"(device {device!r} runs DDP, which cannot unfreeze parameters during training)"
            )
        trunk_yaml = None
        if backbone:
            trunk_yaml = out_dir / trunk_model_yaml(model_ref, backbone)[0]
        policy = policy_for(data["category"])
        config = {
            "data_yaml": str(Path(data_yaml).resolve()),
            "model": str(model),
            "model_resolved": str(trunk_yaml) if trunk_yaml else model_ref,
            "backbone": backbone,
            "freeze_trunk_epochs": int(freeze_trunk_epochs),
            "close_mosaic": None if close_mosaic is None else int(close_mosaic),
            "nbs": None if nbs is None else int(nbs),
            "out_dir": str(out_dir),
            "epochs": int(epochs),
            "imgsz": int(imgsz),
            "batch": int(batch),
            "device": device,
            "seed": int(seed),
            "workers": int(workers),
            "optimizer": str(optimizer),
            "lr0": float(lr0),
            "allow_download": bool(allow_download),
            "resume": bool(resume),
            "force": bool(force),
            "names": list(data["names"].values()),
            "augmentation": policy.as_dict(),
            "augmentation_overrides": ultralytics_overrides(policy),
        }
        with run, run_log(run / "log.txt"), torch_determinism_restored(), ddp_launch():
            _write_config(run, config, data, resume=resume)
            if backbone and not resume:
                write_trunk_yaml(out_dir, model_ref, backbone)
            LOG.info(
                "augmentation for %r from %s: %s",
                data["category"],
                policy.source,
                config["augmentation_overrides"] or "ultralytics defaults",
            )
            trainer = _build_trainer(config, out_dir, resume=resume, allow_download=allow_download)
            _train(trainer, out_dir)
            metrics = _metrics(trainer, run)
            LOG.info("run folder %s: mAP50 %.4f, mAP50-95 %.4f", out_dir, metrics["mAP50"], metrics["mAP50-95"])
    return out_dir


def _check_numbers(**values: int) -> None:
    lows = {"epochs": 1, "imgsz": 32, "batch": 1, "workers": 0}
    for name, value in values.items():
        if int(value) < lows[name]:
            raise PipelineError(f"{name}={value}: expected an integer >= {lows[name]}")


def _check_trunk_options(
    model: str, *, backbone: str | None, freeze_trunk_epochs: int, close_mosaic: int | None
) -> None:
    if backbone is not None and backbone not in TRUNKS:
        raise PipelineError(f"--backbone {backbone}: expected one of {', '.join(TRUNKS)}")
    if backbone and Path(model).suffix.lower() not in {".yaml", ".yml"}:
        raise PipelineError(
            f"--model {model}: --backbone {backbone} replaces the backbone of a model YAML "
            "(e.g. yolov8n-worldv2.yaml), not of weights"
        )
    if int(freeze_trunk_epochs) < 0 or (freeze_trunk_epochs and not backbone):
        raise PipelineError(
            f"--freeze-trunk-epochs {freeze_trunk_epochs}: expected an integer >= 0, and a --backbone to freeze"
        )
    if close_mosaic is not None and int(close_mosaic) < 0:
        raise PipelineError(f"--close-mosaic {close_mosaic}: expected an integer >= 0")


def _check_dataset(data_yaml: Path) -> dict:
    """:func:`pipeline.data.yolo.read_data_yaml`, every train and val label checked, and every image
    checked the way ultralytics' dataset scan does (:func:`_check_images`)."""
    data = read_data_yaml(data_yaml)
    root = Path(data["path"])
    images = []
    for split in ("train", "val"):
        files = split_image_files(root, data[split], data_yaml)
        check_labels(files, data["nc"])
        images += files
    _check_images(images, data_yaml, data["nc"])
    return data


def _check_images(images: list[Path], data_yaml: Path, nc: int) -> None:
    """Run ultralytics' own per-image check (``ultralytics.data.utils.verify_image_label``: PIL
    ``verify``, size >= 10 px, format, label parse) on every image, once per file (val images are
    often links to train images).

    ultralytics only logs the images it finds corrupt and trains without them; a run on a silently
    smaller dataset is refused here instead. (That check also rewrites a JPEG that lacks its end
    marker, as ultralytics' scan would.)

    Raises:
        PipelineError: ``<data.yaml>: ultralytics found N corrupt image(s)/label(s), e.g. <file>: <reason>``.
    """
    from multiprocessing.pool import ThreadPool

    from ultralytics.data.utils import verify_image_label

    from pipeline.data.yolo import label_path

    unique = list({im.resolve(): im for im in reversed(images)}.values())[::-1]  # first path of each file
    args = [(str(im), str(label_path(im)), "", False, nc, 0, 0, False) for im in unique]
    with ThreadPool(min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(verify_image_label, args)
    corrupt = [r[9].replace(": ignoring corrupt image/label: ", ": ") for r in results if r[8]]
    if corrupt:
        raise PipelineError(
            f"{data_yaml}: ultralytics found {len(corrupt)} corrupt image(s)/label(s), e.g. {corrupt[0]}"
        )


def _resolve_model(model: str, *, allow_download: bool) -> str:
    """An absolute weights path, or a model YAML ultralytics can find (scale letter in the name allowed)."""
    from pipeline.core.weights import resolve_weights

    if Path(model).suffix.lower() in {".yaml", ".yml"}:
        from ultralytics.nn.tasks import yaml_model_load

        try:
            cfg = yaml_model_load(model)
        except (FileNotFoundError, OSError) as exc:
            raise PipelineError(f"{model}: model YAML not found ({exc})") from None
        if "WorldDetect" not in str(cfg.get("head", "")):
            raise PipelineError(f"{model}: not a YOLO-World model YAML (expected a WorldDetect head)")
        return str(Path(model).resolve()) if Path(model).is_file() else model
    return str(resolve_weights(model, allow_download=allow_download))


def _training_device(device: str | None, *, batch: int) -> str:
    """ultralytics' device string; a comma list of CUDA indices selects its DDP (one process per GPU)."""
    device = ultralytics_device(device, multi=True)
    n_gpu = len(device.split(","))
    if n_gpu > 1 and int(batch) % n_gpu:
        raise PipelineError(
            f"batch={batch}: expected a multiple of the {n_gpu} GPUs in device {device!r} (one share per GPU)"
        )
    return device


def _write_config(run: RunDir, config: dict, data: dict, *, resume: bool) -> None:
    """``config.yaml`` and ``data.yaml`` (names keyed 0..nc-1, as ultralytics reads them); a resume keeps
    the config of the run it continues and records its own call in ``config.resume.yaml``."""
    import ultralytics
    import yaml

    config = {**config, "ultralytics_version": ultralytics.__version__}
    if resume:
        run.write_config(config, name="config.resume.yaml")
        return
    run.write_config(config)
    atomic_write_text(run / "data.yaml", yaml.safe_dump(data, sort_keys=False))  # int keys: not via write_config


def _build_trainer(config: dict, out_dir: Path, *, resume: bool, allow_download: bool) -> OfflineWorldTrainer:
    """An :class:`OfflineWorldTrainer` for a new run or for resuming ``weights/last.pt``."""
    if resume:
        last = str(out_dir / RESUME_FILE)
        overrides = {
            "model": last,
            "resume": last,
            "data": str(out_dir / "data.yaml"),
            "save_dir": str(out_dir),
            "device": config["device"],
            "workers": config["workers"],
        }
    else:
        overrides = {
            "model": config["model_resolved"],
            "data": str(out_dir / "data.yaml"),
            "epochs": config["epochs"],
            "imgsz": config["imgsz"],
            "batch": config["batch"],
            "device": config["device"],
            "workers": config["workers"],
            "seed": config["seed"],
            "deterministic": True,
            "optimizer": config["optimizer"],
            "lr0": config["lr0"],
            # the trunk options are absent from configs written before they existed
            **({"freeze": [0]} if config.get("freeze_trunk_epochs") else {}),
            **({} if config.get("close_mosaic") is None else {"close_mosaic": config["close_mosaic"]}),
            **({} if config.get("nbs") is None else {"nbs": config["nbs"]}),
            "project": str(out_dir.parent),
            "name": out_dir.name,
            "exist_ok": True,
            "amp": config["device"] != "cpu",
            "plots": True,
            "val": True,
            "cache": False,
            "verbose": True,
            **config["augmentation_overrides"],  # label-safe: e.g. no flips for cable
        }
    try:
        trainer = OfflineWorldTrainer(overrides=overrides)
    except (FileNotFoundError, ValueError) as exc:  # e.g. an unknown device: select_device raises ValueError
        raise PipelineError(f"{out_dir}: cannot start training ({first_line(exc)})") from None
    freeze = (_stored_config(out_dir) if resume else config).get("freeze_trunk_epochs", 0)
    if freeze:
        trainer.add_callback("on_train_epoch_start", trunk_unfreezer(int(freeze)))
    trainer.use_clip = clip_usable(allow_download)
    trainer.embedding_source = CLIP_VARIANT if trainer.use_clip else HASH_SOURCE
    stored = out_dir / "weights" / EMBEDDINGS_FILE
    if resume and stored.is_file():  # same prompts as the interrupted run, whatever is installed now
        trainer.use_stored_prompts(stored)
    elif not trainer.use_clip:
        msg = (
            f"CLIP is not available (package 'clip' or {clip_weights_path()} missing): class prompts get "
            "deterministic hash embeddings, so the detector is closed-set (it only knows the trained names)"
        )
        LOG.warning(msg)  # into log.txt
        warnings.warn(msg, UserWarning, stacklevel=3)  # on the console, once per process
    trainer.store_prompts_on_start(stored)
    return trainer


def _stored_config(out_dir: Path) -> dict:
    """The ``config.yaml`` of the run being resumed (empty when absent or unreadable)."""
    import yaml

    try:
        return yaml.safe_load((out_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


class _StopAfterEpoch(Exception):
    """Raised by :func:`_stop_after_epoch` to leave ultralytics' epoch loop (``args``: the epoch, 1-based)."""


def _stop_after_epoch(stop):
    """An ``on_fit_epoch_end`` callback: once ``stop`` is set (Ctrl-C), leave training after the epoch.

    ultralytics runs it after the epoch's ``weights/last.pt`` is saved. Leaving by an exception, not by
    ``trainer.stop`` (what its EarlyStopping sets), matters: a normal end runs ``final_eval``, which
    strips the optimizer from ``last.pt`` and marks it finished, so ultralytics could not resume it.
    The last epoch always runs to its end (and ``final_eval`` calls this hook once more, with
    ``epoch + 1 == epochs``)."""

    def on_fit_epoch_end(trainer) -> None:
        if stop and trainer.epoch + 1 < trainer.epochs:
            raise _StopAfterEpoch(trainer.epoch + 1)

    return on_fit_epoch_end


def _train(trainer: Any, out_dir: Path) -> None:
    """``trainer.train()``; a Ctrl-C stops after the current epoch (single process; with several GPUs
    ultralytics' worker processes get the Ctrl-C and stop at once, ``last.pt`` of the last finished
    epoch stays).

    Raises:
        Interrupted: after Ctrl-C, with ``weights/last.pt`` resumable by ``--resume``.
        PipelineError: ultralytics refused to train (e.g. a finished run given ``--resume``).
    """
    with contextlib.nullcontext() if trainer.ddp else stop_on_interrupt("this epoch") as stop:
        trainer.add_callback("on_fit_epoch_end", _stop_after_epoch(stop))
        try:
            trainer.train()
        except _StopAfterEpoch as done:
            epoch, total = int(done.args[0]), int(trainer.epochs)
            LOG.info("interrupted after epoch %d of %d; %s is resumable", epoch, total, out_dir / RESUME_FILE)
            raise Interrupted(f"{out_dir / RESUME_FILE} (epoch {epoch} of {total})", resumable=True) from None
        except AssertionError as exc:  # ultralytics asserts, e.g. "training ... is finished, nothing to resume"
            raise PipelineError(f"{out_dir}: {first_line(exc)}") from None


def _metrics(trainer: OfflineWorldTrainer, run: RunDir) -> dict:
    """The run's ``metrics.json``: written by rank 0 of the DDP workers, else here from the trainer."""
    worker_metrics = run / "metrics.json"
    if getattr(trainer, "ddp", False) and worker_metrics.is_file():
        return read_json(worker_metrics)
    metrics = trainer.final_metrics()
    run.write_metrics(metrics)
    return metrics
