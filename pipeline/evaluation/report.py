"""Self-contained HTML report (and the same numbers as JSON) for one or more ``pipeline evaluate`` runs.

A run is the output folder of ``pipeline evaluate`` (``fusion.json`` from ``--val-predictions``
and/or ``metrics_*.json``) or a ``fusion.json`` file. The report folder holds ``report.html``,
``report.json`` and ``images/`` (PNG plots, JPEG gallery tiles) referenced by relative paths, so it
opens from disk in any browser with no server and can be moved or zipped as a whole.

Per run: dataset counts per split and class (images per ``defect_type``, instances per category,
from the COCO ground truths next to the run's val/test files, ``train.json`` included when it sits
beside them), the image-level table (each source and fusion; thresholds from val, metrics on test),
confusion matrices, ROC and PR curves (test), the per-file metrics of ``pipeline evaluate``
(COCO AP, mask IoU, classifier, anomaly), and a gallery: the most confident errors and the least
confident correct decisions of the best method, with predictions drawn over the image (ground-truth
boxes green; per source: boxes at or above its threshold, RLE masks filled, anomaly maps as a
heat-map; the top box below threshold thin).

Confidence of a decision is ``|s - t| / sd``: the distance of the image's score ``s`` from the
method's threshold ``t`` in val standard deviations ``sd`` of that method's score.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import (
    atomic_savefig,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_image,
    read_json,
    staged_dir,
)
from pipeline.data.mvtec import GOOD
from pipeline.data.predictions import load_predictions
from pipeline.evaluation.anomaly import load_map, resize_map
from pipeline.evaluation.curves import pr_curve, roc_curve

PALETTE_BGR = [(0, 140, 255), (255, 0, 255), (255, 255, 0), (0, 0, 255), (255, 128, 0), (128, 0, 255)]
GT_BGR = (0, 200, 0)
PER_FILE_METRICS = ("metrics.json", "anomaly_metrics.json")  # classifier / anomaly files of pipeline evaluate
METRIC_COLS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "auroc")


# ------------------------------------------------------------------------------ inputs
def load_run(run: Path) -> dict:
    """``{"name", "dir", "fusion": dict | None, "metrics": {file stem: dict}, "plots": [png paths]}``.

    Per-file metrics are the ``metrics_<stem>.json`` (COCO results), ``metrics.json`` (classifier)
    and ``anomaly_metrics.json`` files that ``pipeline evaluate`` writes.

    Raises:
        PipelineError: the path holds neither ``fusion.json`` nor ``metrics_*.json``.
    """
    run = Path(run)
    if run.is_file():
        fusion_path, folder = run, run.parent
    else:
        fusion_path, folder = run / "fusion.json", run
    if not folder.is_dir():
        raise PipelineError(f"{run}: not found (expected a 'pipeline evaluate' output folder or its fusion.json)")
    fusion = read_json(fusion_path) if fusion_path.is_file() else None
    if fusion is not None and not (isinstance(fusion, dict) and "sources" in fusion and "images" in fusion):
        raise PipelineError(
            f"{fusion_path}: not a fusion result (expected the fusion.json of 'pipeline evaluate --val-predictions')"
        )
    files = sorted(folder.glob("metrics_*.json")) + [folder / n for n in PER_FILE_METRICS if (folder / n).is_file()]
    metrics = {p.stem[len("metrics_") :] if p.stem.startswith("metrics_") else p.stem: read_json(p) for p in files}
    if fusion is None and not metrics:
        raise PipelineError(f"{run}: no fusion.json or metrics files (expected a 'pipeline evaluate' output folder)")
    plots = sorted(folder.glob("*.png"))
    return {"name": folder.name, "dir": str(folder.resolve()), "fusion": fusion, "metrics": metrics, "plots": plots}


def dataset_counts(gt_paths: dict[str, Path]) -> dict:
    """Images per ``defect_type`` and instances per category for each split's COCO ground truth.

    Returns:
        ``{split: {"images": {defect_type: n}, "instances": {category name: n}, "n_images", "n_instances"}}``.
    """
    out = {}
    for split, path in gt_paths.items():
        doc = read_json(path)
        imgs: dict[str, int] = {}
        for im in doc.get("images", []):
            t = str(im.get("defect_type", "?"))
            imgs[t] = imgs.get(t, 0) + 1
        names = {c["id"]: c["name"] for c in doc.get("categories", [])}
        inst: dict[str, int] = {}
        for a in doc.get("annotations", []):
            n = names.get(a.get("category_id"), str(a.get("category_id")))
            inst[n] = inst.get(n, 0) + 1
        out[split] = {
            "images": dict(sorted(imgs.items())),
            "instances": dict(sorted(inst.items())),
            "n_images": sum(imgs.values()),
            "n_instances": sum(inst.values()),
        }
    return out


def _gt_paths(fusion: dict) -> dict[str, Path]:
    paths = {}
    val, test = Path(fusion["val_gt"]), Path(fusion["test_gt"])
    train = test.with_name("train.json")
    if train.is_file() and train != val and train != test:
        paths["train"] = train
    paths["val"], paths["test"] = val, test
    return paths


def method_rows(fusion: dict) -> list[dict]:
    """One row per source and fusion rule: ``{"name", "kind", "threshold", "val": metrics, "test": metrics}``."""
    rows = [
        {"name": s["name"], "kind": s["kind"], "threshold": s["threshold"], "val": s["val"], "test": s["test"]}
        for s in fusion["sources"]
    ]
    rows += [
        {"name": f"fusion:{k}", "kind": "fusion", "threshold": v["threshold"], "val": v["val"], "test": v["test"]}
        for k, v in fusion["fusion"].items()
    ]
    return rows


def flat_metrics(m: dict, *, limit: int = 20) -> dict[str, float]:
    """Scalar numbers of a per-file metrics dict, nested one level (``bbox.AP``), at most ``limit``;
    COCO's per-size buckets (``AP_small`` ...) are left out."""
    out: dict[str, float] = {}
    for k, v in m.items():
        items = [(k, v)] if not isinstance(v, dict) else [(f"{k}.{k2}", v2) for k2, v2 in v.items()]
        for name, val in items:
            number = isinstance(val, (int, float)) and not isinstance(val, bool)
            if number and not name.endswith(("_small", "_medium", "_large")):
                out[name] = float(val)
    return dict(list(out.items())[:limit])


# --------------------------------------------------------------------------------- gallery
def pick_gallery(records: Sequence[dict], method: str, threshold: float, sd: float, *, n: int) -> dict[str, list[dict]]:
    """Most confident errors and least confident correct decisions of ``method``.

    Args:
        records: the per-image records of ``fusion.json`` (``images.test``).
        method: a key of each record's ``scores``. threshold: its threshold. sd: its val score spread (> 0).
        n: images per group.

    Returns:
        ``{"errors": [...], "uncertain_correct": [...]}``: records with ``confidence`` = ``|s - t| / sd``
        added, errors by decreasing confidence, correct ones by increasing confidence.
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
    return {"errors": errors[:n], "uncertain_correct": correct[:n]}


def _source_overlays(fusion: dict) -> list[dict]:
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
        sources: from :func:`_source_overlays`: ``results`` (COCO boxes, optional RLE ``segmentation``)
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


# ------------------------------------------------------------------------------------ plots
def _plot_curves(rows: list[dict], records: list[dict], path_roc: Path, path_pr: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.array([r["defect"] for r in records], bool)
    for path, kind in ((path_roc, "roc"), (path_pr, "pr")):
        fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
        for row in rows:
            s = np.array([r["scores"][row["name"]] for r in records])
            au = row["test"]["auroc"]
            if kind == "roc":
                fpr, tpr = roc_curve(s, y)
                ax.plot(fpr, tpr, label=f"{row['name']} (AUROC {au:.3f})" if au is not None else row["name"])
            else:
                rec, prec = pr_curve(s, y)
                ax.step(
                    np.r_[0.0, rec],
                    np.r_[1.0, prec],
                    where="post",
                    label=f"{row['name']} (F1@t {row['test']['f1']:.3f})",
                )
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set(xlabel="false positive rate (good called defect)", ylabel="true positive rate (defect recall)")
        else:
            ax.set(xlabel="recall (defect)", ylabel="precision (defect)")
        ax.set(xlim=(-0.01, 1.01), ylim=(0, 1.02), title=f"image-level {kind.upper()} on test")
        ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, path)


# ------------------------------------------------------------------------------------- HTML
CSS = (
    "body{font-family:sans-serif;margin:20px;color:#222;max-width:1400px}\n"
    "table{border-collapse:collapse;margin:6px 0 14px}"
    "td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}\n"
    "th{background:#eee}td.l,th.l{text-align:left}tr.best td{background:#e5f5e0;font-weight:bold}\n"
    ".cm{display:inline-block;margin:4px 10px 4px 0;vertical-align:top}.cm td{width:38px;text-align:center}\n"
    ".gal{display:flex;flex-wrap:wrap;gap:10px}.tile{width:330px;font-size:12px}"
    ".tile img{max-width:320px;border:1px solid #999}\n"
    ".scroll{overflow-x:auto;max-width:100%}.err{color:#b00}.ok{color:#070}"
    ".plots img{max-width:560px;margin-right:10px;vertical-align:top}small{color:#666}"
)
GALLERY_GROUPS = (("errors", "Most confident errors"), ("uncertain_correct", "Least confident correct"))


def _e(x) -> str:
    return html.escape(str(x))


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _counts_html(counts: dict) -> str:
    types = sorted({t for c in counts.values() for t in c["images"]})
    cats = sorted({t for c in counts.values() for t in c["instances"]})
    head = (
        "".join(f"<th>{_e(t)}</th>" for t in types)
        + "<th>all images</th>"
        + "".join(f"<th>{_e(c)} inst.</th>" for c in cats)
    )
    body = ""
    for split, c in counts.items():
        body += f"<tr><td class=l>{_e(split)}</td>" + "".join(f"<td>{c['images'].get(t, 0)}</td>" for t in types)
        body += f"<td>{c['n_images']}</td>" + "".join(f"<td>{c['instances'].get(k, 0)}</td>" for k in cats) + "</tr>"
    return f"<table><tr><th class=l>split</th>{head}</tr>{body}</table>"


def _methods_html(rows: list[dict], best: str | None) -> str:
    head = (
        "<tr><th class=l>source / fusion</th><th>threshold (val)</th>"
        + "".join(f"<th>{c}</th>" for c in METRIC_COLS)
        + "<th>val F1</th><th>val AUROC</th></tr>"
    )
    body = ""
    for r in rows:
        t = r["test"]
        body += (
            f"<tr class='{'best' if r['name'] == best else ''}'><td class=l>{_e(r['name'])}</td>"
            f"<td>{r['threshold']:.4g}</td>"
            + "".join(f"<td>{_num(t[c])}</td>" for c in METRIC_COLS)
            + f"<td>{_num(r['val']['f1'])}</td><td>{_num(r['val']['auroc'])}</td></tr>"
        )
    return f"<table>{head}{body}</table>"


def _cm_html(name: str, cm: list) -> str:
    (tn, fp), (fn, tp) = cm
    return (
        f"<div class=cm><b>{_e(name)}</b><table><tr><th></th><th>pred {GOOD}</th><th>pred defect</th></tr>"
        f"<tr><th>true {GOOD}</th><td>{tn}</td><td>{fp}</td></tr>"
        f"<tr><th>true defect</th><td>{fn}</td><td>{tp}</td></tr></table></div>"
    )


def _per_file_html(metrics: dict) -> str:
    out = ""
    for stem, m in metrics.items():
        flat = flat_metrics(m)
        if not flat:
            continue
        out += (
            f"<p><b>{_e(stem)}</b></p><div class=scroll><table><tr>"
            + "".join(f"<th>{_e(k)}</th>" for k in flat)
            + "</tr><tr>"
        )
        out += "".join(f"<td>{v:.4f}</td>" for v in flat.values()) + "</tr></table></div>"
    return out


# ------------------------------------------------------------------------------- report steps
class _Images:
    """The report's ``images/`` folder: files written there and their paths relative to the report,
    in the order the HTML references them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[str] = []

    def add(self, name: str) -> str:
        """Record a file already written to ``folder / name``; returns its relative path."""
        self.paths.append(f"images/{name}")
        return f"images/{name}"

    def write(self, name: str, data: bytes) -> str:
        """Write ``data`` to ``folder / name``; returns its relative path."""
        atomic_write_bytes(self.folder / name, data)
        return self.add(name)


def load_runs(runs: Sequence[Path]) -> list[dict]:
    """:func:`load_run` for each run, in order.

    Raises:
        PipelineError: no runs, or a run of :func:`load_run`'s errors.
    """
    loaded = [load_run(r) for r in runs]
    if not loaded:
        raise PipelineError("give at least one 'pipeline evaluate' output folder")
    return loaded


def _tables(fusion: dict, rows: list[dict]) -> tuple[dict, list[str]]:
    """Dataset counts, the image-level table, its notes and the confusion matrices of a fused run:
    ``(report.json fields, HTML parts)``."""
    counts = dataset_counts(_gt_paths(fusion))
    entry = {
        "counts": counts,
        "best": fusion["best"],
        "better_fusion": fusion.get("better_fusion"),
        "image_level": [
            {"name": r["name"], "kind": r["kind"], "threshold": r["threshold"], "test": r["test"], "val": r["val"]}
            for r in rows
        ],
        "definitions": fusion.get("definitions", {}),
    }
    note = f"Best on test: <b>{_e(fusion['best'])}</b>."
    if fusion.get("better_fusion"):
        note += f" Better fusion rule: <b>{_e(fusion['better_fusion'])}</b>."
    definitions = "<br>".join(f"<small>{_e(k)}: {_e(v)}</small>" for k, v in fusion.get("definitions", {}).items())
    parts = [
        "<h3>Dataset</h3>" + _counts_html(counts),
        "<h3>Image-level good/defect decision (thresholds chosen on val, metrics on test)</h3>",
        _methods_html(rows, fusion["best"]),
        f"<p>{note} Defect is the positive class.<br>" + definitions + "</p>",
        "<h3>Confusion matrices (test)</h3>"
        + "".join(_cm_html(r["name"], r["test"]["confusion_matrix"]) for r in rows),
    ]
    return entry, parts


def _curves(fusion: dict, rows: list[dict], tag: str, images: _Images) -> str:
    """Image-level ROC and PR curves on test as two PNGs; returns their HTML."""
    roc, pr = f"{tag}_roc.png", f"{tag}_pr.png"
    _plot_curves(rows, fusion["images"]["test"], images.folder / roc, images.folder / pr)
    images.add(roc)
    images.add(pr)
    return (
        f"<h3>ROC and PR curves (test)</h3><div class=plots><img src='images/{roc}' alt='ROC'>"
        f"<img src='images/{pr}' alt='PR'></div>"
    )


def _tile(
    r: dict, fname: str, *, root: Path, anns: dict[int, list], overlays: list[dict], max_side: int, images: _Images
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


def _galleries(
    fusion: dict, run_dir: str, tag: str, images: _Images, *, methods: Sequence[str], n: int, max_side: int
) -> tuple[dict, list[str]]:
    """Per method the most confident errors and least confident correct decisions on test, drawn:
    ``({method: {group: [record]}}, HTML parts)``.

    Raises:
        PipelineError: a method that is neither a source nor a fusion rule of the run.
    """
    overlays = _source_overlays(fusion)
    anns: dict[int, list] = {}
    for a in read_json(fusion["test_gt"]).get("annotations", []):
        anns.setdefault(int(a["image_id"]), []).append(a)
    root = Path(fusion.get("image_root") or ".")
    legend = ", ".join(
        f"<span style='color:rgb{tuple(reversed(s['color']))}'>&#9632; {_e(s['name'])}</span>" for s in overlays
    )
    entry: dict = {}
    parts: list[str] = []
    for gi, method in enumerate(methods):
        if method not in fusion["thresholds"]:
            raise PipelineError(
                f"{run_dir}: no method {method!r} for the gallery (expected one of {', '.join(fusion['thresholds'])})"
            )
        vals = np.array([r["scores"][method] for r in fusion["images"]["val"]], np.float64)
        sd = float(vals.std()) if vals.size and vals.std() > 0 else 1.0
        picks = pick_gallery(fusion["images"]["test"], method, fusion["thresholds"][method], sd, n=n)
        parts.append(
            f"<h3>Gallery: {_e(method)} on test</h3><p><small>green = ground-truth boxes; {legend}; "
            "thick = at or above the source's threshold (top 5), thin = its top box below it; "
            "heat-map = anomaly map (one colour scale per source); &#10003; = called defect.</small></p>"
        )
        entry[method] = {}
        for group, group_title in GALLERY_GROUPS:
            parts.append(f"<h4>{group_title}</h4><div class=gal>")
            entry[method][group] = []
            if not picks[group]:
                parts.append("<p>none</p>")
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


def _run_section(
    run: dict, k: int, images: _Images, *, gallery: int, max_side: int, gallery_methods: Sequence[str] | None
) -> tuple[dict, list[str]]:
    """Everything the report shows for the ``k``-th run: ``(report.json entry, HTML parts)``."""
    tag = f"run{k}"
    entry: dict = {
        "name": run["name"],
        "dir": run["dir"],
        "per_file": {s: flat_metrics(m) for s, m in run["metrics"].items()},
    }
    parts = [f"<h2>Run {k + 1}: {_e(run['name'])}</h2><p><small>{_e(run['dir'])}</small></p>"]
    fusion = run["fusion"]
    if fusion is not None:
        rows = method_rows(fusion)
        fields, html_parts = _tables(fusion, rows)
        entry.update(fields)
        parts += html_parts
        parts.append(_curves(fusion, rows, tag, images))
        entry["gallery"], html_parts = _galleries(
            fusion, run["dir"], tag, images, n=gallery, max_side=max_side, methods=gallery_methods or [fusion["best"]]
        )
        parts += html_parts
    if run["metrics"]:
        parts.append("<h3>Per-file metrics (pipeline evaluate)</h3>" + _per_file_html(run["metrics"]))
    plot_tags = [
        f"<img src='{images.write(f'{tag}_{p.name}', p.read_bytes())}' alt='{_e(p.name)}'>" for p in run["plots"]
    ]
    if plot_tags:
        parts.append("<h3>Plots of the run</h3><div class=plots>" + "".join(plot_tags) + "</div>")
    return entry, parts


def _write_report(folder: Path, title: str, body: list[str], doc: dict) -> None:
    """``report.html`` (head, ``body`` parts, one per line) and ``report.json`` into ``folder``."""
    head = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
    ]
    atomic_write_text(folder / "report.html", "\n".join([*head, *body, "</body></html>"]))
    atomic_write_json(folder / "report.json", doc)


def build_report(
    runs: Sequence[Path],
    out: Path,
    *,
    gallery: int = 6,
    max_side: int = 320,
    force: bool = False,
    title: str = "pipeline report",
    gallery_methods: Sequence[str] | None = None,
) -> dict:
    """Write ``out/report.html``, ``out/report.json`` and ``out/images/`` for one or more evaluate runs.

    Args:
        runs: ``pipeline evaluate`` output folders (or their ``fusion.json`` files).
        out: report folder (written atomically; replaced only with ``force``).
        gallery: images per gallery group (most confident errors, least confident correct).
        max_side: longer side of gallery tiles in pixels.
        gallery_methods: sources / fusion rules (``fusion:or``, ``fusion:logistic``) to show galleries
            for; default the run's best method on test.

    Returns:
        The JSON document written to ``report.json`` (``{"title", "runs": [...]}``) with ``html`` and
        ``images`` (relative paths) added.

    Raises:
        PipelineError: a run folder without results, refused overwrite, unreadable ground truth.
    """
    loaded = load_runs(runs)
    out = Path(out)
    doc: dict = {"title": title, "runs": []}
    body: list[str] = []
    with staged_dir(out, force=force) as tmp:
        images = _Images(tmp / "images")
        images.folder.mkdir()
        for k, run in enumerate(loaded):
            entry, parts = _run_section(
                run, k, images, gallery=gallery, max_side=max_side, gallery_methods=gallery_methods
            )
            doc["runs"].append(entry)
            body += parts
        _write_report(tmp, title, body, doc)
    doc["html"] = str(out / "report.html")
    doc["images"] = images.paths
    return doc
