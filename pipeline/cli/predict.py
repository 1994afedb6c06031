"""``pipeline predict yolo | sam | classifier | anomaly``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.core.console import echo

predict_app = typer.Typer(no_args_is_help=True, help="Run a trained model over a split and write predictions.")


@predict_app.command("yolo")
def predict_yolo(
    weights: Path = typer.Option(..., help="Trained weights (run folder's weights/best.pt)."),
    gt: Path = typer.Option(..., help="COCO ground truth of the split to predict (annotations/<cat>/coco/test.json)."),
    out: Path = typer.Option(..., help="Run folder: predictions.json (COCO results), config.yaml."),
    imgsz: int = typer.Option(640, help="Inference image size (use the training size)."),
    conf: float = typer.Option(0.001, help="Minimum score kept (low, so mAP sees the whole PR curve)."),
    device: Optional[str] = typer.Option(None, help="cpu, 0, cuda:N, auto (default: GPU 0 when present, else cpu)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Detect defects on every image of a split; write COCO results (image_id, category_id, bbox, score)."""
    from pipeline.models.yolo.predict import predict_split

    res = predict_split(weights=weights, gt=gt, out=out, imgsz=imgsz, conf=conf, device=device, force=force)
    echo(
        f"wrote {res.n_detections} detections on {res.n_images} images to {res.predictions}; "
        f"score it with: pipeline evaluate {res.predictions} --gt {gt}"
    )


@predict_app.command("sam")
def predict_sam_cmd(
    gt: Path = typer.Option(
        ..., help="COCO ground truth of the split (annotations/<cat>/coco/test.json): images, and boxes unless --boxes."
    ),
    out: Path = typer.Option(Path("runs/sam-predict"), help="Run folder: predictions.json, overlays/, config.yaml."),
    boxes: Optional[Path] = typer.Option(
        None, help="A detector's COCO results to prompt with (default: the ground-truth boxes)."
    ),
    weights: Optional[Path] = typer.Option(
        None, help="Fine-tuned checkpoint (runs/sam/best.pt); omit for the zero-shot baseline."
    ),
    model_type: Optional[str] = typer.Option(
        None, help="tiny | vit_b | vit_l | vit_h (zero-shot; taken from --weights otherwise)."
    ),
    checkpoint: Optional[str] = typer.Option(
        None, help="Full SAM checkpoint, name or path (default: the one --weights was trained from)."
    ),
    min_score: float = typer.Option(0.0, help="Skip detector boxes scoring lower."),
    overlays: int = typer.Option(8, help="Number of images drawn with predicted (red) vs true (green) masks."),
    cache_dir: Optional[Path] = typer.Option(None, help="Image-embedding cache (default: as finetune sam)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda ... (default: cuda when present)."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow downloading the official checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Predict one mask per box with SAM; write COCO results with RLE masks at the original size."""
    from pipeline.models.sam.predict import predict_sam

    run = predict_sam(
        gt=gt,
        out=out,
        boxes=boxes,
        weights=weights,
        model_type=model_type,
        checkpoint=checkpoint,
        cache_dir=cache_dir,
        device=device,
        min_score=min_score,
        n_overlays=overlays,
        allow_download=allow_download,
        force=force,
    )
    echo(
        f"wrote {run}/predictions.json (overlays in {run}/overlays); "
        f"score it with: pipeline evaluate {run}/predictions.json --gt {gt}"
    )


@predict_app.command("classifier")
def predict_classifier_cmd(
    run: Path = typer.Option(..., "--run", help="Run folder of 'finetune classifier' or a checkpoint .pt."),
    split: Path = typer.Option(..., "--split", help="Split manifest annotations/<category>/split.json."),
    subset: str = typer.Option("test", "--subset", help="Manifest subset to predict: train, val or test."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder to write: predictions.json (kind: classification) and config.yaml."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    root: Optional[Path] = typer.Option(
        None, "--root", help="Category folder, when the data moved since the split was written."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing prediction run folder."),
) -> None:
    """Predict image-level labels with a trained classifier; writes per-image image/label/scores JSON."""
    from pipeline.models.classifier.predict import PREDICTIONS, predict_classifier

    folder = predict_classifier(run, split, out, subset=subset, device=device, force=force, root=root)
    echo(f"wrote {folder / PREDICTIONS}; score it with: pipeline evaluate {folder / PREDICTIONS}")


@predict_app.command("anomaly")
def predict_anomaly_cmd(
    model: Path = typer.Argument(..., help="model.pt of 'finetune anomaly' (or its run folder)."),
    category: Optional[Path] = typer.Option(None, "--category", help="Category folder (default: the split's root)."),
    split: Optional[Path] = typer.Option(
        None, "--split", help="Split manifest; default the split.json saved in the run folder."
    ),
    subset: str = typer.Option("test", "--subset", help="train, val, test or all."),
    out: Path = typer.Option(
        Path("runs/anomaly_predict"),
        "--out",
        "-o",
        help="Run folder for predictions.json, maps/, overlays/, coco_results.json.",
    ),
    maps: bool = typer.Option(True, "--maps/--no-maps", help="Save raw float maps (.npy, needed for pixel metrics)."),
    overlays: int = typer.Option(8, "--overlays", help="Heat-map overlay PNGs to write (0 for none)."),
    coco: bool = typer.Option(
        True, "--coco/--no-coco", help="Also write maps thresholded into COCO results (boxes + RLE masks)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N (default: CUDA when available)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
) -> None:
    """Score images with a PatchCore artefact: image score, good/defect decision and anomaly map per image."""
    from pipeline.models.anomaly.predict import predict_run

    path = predict_run(
        model,
        out=out,
        category_dir=category,
        split_path=split,
        subset=subset,
        save_maps=maps,
        overlays=overlays,
        coco=coco,
        force=force,
        device=device,
    )
    echo(f"wrote {path}")
