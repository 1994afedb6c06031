"""The report's gallery: per method the most confident errors and the least confident correct
decisions on the reported split, with predictions drawn over each image.

Confidence of a decision is ``|s - t| / sd``: the distance of the image's score ``s`` from the
method's threshold ``t`` in val standard deviations ``sd`` of that method's score. The method
shown by default is the one :func:`pipeline.evaluation.fusion.choose` picked on val.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_image, read_json
from pipeline.data.mvtec import GOOD
from pipeline.data.predictions import load_predictions
from pipeline.evaluation.anomaly import load_map, resize_map

PALETTE_BGR = [(0, 140, 255), (255, 0, 255), (255, 255, 0), (0, 0, 255), (255, 128, 0), (128, 0, 255)]
GT_BGR = (0, 200, 0)
GALLERY_GROUPS = (("errors", "Most confident errors"), ("uncertain_correct", "Least confident correct"))


def _e(x) -> str:
    return html.escape(str(x))


def pick_gallery(records: Sequence[dict], method: str, threshold: float, sd: float, *, n: int) -> dict[str, list[dict]]:
    """Most confident errors and least confident correct decisions of ``method``.

    Args:
        records: the per-image records of ``fusion.json`` (``images.test``).
        method: a key of each record's ``scores``. threshold: its threshold. sd: its val score spread (> 0).
        n: images per group.

    Returns:
        ``{"errors": [...], "uncertain_correct": [...], "n_errors": int, "n_images": int}``: at most ``n``
        records per group with ``confidence`` = ``|s - t| / sd`` added, errors by decreasing confidence,
        correct ones by increasing confidence; ``n_errors`` counts every error among ``records``.
    """
    errors, correct = [], []
    for r in records:
        s = r["scores"][method]
        rec = {
            **r,
            "method": method,
            "score": s,
            "threshold": threshold,
            "confidence": abs(s - threshold) / sd,
            "decision": bool(s >= threshold),
        }
        (errors if rec["decision"] != r["defect"] else correct).append(rec)
    errors.sort(key=lambda r: (-r["confidence"], r["image_id"]))
    correct.sort(key=lambda r: (r["confidence"], r["image_id"]))
    return {
        "errors": errors[:n],
        "uncertain_correct": correct[:n],
        "n_errors": len(errors),
        "n_images": len(records),
    }


def source_overlays(fusion: dict) -> list[dict]:
    """Per source what can be drawn: COCO results by image, or anomaly map paths by image."""
    out = []
    for k, s in enumerate(fusion["sources"]):
        path = Path(s["test_path"])
        info = {
            "name": s["name"],
            "kind": s["kind"],
            "threshold": s["threshold"],
            "color": PALETTE_BGR[k % len(PALETTE_BGR)],
        }
        try:
            pred = load_predictions(path)
        except PipelineError:  # moved or rewritten since evaluate: the gallery shows the scores only
            pred = None
        if pred is not None and pred.kind == "coco":
            by_img: dict[int, list] = {}
            for r in pred.records:
                by_img.setdefault(int(r["image_id"]), []).append(r)
            info["results"] = by_img
        elif pred is not None and pred.kind == "anomaly":
            maps = {}
            for p in pred.records:
                if p.get("map") and p.get("image_id") is not None:
                    mp = Path(p["map"])
                    mp = mp if mp.is_absolute() else path.parent / mp
                    if mp.is_file():
                        maps[int(p["image_id"])] = mp
            info["maps"] = maps
            if maps:  # one colour scale for all maps of the source, so a good image does not look hot
                vals = [load_map(mp) for mp in maps.values()]
                info["map_range"] = (float(min(v.min() for v in vals)), float(max(v.max() for v in vals)))
        out.append(info)
    return out


def draw_overlay(
    image_bgr: np.ndarray,
    *,
    image_id: int,
    gt_anns: Sequence[dict],
    sources: Sequence[dict],
    max_side: int = 320,
    max_boxes: int = 5,
) -> np.ndarray:
    """Predictions over one image, resized so its longer side is ``max_side`` pixels.

    Args:
        image_bgr: ``HxWx3`` uint8 BGR (or ``HxW`` grey) at native size.
        image_id: the image's global id (keys of the sources' results / maps).
        gt_anns: COCO ground-truth annotations of the image (``bbox`` [x, y, w, h] px) drawn green.
        sources: from :func:`source_overlays`: ``results`` (COCO boxes, optional RLE ``segmentation``)
            or ``maps`` (anomaly map files, coloured over ``map_range`` = (lo, hi), else the map's own
            range), each with ``threshold`` and ``color`` (BGR).
        max_side: longer side of the result in pixels.
        max_boxes: per source, the highest-scoring results at or above its threshold that are drawn.

    Returns:
        ``hxwx3`` uint8 BGR.
    """
    import cv2

    from pipeline.data.instances import decode_rle

    img = image_bgr if image_bgr.ndim == 3 else cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    img = img[..., :3].copy()
    h, w = img.shape[:2]
    for src in sources:  # heat-maps first, under everything else
        mp = src.get("maps", {}).get(image_id)
        if mp is not None and Path(mp).is_file():
            m = resize_map(load_map(Path(mp)), (h, w))
            lo, hi = src.get("map_range") or (float(m.min()), float(m.max()))
            norm = (
                (np.clip((m - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8) if hi > lo else np.zeros((h, w), np.uint8)
            )
            img = cv2.addWeighted(img, 0.55, cv2.applyColorMap(norm, cv2.COLORMAP_JET), 0.45, 0)
    scale = max_side / max(h, w)
    boxes = []  # (bbox_xywh, color, thickness, text)
    for src in sources:
        res = sorted(src.get("results", {}).get(image_id, []), key=lambda r: -r["score"])
        above = [r for r in res if r["score"] >= src["threshold"]][:max_boxes]
        for r in above:
            if "segmentation" in r:
                m = decode_rle(r["segmentation"])
                if m.shape == (h, w):
                    color = np.array(src["color"], np.float32)
                    img[m] = (0.5 * img[m] + 0.5 * color).astype(np.uint8)
            if "bbox" in r:
                boxes.append((r["bbox"], src["color"], 2, f"{r['score']:.2f}"))
        if not above and res and "bbox" in res[0]:
            boxes.append((res[0]["bbox"], src["color"], 1, f"{res[0]['score']:.2f}"))
    img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    for a in gt_anns:
        x, y, bw, bh = (v * scale for v in a["bbox"])
        cv2.rectangle(img, (int(x), int(y)), (int(round(x + bw)), int(round(y + bh))), GT_BGR, 1)
    for (x, y, bw, bh), color, thick, text in boxes:
        x, y, bw, bh = x * scale, y * scale, bw * scale, bh * scale
        cv2.rectangle(img, (int(x), int(y)), (int(round(x + bw)), int(round(y + bh))), color, thick)
        cv2.putText(img, text, (int(x), max(10, int(y) - 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, color, 1, cv2.LINE_AA)
    return img


def _tile(
    r: dict, fname: str, *, root: Path, anns: dict[int, list], overlays: list[dict], max_side: int, images
) -> tuple[dict, str]:
    """One gallery image (a record of :func:`pick_gallery`) drawn and saved as JPEG:
    ``(report.json record, HTML)``."""
    import cv2

    try:
        img = read_image(root / r["file_name"], flags=cv2.IMREAD_COLOR)  # BGR, as OpenCV draws
    except PipelineError:  # image moved: a grey tile, the numbers still show
        img = np.full((max_side, max_side, 3), 200, np.uint8)
    tile = draw_overlay(
        img, image_id=r["image_id"], gt_anns=anns.get(r["image_id"], []), sources=overlays, max_side=max_side
    )
    _, buf = cv2.imencode(".jpg", tile, [cv2.IMWRITE_JPEG_QUALITY, 85])
    rel = images.write(fname, buf.tobytes())
    truth = "defect" if r["defect"] else GOOD
    dec = "defect" if r["decision"] else GOOD
    cls = "err" if r["decision"] != r["defect"] else "ok"
    per = "<br>".join(f"{_e(n)}: {v:.3g}{' &#10003;' if r['decisions'][n] else ''}" for n, v in r["scores"].items())
    html_tile = (
        f"<div class=tile><img src='{rel}' alt='{_e(r['file_name'])}'><br><b>{_e(r['file_name'])}</b>"
        f" (id {r['image_id']})<br>truth {_e(r['defect_type'])} ({truth}), "
        f"<span class={cls}>decision {dec}</span>, "
        f"confidence {r['confidence']:.2f}<br><small>{per}</small></div>"
    )
    keys = ("image_id", "file_name", "defect_type", "score", "threshold", "decision", "confidence")
    return {k: r[k] for k in keys} | {"image": rel}, html_tile


def default_method(fusion: dict) -> str:
    """The gallery's method when none is asked for: the one chosen on val (``choices.gallery`` of
    :func:`pipeline.evaluation.fusion.choose`: the better fusion rule, or the one source). A
    ``fusion.json`` written before choices were recorded falls back to its better fusion rule, else
    its best method."""
    chosen = fusion.get("choices", {}).get("gallery")
    if chosen:
        return chosen
    return f"fusion:{fusion['better_fusion']}" if fusion.get("better_fusion") else fusion["best"]


def _group_html(group: str, title: str, picks: dict, split: str) -> str:
    """Heading of one gallery group; "no errors" only when the method makes none on the split."""
    if group == "errors":
        k, total = len(picks["errors"]), picks["n_errors"]
        if total == 0:
            return f"<h4>{title}</h4><p>no errors: all {picks['n_images']} {split} images decided correctly</p>"
        return f"<h4>{title} ({k} shown of {total} errors on {picks['n_images']} {split} images)</h4>"
    return f"<h4>{title}</h4>" + ("" if picks[group] else "<p>none</p>")


def galleries(
    fusion: dict, run_dir: str, tag: str, images, *, methods: Sequence[str] | None, n: int, max_side: int
) -> tuple[dict, list[str]]:
    """Per method the most confident errors and least confident correct decisions on test, drawn:
    ``({method: {group: [record], "n_errors", "n_images", "chosen_on"}}, HTML parts)``.

    Args:
        fusion: a ``fusion.json`` document. images: the report's ``images/`` writer (``write(name, bytes)``).
        methods: sources / fusion rules to show; ``None``: :func:`default_method` (chosen on val).

    Raises:
        PipelineError: a method that is neither a source nor a fusion rule of the run.
    """
    overlays = source_overlays(fusion)
    anns: dict[int, list] = {}
    for a in read_json(fusion["test_gt"]).get("annotations", []):
        anns.setdefault(int(a["image_id"]), []).append(a)
    root = Path(fusion.get("image_root") or ".")
    legend = ", ".join(
        f"<span style='color:rgb{tuple(reversed(s['color']))}'>&#9632; {_e(s['name'])}</span>" for s in overlays
    )
    chosen_on = "val" if methods is None else "option"
    entry: dict = {}
    parts: list[str] = []
    for gi, method in enumerate(methods or [default_method(fusion)]):
        if method not in fusion["thresholds"]:
            raise PipelineError(
                f"{run_dir}: no method {method!r} for the gallery (expected one of {', '.join(fusion['thresholds'])})"
            )
        vals = np.array([r["scores"][method] for r in fusion["images"]["val"]], np.float64)
        sd = float(vals.std()) if vals.size and vals.std() > 0 else 1.0
        picks = pick_gallery(fusion["images"]["test"], method, fusion["thresholds"][method], sd, n=n)
        why = "chosen on val" if chosen_on == "val" else "asked for"
        parts.append(
            f"<h3>Gallery: {_e(method)} on test ({why})</h3><p><small>green = ground-truth boxes; {legend}; "
            "thick = at or above the source's threshold (top 5), thin = its top box below it; "
            "heat-map = anomaly map (one colour scale per source); &#10003; = called defect.</small></p>"
        )
        entry[method] = {"n_errors": picks["n_errors"], "n_images": picks["n_images"], "chosen_on": chosen_on}
        for group, group_title in GALLERY_GROUPS:
            parts.append(_group_html(group, group_title, picks, "test") + "<div class=gal>")
            entry[method][group] = []
            for r in picks[group]:
                rec, html_tile = _tile(
                    r,
                    f"{tag}_g{gi}_{group}_{r['image_id']}.jpg",
                    root=root,
                    anns=anns,
                    overlays=overlays,
                    max_side=max_side,
                    images=images,
                )
                entry[method][group].append(rec)
                parts.append(html_tile)
            parts.append("</div>")
    return entry, parts
