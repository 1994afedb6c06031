"""``pipeline bundle`` and ``pipeline inspect``: trained models on new, unlabelled images."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core.console import echo


def bundle(
    split: Optional[Path] = typer.Option(
        None, help="The split the models were trained on (annotations/<cat>/split.json)."
    ),
    out: Optional[Path] = typer.Option(None, help="Bundle folder: bundle.yaml, split.json and each model's files."),
    detector: Optional[Path] = typer.Option(None, help="A finetune yolo run folder (or its weights/best.pt)."),
    sam: Optional[Path] = typer.Option(None, help="A finetune sam run folder (or its best.pt); needs --detector."),
    classifier: Optional[Path] = typer.Option(None, help="A finetune classifier run folder (or a checkpoint .pt)."),
    anomaly: Optional[Path] = typer.Option(None, help="A finetune anomaly run folder (or its model.pt)."),
    check: Optional[Path] = typer.Option(None, help="Verify the SHA-256 of every file of this bundle instead."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda:N, auto (default: GPU when present, else cpu)."),
    batch: int = typer.Option(8, help="Images per batch while scoring the val images."),
    force: bool = typer.Option(False, "--force", help="Replace an existing bundle folder."),
) -> None:
    """Pack trained runs into one folder; thresholds and the fused rule are chosen on the split's val images."""
    from pipeline.core.errors import PipelineError

    if check is not None:
        from pipeline.inspection.bundle import check_bundle

        problems = check_bundle(check)
        for line in problems:
            echo(line, markup=False)
        if problems:
            raise typer.Exit(1)
        echo(f"{check}: every file matches bundle.yaml", markup=False)
        return
    if split is None or out is None:
        raise PipelineError("give --split and --out (or --check BUNDLE)")
    from pipeline.inspection.bundle import make_bundle

    path = make_bundle(
        split_path=split,
        out=out,
        detector=detector,
        sam=sam,
        classifier=classifier,
        anomaly=anomaly,
        device=device,
        batch=batch,
        force=force,
    )
    echo(
        f"wrote {path}; inspect new images with: pipeline inspect IMAGES... --bundle {out} --out runs/inspect",
        markup=False,
    )


def inspect(
    images: List[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns."),
    bundle: Path = typer.Option(..., help="A folder written by 'pipeline bundle'."),
    out: Path = typer.Option(
        ..., help="Run folder: verdicts.jsonl/.csv, images.json, predictions.json, masks/, overlays/."
    ),
    batch: int = typer.Option(8, help="Images read, scored and written per batch (memory stays flat)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda:N, auto (default: GPU when present, else cpu)."),
    no_overlays: bool = typer.Option(False, "--no-overlays", help="Do not draw overlays/<name>.png."),
    resume: bool = typer.Option(False, "--resume", help="Skip the images already in OUT/verdicts.jsonl."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any image could not be read."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
) -> None:
    """Inspect new images: per image boxes, masks, class probabilities, anomaly map and a good/defect verdict.

    Under torchrun (torchrun --nproc_per_node N -m pipeline inspect ...) each process inspects its share.
    """
    from pipeline.core.console import console
    from pipeline.core.errors import PipelineError
    from pipeline.inspection.inspect import inspect_images, summary_table

    res = inspect_images(
        images,
        bundle=bundle,
        out=out,
        batch=batch,
        device=device,
        overlays=not no_overlays,
        resume=resume,
        force=force,
    )
    if res.rank == 0:  # under torchrun every rank returns the same result; one prints it
        console().print(summary_table(res))
        echo(f"wrote {res.out / 'verdicts.jsonl'} ({res.errors} unreadable)", markup=False)
    if res.errors and (strict or res.errors == res.n_images):
        why = "every image was unreadable" if res.errors == res.n_images else "--strict and some images were unreadable"
        raise PipelineError(
            f"{res.out / 'verdicts.jsonl'}: {res.errors} of {res.n_images} image(s) failed ({why}; "
            "each has verdict 'error' with its reason)"
        )
