"""``pipeline export labelstudio`` and ``pipeline import labelstudio``: human review."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from pipeline.core.console import echo

export_app = typer.Typer(no_args_is_help=True, help="Export predictions for human review.")
import_app = typer.Typer(no_args_is_help=True, help="Import reviewed labels back.")


@export_app.command("labelstudio")
def export_labelstudio(
    predictions: List[Path] = typer.Argument(
        ...,
        help="Prediction files: COCO results JSON (detector, SAM prompted by a detector; masks "
        "from 'segmentation'); classifier/anomaly JSON feed the review order. Without --gt: a 'pipeline "
        "inspect' run's predictions.json (the images come from images.json beside it).",
    ),
    gt: Optional[Path] = typer.Option(
        None,
        help="COCO ground truth of the split: image list, sizes, class names. Leave out for a 'pipeline inspect' "
        "run: its images.json, verdicts and the parent dataset's class names are used.",
    ),
    out: Path = typer.Option(Path("runs/labelstudio"), help="Folder for tasks.json and labeling_config.xml."),
    min_score: str = typer.Option(
        "auto",
        help="Leave out detections scoring lower; also the threshold of the uncertainty score. 'auto': per file, "
        "the threshold its provenance records (PatchCore's, chosen on val), else 0 (keep everything).",
    ),
    model_version: str = typer.Option("pipeline", help="Model version shown in Label Studio."),
    polygons: bool = typer.Option(
        False, "--polygons", help="Also give predicted masks as polygons (besides brush masks)."
    ),
    order: Optional[str] = typer.Option(
        None,
        help="Task order: 'image' (ground-truth order) or 'uncertainty' (least sure first). "
        "Default: 'image' with --gt, 'uncertainty' for an inspection.",
    ),
    document_root: Optional[Path] = typer.Option(
        None,
        help="Label Studio local-files document root (default: the parent of the image root: the category "
        "folder, or the inspected images' common folder).",
    ),
    url_prefix: Optional[str] = typer.Option(None, help="Serve images from this URL prefix instead of local files."),
    push: bool = typer.Option(
        False, "--push", help="Also create/update a project on a Label Studio server (--url) and import the tasks."
    ),
    url: Optional[str] = typer.Option(None, help="Label Studio server for --push, e.g. http://127.0.0.1:8080."),
    project: Optional[str] = typer.Option(
        None, help="Project title for --push (default: 'review <category> <split>')."
    ),
    token_env: str = typer.Option(
        "LABEL_STUDIO_API_KEY", help="Environment variable holding the API token (never pass the token itself)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing output."),
) -> None:
    """Write Label Studio tasks with the predictions as pre-annotations (boxes, brush masks), and the matching
    labeling config."""
    from rich.markup import escape

    from pipeline.review.export import export_tasks
    from pipeline.review.sources import region_lines

    info = export_tasks(
        predictions,
        gt_path=gt,
        out_dir=out,
        min_score=min_score,
        model_version=model_version,
        document_root=document_root,
        url_prefix=url_prefix,
        polygons=polygons,
        order=order,
        force=force,
        push=push,
        url=url,
        project=project,
        token_env=token_env,
    )
    for line in region_lines(info["regions"]):
        echo(f"[bold red]{escape(line)}[/]" if line.startswith("WARNING") else line, markup=line.startswith("WARNING"))
    if gt is None:
        echo(
            f"inspection: image root {info['image_root']} (the inspected images' common folder), "
            f"classes from {info['classes_from']}; {info['n_errors']} image(s) with verdict error left out"
        )
    echo(
        f"wrote {info['n_tasks']} tasks ({info['n_results']} predicted regions, {info['n_masks']} with masks, "
        f"order: {info['order']}) to {info['tasks']}"
    )
    echo(f"labeling config: {info['config']}")
    for w in info["warnings"]:
        echo(f"[yellow]warning:[/yellow] {w}")
    pushed = info["pushed"]
    if pushed:
        echo(
            f"{'created' if pushed['created'] else 'updated'} project {pushed['project_url']}: "
            f"{pushed['n_imported']} tasks imported, {pushed['n_updated']} updated"
        )
    elif info["start_command"]:
        echo(
            "Label Studio settings: start it with\n"
            f"  {info['start_command']}\n"
            f"then in the project: Settings > Labeling Interface > Code: paste {info['config']}; "
            f"Settings > Cloud Storage > Add Source Storage > Local files, absolute path {info['storage_path']}; "
            f"Import: {info['tasks']}"
        )


@import_app.command("labelstudio")
def import_labelstudio(
    export: Path = typer.Argument(..., help="Label Studio JSON export of the reviewed project (Export > JSON)."),
    config: Path = typer.Option(
        ..., help="The project's labeling config (labeling_config.xml written by 'export labelstudio')."
    ),
    out: Path = typer.Option(..., help="COCO ground truth file to write, e.g. annotations/bottle/coco/reviewed.json."),
    image_root: Optional[Path] = typer.Option(
        None, help="Category folder the images are relative to (default: the tasks' data.image_root)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
) -> None:
    """Turn reviewed Label Studio tasks into COCO ground truth (rectangles -> boxes, brush/polygons -> RLE masks)."""
    from pipeline.review.reviewed import import_export

    info = import_export(export, config_path=config, out_path=out, image_root=image_root, force=force)
    echo(
        f"wrote {info['n_images']} reviewed images, {info['n_annotations']} annotations to {info['out']}"
        + (f" ({info['n_unreviewed']} tasks without a submitted annotation left out)" if info["n_unreviewed"] else "")
    )
