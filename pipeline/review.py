"""Label Studio review tasks: predictions as pre-annotations, and the labeling config they need.

Task format: https://labelstud.io/guide/task_format and https://labelstud.io/guide/predictions.
Rectangle values are percentages (0-100) of the original image size with the top-left corner
as ``x``, ``y``. Local images are referenced as ``/data/local-files/?d=<path relative to the
document root>`` (Label Studio's local file serving).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import quote
from xml.etree import ElementTree as ET

from pipeline.errors import PipelineError

IMAGE_TAG = "image"
RECT_TAG = "label"
PALETTE = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324")


def labeling_config(class_names: list[str]) -> str:
    """Label Studio labeling config XML with one image and rectangle labels for ``class_names``."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=IMAGE_TAG, value=f"${IMAGE_TAG}", zoom="true")
    rect = ET.SubElement(view, "RectangleLabels", name=RECT_TAG, toName=IMAGE_TAG)
    for i, n in enumerate(class_names):
        ET.SubElement(rect, "Label", value=n, background=PALETTE[i % len(PALETTE)])
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def config_labels(config_xml: str) -> dict[str, tuple[str, set[str]]]:
    """Control tags of a config: ``{from_name: (to_name, {label values})}``."""
    try:
        root = ET.fromstring(config_xml)
    except ET.ParseError as exc:
        raise PipelineError(f"labeling config is not valid XML ({exc})") from None
    out = {}
    for el in root.iter():
        if el.tag.endswith("Labels") and "name" in el.attrib:
            out[el.attrib["name"]] = (el.attrib.get("toName", ""), {l.attrib["value"] for l in el.iter("Label")})
    return out


def validate_tasks(tasks: list[dict], config_xml: str, *, source: str = "tasks") -> None:
    """Check every result's tag names and labels exist in the config and result ids are unique.

    Raises:
        PipelineError: one line naming the first offending task and result.
    """
    controls = config_labels(config_xml)
    seen: set[str] = set()
    for t, task in enumerate(tasks):
        for group in ("predictions", "annotations"):
            for pred in task.get(group, []):
                for r in pred.get("result", []):
                    rid = r.get("id")
                    if rid in seen:
                        raise PipelineError(f"{source}: task {t} result id {rid!r} is not unique")
                    seen.add(rid)
                    if r.get("from_name") not in controls:
                        raise PipelineError(f"{source}: task {t} from_name {r.get('from_name')!r} not in the config {sorted(controls)}")
                    to_name, labels = controls[r["from_name"]]
                    if r.get("to_name") != to_name:
                        raise PipelineError(f"{source}: task {t} to_name {r.get('to_name')!r} (config expects {to_name!r})")
                    for key in ("rectanglelabels", "brushlabels", "polygonlabels"):
                        for label in r.get("value", {}).get(key, []):
                            if label not in labels:
                                raise PipelineError(f"{source}: task {t} label {label!r} not in the config {sorted(labels)}")


def image_url(path: Path, *, document_root: Path | None = None, url_prefix: str | None = None, rel: str | None = None) -> str:
    """URL Label Studio uses for an image.

    With ``url_prefix``: ``url_prefix + rel`` (``rel`` = path relative to the category root). Otherwise
    ``/data/local-files/?d=<path relative to document_root>`` with forward slashes.

    Raises:
        PipelineError: the image is not under ``document_root``.
    """
    if url_prefix:
        return url_prefix.rstrip("/") + "/" + quote((rel or Path(path).name).replace(os.sep, "/"))
    root = Path(document_root).resolve()
    p = Path(path).resolve()
    try:
        r = p.relative_to(root)
    except ValueError:
        raise PipelineError(f"{p}: not under the document root {root} (pass --document-root or --url-prefix)") from None
    return "/data/local-files/?d=" + quote(r.as_posix())


def _result_id(*parts) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()[:10]


def rectangle_result(*, bbox_xywh, label: str, size_hw: tuple[int, int], score: float | None, rid: str) -> dict:
    """One ``rectanglelabels`` result; ``bbox_xywh`` in pixels -> ``x, y, width, height`` in percent."""
    h, w = size_hw
    x, y, bw, bh = (float(v) for v in bbox_xywh)
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(w), x + bw), min(float(h), y + bh)
    r = {
        "id": rid, "type": "rectanglelabels", "from_name": RECT_TAG, "to_name": IMAGE_TAG,
        "original_width": w, "original_height": h, "image_rotation": 0,
        "value": {"x": 100 * x0 / w, "y": 100 * y0 / h, "width": 100 * (x1 - x0) / w,
                  "height": 100 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [label]},
    }
    if score is not None:
        r["score"] = float(score)
    return r


def coco_to_tasks(
    coco_gt: dict,
    results: list[dict],
    *,
    model_version: str,
    min_score: float = 0.25,
    document_root: Path | None = None,
    url_prefix: str | None = None,
) -> list[dict]:
    """Label Studio tasks, one per ground-truth image, with the predictions as pre-annotations.

    Args:
        coco_gt: COCO ground truth dict (images carry ``file_name`` relative to ``info.image_root``).
        results: COCO results (``image_id``, ``category_id``, ``bbox`` [x, y, w, h] pixels, ``score``).
        model_version: shown in Label Studio's prediction list.
        min_score: results scoring lower are left out (reviewers see what the model would report).
        document_root / url_prefix: see :func:`image_url`; the default document root is the parent of
            the category root.

    Returns:
        Tasks ``{"data": {"image", "image_id", "file_name"}, "predictions": [...]}``; every image appears,
        also with no predictions, so the whole split can be reviewed.
    """
    image_root = Path(coco_gt.get("info", {}).get("image_root", "."))
    if document_root is None and url_prefix is None:
        document_root = image_root.parent
    names = {c["id"]: c["name"] for c in coco_gt["categories"]}
    by_img: dict[int, list[dict]] = {}
    for r in results:
        if r["score"] >= min_score:
            by_img.setdefault(r["image_id"], []).append(r)
    tasks = []
    for img in coco_gt["images"]:
        size_hw = (img["height"], img["width"])
        preds = sorted(by_img.get(img["id"], []), key=lambda r: -r["score"])
        result = [
            rectangle_result(bbox_xywh=r["bbox"], label=names[r["category_id"]], size_hw=size_hw, score=r["score"],
                             rid=_result_id(img["id"], k, model_version))
            for k, r in enumerate(preds)
        ]
        task = {
            "data": {
                IMAGE_TAG: image_url(image_root / img["file_name"], document_root=document_root,
                                     url_prefix=url_prefix, rel=img["file_name"]),
                "image_id": img["id"],
                "file_name": img["file_name"],
            },
            "predictions": [{"model_version": model_version,
                             "score": max((r["score"] for r in preds), default=0.0), "result": result}],
        }
        tasks.append(task)
    return tasks


def export_tasks(
    pred_path: Path,
    *,
    gt_path: Path,
    out_dir: Path,
    min_score: float = 0.25,
    model_version: str = "pipeline",
    document_root: Path | None = None,
    url_prefix: str | None = None,
    force: bool = False,
) -> dict:
    """Write ``tasks.json`` and ``labeling_config.xml`` into ``out_dir`` (atomically, as a folder).

    Returns:
        ``{"tasks", "config", "n_tasks", "n_results", "document_root", "storage_path"}``.

    Raises:
        PipelineError: unreadable inputs, predictions on unknown images/classes, labels not in the
            config, an existing ``out_dir`` without ``force``.
    """
    from pipeline.evaluation import check_results, load_coco_gt
    from pipeline.io import atomic_write_json, atomic_write_text, read_json, staged_dir

    coco = load_coco_gt(gt_path)
    results = read_json(pred_path)
    if not isinstance(results, list):
        raise PipelineError(f"{pred_path}: expected a JSON list of COCO results")
    check_results(results, coco, pred_path)
    gt = coco.dataset
    image_root = Path(gt.get("info", {}).get("image_root", "."))
    if document_root is None and url_prefix is None:
        document_root = image_root.parent
    tasks = coco_to_tasks(gt, results, model_version=model_version, min_score=min_score,
                          document_root=document_root, url_prefix=url_prefix)
    config = labeling_config([c["name"] for c in sorted(gt["categories"], key=lambda c: c["id"])])
    validate_tasks(tasks, config, source=str(pred_path))
    out_dir = Path(out_dir)
    with staged_dir(out_dir, force=force) as tmp:
        atomic_write_json(tmp / "tasks.json", tasks)
        atomic_write_text(tmp / "labeling_config.xml", config)
    return {
        "tasks": out_dir.resolve() / "tasks.json",
        "config": out_dir.resolve() / "labeling_config.xml",
        "n_tasks": len(tasks),
        "n_results": sum(len(p["result"]) for t in tasks for p in t["predictions"]),
        "document_root": Path(document_root).resolve() if document_root else None,
        "storage_path": image_root.resolve(),
    }
