"""The ``pipeline`` command line (Typer). Each command is a thin typed function: it parses
options, calls one library function, and prints what it wrote. Heavy libraries are imported
inside the commands so ``pipeline --help`` stays instant.

Errors of type :class:`pipeline.core.errors.PipelineError` reach the user as one line and exit 1;
``pipeline --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Industrial visual inspection on MVTec AD-layout data.")
finetune_app = typer.Typer(no_args_is_help=True, help="Train a model: yolo, sam, classifier, anomaly.")
predict_app = typer.Typer(no_args_is_help=True, help="Run a trained model over a split and write predictions.")
export_app = typer.Typer(no_args_is_help=True, help="Export predictions for human review.")
import_app = typer.Typer(no_args_is_help=True, help="Import reviewed labels back.")
app.add_typer(finetune_app, name="finetune")
app.add_typer(predict_app, name="predict")
app.add_typer(export_app, name="export")
app.add_typer(import_app, name="import")

_STATE = {"debug": False}


def echo(msg: str) -> None:
    from rich.console import Console

    Console(highlight=False, soft_wrap=True).print(msg)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors.")) -> None:
    """Industrial visual inspection on MVTec AD-layout data."""
    _STATE["debug"] = debug


# ----------------------------------------------------------------------------- data (issue 2)
# (commands added below by the foundation)


@app.command("synth-mvtec")
def synth_mvtec(
    out: Path = typer.Argument(..., help="Category folder to create, e.g. data/synth."),
    seed: int = typer.Option(0, help="Random seed; same seed, same files."),
    height: int = typer.Option(96, help="Image height in pixels."),
    width: int = typer.Option(128, help="Image width in pixels."),
    n_train_good: int = typer.Option(10, help="Images in train/good."),
    n_test_good: int = typer.Option(6, help="Images in test/good."),
    n_per_defect: int = typer.Option(6, help="Images per defect type (ring, scratch, spot)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
) -> None:
    """Write a small synthetic category in the exact MVTec AD layout (the embedded demo data)."""
    from pipeline.core.io import staged_dir
    from pipeline.data.synth import generate_category

    with staged_dir(out, force=force) as tmp:
        generate_category(tmp, seed=seed, size_hw=(height, width), n_train_good=n_train_good,
                          n_test_good=n_test_good, n_per_defect=n_per_defect)
    echo(f"wrote synthetic category {out}")


@app.command("convert-masks")
def convert_masks(
    category: Path = typer.Argument(..., help="MVTec AD category folder, e.g. $MVTEC_ROOT/bottle."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: annotations/<category>)."),
    ratios: str = typer.Option("0.6,0.2,0.2", help="train,val,test fractions of test/ images (stratified)."),
    seed: int = typer.Option(0, help="Split seed."),
    connectivity: int = typer.Option(8, help="Connected-component connectivity: 8 or 4."),
    min_area: int = typer.Option(1, help="Drop components smaller than this many pixels (1 keeps all)."),
    rename: List[str] = typer.Option([], help="DEFECT_TYPE=class name; repeat; same name merges types."),
    split: Optional[Path] = typer.Option(None, help="Reuse this split.json instead of drawing a new split."),
    force: bool = typer.Option(False, "--force", help="Replace existing output."),
) -> None:
    """MVTec masks -> one instance per connected component -> COCO, YOLO and SAM files per split."""
    from pipeline.data.convert import convert_category, parse_rename
    from pipeline.data.split import load_split

    try:
        r = tuple(float(v) for v in ratios.split(","))
    except ValueError:
        raise PipelineError(f"--ratios {ratios!r}: expected three numbers like 0.6,0.2,0.2") from None
    if len(r) != 3:
        raise PipelineError(f"--ratios {ratios!r}: expected three numbers like 0.6,0.2,0.2")
    out = out or Path("annotations") / Path(category).resolve().name
    manifest = load_split(split) if split else None
    summary = convert_category(category, out, ratios=r, seed=seed, connectivity=connectivity, min_area=min_area,
                               rename=parse_rename(rename), split_manifest=manifest, force=force)
    from rich.table import Table
    from rich.console import Console

    table = Table(title=f"{Path(category).name}: classes {', '.join(summary.classes)}")
    for col in ("split", "images", "masks", "instances"):
        table.add_column(col, justify="right")
    for s in summary.images:
        table.add_row(s, str(summary.images[s]), str(summary.masks[s]), str(summary.instances[s]))
    table.add_row("all", *(str(sum(d.values())) for d in (summary.images, summary.masks, summary.instances)))
    Console().print(table)
    echo(f"wrote {summary.out}/{{split.json, coco/, yolo/data.yaml, sam/}}")

# ----------------------------------------------------------------------------- YOLO-World (issue 2)


def _default_device() -> str:
    import torch

    return "0" if torch.cuda.is_available() else "cpu"


@finetune_app.command("yolo")
def finetune_yolo(
    data: Path = typer.Option(..., help="YOLO data.yaml written by convert-masks (annotations/<cat>/yolo/data.yaml)."),
    model: str = typer.Option("yolov8s-worldv2.pt", help="Weights (path or yolov8s-worldv2.pt) or a model YAML (random init)."),
    out: Path = typer.Option(Path("runs/yolo"), help="Run folder."),
    epochs: int = typer.Option(30, help="Training epochs."),
    imgsz: int = typer.Option(640, help="Training image size (pixels, longest side)."),
    batch: int = typer.Option(8, help="Batch size (global: split over the GPUs of a multi-GPU --device)."),
    device: Optional[str] = typer.Option(None, help="cpu, 0, or several GPUs 0,1,2,3 (ultralytics DDP, one process per GPU; default: GPU 0 when present, else cpu)."),
    seed: int = typer.Option(0, help="Random seed."),
    workers: int = typer.Option(0, help="Data-loader workers."),
    optimizer: str = typer.Option("auto", help="auto (ultralytics chooses, ignores --lr0), SGD, AdamW, ..."),
    lr0: float = typer.Option(0.01, help="Initial learning rate (unless --optimizer auto)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow downloading known weights."),
    resume: bool = typer.Option(False, "--resume", help="Resume an interrupted run from its last.pt."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Fine-tune YOLO-World (ultralytics) to localise defects; works offline."""
    from pipeline.models.yolo.train import train_yolo_world

    run = train_yolo_world(data_yaml=data, model=model, out_dir=out, epochs=epochs, imgsz=imgsz, batch=batch,
                           device=device, seed=seed, workers=workers, optimizer=optimizer, lr0=lr0,
                           allow_download=allow_download,
                           resume=resume, force=force)
    echo(f"run folder: {run} (weights in {run}/weights, metrics in {run}/metrics.json)")


@predict_app.command("yolo")
def predict_yolo(
    weights: Path = typer.Option(..., help="Trained weights (run folder's weights/best.pt)."),
    gt: Path = typer.Option(..., help="COCO ground truth of the split to predict (annotations/<cat>/coco/test.json)."),
    out: Path = typer.Option(..., help="COCO results JSON to write."),
    imgsz: int = typer.Option(640, help="Inference image size (use the training size)."),
    conf: float = typer.Option(0.001, help="Minimum score kept (low, so mAP sees the whole PR curve)."),
    device: Optional[str] = typer.Option(None, help="cpu, 0, ... (default: GPU 0 when present, else cpu)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Detect defects on every image of a split; write COCO results (image_id, category_id, bbox, score)."""
    from pipeline.data.coco import class_index_to_category, detections_to_results, split_images
    from pipeline.models.yolo.train import load_class_names, predict_yolo_world
    from pipeline.core.io import atomic_write_json, check_can_write, read_json

    check_can_write(out, force=force)
    gt_data = read_json(gt)
    images = split_images(gt_data)
    index_to_cat = class_index_to_category(load_class_names(weights), gt_data, source=weights)
    dets = predict_yolo_world(weights=weights, images=[p for _, p, _ in images], imgsz=imgsz, conf=conf, device=device)
    results = detections_to_results(dets, images, index_to_cat)
    atomic_write_json(out, results, indent=None)
    echo(f"wrote {len(results)} detections on {len(images)} images to {out}")


# ----------------------------------------------------------------------------- SAM (issue 3)


@finetune_app.command("sam")
def finetune_sam_cmd(
    annotations: Path = typer.Argument(..., help="Folder written by convert-masks (annotations/<cat>): reads sam/train.jsonl, sam/val.jsonl."),
    out: Path = typer.Option(Path("runs/sam"), help="Run folder."),
    model_type: str = typer.Option("vit_b", help="tiny (random init, smoke runs) | vit_b | vit_l | vit_h."),
    checkpoint: Optional[str] = typer.Option(None, help="Full SAM checkpoint, name or path (sam_vit_b_01ec64.pth); required for vit_*."),
    epochs: int = typer.Option(10, help="Epochs."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (cosine schedule to lr * 0.01)."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    box_jitter: float = typer.Option(0.0, help="Jitter each box coordinate by up to this many original pixels (0: off)."),
    mask_loss: str = typer.Option("focal", help="focal (x20) or bce (x1), plus Dice and IoU-head MSE."),
    loss_resolution: str = typer.Option("lowres", help="lowres (decoder's 256x256 frame, area-pooled soft target) or native (original pixels)."),
    train_prompt_encoder: bool = typer.Option(False, "--train-prompt-encoder", help="Also train the prompt encoder."),
    train_image_encoder: bool = typer.Option(False, "--train-image-encoder", help="Also train the image encoder (slow: no embedding cache)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Image-embedding cache (default: $PIPELINE_CACHE/sam-embeddings or ~/.cache/pipeline/sam-embeddings)."),
    seed: int = typer.Option(0, help="Random seed (order, jitter; tiny model init)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda when present; under torchrun each process takes GPU LOCAL_RANK)."),
    images_per_step: int = typer.Option(1, "--images-per-step", help="Images per optimizer step (global batch, split over torchrun processes; keep it fixed to get the same result on any number of GPUs)."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast for the decoder on CUDA (ignored on CPU)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow downloading the official checkpoint."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt (its stored config)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Fine-tune SAM's mask decoder on defect components (box -> mask), image embeddings cached on disk."""
    from pipeline.models.sam.train import SamTrainConfig, finetune_sam

    train = ("mask_decoder",) + (("prompt_encoder",) if train_prompt_encoder else ()) + (("image_encoder",) if train_image_encoder else ())
    cfg = SamTrainConfig(
        train_records=str(Path(annotations) / "sam" / "train.jsonl"), val_records=str(Path(annotations) / "sam" / "val.jsonl"),
        model_type=model_type, checkpoint=checkpoint, tiny_seed=seed, train=train, epochs=epochs, lr=lr,
        weight_decay=weight_decay, seed=seed, box_jitter_px=box_jitter, mask_loss=mask_loss, loss_resolution=loss_resolution,
        cache_dir=str(cache_dir) if cache_dir else None, device=device, allow_download=allow_download,
        images_per_step=images_per_step, amp=amp)
    run = finetune_sam(cfg, out, resume=resume, force=force)
    from pipeline.core import distributed

    if distributed.is_main():
        echo(f"run folder: {run} (best.pt, last.pt, metrics.json, curves.png)")


@predict_app.command("sam")
def predict_sam_cmd(
    gt: Path = typer.Option(..., help="COCO ground truth of the split (annotations/<cat>/coco/test.json): images, and boxes unless --boxes."),
    out: Path = typer.Option(Path("runs/sam-predict"), help="Run folder: predictions.json, overlays/, config.yaml."),
    boxes: Optional[Path] = typer.Option(None, help="A detector's COCO results to prompt with (default: the ground-truth boxes)."),
    weights: Optional[Path] = typer.Option(None, help="Fine-tuned checkpoint (runs/sam/best.pt); omit for the zero-shot baseline."),
    model_type: Optional[str] = typer.Option(None, help="tiny | vit_b | vit_l | vit_h (zero-shot; taken from --weights otherwise)."),
    checkpoint: Optional[str] = typer.Option(None, help="Full SAM checkpoint, name or path (default: the one --weights was trained from)."),
    min_score: float = typer.Option(0.0, help="Skip detector boxes scoring lower."),
    overlays: int = typer.Option(8, help="Number of images drawn with predicted (red) vs true (green) masks."),
    cache_dir: Optional[Path] = typer.Option(None, help="Image-embedding cache (default: as finetune sam)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cuda when present)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow downloading the official checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Predict one mask per box with SAM; write COCO results with RLE masks at the original size."""
    from pipeline.models.sam.predict import predict_sam

    run = predict_sam(gt=gt, out=out, boxes=boxes, weights=weights, model_type=model_type, checkpoint=checkpoint,
                      cache_dir=cache_dir, device=device, min_score=min_score, n_overlays=overlays,
                      allow_download=allow_download, force=force)
    echo(f"wrote {run}/predictions.json (overlays in {run}/overlays); score it with: pipeline evaluate {run}/predictions.json --gt {gt}")


# ----------------------------------------------------------------------------- classifier (issue 4)


@finetune_app.command("classifier")
def finetune_classifier(
    config: str = typer.Option(..., "--config", "-c", help="YAML path or attempt name (attempt1_resnet18, attempt2_selfattention, attempt3_dropblock, attempt4_gem)."),
    split: Path = typer.Option(..., "--split", help="Split manifest annotations/<category>/split.json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/classifier/<config name>)."),
    task: str = typer.Option("multiclass", "--task", help="multiclass (good + each defect type) or binary (good vs defect)."),
    weights: str = typer.Option("none", "--weights", help="imagenet (torchvision resnet18-f37072fd.pth from the caches), none (from scratch) or a state-dict path."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Download the ImageNet file when it is nowhere on disk."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override train.epochs."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Override train.batch_size."),
    device: Optional[str] = typer.Option(None, "--device", help="Override train.device (auto, cpu, cuda, cuda:N)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override train.seed."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="Override data.input_size_hw with a square size."),
    balance: Optional[str] = typer.Option(None, "--balance", help="Override longtail.balance: none, reweight, resample (Cui et al. 2019)."),
    feature_rebalance: Optional[bool] = typer.Option(None, "--feature-rebalance/--no-feature-rebalance", help="Override longtail.feature_rebalance (after Xu et al. 2022)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Any other override, dotted: --set model.dropout=0.2 (repeatable)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Category folder, when the data moved since the split was written."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from weights/last.pt."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (ignored on CPU)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="channels_last memory format (default: on with CUDA)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA only)."),
) -> None:
    """Train a ResNet-18 image classifier (one of the four published attempts) on a split manifest.

    Several GPUs or nodes: launch with torchrun (--batch stays the global batch)."""
    from pipeline.models.classifier.train import train_classifier
    from pipeline.models.classifier.config import load_config, parse_override

    overrides: dict = {}
    for text in set_ or []:
        k, v = parse_override(text)
        overrides[k] = v
    for key, value in (("train.epochs", epochs), ("train.batch_size", batch), ("train.device", device), ("train.seed", seed),
                       ("longtail.balance", balance), ("longtail.feature_rebalance", feature_rebalance)):
        if value is not None:
            overrides[key] = value
    if imgsz is not None:
        overrides["data.input_size_hw"] = [imgsz, imgsz]
    cfg = load_config(config, overrides)
    run_dir = out or Path("runs") / "classifier" / cfg.name
    result = train_classifier(cfg, split, run_dir, task=task, weights=weights, allow_download=allow_download,
                              force=force, resume=resume, root=root, amp=amp, channels_last=channels_last, compile=compile_)
    from pipeline.core import distributed

    if not distributed.is_main():
        return
    val = result.metrics.get("val") or {}
    if val:
        echo(f"val accuracy {val.get('accuracy'):.4f}, balanced accuracy {val.get('balanced_accuracy'):.4f} (weights: {result.metrics['weights']})")


@predict_app.command("classifier")
def predict_classifier_cmd(
    run: Path = typer.Option(..., "--run", help="Run folder of 'finetune classifier' or a checkpoint .pt."),
    split: Path = typer.Option(..., "--split", help="Split manifest annotations/<category>/split.json."),
    subset: str = typer.Option("test", "--subset", help="Manifest subset to predict: train, val or test."),
    out: Path = typer.Option(..., "--out", "-o", help="Prediction JSON to write (kind: classification)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    root: Optional[Path] = typer.Option(None, "--root", help="Category folder, when the data moved since the split was written."),
    force: bool = typer.Option(False, "--force", help="Replace an existing prediction file."),
) -> None:
    """Predict image-level labels with a trained classifier; writes per-image image/label/scores JSON."""
    from pipeline.models.classifier.train import predict_classifier

    path = predict_classifier(run, split, out, subset=subset, device=device, force=force, root=root)
    echo(f"wrote {path}")


# ----------------------------------------------------------------------------- anomaly (issue 5)


@finetune_app.command("anomaly")
def finetune_anomaly_cmd(
    category: Optional[Path] = typer.Argument(None, help="Category folder (MVTec AD layout); train/good is the training set."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split manifest annotations/<category>/split.json (its val split sets the threshold); default: a seed-0 60/20/20 split drawn from CATEGORY."),
    out: Path = typer.Option(Path("runs/anomaly"), "--out", "-o", help="Run folder to write (model.pt, config.yaml, metrics.json, log.txt)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="wide_resnet50_2, resnet18, efficientnet_lite0 or mobilenet_v2; default the best one whose weights are on disk."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Backbone weights file (default: torch cache / $PIPELINE_WEIGHTS, or the installed weights package)."),
    imgsz: int = typer.Option(224, "--imgsz", help="Square network input side; every image is resized to it (aspect ratio not kept)."),
    coreset_ratio: float = typer.Option(0.01, "--coreset-ratio", help="Fraction of training patches kept in the memory bank (0.01 default for CPU; the paper uses 0.01-0.25)."),
    feature_dim: Optional[int] = typer.Option(None, "--feature-dim", help="Reduce patch features to this many channels (adaptive average pooling)."),
    neighbors: int = typer.Option(9, "--neighbors", help="b of the image-score re-weighting."),
    batch: int = typer.Option(16, "--batch", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random projection and the first coreset centre."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Download a missing torchvision ImageNet file (resnet18, wide_resnet50_2)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: CUDA when available)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Fit PatchCore (Roth et al., CVPR 2022) on good images only; choose the threshold on the val split."""
    from pipeline.models.anomaly.patchcore import PatchCoreConfig, fit_run

    if category is None and split is None:
        raise PipelineError("give the category folder (and optionally --split annotations/<category>/split.json)")
    if backbone is not None:
        from pipeline.models.backbones import SPECS

        if backbone not in SPECS:
            raise PipelineError(f"unknown backbone {backbone!r} (expected one of {', '.join(SPECS)})")
    cfg = PatchCoreConfig(backbone=backbone, weights=str(weights) if weights else None, image_size=imgsz,
                          coreset_ratio=coreset_ratio, feature_dim=feature_dim, num_neighbors=neighbors,
                          batch_size=batch, seed=seed)
    m = fit_run(category, out=out, config=cfg, split_path=split, force=force, allow_download=allow_download,
                device=device, echo=echo)
    if not m:  # a torchrun rank other than 0: it shared the feature extraction, rank 0 reports
        return
    v = m["val"]
    echo(f"backbone {m['backbone']}: memory bank {m['memory_bank'][0]} x {m['memory_bank'][1]}, fit {m['fit_seconds']:.1f} s; "
         f"val image AUROC {v['image_auroc']:.4f}, F1 {v['image_f1']:.4f}")
    echo(f"wrote {out}")


@predict_app.command("anomaly")
def predict_anomaly_cmd(
    model: Path = typer.Argument(..., help="model.pt of 'finetune anomaly' (or its run folder)."),
    category: Optional[Path] = typer.Option(None, "--category", help="Category folder (default: the split's root)."),
    split: Optional[Path] = typer.Option(None, "--split", help="Split manifest; default the split.json saved in the run folder."),
    subset: str = typer.Option("test", "--subset", help="train, val, test or all."),
    out: Path = typer.Option(Path("runs/anomaly_predict"), "--out", "-o", help="Folder for predictions.json, maps/, overlays/, coco_results.json."),
    maps: bool = typer.Option(True, "--maps/--no-maps", help="Save raw float maps (.npy, needed for pixel metrics)."),
    overlays: int = typer.Option(8, "--overlays", help="Heat-map overlay PNGs to write (0 for none)."),
    coco: bool = typer.Option(True, "--coco/--no-coco", help="Also write maps thresholded into COCO results (boxes + RLE masks)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: CUDA when available)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Score images with a PatchCore artefact: image score, good/defect decision and anomaly map per image."""
    from pipeline.models.anomaly.patchcore import predict_run

    artefact = model / "model.pt" if model.is_dir() else model
    if split is None and category is None and (artefact.parent / "split.json").is_file():
        split = artefact.parent / "split.json"
    path = predict_run(artefact, out=out, category_dir=category, split_path=split, subset=subset, save_maps=maps,
                       overlays=overlays, coco=coco, force=force, device=device, echo=echo)
    echo(f"wrote {path}")


# ----------------------------------------------------------------------------- evaluate / review


@app.command("evaluate")
def evaluate(
    predictions: List[Path] = typer.Argument(..., help="Prediction files: COCO results JSON, classifier or anomaly JSON."),
    gt: Optional[Path] = typer.Option(None, help="COCO ground truth of the same split (needed for COCO results and for the image-level decision)."),
    out: Path = typer.Option(Path("runs/evaluate"), help="Folder for metrics JSON and plots."),
    val_predictions: Optional[List[Path]] = typer.Option(None, "--val-predictions", help="The same sources predicted on the val split, in the same order (repeat the option); turns on the image-level good/defect decision with val thresholds and fusion."),
    val_gt: Optional[Path] = typer.Option(None, "--val-gt", help="COCO ground truth of the val split (annotations/<cat>/coco/val.json)."),
    l2: float = typer.Option(1.0, "--l2", help="L2 penalty of the logistic-regression fusion."),
    class_agnostic: bool = typer.Option(False, "--class-agnostic", help="Match COCO results whatever their class (for class-less sources such as PatchCore's regions)."),
) -> None:
    """Score predictions: COCO mAP (bbox, segm), mask IoU/Dice, classifier and anomaly metrics.

    With --val-predictions and --val-gt also the image-level good/defect decision of each source and of their fusion (any-source OR, logistic regression): thresholds chosen on val, metrics on the split of --gt; written to OUT/fusion.json (input of 'pipeline report')."""
    from pipeline.evaluation.evaluate import evaluate_file

    if val_predictions and (val_gt is None or gt is None):
        raise PipelineError("--val-predictions needs --val-gt (val COCO ground truth) and --gt (ground truth of the evaluated split)")
    for pred in predictions:
        metrics = evaluate_file(pred, gt=gt, out_dir=out, class_agnostic=class_agnostic)
        echo(metrics.pop("_summary", ""))
    if val_predictions:
        from pipeline.evaluation.fusion import format_table, fuse_files
        from pipeline.core.io import atomic_write_json

        result = fuse_files(val_predictions, predictions, val_gt=val_gt, test_gt=gt, l2=l2)
        result["metrics_files"] = sorted(str(p.resolve()) for p in Path(out).glob("metrics_*.json"))
        atomic_write_json(Path(out) / "fusion.json", result)
        echo("image-level good/defect (thresholds from val):")
        echo(format_table(result))
        if result["better_fusion"]:
            echo(f"better fusion: {result['better_fusion']}; best overall: {result['best']}")
    echo(f"metrics and plots in {out}")


@app.command("report")
def report(
    runs: List[Path] = typer.Argument(..., help="Output folders of 'pipeline evaluate' (fusion.json and/or metrics_*.json), or fusion.json files."),
    out: Path = typer.Option(Path("runs/report"), "--out", "-o", help="Report folder: report.html, report.json, images/."),
    gallery: int = typer.Option(6, "--gallery", help="Images per gallery group (most confident errors, least confident correct)."),
    max_side: int = typer.Option(320, "--max-side", help="Longer side of gallery images in pixels."),
    title: str = typer.Option("pipeline report", "--title", help="Report title."),
    gallery_method: Optional[List[str]] = typer.Option(None, "--gallery-method", help="Source or fusion (fusion:or, fusion:logistic) to show a gallery for (repeat; default: the best on test)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
) -> None:
    """Write a self-contained HTML report (plus the same numbers as JSON): dataset counts, metrics tables,
    ROC/PR curves, confusion matrices and a gallery with predictions drawn over the images."""
    from pipeline.evaluation.report import build_report

    doc = build_report(runs, out, gallery=gallery, max_side=max_side, force=force, title=title,
                       gallery_methods=gallery_method or None)
    echo(f"wrote {doc['html']} ({len(doc['images'])} images) and {Path(out) / 'report.json'}")


@export_app.command("labelstudio")
def export_labelstudio(
    predictions: List[Path] = typer.Argument(..., help="Prediction files: COCO results JSON (detector, SAM; masks from 'segmentation'); classifier/anomaly JSON feed the review order."),
    gt: Path = typer.Option(..., help="COCO ground truth of the split: image list, sizes, class names."),
    out: Path = typer.Option(Path("runs/labelstudio"), help="Folder for tasks.json and labeling_config.xml."),
    min_score: float = typer.Option(0.25, help="Leave out predictions scoring lower; also the threshold of the uncertainty score."),
    model_version: str = typer.Option("pipeline", help="Model version shown in Label Studio."),
    polygons: bool = typer.Option(False, "--polygons", help="Also give predicted masks as polygons (besides brush masks)."),
    order: str = typer.Option("image", help="Task order: 'image' (ground-truth order) or 'uncertainty' (least sure first)."),
    document_root: Optional[Path] = typer.Option(None, help="Label Studio local-files document root (default: parent of the category folder)."),
    url_prefix: Optional[str] = typer.Option(None, help="Serve images from this URL prefix instead of local files."),
    push: bool = typer.Option(False, "--push", help="Also create/update a project on a Label Studio server (--url) and import the tasks."),
    url: Optional[str] = typer.Option(None, help="Label Studio server for --push, e.g. http://127.0.0.1:8080."),
    project: Optional[str] = typer.Option(None, help="Project title for --push (default: 'review <category> <split>')."),
    token_env: str = typer.Option("LABEL_STUDIO_API_KEY", help="Environment variable holding the API token (never pass the token itself)."),
    force: bool = typer.Option(False, "--force", help="Replace existing output."),
) -> None:
    """Write Label Studio tasks with the predictions as pre-annotations (boxes, brush masks), and the matching labeling config."""
    from pipeline.review.export import export_tasks

    if push and not url:
        raise PipelineError("--push needs --url (the Label Studio server, e.g. http://127.0.0.1:8080)")
    pushed: dict = {}

    def _push(tasks: list, config_xml: str, title: str) -> None:  # runs before anything is written
        from pipeline.core.io import check_can_write
        from pipeline.review.client import push_tasks

        check_can_write(out, force=force)
        pushed.update(push_tasks(tasks, config_xml, url=url, title=project or title, token_env=token_env,
                                 storage_path=None if url_prefix else _storage_path(gt), source=str(predictions[0])))

    info = export_tasks(predictions, gt_path=gt, out_dir=out, min_score=min_score, model_version=model_version,
                        document_root=document_root, url_prefix=url_prefix, polygons=polygons, order=order, force=force,
                        before_write=_push if push else None)
    echo(f"wrote {info['n_tasks']} tasks ({info['n_results']} predicted regions, {info['n_masks']} with masks, "
         f"order: {order}) to {info['tasks']}")
    echo(f"labeling config: {info['config']}")
    if pushed:
        echo(f"{'created' if pushed['created'] else 'updated'} project {pushed['project_url']}: "
             f"{pushed['n_imported']} tasks imported, {pushed['n_updated']} updated")
    elif info.get("document_root"):
        echo("Label Studio settings: start it with\n"
             f"  LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={info['document_root']} label-studio start\n"
             f"then in the project: Settings > Labeling Interface > Code: paste {info['config']}; "
             f"Settings > Cloud Storage > Add Source Storage > Local files, absolute path {info['storage_path']}; "
             f"Import: {info['tasks']}")


def _storage_path(gt: Path) -> Path:
    """The category folder of a COCO ground truth (its ``info.image_root``): the Local Storage path."""
    import json

    return Path(json.loads(Path(gt).read_text()).get("info", {}).get("image_root", "."))


@import_app.command("labelstudio")
def import_labelstudio(
    export: Path = typer.Argument(..., help="Label Studio JSON export of the reviewed project (Export > JSON)."),
    config: Path = typer.Option(..., help="The project's labeling config (labeling_config.xml written by 'export labelstudio')."),
    out: Path = typer.Option(..., help="COCO ground truth file to write, e.g. annotations/bottle/coco/reviewed.json."),
    image_root: Optional[Path] = typer.Option(None, help="Category folder the images are relative to (default: the tasks' data.image_root)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Turn reviewed Label Studio tasks into COCO ground truth (rectangles -> boxes, brush/polygons -> RLE masks)."""
    from pipeline.review.export import import_export

    info = import_export(export, config_path=config, out_path=out, image_root=image_root, force=force)
    echo(f"wrote {info['n_images']} reviewed images, {info['n_annotations']} annotations to {info['out']}"
         + (f" ({info['n_unreviewed']} tasks without a submitted annotation left out)" if info["n_unreviewed"] else ""))


def main() -> None:
    """Console entry point: run the app, turning :class:`PipelineError` into one line and exit 1."""
    debug = "--debug" in sys.argv[1:]
    try:
        app(standalone_mode=False)
    except PipelineError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # usage errors, --help exits, aborts (typer vendors click: match by shape)
        code = getattr(exc, "exit_code", None)
        if code is None:
            raise
        message = getattr(exc, "format_message", lambda: "")()
        if message:  # a usage error: one line, with where to look (help already shown has none)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            print(f"error: {message}{hint}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
