"""The ``pipeline`` command line (Typer). Each command is a thin typed function: it parses
options, calls one library function, and prints what it wrote. Heavy libraries are imported
inside the commands so ``pipeline --help`` stays instant.

Errors of type :class:`pipeline.errors.PipelineError` reach the user as one line and exit 1;
``pipeline --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from pipeline.errors import PipelineError

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
    from pipeline.io import staged_dir
    from pipeline.synth import generate_category

    with staged_dir(out, force=force) as tmp:
        generate_category(tmp, seed=seed, size_hw=(height, width), n_train_good=n_train_good,
                          n_test_good=n_test_good, n_per_defect=n_per_defect)
    echo(f"wrote synthetic category {out}")


@app.command("convert-masks")
def convert_masks(
    category: Path = typer.Argument(..., help="MVTec AD category folder, e.g. $MVTEC_ROOT/bottle."),
    out: Optional[Path] = typer.Option(None, help="Output folder [default: annotations/<category>]."),
    ratios: str = typer.Option("0.6,0.2,0.2", help="train,val,test fractions of test/ images (stratified)."),
    seed: int = typer.Option(0, help="Split seed."),
    connectivity: int = typer.Option(8, help="Connected-component connectivity: 8 or 4."),
    min_area: int = typer.Option(1, help="Drop components smaller than this many pixels (1 keeps all)."),
    rename: List[str] = typer.Option([], help="DEFECT_TYPE=class name; repeat; same name merges types."),
    split: Optional[Path] = typer.Option(None, help="Reuse this split.json instead of drawing a new split."),
    force: bool = typer.Option(False, "--force", help="Replace existing output."),
) -> None:
    """MVTec masks -> one instance per connected component -> COCO, YOLO and SAM files per split."""
    from pipeline.convert import convert_category, parse_rename
    from pipeline.mvtec import load_split

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
    batch: int = typer.Option(8, help="Batch size."),
    device: Optional[str] = typer.Option(None, help="cpu, 0, 0,1 ... [default: GPU 0 when present, else cpu]."),
    seed: int = typer.Option(0, help="Random seed."),
    workers: int = typer.Option(0, help="Data-loader workers."),
    allow_download: bool = typer.Option(False, "--allow-download", help="Allow downloading known weights."),
    resume: bool = typer.Option(False, "--resume", help="Resume an interrupted run from its last.pt."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Fine-tune YOLO-World (ultralytics) to localise defects; works offline."""
    from pipeline.detection import train_yolo_world

    run = train_yolo_world(data_yaml=data, model=model, out_dir=out, epochs=epochs, imgsz=imgsz, batch=batch,
                           device=device, seed=seed, workers=workers, allow_download=allow_download,
                           resume=resume, force=force)
    echo(f"run folder: {run} (weights in {run}/weights, metrics in {run}/metrics.json)")


@predict_app.command("yolo")
def predict_yolo(
    weights: Path = typer.Option(..., help="Trained weights (run folder's weights/best.pt)."),
    gt: Path = typer.Option(..., help="COCO ground truth of the split to predict (annotations/<cat>/coco/test.json)."),
    out: Path = typer.Option(..., help="COCO results JSON to write."),
    imgsz: int = typer.Option(640, help="Inference image size (use the training size)."),
    conf: float = typer.Option(0.001, help="Minimum score kept (low, so mAP sees the whole PR curve)."),
    device: Optional[str] = typer.Option(None, help="cpu, 0, ... [default: GPU 0 when present, else cpu]."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Detect defects on every image of a split; write COCO results (image_id, category_id, bbox, score)."""
    from pipeline.coco_results import class_index_to_category, detections_to_results, split_images
    from pipeline.detection import load_class_names, predict_yolo_world
    from pipeline.io import atomic_write_json, check_can_write, read_json

    check_can_write(out, force=force)
    gt_data = read_json(gt)
    images = split_images(gt_data)
    index_to_cat = class_index_to_category(load_class_names(weights), gt_data, source=weights)
    dets = predict_yolo_world(weights=weights, images=[p for _, p, _ in images], imgsz=imgsz, conf=conf, device=device)
    results = detections_to_results(dets, images, index_to_cat)
    atomic_write_json(out, results, indent=None)
    echo(f"wrote {len(results)} detections on {len(images)} images to {out}")


# ----------------------------------------------------------------------------- SAM (issue 3)

# ----------------------------------------------------------------------------- classifier (issue 4)

# ----------------------------------------------------------------------------- anomaly (issue 5)

# ----------------------------------------------------------------------------- evaluate / review


@app.command("evaluate")
def evaluate(
    predictions: List[Path] = typer.Argument(..., help="Prediction files: COCO results JSON, classifier or anomaly JSON."),
    gt: Optional[Path] = typer.Option(None, help="COCO ground truth of the same split (needed for COCO results)."),
    out: Path = typer.Option(Path("runs/evaluate"), help="Folder for metrics JSON and plots."),
) -> None:
    """Score predictions: COCO mAP (bbox, segm), mask IoU/Dice, classifier and anomaly metrics."""
    from pipeline.evaluation import evaluate_file

    for pred in predictions:
        metrics = evaluate_file(pred, gt=gt, out_dir=out)
        echo(metrics.pop("_summary", ""))
    echo(f"metrics and plots in {out}")


@export_app.command("labelstudio")
def export_labelstudio(
    predictions: Path = typer.Argument(..., help="COCO results JSON (a detector's or SAM's predictions)."),
    gt: Path = typer.Option(..., help="COCO ground truth of the split: image list, sizes, class names."),
    out: Path = typer.Option(Path("runs/labelstudio"), help="Folder for tasks.json and labeling_config.xml."),
    min_score: float = typer.Option(0.25, help="Leave out predictions scoring lower."),
    model_version: str = typer.Option("pipeline", help="Model version shown in Label Studio."),
    document_root: Optional[Path] = typer.Option(None, help="Label Studio local-files document root [default: parent of the category folder]."),
    url_prefix: Optional[str] = typer.Option(None, help="Serve images from this URL prefix instead of local files."),
    force: bool = typer.Option(False, "--force", help="Replace existing output."),
) -> None:
    """Write Label Studio tasks with the predictions as pre-annotations, and the matching labeling config."""
    from pipeline.review import export_tasks

    info = export_tasks(predictions, gt_path=gt, out_dir=out, min_score=min_score, model_version=model_version,
                        document_root=document_root, url_prefix=url_prefix, force=force)
    echo(f"wrote {info['n_tasks']} tasks ({info['n_results']} predicted regions) to {info['tasks']}")
    echo(f"labeling config: {info['config']}")
    if info.get("document_root"):
        echo("Label Studio settings: start it with\n"
             f"  LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={info['document_root']} label-studio start\n"
             f"then in the project: Settings > Labeling Interface > Code: paste {info['config']}; "
             f"Settings > Cloud Storage > Add Source Storage > Local files, absolute path {info['storage_path']}; "
             f"Import: {info['tasks']}")


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
    except Exception as exc:  # click usage errors and friends
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
