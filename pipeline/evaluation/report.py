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
from pipeline.core.io import atomic_savefig, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, staged_dir

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
        raise PipelineError(f"{fusion_path}: not a fusion result (expected the fusion.json of 'pipeline evaluate --val-predictions')")
    files = sorted(folder.glob("metrics_*.json")) + [folder / n for n in PER_FILE_METRICS if (folder / n).is_file()]
    metrics = {p.stem[len("metrics_"):] if p.stem.startswith("metrics_") else p.stem: read_json(p) for p in files}
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
        out[split] = {"images": dict(sorted(imgs.items())), "instances": dict(sorted(inst.items())),
                      "n_images": sum(imgs.values()), "n_instances": sum(inst.values())}
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
    rows = [{"name": s["name"], "kind": s["kind"], "threshold": s["threshold"], "val": s["val"], "test": s["test"]}
            for s in fusion["sources"]]
    rows += [{"name": f"fusion:{k}", "kind": "fusion", "threshold": v["threshold"], "val": v["val"], "test": v["test"]}
             for k, v in fusion["fusion"].items()]
    return rows


def flat_metrics(m: dict, *, limit: int = 20) -> dict[str, float]:
    """Scalar numbers of a per-file metrics dict, nested one level (``bbox.AP``), at most ``limit``;
    COCO's per-size buckets (``AP_small`` ...) are left out."""
    out: dict[str, float] = {}
    for k, v in m.items():
        items = [(k, v)] if not isinstance(v, dict) else [(f"{k}.{k2}", v2) for k2, v2 in v.items()]
        for name, val in items:
            if isinstance(val, (int, float)) and not isinstance(val, bool) and not name.endswith(("_small", "_medium", "_large")):
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
        rec = {**r, "method": method, "score": s, "threshold": threshold,
               "confidence": abs(s - threshold) / sd, "decision": bool(s >= threshold)}
        (errors if rec["decision"] != r["defect"] else correct).append(rec)
    errors.sort(key=lambda r: (-r["confidence"], r["image_id"]))
    correct.sort(key=lambda r: (r["confidence"], r["image_id"]))
    return {"errors": errors[:n], "uncertain_correct": correct[:n]}


def _source_overlays(fusion: dict) -> list[dict]:
    """Per source what can be drawn: COCO results by image, or anomaly map paths by image."""
    out = []
    for k, s in enumerate(fusion["sources"]):
        path = Path(s["test_path"])
        info = {"name": s["name"], "kind": s["kind"], "threshold": s["threshold"], "color": PALETTE_BGR[k % len(PALETTE_BGR)]}
        try:
            doc = read_json(path)
        except PipelineError:
            doc = None
        if isinstance(doc, list):
            by_img: dict[int, list] = {}
            for r in doc:
                by_img.setdefault(int(r["image_id"]), []).append(r)
            info["results"] = by_img
        elif isinstance(doc, dict) and doc.get("kind") == "anomaly":
            maps = {}
            for p in doc.get("predictions", []):
                if p.get("map") and p.get("image_id") is not None:
                    mp = Path(p["map"])
                    mp = mp if mp.is_absolute() else path.parent / mp
                    if mp.is_file():
                        maps[int(p["image_id"])] = mp
            info["maps"] = maps
            if maps:  # one colour scale for all maps of the source, so a good image does not look hot
                from pipeline.evaluation.anomaly import load_map

                vals = [load_map(mp) for mp in maps.values()]
                info["map_range"] = (float(min(v.min() for v in vals)), float(max(v.max() for v in vals)))
        out.append(info)
    return out


def draw_overlay(image_bgr: np.ndarray, *, image_id: int, gt_anns: Sequence[dict], sources: Sequence[dict],
                 max_side: int = 320, max_boxes: int = 5) -> np.ndarray:
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

    from pipeline.evaluation.anomaly import load_map, resize_map
    from pipeline.data.instances import decode_rle

    img = image_bgr if image_bgr.ndim == 3 else cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    img = img[..., :3].copy()
    h, w = img.shape[:2]
    for src in sources:  # heat-maps first, under everything else
        mp = src.get("maps", {}).get(image_id)
        if mp is not None and Path(mp).is_file():
            m = resize_map(load_map(Path(mp)), (h, w))
            lo, hi = src.get("map_range") or (float(m.min()), float(m.max()))
            norm = (np.clip((m - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8) if hi > lo else np.zeros((h, w), np.uint8)
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

    from pipeline.evaluation.curves import pr_curve, roc_curve

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
                ax.step(np.r_[0.0, rec], np.r_[1.0, prec], where="post", label=f"{row['name']} (F1@t {row['test']['f1']:.3f})")
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
CSS = """body{font-family:sans-serif;margin:20px;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}tr.best td{background:#e5f5e0;font-weight:bold}
.cm{display:inline-block;margin:4px 10px 4px 0;vertical-align:top}.cm td{width:38px;text-align:center}
.gal{display:flex;flex-wrap:wrap;gap:10px}.tile{width:330px;font-size:12px}.tile img{max-width:320px;border:1px solid #999}
.scroll{overflow-x:auto;max-width:100%}.err{color:#b00}.ok{color:#070}.plots img{max-width:560px;margin-right:10px;vertical-align:top}small{color:#666}"""


def _e(x) -> str:
    return html.escape(str(x))


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _counts_html(counts: dict) -> str:
    types = sorted({t for c in counts.values() for t in c["images"]})
    cats = sorted({t for c in counts.values() for t in c["instances"]})
    head = "".join(f"<th>{_e(t)}</th>" for t in types) + "<th>all images</th>" + "".join(f"<th>{_e(c)} inst.</th>" for c in cats)
    body = ""
    for split, c in counts.items():
        body += f"<tr><td class=l>{_e(split)}</td>" + "".join(f"<td>{c['images'].get(t, 0)}</td>" for t in types)
        body += f"<td>{c['n_images']}</td>" + "".join(f"<td>{c['instances'].get(k, 0)}</td>" for k in cats) + "</tr>"
    return f"<table><tr><th class=l>split</th>{head}</tr>{body}</table>"


def _methods_html(rows: list[dict], best: str | None) -> str:
    head = "<tr><th class=l>source / fusion</th><th>threshold (val)</th>" + "".join(
        f"<th>{c}</th>" for c in METRIC_COLS) + "<th>val F1</th><th>val AUROC</th></tr>"
    body = ""
    for r in rows:
        t = r["test"]
        body += (f"<tr class='{'best' if r['name'] == best else ''}'><td class=l>{_e(r['name'])}</td><td>{r['threshold']:.4g}</td>"
                 + "".join(f"<td>{_num(t[c])}</td>" for c in METRIC_COLS)
                 + f"<td>{_num(r['val']['f1'])}</td><td>{_num(r['val']['auroc'])}</td></tr>")
    return f"<table>{head}{body}</table>"


def _cm_html(name: str, cm: list) -> str:
    (tn, fp), (fn, tp) = cm
    return (f"<div class=cm><b>{_e(name)}</b><table><tr><th></th><th>pred good</th><th>pred defect</th></tr>"
            f"<tr><th>true good</th><td>{tn}</td><td>{fp}</td></tr><tr><th>true defect</th><td>{fn}</td><td>{tp}</td></tr></table></div>")


def _per_file_html(metrics: dict) -> str:
    out = ""
    for stem, m in metrics.items():
        flat = flat_metrics(m)
        if not flat:
            continue
        out += f"<p><b>{_e(stem)}</b></p><div class=scroll><table><tr>" + "".join(f"<th>{_e(k)}</th>" for k in flat) + "</tr><tr>"
        out += "".join(f"<td>{v:.4f}</td>" for v in flat.values()) + "</tr></table></div>"
    return out


def build_report(runs: Sequence[Path], out: Path, *, gallery: int = 6, max_side: int = 320, force: bool = False,
                 title: str = "pipeline report", gallery_methods: Sequence[str] | None = None) -> dict:
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
    import cv2

    from pipeline.core.io import read_image

    loaded = [load_run(r) for r in runs]
    if not loaded:
        raise PipelineError("give at least one 'pipeline evaluate' output folder")
    out = Path(out)
    doc: dict = {"title": title, "runs": []}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]
    images: list[str] = []
    with staged_dir(out, force=force) as tmp:
        (tmp / "images").mkdir()

        def save_png(name: str, data: bytes) -> str:
            atomic_write_bytes(tmp / "images" / name, data)
            images.append(f"images/{name}")
            return f"images/{name}"

        for k, run in enumerate(loaded):
            tag = f"run{k}"
            entry: dict = {"name": run["name"], "dir": run["dir"], "per_file": {s: flat_metrics(m) for s, m in run["metrics"].items()}}
            parts.append(f"<h2>Run {k + 1}: {_e(run['name'])}</h2><p><small>{_e(run['dir'])}</small></p>")
            fusion = run["fusion"]
            if fusion is not None:
                counts = dataset_counts(_gt_paths(fusion))
                rows = method_rows(fusion)
                entry.update({"counts": counts, "best": fusion["best"], "better_fusion": fusion.get("better_fusion"),
                              "image_level": [{"name": r["name"], "kind": r["kind"], "threshold": r["threshold"],
                                               "test": r["test"], "val": r["val"]} for r in rows],
                              "definitions": fusion.get("definitions", {})})
                parts.append("<h3>Dataset</h3>" + _counts_html(counts))
                parts.append("<h3>Image-level good/defect decision (thresholds chosen on val, metrics on test)</h3>")
                parts.append(_methods_html(rows, fusion["best"]))
                note = f"Best on test: <b>{_e(fusion['best'])}</b>."
                if fusion.get("better_fusion"):
                    note += f" Better fusion rule: <b>{_e(fusion['better_fusion'])}</b>."
                parts.append(f"<p>{note} Defect is the positive class.<br>"
                             + "<br>".join(f"<small>{_e(k2)}: {_e(v)}</small>" for k2, v in fusion.get("definitions", {}).items()) + "</p>")
                parts.append("<h3>Confusion matrices (test)</h3>" + "".join(_cm_html(r["name"], r["test"]["confusion_matrix"]) for r in rows))
                recs = fusion["images"]["test"]
                roc, pr = tmp / "images" / f"{tag}_roc.png", tmp / "images" / f"{tag}_pr.png"
                _plot_curves(rows, recs, roc, pr)
                images += [f"images/{roc.name}", f"images/{pr.name}"]
                parts.append(f"<h3>ROC and PR curves (test)</h3><div class=plots><img src='images/{roc.name}' alt='ROC'>"
                             f"<img src='images/{pr.name}' alt='PR'></div>")
                # galleries: the best method unless the caller names others
                overlays = _source_overlays(fusion)
                gt = read_json(fusion["test_gt"])
                anns: dict[int, list] = {}
                for a in gt.get("annotations", []):
                    anns.setdefault(int(a["image_id"]), []).append(a)
                root = Path(fusion.get("image_root") or ".")
                legend = ", ".join(f"<span style='color:rgb{tuple(reversed(s['color']))}'>&#9632; {_e(s['name'])}</span>" for s in overlays)
                entry["gallery"] = {}
                for gi, method in enumerate(gallery_methods or [fusion["best"]]):
                    if method not in fusion["thresholds"]:
                        raise PipelineError(f"{run['dir']}: no method {method!r} for the gallery (expected one of {', '.join(fusion['thresholds'])})")
                    vals = np.array([r["scores"][method] for r in fusion["images"]["val"]], np.float64)
                    sd = float(vals.std()) if vals.size and vals.std() > 0 else 1.0
                    picks = pick_gallery(recs, method, fusion["thresholds"][method], sd, n=gallery)
                    parts.append(f"<h3>Gallery: {_e(method)} on test</h3><p><small>green = ground-truth boxes; {legend}; thick = at or "
                                 "above the source's threshold (top 5), thin = its top box below it; heat-map = anomaly map "
                                 "(one colour scale per source); &#10003; = called defect.</small></p>")
                    entry["gallery"][method] = {}
                    for group, title_g in (("errors", "Most confident errors"), ("uncertain_correct", "Least confident correct")):
                        parts.append(f"<h4>{title_g}</h4><div class=gal>")
                        entry["gallery"][method][group] = []
                        if not picks[group]:
                            parts.append("<p>none</p>")
                        for r in picks[group]:
                            fname = f"{tag}_g{gi}_{group}_{r['image_id']}.jpg"
                            try:
                                img = read_image(root / r["file_name"], flags=cv2.IMREAD_COLOR)
                            except PipelineError:  # image moved: a grey tile, the numbers still show
                                img = np.full((max_side, max_side, 3), 200, np.uint8)
                            tile = draw_overlay(img, image_id=r["image_id"], gt_anns=anns.get(r["image_id"], []),
                                                sources=overlays, max_side=max_side)
                            ok, buf = cv2.imencode(".jpg", tile, [cv2.IMWRITE_JPEG_QUALITY, 85])
                            rel = save_png(fname, buf.tobytes())
                            truth = "defect" if r["defect"] else "good"
                            dec = "defect" if r["decision"] else "good"
                            cls = "err" if r["decision"] != r["defect"] else "ok"
                            per = "<br>".join(f"{_e(n)}: {v:.3g}{' &#10003;' if r['decisions'][n] else ''}" for n, v in r["scores"].items())
                            parts.append(f"<div class=tile><img src='{rel}' alt='{_e(r['file_name'])}'><br><b>{_e(r['file_name'])}</b>"
                                         f" (id {r['image_id']})<br>truth {_e(r['defect_type'])} ({truth}), <span class={cls}>decision {dec}</span>, "
                                         f"confidence {r['confidence']:.2f}<br><small>{per}</small></div>")
                            entry["gallery"][method][group].append({k2: r[k2] for k2 in ("image_id", "file_name", "defect_type", "score",
                                                                                         "threshold", "decision", "confidence")} | {"image": rel})
                        parts.append("</div>")
            if run["metrics"]:
                parts.append("<h3>Per-file metrics (pipeline evaluate)</h3>" + _per_file_html(run["metrics"]))
            plot_tags = []
            for p in run["plots"]:
                rel = save_png(f"{tag}_{p.name}", p.read_bytes())
                plot_tags.append(f"<img src='{rel}' alt='{_e(p.name)}'>")
            if plot_tags:
                parts.append("<h3>Plots of the run</h3><div class=plots>" + "".join(plot_tags) + "</div>")
            doc["runs"].append(entry)
        parts.append("</body></html>")
        atomic_write_text(tmp / "report.html", "\n".join(parts))
        atomic_write_json(tmp / "report.json", _jsonable(doc))
    doc["html"] = str(out / "report.html")
    doc["images"] = images
    return doc


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
