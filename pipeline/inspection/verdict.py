"""The image-level decision of a bundle: chosen on the split's val images, applied to new images.

Sources (a defect score per image, the definitions of :mod:`pipeline.evaluation.fusion`):
``detector`` the highest box score (0 without boxes), ``classifier`` ``1 - p(good)``, ``anomaly``
the PatchCore image score. SAM refines the detector's boxes into masks and is no source of its own
(its mask scores are the box scores).

Choice, on val only: each source's threshold by :func:`pipeline.evaluation.fusion.f1_threshold`;
with one source the rule is ``single`` (``score >= threshold``); with two or more, both fusion rules
of :mod:`pipeline.evaluation.fusion` (``or`` over the val-standardised margins, ``logistic``) are fitted
on val and :func:`pipeline.evaluation.fusion.choose` keeps the better one (higher val balanced
accuracy, then F1, then the name): the rule ``pipeline evaluate`` calls ``better_fusion``, so an
inspected image gets the verdict that evaluate's val-chosen fused decision gives it.

Confidence of a verdict, in ``[0.5, 1]``: ``sigmoid(|margin|)`` with the margin in val standard
deviations (``(s - t) / sd`` for ``single``, the ``or`` score itself), and for ``logistic`` the fitted
probability of the verdict given (``p`` or ``1 - p``). 0.5 means "on the threshold".
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.data.mvtec import GOOD

DEFECT = "defect"
SOURCES = ("detector", "classifier", "anomaly")  # the order of the fused score's columns


def choose_decision(val_scores: Mapping[str, np.ndarray], y: np.ndarray) -> dict:
    """The decision rule chosen on val (module docstring), JSON-ready.

    Args:
        val_scores: source name -> ``N`` float defect scores of the val images.
        y: ``N`` bool, True = defect.

    Returns:
        ``{"chosen_on": "val", "sources", "thresholds", "source_sd", "rule", "threshold",
        "logistic" (model and threshold, two or more sources), "val": {name: metrics}}``.

    Raises:
        PipelineError: no sources, or a val split without both good and defect images.
    """
    from pipeline.evaluation.fusion import choose, decision_metrics, f1_threshold, fit_logistic

    names = [s for s in SOURCES if s in val_scores]
    y = np.asarray(y, bool)
    if not names:
        raise PipelineError("no image-level source (give --anomaly, --classifier or --detector)")
    if y.all() or not y.any():
        raise PipelineError("the split's val images must hold good and defect images to choose thresholds")
    x = np.stack([np.asarray(val_scores[s], np.float64) for s in names], 1)
    thr = np.array([f1_threshold(x[:, j], y) for j in range(len(names))])
    sd = x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    out = {
        "chosen_on": "val",
        "sources": names,
        "thresholds": dict(zip(names, thr.tolist())),
        "source_sd": dict(zip(names, sd.tolist())),
        "val": {n: decision_metrics(x[:, j], y, thr[j]) for j, n in enumerate(names)},
    }
    if len(names) == 1:
        out.update(rule="single", threshold=float(thr[0]))
        return out
    model = fit_logistic(x, y)
    p = model.predict(x)
    t_lr = f1_threshold(p, y)
    out["logistic"] = {**model.to_dict(), "threshold": t_lr}
    out["val"]["fusion:or"] = decision_metrics(((x - thr) / sd).max(1), y, 0.0)
    out["val"]["fusion:logistic"] = decision_metrics(p, y, t_lr)
    per_source = [{"name": n, "val": out["val"][n]} for n in names]
    rules = {r: {"val": out["val"][f"fusion:{r}"]} for r in ("or", "logistic")}
    rule = choose(per_source, rules)["better_fusion"]
    out.update(rule=rule, threshold=t_lr if rule == "logistic" else 0.0)
    return out


def fused_score(decision: Mapping, scores: Mapping[str, float]) -> float:
    """The decision score of one image under ``decision`` (``>= decision["threshold"]`` -> defect)."""
    names = decision["sources"]
    x = np.array([float(scores[s]) for s in names], np.float64)
    thr = np.array([decision["thresholds"][s] for s in names])
    sd = np.array([decision["source_sd"][s] for s in names])
    if decision["rule"] == "single":
        return float(x[0])
    if decision["rule"] == "or":
        return float(((x - thr) / sd).max())
    from pipeline.evaluation.fusion import LogisticModel

    lr = decision["logistic"]
    arr = {k: np.asarray(lr[k], np.float64) for k in ("mean", "std", "weights")}
    model = LogisticModel(arr["mean"], arr["std"], arr["weights"], float(lr["bias"]), float(lr["l2"]))
    return float(model.predict(x[None])[0])


def decide(decision: Mapping, scores: Mapping[str, float], *, defect_type: str | None = None) -> dict:
    """Verdict of one image from its per-source scores.

    Args:
        decision: :func:`choose_decision`'s result (``bundle.yaml``'s ``decision``).
        scores: source -> defect score, for every source of the decision.
        defect_type: the defect class the models name (classifier, else detector), if any.

    Returns:
        ``{"verdict": "good" | "defect", "defect_type" (None for good), "fused_score", "confidence",
        "reason"}``; the reason says which source fired against its threshold, e.g.
        ``"defect: anomaly 3.1 >= 2.4; classifier 0.12 < 0.5 (rule or)"``.
    """
    missing = [s for s in decision["sources"] if s not in scores]
    if missing:
        raise PipelineError(f"no score from {', '.join(missing)} (the bundle's decision needs it)")
    f = fused_score(decision, scores)
    defect = f >= decision["threshold"]
    if decision["rule"] == "logistic":
        conf = f if defect else 1.0 - f
    else:
        s0 = decision["sources"][0]
        margin = f if decision["rule"] == "or" else (f - decision["threshold"]) / decision["source_sd"][s0]
        conf = 1.0 / (1.0 + np.exp(-abs(margin)))
    parts = []
    for s in decision["sources"]:
        t = decision["thresholds"][s]
        parts.append(f"{s} {scores[s]:.4g} {'>=' if scores[s] >= t else '<'} {t:.4g}")
    verdict = DEFECT if defect else GOOD
    rule = decision["rule"]
    tail = "" if rule == "single" else f" (rule {rule}: {f:.4g} {'>=' if defect else '<'} {decision['threshold']:.4g})"
    return {
        "verdict": verdict,
        "defect_type": (defect_type or None) if defect else None,
        "fused_score": f,
        "confidence": float(conf),
        "reason": f"{verdict}: {'; '.join(parts)}{tail}",
    }
