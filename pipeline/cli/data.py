"""Data commands: ``synth-mvtec``, ``convert-masks``, ``dataset add-reviewed``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core.console import echo
from pipeline.core.errors import PipelineError

dataset_app = typer.Typer(no_args_is_help=True, help="Dataset versions: reviewed labels into a new version.")


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
        generate_category(
            tmp,
            seed=seed,
            size_hw=(height, width),
            n_train_good=n_train_good,
            n_test_good=n_test_good,
            n_per_defect=n_per_defect,
        )
    echo(f"wrote synthetic category {out}")


def convert_masks(
    category: Path = typer.Argument(..., help="MVTec AD category folder, e.g. $MVTEC_ROOT/bottle."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default: annotations/<category>)."),
    ratios: str = typer.Option("0.6,0.2,0.2", help="train,val,test fractions of test/ images (stratified)."),
    seed: int = typer.Option(0, help="Split seed."),
    connectivity: int = typer.Option(8, help="Connected-component connectivity: 8 or 4."),
    min_area: int = typer.Option(1, help="Drop components smaller than this many pixels (1 keeps all)."),
    rename: List[str] = typer.Option([], help="DEFECT_TYPE=class name; repeat; same name merges types."),
    split: Optional[Path] = typer.Option(None, help="Reuse this split.json instead of drawing a new split."),
    allow_empty_masks: bool = typer.Option(
        False, "--allow-empty-masks", help="Keep defect images whose mask is all zero, as good images."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace what an earlier convert-masks wrote (other files stay)."
    ),
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
    summary = convert_category(
        category,
        out,
        ratios=r,
        seed=seed,
        connectivity=connectivity,
        min_area=min_area,
        rename=parse_rename(rename),
        split_manifest=manifest,
        allow_empty_masks=allow_empty_masks,
        force=force,
    )
    from rich.table import Table

    from pipeline.core.console import console

    table = Table(title=f"{Path(category).name}: classes {', '.join(summary.classes)}")
    for col in ("split", "images", "masks", "instances"):
        table.add_column(col, justify="right")
    for s in summary.images:
        table.add_row(s, str(summary.images[s]), str(summary.masks[s]), str(summary.instances[s]))
    table.add_row("all", *(str(sum(d.values())) for d in (summary.images, summary.masks, summary.instances)))
    console().print(table)
    for w in summary.warnings:
        echo(f"[yellow]warning:[/yellow] {w}")
    echo(f"wrote {summary.out}/{{split.json, coco/, yolo/data.yaml, sam/}}")


@dataset_app.command("add-reviewed")
def add_reviewed(
    parent: Path = typer.Option(..., "--from", help="The parent dataset folder, e.g. annotations/bottle."),
    reviewed: Path = typer.Option(..., help="Reviewed COCO ground truth (pipeline import labelstudio)."),
    out: Path = typer.Option(..., help="The new version's folder, e.g. annotations/bottle-v2 (never --from)."),
    to: str = typer.Option("train", help="Split the reviewed images join: train or val."),
    replace_labels: bool = typer.Option(
        False, "--replace-labels", help="An image already in the parent gets the reviewed labels, in its split."
    ),
    force: bool = typer.Option(False, "--force", help="Replace a version an earlier add-reviewed wrote in --out."),
) -> None:
    """A new dataset version: the parent's split plus the reviewed images, COCO/YOLO/SAM regenerated."""
    from pipeline.data.dataset import add_reviewed as add

    s = add(parent, reviewed, out, to=to, replace_labels=replace_labels, force=force)
    per_class = ", ".join(f"{n} {k}" for n, k in s.added["instances_per_class"].items())
    echo(
        f"added {s.added['images']} image(s) to {s.to} ({s.added['negatives']} reviewed good; instances: {per_class})"
        + (f"; replaced the labels of {len(s.replaced)}" if s.replaced else ""),
        markup=False,
    )
    echo(f"wrote {s.out}/{{split.json, coco/, yolo/data.yaml, sam/, images/reviewed/, dataset.yaml}}", markup=False)
