"""``pipeline evaluate`` and ``pipeline report``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core.console import echo


def evaluate(
    predictions: List[Path] = typer.Argument(
        ..., help="Prediction files: COCO results JSON, classifier or anomaly JSON."
    ),
    gt: Optional[Path] = typer.Option(
        None, help="COCO ground truth of the same split (needed for COCO results and for the image-level decision)."
    ),
    out: Path = typer.Option(Path("runs/evaluate"), help="Folder for metrics JSON and plots."),
    val_predictions: Optional[List[Path]] = typer.Option(
        None,
        "--val-predictions",
        help="The same sources predicted on the val split, in the same order (repeat the option); turns on the "
        "image-level good/defect decision with val thresholds and fusion.",
    ),
    val_gt: Optional[Path] = typer.Option(
        None, "--val-gt", help="COCO ground truth of the val split (annotations/<cat>/coco/val.json)."
    ),
    l2: float = typer.Option(1.0, "--l2", help="L2 penalty of the logistic-regression fusion."),
    class_agnostic: Optional[List[Path]] = typer.Option(
        None,
        "--class-agnostic",
        metavar="FILE",
        help="Match this COCO results file whatever its classes (repeat per file). Default per file: "
        "class-agnostic when every result carries class_agnostic: true (PatchCore's regions), else by class.",
    ),
    class_aware: Optional[List[Path]] = typer.Option(
        None, "--class-aware", metavar="FILE", help="Match this COCO results file by class (repeat per file)."
    ),
    mask_score_threshold: float = typer.Option(
        0.5,
        "--mask-score-threshold",
        help="Predicted masks scoring at least this count in mask IoU/Dice (COCO mAP uses every score).",
    ),
) -> None:
    """Score predictions: COCO mAP (bbox, segm), mask IoU/Dice, classifier and anomaly metrics.

    With --val-predictions and --val-gt also the image-level good/defect decision of each source and
    of their fusion (any-source OR, logistic regression): thresholds chosen on val, metrics on the
    split of --gt; written to OUT/fusion.json (input of 'pipeline report'). Every input is checked
    before anything is written."""
    from pipeline.evaluation.evaluate import evaluate_files

    lines = evaluate_files(
        predictions,
        gt=gt,
        out_dir=out,
        class_agnostic=class_agnostic or (),
        class_aware=class_aware or (),
        mask_score_threshold=mask_score_threshold,
        val_predictions=val_predictions,
        val_gt=val_gt,
        l2=l2,
    )
    for line in lines:
        echo(line, markup=False)  # plain text: "[upper bound: ...]" is a label, not rich markup
    echo(f"metrics and plots in {out}")


def report(
    runs: List[Path] = typer.Argument(
        ..., help="Output folders of 'pipeline evaluate' (fusion.json and/or metrics_*.json), or fusion.json files."
    ),
    out: Path = typer.Option(
        Path("runs/report"), "--out", "-o", help="Report folder: report.html, report.json, images/."
    ),
    gallery: int = typer.Option(
        6, "--gallery", help="Images per gallery group (most confident errors, least confident correct)."
    ),
    max_side: int = typer.Option(320, "--max-side", help="Longer side of gallery images in pixels."),
    title: str = typer.Option("pipeline report", "--title", help="Report title."),
    gallery_method: Optional[List[str]] = typer.Option(
        None,
        "--gallery-method",
        help="Source or fusion (fusion:or, fusion:logistic) to show a gallery for "
        "(repeat; default: the method chosen on val).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing report folder."),
) -> None:
    """Write a self-contained HTML report (plus the same numbers as JSON): dataset counts, metrics tables,
    ROC/PR curves, confusion matrices and a gallery with predictions drawn over the images."""
    from pipeline.evaluation.report import build_report

    doc = build_report(
        runs, out, gallery=gallery, max_side=max_side, force=force, title=title, gallery_methods=gallery_method or None
    )
    echo(f"wrote {doc['html']} ({len(doc['images'])} images) and {Path(out) / 'report.json'}")
