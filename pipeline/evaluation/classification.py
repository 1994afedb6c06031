"""Image-level classification metrics and the ``kind: classification`` prediction file evaluator.

Metrics (all plain numpy, no scikit-learn):

- accuracy, balanced accuracy (mean per-class recall over classes present in the ground truth),
  macro-F1 (mean over classes present in the ground truth or the predictions), per-class
  precision / recall / F1 / support, and the confusion matrix (rows = truth, columns = prediction);
- AUROC for good vs defect with the defect score ``1 - p(good)``, computed as the Mann-Whitney U
  statistic with mid-ranks for ties (Hanley & McNeil, Radiology 1982): the probability that a
  random defect image scores higher than a random good one, ties counting one half.

Prediction file (``"kind": "classification"``)::

    {"kind": "classification", "model": str, "classes": [str, ...], "task": "multiclass"|"binary",
     "root": category root, "split_manifest": optional path, "subset": optional split name,
     "run_dir": optional training run folder (its history.json gives training curves),
     "weights": optional note on the initial weights,
     "predictions": [{"image": path relative to root, "image_id": int, "label": predicted class,
                      "scores": {class: probability}}]}

The true label of an image comes from the split manifest when the file names one that can be read,
else from the MVTec path itself (``test/<label>/...``, ``train/good/...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_savefig, atomic_write_json, read_json
from pipeline.data.mvtec import GOOD
from pipeline.data.predictions import load_predictions
from pipeline.evaluation.curves import binary_auroc as auroc


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """``num_classes x num_classes`` int64 counts; row = true class index, column = predicted."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    t = np.asarray(y_true, np.int64)
    p = np.asarray(y_pred, np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    np.add.at(cm, (t, p), 1)
    return cm


def summarize_confusion(cm: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1 and per-class precision/recall/F1/support from ``cm``.

    A class's precision is ``None`` when nothing was predicted as it; its recall is ``None`` when it
    has no true images (such a class is left out of balanced accuracy). Macro-F1 averages F1 over
    classes that occur in the truth or the predictions.
    """
    cm = np.asarray(cm, np.float64)
    total = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    per_class = {}
    recalls, f1s = [], []
    for i, name in enumerate(classes):
        prec = float(tp[i] / predicted[i]) if predicted[i] > 0 else None
        rec = float(tp[i] / support[i]) if support[i] > 0 else None
        if prec is not None and rec is not None and prec + rec > 0:
            f1 = 2 * prec * rec / (prec + rec)
        else:
            f1 = 0.0
        per_class[name] = {"precision": prec, "recall": rec, "f1": f1, "support": int(support[i])}
        if rec is not None:
            recalls.append(rec)
        if support[i] > 0 or predicted[i] > 0:
            f1s.append(f1)
    return {
        "n": int(total),
        "accuracy": float(tp.sum() / total) if total else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": per_class,
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, *, title: str = "") -> Path:
    """Write the confusion matrix (counts, row-normalised colour) as a PNG; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.1 * n + 2))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for r in range(n):
        for c in range(n):
            ax.text(c, r, str(int(cm[r, c])), ha="center", va="center", color="white" if norm[r, c] > 0.5 else "black")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    atomic_savefig(fig, Path(path), dpi=100)
    return Path(path)


def plot_history(history: Sequence[dict], path: Path, *, title: str = "") -> Path | None:
    """Training curves (loss; accuracy and balanced accuracy) from a run's per-epoch history."""
    if not history:
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, [h.get("train_loss") for h in history], label="train loss")
    if any(h.get("val_loss") is not None for h in history):
        a1.plot(ep, [h.get("val_loss") for h in history], label="val loss")
    a1.set_xlabel("epoch")
    a1.legend()
    a2.plot(ep, [h.get("train_accuracy") for h in history], label="train accuracy")
    for key in ("val_accuracy", "val_balanced_accuracy"):
        if any(h.get(key) is not None for h in history):
            a2.plot(ep, [h.get(key) for h in history], label=key.replace("_", " "))
    a2.set_ylim(0, 1.02)
    a2.set_xlabel("epoch")
    a2.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_savefig(fig, Path(path), dpi=100)
    return Path(path)


def _label_from_path(image: str) -> str | None:
    parts = Path(image).parts
    if len(parts) >= 3 and parts[0] in ("test", "train"):
        return parts[1]
    return None


def _truth_lookup(doc: dict) -> dict[str, str]:
    """image (relative path) -> true label, from the named split manifest when readable."""
    m = doc.get("split_manifest")
    if not m:
        return {}
    try:
        manifest = read_json(Path(m))
    except PipelineError:
        return {}
    out = {}
    for entries in manifest.get("splits", {}).values():
        for e in entries:
            out[e["image"]] = e["label"]
    for p in manifest.get("train_good", []):
        out[p] = GOOD
    return out


def classification_metrics(
    true: Sequence[str], pred: Sequence[str], p_good: Sequence[float] | None, classes: Sequence[str]
) -> dict:
    """All metrics for label lists (strings); ``p_good`` (probability of ``good``) gives the AUROC
    (defect score ``1 - p_good``, see :func:`pipeline.evaluation.curves.binary_auroc`); when it cannot
    be computed ``auroc_good_vs_defect`` is ``None`` beside ``auroc_reason``."""
    index = {c: i for i, c in enumerate(classes)}
    cm = confusion_matrix([index[t] for t in true], [index[p] for p in pred], len(classes))
    out = summarize_confusion(cm, classes)
    out["classes"] = list(classes)
    if p_good is not None:
        defect = [t != GOOD for t in true]
        out["auroc_good_vs_defect"] = auroc([1.0 - float(g) for g in p_good], defect)
        if out["auroc_good_vs_defect"] is None:
            out["auroc_reason"] = "only one class in the split"
    else:
        out["auroc_good_vs_defect"] = None
        out["auroc_reason"] = f"no p({GOOD}): the classes have no {GOOD!r}"
    return out


def evaluate_classification(pred_path: Path, out_dir: Path, *, split_path: Path | None = None) -> dict:
    """Evaluate a ``kind: classification`` prediction file.

    Writes ``metrics.json``, ``confusion_matrix.png`` and (when the file names a training run with
    a ``history.json``) ``training_curves.png`` into ``out_dir``.

    Args:
        pred_path: the prediction JSON (format in the module docstring).
        out_dir: folder for the outputs (created).
        split_path: split manifest giving true labels (overrides the file's ``split_manifest``).

    Returns:
        The metrics dict (also in ``metrics.json``).

    Raises:
        PipelineError: not a classification file, a prediction whose label is not in ``classes``,
            or an image whose true label cannot be found.
    """
    pred_path = Path(pred_path)
    loaded = load_predictions(pred_path)
    if loaded.kind != "classification":
        raise PipelineError(
            f"{pred_path}: not a classification prediction file (a {loaded.kind} file; "
            'expected "kind": "classification")'
        )
    doc, preds = loaded.doc, loaded.records
    classes = doc.get("classes")
    if not isinstance(classes, list) or not classes:
        raise PipelineError(f"{pred_path}: expected 'classes' (a non-empty list of class names)")
    if split_path is not None:
        doc = {**doc, "split_manifest": str(split_path)}
    lookup = _truth_lookup(doc)
    binary = doc.get("task") == "binary" or list(classes) == [GOOD, "defect"]
    true, pred, p_good = [], [], []
    for i, p in enumerate(preds):
        for key in ("image", "label", "scores"):
            if key not in p:
                raise PipelineError(f"{pred_path}: predictions[{i}] has no {key!r} (expected image, label, scores)")
        t = lookup.get(p["image"]) or _label_from_path(p["image"])
        if t is None:
            raise PipelineError(f"{pred_path}: no true label for {p['image']} (pass the split manifest)")
        if binary and t != GOOD:
            t = "defect"
        if t not in classes:
            raise PipelineError(f"{pred_path}: true label {t!r} of {p['image']} is not among classes {classes}")
        if p["label"] not in classes:
            raise PipelineError(
                f"{pred_path}: predicted label {p['label']!r} of {p['image']} is not among classes {classes}"
            )
        true.append(t)
        pred.append(p["label"])
        p_good.append(float(p["scores"].get(GOOD, 0.0)))
    if not true:
        raise PipelineError(f"{pred_path}: no predictions to evaluate")
    metrics = classification_metrics(true, pred, p_good if GOOD in classes else None, classes)
    metrics.update({"predictions": str(pred_path), "model": doc.get("model"), "subset": doc.get("subset")})
    if doc.get("weights"):
        metrics["weights"] = doc["weights"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{doc.get('model', '')} {doc.get('subset') or ''}".strip()
    png = plot_confusion(np.array(metrics["confusion_matrix"]), classes, out_dir / "confusion_matrix.png", title=title)
    metrics["confusion_matrix_png"] = str(png)
    run_dir = doc.get("run_dir")
    if run_dir and (Path(run_dir) / "history.json").is_file():
        hist = read_json(Path(run_dir) / "history.json")
        png = plot_history(hist, out_dir / "training_curves.png", title=str(doc.get("model", "")))
        metrics["training_curves_png"] = str(png) if png else None
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
