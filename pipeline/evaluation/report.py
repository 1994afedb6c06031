"""Self-contained HTML report (and the same numbers as JSON) for one or more ``pipeline evaluate`` runs.

A run is the output folder of ``pipeline evaluate`` (``fusion.json`` from ``--val-predictions``
and/or ``metrics_*.json``) or a ``fusion.json`` file. The report folder holds ``report.html``,
``report.json`` and ``images/`` (PNG plots, JPEG gallery tiles) referenced by relative paths, so it
opens from disk in any browser with no server and can be moved or zipped as a whole.

Per run: dataset counts per split and class (images per ``defect_type``, instances per category,
from the COCO ground truths next to the run's val/test files, ``train.json`` included when it sits
beside them, and ``train/good``: the split manifest's extra good images, when ``split.json`` sits one
folder above), the image-level table (each source and fusion; thresholds and the best method chosen
on val, metrics on test), confusion matrices, ROC and PR curves (test), the per-file metrics of
``pipeline evaluate`` (COCO AP, mask IoU, classifier, anomaly), each plot of the run once under its
own title, and a gallery (:mod:`pipeline.evaluation.gallery`) of the method chosen on val.
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
    read_json,
    staged_dir,
)
from pipeline.data.mvtec import GOOD
from pipeline.evaluation.curves import pr_curve, roc_curve
from pipeline.evaluation.gallery import draw_overlay, galleries, pick_gallery  # noqa: F401  (the report's API)

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


def train_good_count(fusion: dict) -> dict | None:
    """``{"n_images", "split"}`` of the split manifest's ``train_good`` list (MVTec's ``train/good``,
    extra good images outside train/val/test), read from ``split.json`` one folder above the test ground
    truth (``annotations/<cat>/coco/test.json`` -> ``annotations/<cat>/split.json``); ``None`` without it."""
    path = Path(fusion["test_gt"]).parent.parent / "split.json"
    if not path.is_file():
        return None
    manifest = read_json(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("train_good"), list):
        return None
    return {"n_images": len(manifest["train_good"]), "split": str(path)}


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


def flat_metrics(m: dict, *, limit: int = 20) -> dict[str, float | int]:
    """Scalar numbers of a per-file metrics dict, nested one level (``bbox.AP``), at most ``limit``;
    COCO's per-size buckets (``AP_small`` ...) are left out. Integers (counts) stay integers."""
    out: dict[str, float | int] = {}
    for k, v in m.items():
        items = [(k, v)] if not isinstance(v, dict) else [(f"{k}.{k2}", v2) for k2, v2 in v.items()]
        for name, val in items:
            number = isinstance(val, (int, float)) and not isinstance(val, bool)
            if number and not name.endswith(("_small", "_medium", "_large")):
                out[name] = val if isinstance(val, int) else float(val)
    return dict(list(out.items())[:limit])


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
    ".plots img{max-width:560px;vertical-align:top}small{color:#666}"
    "figure{display:inline-block;margin:0 10px 10px 0}figcaption{font-size:12px;color:#444}"
)


def _e(x) -> str:
    return html.escape(str(x))


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _counts_html(counts: dict, train_good: dict | None = None) -> str:
    types = sorted({t for c in counts.values() for t in c["images"]})
    cats = sorted({t for c in counts.values() for t in c["instances"]})
    head = (
        "".join(f"<th>{_e(t)}</th>" for t in types)
        + "<th>all images</th>"
        + "".join(f"<th>{_e(c)} inst.</th>" for c in cats)
    )
    body = ""
    if train_good is not None:  # MVTec's train/good: good images only, no instances
        body += "<tr><td class=l>train/good</td>" + "".join(
            f"<td>{train_good['n_images'] if t == GOOD else 0}</td>" for t in types
        )
        body += f"<td>{train_good['n_images']}</td>" + "".join("<td>0</td>" for _ in cats) + "</tr>"
    for split, c in counts.items():
        body += f"<tr><td class=l>{_e(split)}</td>" + "".join(f"<td>{c['images'].get(t, 0)}</td>" for t in types)
        body += f"<td>{c['n_images']}</td>" + "".join(f"<td>{c['instances'].get(k, 0)}</td>" for k in cats) + "</tr>"
    return f"<table><tr><th class=l>split</th>{head}</tr>{body}</table>"


def _methods_html(rows: list[dict], best: str | None) -> str:
    head = (
        "<tr><th class=l>source / fusion</th><th>threshold (val)</th>"
        + "".join(f"<th>{c}</th>" for c in METRIC_COLS)
        + "<th>val balanced_accuracy</th><th>val F1</th><th>val AUROC</th></tr>"
    )
    body = ""
    for r in rows:
        t = r["test"]
        body += (
            f"<tr class='{'best' if r['name'] == best else ''}'><td class=l>{_e(r['name'])}</td>"
            f"<td>{r['threshold']:.4g}</td>"
            + "".join(f"<td>{_num(t[c])}</td>" for c in METRIC_COLS)
            + f"<td>{_num(r['val']['balanced_accuracy'])}</td><td>{_num(r['val']['f1'])}</td>"
            f"<td>{_num(r['val']['auroc'])}</td></tr>"
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
        out += "".join(f"<td>{_num(v)}</td>" for v in flat.values()) + "</tr></table></div>"
    return out


# ------------------------------------------------------------------------------- report steps
class _Images:
    """The report's ``images/`` folder: files written there and their paths relative to the report,
    in the order the HTML references them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.paths: list[str] = []
        self.seen: set[bytes] = set()  # contents of the run plots already in the report

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
    train_good = train_good_count(fusion)
    entry = {
        "counts": counts,
        "train_good": train_good,
        "chosen_on": fusion.get("chosen_on"),
        "best": fusion["best"],
        "better_fusion": fusion.get("better_fusion"),
        "image_level": [
            {"name": r["name"], "kind": r["kind"], "threshold": r["threshold"], "test": r["test"], "val": r["val"]}
            for r in rows
        ],
        "definitions": fusion.get("definitions", {}),
    }
    on = fusion.get("chosen_on") or "test (a fusion.json from before choices were made on val)"
    note = f"Best, chosen on {_e(on)}: <b>{_e(fusion['best'])}</b>."
    if fusion.get("better_fusion"):
        note += f" Better fusion rule, chosen on {_e(on)}: <b>{_e(fusion['better_fusion'])}</b>."
    note += " Test metrics are only reported."
    definitions = "<br>".join(f"<small>{_e(k)}: {_e(v)}</small>" for k, v in fusion.get("definitions", {}).items())
    parts = [
        "<h3>Dataset</h3>" + _counts_html(counts, train_good),
        "<h3>Image-level good/defect decision (thresholds and choices on val, metrics on test)</h3>",
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
        entry["gallery"], html_parts = galleries(
            fusion, run["dir"], tag, images, n=gallery, max_side=max_side, methods=gallery_methods or None
        )
        parts += html_parts
    if run["metrics"]:
        parts.append("<h3>Per-file metrics (pipeline evaluate)</h3>" + _per_file_html(run["metrics"]))
    entry["plots"], html_plots = _run_plots(run["plots"], tag, images)
    if html_plots:
        parts.append("<h3>Plots of the run</h3><div class=plots>" + html_plots + "</div>")
    return entry, parts


PLOT_TITLES = (  # file-name prefix of a plot of pipeline evaluate -> what it shows
    ("pr_bbox_", "bbox precision-recall at IoU 0.5"),
    ("pr_segm_", "mask precision-recall at IoU 0.5"),
    ("anomaly_curves_", "anomaly image ROC, pixel ROC and PRO"),
    ("confusion_matrix_", "classifier confusion matrix"),
    ("training_curves_", "classifier training curves"),
)


def plot_title(path: Path) -> str:
    """Caption of a run's plot from its file name: ``pr_bbox_<tag>.png`` -> ``bbox precision-recall at
    IoU 0.5: <tag>`` (the file stem for unknown names)."""
    for prefix, what in PLOT_TITLES:
        if path.stem.startswith(prefix):
            return f"{what}: {path.stem[len(prefix) :]}"
    return path.stem


def _run_plots(plots: Sequence[Path], tag: str, images: _Images) -> tuple[list[dict], str]:
    """Each plot of the run once (byte-identical files, also from an earlier run, are shown once),
    each under its own caption: ``([{"title", "image"}], HTML)``."""
    out, html_parts = [], ""
    for p in plots:
        data = p.read_bytes()
        if data in images.seen:
            continue
        rel = images.write(f"{tag}_{p.name}", data)
        images.seen.add(data)
        title = plot_title(p)
        out.append({"title": title, "image": rel})
        html_parts += f"<figure><img src='{rel}' alt='{_e(title)}'><figcaption>{_e(title)}</figcaption></figure>"
    return out, html_parts


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
            for; default the method chosen on val (:func:`pipeline.evaluation.gallery.default_method`).

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
