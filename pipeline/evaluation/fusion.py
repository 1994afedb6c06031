"""Image-level good/defect decision from any set of prediction files, alone and fused.

Every prediction file becomes one *source*: a defect score per image of the split. Sources must be
models' own outputs: SAM masks prompted with the ground-truth boxes (an upper bound) are refused
(:func:`pipeline.data.predictions.require_model_output`); files without provenance are accepted.

- COCO results list (detector boxes, SAM masks, anomaly maps turned into regions): the maximum
  ``score`` over all results on the image, 0.0 when the image has none.
- Classifier file (``"kind": "classification"``): ``1 - p(good)``; when the classes have no
  ``good`` (a binary model named otherwise), the probability of ``defect``.
- Anomaly file (``"kind": "anomaly"``): its image ``score`` (any real number; higher = more anomalous).

The true label of an image is ``defect_type != "good"`` in the split's COCO ground truth
(``annotations/<cat>/coco/<split>.json``); images are matched by the global ``image_id`` (by the
``image`` path relative to the category root when a record has no id).

Thresholds are chosen on the val split and applied unchanged to test (decision: ``score >= t``).
The rule (:func:`f1_threshold`): among the cut points between consecutive distinct val scores,
take the one with the highest F1 of the defect class; ties go to the higher balanced accuracy,
then to the higher threshold. The threshold is placed halfway between the last score called
defect and the next lower score, so it does not sit on a val image's score.

Fusion of two or more sources:

- ``or``: defect when any source is at or above its own val threshold. Its continuous score (for
  AUROC and curves) is ``max_i (s_i - t_i) / sd_i`` with ``sd_i`` the val standard deviation of
  source ``i``: ``>= 0`` exactly when some source fires, so the OR decision is that score ``>= 0``.
- ``logistic``: logistic regression (Cox 1958) over the standardised per-source scores, fitted on
  the val split by Newton's method (IRLS) with an L2 penalty ``l2 * ||w||^2 / 2`` on the weights
  (not the bias) and class-balanced sample weights (each class weighs half). The fused score is
  the fitted defect probability; its threshold is chosen on val by the same F1 rule. Fitting and
  choosing the threshold on the same (small) val split is optimistic on val: read the test rows.

Metrics for each source and fusion, on val and test (:func:`decision_metrics`): accuracy, balanced
accuracy, precision / recall / F1 of the defect class, AUROC (Mann-Whitney, ties count one half;
``None`` with an ``auroc_reason`` when the split holds one class only) and the confusion matrix
``[[TN, FP], [FN, TP]]`` (rows = truth good/defect, columns = decision).

Every choice is made on val, never on test (:func:`choose`): each source's threshold, the better
fusion rule, the best source or fusion, and the method of the report's gallery (the better fusion
rule with two or more sources, else the one source). Ties go to the higher val balanced accuracy,
then the higher val F1, then the name (alphabetical). Test metrics are only reported, so a
different test file changes no choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import read_json
from pipeline.data.mvtec import GOOD
from pipeline.data.predictions import load_predictions, require_model_output, source_name
from pipeline.evaluation.curves import binary_auroc as auroc

FUSION_RULES = ("or", "logistic")
DEFINITIONS = {
    "source_score": "COCO results: max score per image (0 when none); classifier: 1 - p(good) "
    "(p(defect) without 'good'); anomaly: image score",
    "truth": "defect_type != 'good' in the split's COCO ground truth",
    "threshold": "chosen on val: F1-optimal for defects (ties: balanced accuracy, then the higher threshold), "
    "halfway to the next lower val score; decision score >= threshold",
    "or": "defect when any source scores >= its val threshold; continuous score max_i (s_i - t_i) / sd_i (sd on val)",
    "logistic": "L2 (l2 * |w|^2 / 2) logistic regression on val-standardised source scores, class-balanced, "
    "Newton/IRLS; threshold on val by the F1 rule",
    "confusion_matrix": "[[TN, FP], [FN, TP]]: rows truth good/defect, columns decision good/defect",
    "auroc": "Mann-Whitney U / (n_defect * n_good), ties count one half; null (auroc_reason) with one class",
    "choices": "every choice on val: highest val balanced accuracy, then val F1, then name; test only reported",
}
CHOSEN_ON = "val"
CHOICE_RULE = "highest val balanced accuracy, then highest val F1, then name (alphabetical)"


# ------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class SplitLabels:
    """Images of one split from its COCO ground truth.

    Attributes:
        image_ids: global image ids in ground-truth order.
        file_names: path of each image relative to ``image_root``.
        defect_types: ``"good"`` or the defect folder name, per image.
        image_root: absolute category root (``info.image_root``; ``""`` when absent).
        gt_path: the COCO file.
    """

    image_ids: tuple[int, ...]
    file_names: tuple[str, ...]
    defect_types: tuple[str, ...]
    image_root: str
    gt_path: str

    @property
    def y(self) -> np.ndarray:
        """``N`` bool: True for defect images."""
        return np.array([t != GOOD for t in self.defect_types], bool)


def load_split_labels(gt_path: Path) -> SplitLabels:
    """Read image ids, file names and ``defect_type`` from a COCO ground truth of one split.

    Raises:
        PipelineError: the file is not COCO ground truth or an image lacks ``defect_type``.
    """
    doc = read_json(gt_path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise PipelineError(f"{gt_path}: not COCO ground truth (expected an object with 'images')")
    ids, names, types = [], [], []
    for i, im in enumerate(doc["images"]):
        if not isinstance(im, dict) or "id" not in im or "defect_type" not in im:
            raise PipelineError(
                f"{gt_path}: image {i} lacks id/defect_type (expected the files of 'pipeline convert-masks')"
            )
        ids.append(int(im["id"]))
        names.append(str(im.get("file_name", "")))
        types.append(str(im["defect_type"]))
    if not ids:
        raise PipelineError(f"{gt_path}: no images")
    root = str(doc.get("info", {}).get("image_root", ""))
    return SplitLabels(tuple(ids), tuple(names), tuple(types), root, str(gt_path))


@dataclass
class Source:
    """One prediction file reduced to a defect score per image.

    Attributes:
        name: display name, e.g. ``boxes:yolo_test`` (kind, then :func:`pipeline.data.predictions.source_name`).
        kind: ``boxes`` / ``masks`` (COCO results without / with ``segmentation``),
            ``classifier`` or ``anomaly``.
        path: the prediction file.
        scores: ``N`` float64, aligned with the split's ``image_ids``.
    """

    name: str
    kind: str
    path: str
    scores: np.ndarray = field(repr=False)


def _index(labels: SplitLabels) -> tuple[dict[int, int], dict[str, int]]:
    return ({iid: k for k, iid in enumerate(labels.image_ids)}, {fn: k for k, fn in enumerate(labels.file_names)})


def _row(rec: dict, by_id: dict[int, int], by_name: dict[str, int], path: Path, i: int) -> int:
    iid = rec.get("image_id")
    if iid is not None:
        if int(iid) not in by_id:
            raise PipelineError(f"{path}: prediction {i} has image_id {iid} not in the ground truth of this split")
        return by_id[int(iid)]
    img = rec.get("image")
    if img is None or img not in by_name:
        raise PipelineError(f"{path}: prediction {i} has no image_id and image {img!r} is not in the ground truth")
    return by_name[img]


FUSION_PURPOSE = "the fused image-level decision (evaluate --val-predictions)"


def source_scores(pred_path: Path, labels: SplitLabels) -> Source:
    """Defect score per image of ``labels`` from one prediction file (see the module docstring).

    Returns:
        a :class:`Source` whose ``scores`` follow ``labels.image_ids``.

    Raises:
        PipelineError: not a prediction file, an upper bound (SAM masks from ground-truth boxes), records
        naming images outside the split, a classifier or anomaly file that misses some image of the split,
        or a classifier without ``good``/``defect``.
    """
    pred_path = Path(pred_path)
    pred = require_model_output(load_predictions(pred_path), FUSION_PURPOSE)
    by_id, by_name = _index(labels)
    n = len(labels.image_ids)
    if pred.kind == "coco":
        scores = np.zeros(n, np.float64)
        masks = False
        for i, r in enumerate(pred.records):
            if not isinstance(r, dict) or "score" not in r:
                raise PipelineError(f"{pred_path}: result {i} lacks a score (expected COCO results)")
            k = _row(r, by_id, by_name, pred_path, i)
            scores[k] = max(scores[k], float(r["score"]))
            masks = masks or "segmentation" in r
        kind = "masks" if masks else "boxes"
        return Source(f"{kind}:{source_name(pred_path)}", kind, str(pred_path), scores)
    kind = "classifier" if pred.kind == "classification" else "anomaly"
    scores = np.full(n, np.nan)
    for i, p in enumerate(pred.records):
        k = _row(p, by_id, by_name, pred_path, i)
        if kind == "anomaly":
            if "score" not in p:
                raise PipelineError(f"{pred_path}: prediction {i} lacks 'score' (expected an anomaly score)")
            scores[k] = float(p["score"])
        else:
            probs = p.get("scores") or {}
            if GOOD in probs:
                scores[k] = 1.0 - float(probs[GOOD])
            elif "defect" in probs:
                scores[k] = float(probs["defect"])
            else:
                raise PipelineError(
                    f"{pred_path}: prediction {i} scores have neither {GOOD!r} nor 'defect' (got {sorted(probs)})"
                )
    missing = np.flatnonzero(np.isnan(scores))
    if len(missing):
        raise PipelineError(
            f"{pred_path}: no prediction for {len(missing)} image(s) of {labels.gt_path}, "
            f"e.g. image_id {labels.image_ids[missing[0]]} (predict the same split)"
        )
    return Source(f"{kind}:{source_name(pred_path)}", kind, str(pred_path), scores)


def unique_names(sources: Sequence[Source]) -> None:
    """Make source names unique in place (``name``, ``name#2``, ...)."""
    seen: dict[str, int] = {}
    for s in sources:
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s.name = f"{s.name}#{seen[s.name]}"


# ----------------------------------------------------------------------------- metrics
def decision_metrics(scores: Sequence[float], y: Sequence[bool], threshold: float) -> dict:
    """Image-level metrics of the decision ``scores >= threshold`` (defect = positive class).

    Args:
        scores: ``N`` defect scores. y: ``N`` bool, True = defect. threshold: decision threshold.

    Returns:
        ``{"n", "n_defect", "threshold", "accuracy", "balanced_accuracy", "precision", "recall", "f1",
        "auroc", "confusion_matrix": [[TN, FP], [FN, TP]]}``; precision is 0.0 when nothing is called
        defect, balanced accuracy averages the recalls of the classes present, AUROC is ``None``
        when one class is absent, with ``"auroc_reason"`` saying so.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(y, bool)
    pred = s >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    recalls = [r for r, m in ((rec, tp + fn), (tn / (tn + fp) if tn + fp else 0.0, tn + fp)) if m]
    out = {
        "n": int(len(s)),
        "n_defect": int(y.sum()),
        "threshold": float(threshold),
        "accuracy": (tp + tn) / len(s) if len(s) else 0.0,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "auroc": auroc(s, y),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }
    if out["auroc"] is None:
        out["auroc_reason"] = "only one class in the split" if len(s) else "no images"
    return out


def f1_threshold(scores: Sequence[float], y: Sequence[bool]) -> float:
    """The val threshold: F1-optimal for defects (ties: higher balanced accuracy, then higher threshold).

    Candidates are every distinct score (decision ``score >= candidate``); the returned threshold is
    halfway between the chosen candidate and the next lower distinct score (the candidate itself
    when it is the lowest score), so the val decisions are those of the chosen candidate.

    Args:
        scores: ``N`` defect scores. y: ``N`` bool, True = defect.

    Raises:
        PipelineError: no scores.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(y, bool)
    if len(s) == 0:
        raise PipelineError("cannot choose a threshold on an empty val split")
    cands = np.unique(s)  # ascending
    best, best_key = 0, None
    for k, t in enumerate(cands):
        m = decision_metrics(s, y, t)
        key = (round(m["f1"], 12), round(m["balanced_accuracy"], 12), t)
        if best_key is None or key > best_key:
            best, best_key = k, key
    if best == 0:
        return float(cands[0])
    return float((cands[best] + cands[best - 1]) / 2.0)


# ------------------------------------------------------------------------------ fusion
@dataclass
class LogisticModel:
    """Logistic regression over standardised features: ``p = sigmoid(((x - mean) / std) @ w + b)``.

    Attributes:
        mean, std: ``D`` per-feature val mean and standard deviation (std 1 where constant).
        w: ``D`` weights. b: bias. l2: penalty used in the fit.
    """

    mean: np.ndarray
    std: np.ndarray
    w: np.ndarray
    b: float
    l2: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``NxD`` raw scores -> ``N`` defect probabilities in (0, 1)."""
        z = ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.w + self.b
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def to_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "weights": self.w.tolist(),
            "bias": float(self.b),
            "l2": self.l2,
        }


def fit_logistic(
    x: np.ndarray, y: Sequence[bool], *, l2: float = 1.0, balanced: bool = True, iterations: int = 50
) -> LogisticModel:
    """Fit L2-penalised logistic regression by Newton's method (IRLS).

    Minimises ``sum_i c_i * logloss_i + l2 * ||w||^2 / 2`` over weights ``w`` and an unpenalised bias,
    with ``c_i = N / (2 N_class(i))`` when ``balanced`` (each class weighs N/2) else 1. Features are
    standardised with their mean and standard deviation first. The penalty keeps the solution finite
    when val is perfectly separable.

    Args:
        x: ``NxD`` float scores (one column per source). y: ``N`` bool (True = defect).
        l2: penalty strength (> 0). iterations: Newton steps (stops early when the step is < 1e-10).

    Raises:
        PipelineError: only one class present in ``y`` (nothing to fit).
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, bool)
    if y.all() or not y.any():
        raise PipelineError("logistic fusion needs good and defect images in the val split")
    mean = x.mean(0)
    std = x.std(0)
    std = np.where(std > 0, std, 1.0)
    z = np.c_[(x - mean) / std, np.ones(len(x))]
    c = np.where(y, len(y) / (2 * y.sum()), len(y) / (2 * (~y).sum())) if balanced else np.ones(len(y))
    t = y.astype(np.float64)
    theta = np.zeros(z.shape[1])
    reg = np.r_[np.full(z.shape[1] - 1, l2), 0.0]
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ theta, -500, 500)))
        grad = z.T @ (c * (p - t)) + reg * theta
        hess = (z * (c * p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(theta))
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return LogisticModel(mean, std, theta[:-1], float(theta[-1]), float(l2))


def _or_scores(x: np.ndarray, thresholds: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return ((x - thresholds) / sd).max(1)


def _val_key(name: str, val: dict) -> tuple:
    """Sort key of a method by its VAL metrics (smaller = better): balanced accuracy, F1, then name."""
    return (-val["balanced_accuracy"], -val["f1"], name)


def check_pairs(val: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]]) -> None:
    """Val and test files name the same sources in the same order.

    Args:
        val, test: ``(path, kind)`` per file, in the order given.

    Raises:
        PipelineError: no test files, the two lists differ in length, or a pair differs in kind.
    """
    if len(val) != len(test) or not test:
        raise PipelineError(
            f"give the same prediction sources for val and test ({len(val)} val vs {len(test)} test files)"
        )
    for (vp, vk), (tp, tk) in zip(val, test):
        if vk != tk:
            raise PipelineError(
                f"{vp} ({vk}) and {tp} ({tk}): val and test files must be given in the same order and kinds"
            )


def fuse(
    val_sources: Sequence[Source],
    test_sources: Sequence[Source],
    val: SplitLabels,
    test: SplitLabels,
    *,
    l2: float = 1.0,
) -> dict:
    """Thresholds and every choice on val, metrics on val and test, per source and (two or more) fusion rule.

    Args:
        val_sources, test_sources: the same sources in the same order, scored on val and test.
        val, test: the splits' labels.
        l2: penalty of the logistic fusion.

    Returns:
        JSON-ready ``{"definitions", "val_gt", "test_gt", "image_root", "sources": [{"name", "kind",
        "val_path", "test_path", "threshold", "val": metrics, "test": metrics}], "fusion": {"or": {...},
        "logistic": {..., "model"}}, "better_fusion", "best", "chosen_on": "val", "choices" (:func:`choose`),
        "images": {"val": [...], "test": [...]}}``;
        each image record holds ``image_id``, ``file_name``, ``defect_type``, ``defect`` (truth) and
        ``scores`` / ``decisions`` by source and fusion name.

    Raises:
        PipelineError: the two lists differ in length or kinds.
    """
    check_pairs([(s.path, s.kind) for s in val_sources], [(s.path, s.kind) for s in test_sources])
    yv, yt = val.y, test.y
    xv = np.stack([s.scores for s in val_sources], 1)
    xt = np.stack([s.scores for s in test_sources], 1)
    names = [s.name for s in test_sources]
    thresholds = np.array([f1_threshold(xv[:, j], yv) for j in range(xv.shape[1])])
    out_sources = []
    scores_v = {n: xv[:, j] for j, n in enumerate(names)}
    scores_t = {n: xt[:, j] for j, n in enumerate(names)}
    thr = dict(zip(names, thresholds.tolist()))
    for j, (v, t) in enumerate(zip(val_sources, test_sources)):
        out_sources.append(
            {
                "name": t.name,
                "kind": t.kind,
                "val_path": str(Path(v.path).resolve()),
                "test_path": str(Path(t.path).resolve()),
                "threshold": float(thresholds[j]),
                "threshold_chosen_on": CHOSEN_ON,
                "val": decision_metrics(xv[:, j], yv, thresholds[j]),
                "test": decision_metrics(xt[:, j], yt, thresholds[j]),
            }
        )
    fusion: dict = {}
    if len(names) >= 2:
        fusion, fused_v, fused_t = _fusion_rules(xv, xt, yv, yt, thresholds, l2=l2)
        scores_v.update(fused_v)
        scores_t.update(fused_t)
        thr.update({f"fusion:{k}": v["threshold"] for k, v in fusion.items()})
    choices = choose(out_sources, fusion)
    return {
        "definitions": DEFINITIONS,
        "val_gt": str(Path(val.gt_path).resolve()),
        "test_gt": str(Path(test.gt_path).resolve()),
        "image_root": test.image_root,
        "sources": out_sources,
        "fusion": fusion,
        "thresholds": thr,
        "better_fusion": choices["better_fusion"],
        "best": choices["best"],
        "chosen_on": CHOSEN_ON,
        "choices": {**choices, "thresholds": CHOSEN_ON},
        "images": {"val": _image_records(val, scores_v, thr), "test": _image_records(test, scores_t, thr)},
    }


def _fusion_rules(
    xv: np.ndarray, xt: np.ndarray, yv: np.ndarray, yt: np.ndarray, thresholds: np.ndarray, *, l2: float
) -> tuple[dict, dict, dict]:
    """The ``or`` and ``logistic`` fusion of ``NxD`` source scores (val ``xv``, test ``xt``):
    ``({rule: {"rule", "threshold", ..., "val", "test"}}, val scores, test scores by "fusion:<rule>")``."""
    sd = xv.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    ov, ot = _or_scores(xv, thresholds, sd), _or_scores(xt, thresholds, sd)
    fusion = {
        "or": {
            "rule": "defect when any source scores >= its val threshold; score max_i (s_i - t_i) / sd_i",
            "threshold": 0.0,
            "source_sd": sd.tolist(),
            "val": decision_metrics(ov, yv, 0.0),
            "test": decision_metrics(ot, yt, 0.0),
        }
    }
    model = fit_logistic(xv, yv, l2=l2)
    pv, pt = model.predict(xv), model.predict(xt)
    t_lr = f1_threshold(pv, yv)
    fusion["logistic"] = {
        "rule": "L2 logistic regression on standardised val scores (IRLS, balanced); F1-optimal val threshold",
        "threshold": t_lr,
        "model": model.to_dict(),
        "val": decision_metrics(pv, yv, t_lr),
        "test": decision_metrics(pt, yt, t_lr),
    }
    return fusion, {"fusion:or": ov, "fusion:logistic": pv}, {"fusion:or": ot, "fusion:logistic": pt}


def choose(sources: list[dict], fusion: dict) -> dict:
    """Every choice of the fusion from VAL metrics only (:data:`CHOICE_RULE`); test metrics are not read.

    Args:
        sources: ``[{"name", "val": metrics, ...}]``. fusion: ``{rule: {"val": metrics, ...}}`` (may be empty).

    Returns:
        ``{"best": name, "better_fusion": rule | None, "gallery": method, "chosen_on": "val", "rule"}``:
        the best source or fusion, the better fusion rule (``None`` with one source), and the report
        gallery's method (``fusion:<better rule>``, or the best source without fusion).
    """
    rows = {s["name"]: s["val"] for s in sources}
    rows.update({f"fusion:{k}": v["val"] for k, v in fusion.items()})
    best = min(rows, key=lambda n: _val_key(n, rows[n]))
    better = min(fusion, key=lambda k: _val_key(k, fusion[k]["val"])) if fusion else None
    return {
        "best": best,
        "better_fusion": better,
        "gallery": f"fusion:{better}" if better else best,
        "chosen_on": CHOSEN_ON,
        "rule": CHOICE_RULE,
    }


def _image_records(labels: SplitLabels, scores: dict[str, np.ndarray], thr: dict[str, float]) -> list[dict]:
    """Per image of the split: its id, file, truth, and score and decision (``score >= thr``) by method."""
    return [
        {
            "image_id": iid,
            "file_name": fn,
            "defect_type": dt,
            "defect": dt != GOOD,
            "scores": {n: float(s[k]) for n, s in scores.items()},
            "decisions": {n: bool(s[k] >= thr[n]) for n, s in scores.items()},
        }
        for k, (iid, fn, dt) in enumerate(zip(labels.image_ids, labels.file_names, labels.defect_types))
    ]


def fuse_files(
    val_preds: Sequence[Path], test_preds: Sequence[Path], *, val_gt: Path, test_gt: Path, l2: float = 1.0
) -> dict:
    """:func:`fuse` from files: COCO ground truths of val and test and the prediction files of each split."""
    val, test = load_split_labels(val_gt), load_split_labels(test_gt)
    vs = [source_scores(p, val) for p in val_preds]
    ts = [source_scores(p, test) for p in test_preds]
    unique_names(vs)
    unique_names(ts)
    return fuse(vs, ts, val, test, l2=l2)


def summary_rows(result: dict) -> list[tuple[str, dict]]:
    """``[(name, test metrics)]`` for each source then each fusion rule, in display order."""
    rows = [(s["name"], s["test"]) for s in result["sources"]]
    rows += [(f"fusion:{k}", v["test"]) for k, v in result["fusion"].items()]
    return rows


def format_table(result: dict) -> str:
    """Plain-text table of the test metrics (thresholds from val), one line per source / fusion; the
    val balanced accuracy the choices rest on is the last column, ``*`` marks the best on val."""
    head = (
        f"{'source':32s} {'thr':>9s} {'acc':>6s} {'bacc':>6s} {'prec':>6s} {'rec':>6s} {'F1':>6s} {'AUROC':>6s}"
        f"  {'[[TN FP] [FN TP]]':20s} {'val bacc':>8s}"
    )
    lines = [head]
    val = {s["name"]: s["val"] for s in result["sources"]}
    val.update({f"fusion:{k}": v["val"] for k, v in result["fusion"].items()})
    for name, m in summary_rows(result):
        au = f"{m['auroc']:.3f}" if m["auroc"] is not None else "  n/a"
        mark = " *" if name == result["best"] else ""
        lines.append(
            f"{name[:32]:32s} {m['threshold']:9.4g} {m['accuracy']:6.3f} {m['balanced_accuracy']:6.3f} "
            f"{m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {au:>6s}  {str(m['confusion_matrix']):20s} "
            f"{val[name]['balanced_accuracy']:8.3f}{mark}"
        )
    return "\n".join(lines)
