"""ROC, PR and AUROC of binary scores: the one implementation every evaluator and plot uses.

Scores are real numbers, higher = more likely positive (the defect class); ``positive`` is a bool
per score. Thresholds are the distinct scores; a score is called positive when ``score >= t``.
Plain numpy, no scikit-learn.
"""

from __future__ import annotations

import numpy as np


def binary_auroc(scores, positive) -> float | None:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half).

    Args:
        scores: ``N`` scores, higher = more likely positive (defect).
        positive: ``N`` bools, True = positive.

    Returns:
        AUROC in [0, 1], or ``None`` when one of the two classes is absent (undefined).
    """
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(positive).astype(bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    neg = np.sort(s[~y])
    below = np.searchsorted(neg, s[y], side="left")  # negatives strictly lower than each positive
    ties = np.searchsorted(neg, s[y], side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (n_pos * n_neg))


def _counts_at_thresholds(scores, positive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives called at each distinct score, high to low: ``(tps, fps, n_called)``."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(positive).astype(bool).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    return np.cumsum(y)[last], np.cumsum(~y)[last], last + 1


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` ascending, one point per distinct threshold, starting at (0, 0)."""
    y = np.asarray(positive).astype(bool).ravel()
    tps, fps, _ = _counts_at_thresholds(scores, y)
    return np.r_[0.0, fps / max(int((~y).sum()), 1)], np.r_[0.0, tps / max(int(y.sum()), 1)]


def pr_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    """``(recall, precision)`` of the positive class, one point per distinct threshold, high to low."""
    y = np.asarray(positive).astype(bool).ravel()
    tps, _, called = _counts_at_thresholds(scores, y)
    return tps / max(int(y.sum()), 1), tps / called
