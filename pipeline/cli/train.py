"""``pipeline finetune yolo | sam | classifier | anomaly``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core.console import echo

finetune_app = typer.Typer(no_args_is_help=True, help="Train a model: yolo, sam, classifier, anomaly.")


@finetune_app.command("yolo")
def finetune_yolo(
    data: Path = typer.Option(..., help="YOLO data.yaml written by convert-masks (annotations/<cat>/yolo/data.yaml)."),
    model: Optional[str] = typer.Option(
        None,
        help="Weights (path or yolov8s-worldv2.pt) or a model YAML (random init). "
        "Default: yolov8s-worldv2.pt; with --backbone, yolov8n-worldv2.yaml (its neck and head).",
    ),
    backbone: Optional[str] = typer.Option(
        None,
        help="mobilenet_v2 | efficientnet_lite0: replace the YAML's backbone by this ImageNet trunk "
        "(registry weights, no download). Default: the backbone of --model.",
    ),
    freeze_trunk_epochs: int = typer.Option(0, help="With --backbone: keep the trunk frozen for the first N epochs."),
    close_mosaic: Optional[int] = typer.Option(
        None, help="Last N epochs without mosaic (ultralytics' close_mosaic; default 10; >= --epochs: no mosaic)."
    ),
    nbs: Optional[int] = typer.Option(
        None,
        help="Nominal batch size: gradients of round(nbs / batch) batches per optimizer step "
        "(ultralytics' nbs, default 64; --nbs equal to --batch steps after every batch).",
    ),
    out: Path = typer.Option(Path("runs/yolo"), help="Run folder."),
    epochs: int = typer.Option(30, help="Training epochs."),
    imgsz: int = typer.Option(640, help="Training image size (pixels, longest side)."),
    batch: int = typer.Option(8, help="Batch size (global: split over the GPUs of a multi-GPU --device)."),
    device: Optional[str] = typer.Option(
        None,
        help="cpu, 0, or several GPUs 0,1,2,3 (ultralytics DDP, one process per GPU; "
        "default: GPU 0 when present, else cpu).",
    ),
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

    if model is None:
        model = "yolov8n-worldv2.yaml" if backbone else "yolov8s-worldv2.pt"
    run = train_yolo_world(
        data_yaml=data,
        model=model,
        backbone=backbone,
        freeze_trunk_epochs=freeze_trunk_epochs,
        close_mosaic=close_mosaic,
        nbs=nbs,
        out_dir=out,
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=device,
        seed=seed,
        workers=workers,
        optimizer=optimizer,
        lr0=lr0,
        allow_download=allow_download,
        resume=resume,
        force=force,
    )
    echo(f"run folder: {run} (weights in {run}/weights, metrics in {run}/metrics.json)")


@finetune_app.command("sam")
def finetune_sam_cmd(
    annotations: Path = typer.Argument(
        ..., help="Folder written by convert-masks (annotations/<cat>): reads sam/train.jsonl, sam/val.jsonl."
    ),
    out: Path = typer.Option(Path("runs/sam"), help="Run folder."),
    model_type: str = typer.Option("vit_b", help="tiny (random init, smoke runs) | vit_b | vit_l | vit_h."),
    checkpoint: Optional[str] = typer.Option(
        None, help="Full SAM checkpoint, name or path (sam_vit_b_01ec64.pth); required for vit_*."
    ),
    epochs: int = typer.Option(10, help="Epochs."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (cosine schedule to lr * 0.01)."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay."),
    box_jitter: float = typer.Option(
        0.0, help="Jitter each box coordinate by up to this many original pixels (0: off)."
    ),
    mask_loss: str = typer.Option("focal", help="focal (x20) or bce (x1), plus Dice and IoU-head MSE."),
    loss_resolution: str = typer.Option(
        "lowres", help="lowres (decoder's 256x256 frame, area-pooled soft target) or native (original pixels)."
    ),
    train_prompt_encoder: bool = typer.Option(False, "--train-prompt-encoder", help="Also train the prompt encoder."),
    train_image_encoder: bool = typer.Option(
        False, "--train-image-encoder", help="Also train the image encoder (slow: no embedding cache)."
    ),
    cache_dir: Optional[Path] = typer.Option(
        None,
        help="Image-embedding cache (default: $PIPELINE_CACHE/sam-embeddings or ~/.cache/pipeline/sam-embeddings).",
    ),
    seed: int = typer.Option(0, help="Random seed (order, jitter; tiny model init)."),
    device: Optional[str] = typer.Option(
        None,
        help="cpu, cuda, cuda:1 ... (default: cuda when present; under torchrun each process takes GPU LOCAL_RANK).",
    ),
    images_per_step: int = typer.Option(
        1,
        "--images-per-step",
        help="Images per optimizer step (global batch, split over torchrun processes; "
        "keep it fixed to get the same result on any number of GPUs).",
    ),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast for the decoder on CUDA (ignored on CPU)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow downloading the official checkpoint."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last.pt (its stored config)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Fine-tune SAM's mask decoder on defect components (box -> mask), image embeddings cached on disk."""
    from pipeline.core import distributed
    from pipeline.models.sam.train import SamTrainConfig, finetune_sam

    cfg = SamTrainConfig.from_annotations(
        annotations,
        train_prompt_encoder=train_prompt_encoder,
        train_image_encoder=train_image_encoder,
        model_type=model_type,
        checkpoint=checkpoint,
        tiny_seed=seed,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        box_jitter_px=box_jitter,
        mask_loss=mask_loss,
        loss_resolution=loss_resolution,
        cache_dir=str(cache_dir) if cache_dir else None,
        device=device,
        allow_download=allow_download,
        images_per_step=images_per_step,
        amp=amp,
    )
    run = finetune_sam(cfg, out, resume=resume, force=force)
    if distributed.is_main():
        echo(f"run folder: {run} (best.pt, last.pt, metrics.json, curves.png)")


@finetune_app.command("classifier")
def finetune_classifier(
    config: str = typer.Option(
        ...,
        "--config",
        "-c",
        help="YAML path or attempt name (attempt1_resnet18, attempt2_selfattention, attempt3_dropblock, attempt4_gem).",
    ),
    split: Path = typer.Option(..., "--split", help="Split manifest annotations/<category>/split.json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/classifier/<config name>)."),
    task: str = typer.Option(
        "multiclass", "--task", help="multiclass (good + each defect type) or binary (good vs defect)."
    ),
    backbone: Optional[str] = typer.Option(
        None,
        "--backbone",
        help="Override model.backbone: resnet18 (published), efficientnet_lite0 or mobilenet_v2 (their ImageNet "
        "weights come installed, offline); each attempt's design maps onto the trunk's stages by stride.",
    ),
    weights: str = typer.Option(
        "imagenet",
        "--weights",
        help="imagenet (the trunk's ImageNet weights: resnet18-f37072fd.pth from the weights caches, what the "
        "published attempts use, or the installed registry file), none (from scratch: frozen stages stay random) "
        "or a state-dict path of the trunk.",
    ),
    allow_download: bool = typer.Option(
        False, "--allow-download", help="Download the ImageNet file when it is nowhere on disk."
    ),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override train.epochs."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Override train.batch_size."),
    device: Optional[str] = typer.Option(None, "--device", help="Override train.device (auto, cpu, cuda, cuda:N)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override train.seed."),
    imgsz: Optional[int] = typer.Option(None, "--imgsz", help="Override data.input_size_hw with a square size."),
    balance: Optional[str] = typer.Option(
        None, "--balance", help="Override longtail.balance: none, reweight, resample (Cui et al. 2019)."
    ),
    feature_synthesis: Optional[str] = typer.Option(
        None,
        "--feature-synthesis",
        help="Override longtail.feature_synthesis: interpolate (segments between same-class features), gaussian "
        "(one shrunk Gaussian per class, after distribution calibration) or none; then the head is retrained.",
    ),
    target_ratio: Optional[float] = typer.Option(
        None,
        "--target-ratio",
        help="Override longtail.target_ratio: synthesise up to this fraction of the head's count.",
    ),
    longtail: Optional[str] = typer.Option(
        None, "--longtail", help="Override longtail.method: dlsa (Xu et al., ECCV 2022: flow filter + cascade) or none."
    ),
    feature_rebalance: Optional[bool] = typer.Option(
        None,
        "--feature-rebalance/--no-feature-rebalance",
        hidden=True,
        help="Old name of --feature-synthesis gaussian.",
    ),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="Any other override, dotted: --set model.dropout=0.2 (repeatable)."
    ),
    root: Optional[Path] = typer.Option(
        None, "--root", help="Category folder, when the data moved since the split was written."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from weights/last.pt."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA (ignored on CPU)."),
    channels_last: Optional[bool] = typer.Option(
        None, "--channels-last/--no-channels-last", help="channels_last memory format (default: on with CUDA)."
    ),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the model (CUDA only)."),
) -> None:
    """Train an image classifier (one of the four published attempts; ResNet-18 trunk unless --backbone).

    Several GPUs or nodes: launch with torchrun (--batch stays the global batch)."""
    from pipeline.models.classifier.config import command_line_overrides
    from pipeline.models.classifier.train import train_from_config

    named = {
        "model.backbone": backbone,
        "train.epochs": epochs,
        "train.batch_size": batch,
        "train.device": device,
        "train.seed": seed,
        "longtail.balance": balance,
        "longtail.feature_rebalance": feature_rebalance,
        "longtail.feature_synthesis": feature_synthesis,
        "longtail.target_ratio": target_ratio,
        "longtail.method": longtail,
        "data.input_size_hw": None if imgsz is None else [imgsz, imgsz],
    }
    result = train_from_config(
        config,
        split,
        out,
        overrides=command_line_overrides(set_ or [], named),
        task=task,
        weights=weights,
        allow_download=allow_download,
        force=force,
        resume=resume,
        root=root,
        amp=amp,
        channels_last=channels_last,
        compile=compile_,
    )
    line = result.summary()
    if line:
        echo(line)


@finetune_app.command("anomaly")
def finetune_anomaly_cmd(
    category: Optional[Path] = typer.Argument(
        None, help="Category folder (MVTec AD layout); train/good is the training set."
    ),
    split: Optional[Path] = typer.Option(
        None,
        "--split",
        help="Split manifest annotations/<category>/split.json (its val split sets the threshold); "
        "default: a seed-0 60/20/20 split drawn from CATEGORY.",
    ),
    out: Path = typer.Option(
        Path("runs/anomaly"),
        "--out",
        "-o",
        help="Run folder to write (model.pt, config.yaml, metrics.json, split.json, log.txt).",
    ),
    backbone: Optional[str] = typer.Option(
        None,
        "--backbone",
        help="wide_resnet50_2, resnet18, efficientnet_lite0 or mobilenet_v2; "
        "default the best one whose weights are on disk.",
    ),
    weights: Optional[Path] = typer.Option(
        None,
        "--weights",
        help="Backbone weights file (default: torch cache / $PIPELINE_WEIGHTS, or the installed weights package).",
    ),
    imgsz: int = typer.Option(
        256, "--imgsz", help="Square network input side; every image is resized to it (aspect ratio not kept)."
    ),
    resize: Optional[str] = typer.Option(
        None,
        "--resize",
        help="area (OpenCV, on the 8-bit image) or bilinear_aa (antialiased bilinear on floats); "
        "default per backbone: bilinear_aa for mobilenet_v2, area for the others.",
    ),
    upsample: str = typer.Option(
        "nearest", "--upsample", help="Patch scores -> map before the Gaussian blur: nearest or bilinear."
    ),
    stages: Optional[str] = typer.Option(
        None,
        "--stages",
        help="The two backbone stages, shallower first; default per backbone: blocks.4,blocks.7 "
        "(efficientnet_lite0), features.6,features.10 (mobilenet_v2), layer2,layer3 (ResNets).",
    ),
    coreset_ratio: float = typer.Option(
        0.01,
        "--coreset-ratio",
        help="Fraction of training patches kept in the memory bank (0.01 default for CPU; the paper uses 0.01-0.25).",
    ),
    feature_dim: Optional[int] = typer.Option(
        None, "--feature-dim", help="Reduce patch features to this many channels (adaptive average pooling)."
    ),
    neighbors: int = typer.Option(9, "--neighbors", help="b of the image-score re-weighting."),
    batch: int = typer.Option(16, "--batch", help="Images per forward pass."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random projection and the first coreset centre."),
    allow_download: bool = typer.Option(
        False, "--allow-download", help="Download a missing torchvision ImageNet file (resnet18, wide_resnet50_2)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: CUDA when available)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Fit PatchCore (Roth et al., CVPR 2022) on good images only; choose the threshold on the val split."""
    from pipeline.models.anomaly.patchcore import PatchCoreConfig
    from pipeline.models.anomaly.train import fit_run

    cfg = PatchCoreConfig(
        backbone=backbone,
        weights=str(weights) if weights else None,
        image_size=imgsz,
        resize=resize,
        upsample=upsample,
        stages=stages,
        coreset_ratio=coreset_ratio,
        feature_dim=feature_dim,
        num_neighbors=neighbors,
        batch_size=batch,
        seed=seed,
    )
    m = fit_run(
        category, out=out, config=cfg, split_path=split, force=force, allow_download=allow_download, device=device
    )
    if not m:  # a torchrun rank other than 0: it shared the feature extraction, rank 0 reports
        return
    v = m["val"]
    echo(
        f"backbone {m['backbone']}: memory bank {m['memory_bank'][0]} x {m['memory_bank'][1]}, "
        f"fit {m['fit_seconds']:.1f} s ({m['fit_wall_seconds']:.1f} s in all); "
        f"val image AUROC {v['image_auroc']:.4f}, F1 {v['image_f1']:.4f}"
    )
    echo(f"wrote {out}")
