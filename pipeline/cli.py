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

    Console(highlight=False).print(msg)


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

# ----------------------------------------------------------------------------- SAM (issue 3)

# ----------------------------------------------------------------------------- classifier (issue 4)

# ----------------------------------------------------------------------------- anomaly (issue 5)

# ----------------------------------------------------------------------------- evaluate / review


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
