"""Synthetic tail features by interpolation in a learned feature space (the design's long-tail method).

After the embedding network is trained, its pooled features of the training images are extracted
once; for every class below the target count, synthetic features are drawn on segments between
two real features of that class,

    ``s = (1 - lam) * x_i + lam * x_j``,  ``lam ~ U(0, 1)``,  ``i != j`` drawn uniformly from the class,

or, for a fraction ``mean_fraction`` of the synthetic features, on the segment from one real
feature towards the class mean ``m_c`` (``s = (1 - lam) * x_i + lam * m_c``). Every synthetic
feature is a convex combination of real same-class features (the mean is one too), so it stays
inside the class's convex hull: this is feature-space interpolation in the spirit of SMOTE (Chawla
et al., JAIR 2002) and of the design, which follows Xu et al., ECCV 2022 in retraining the
classifier on real plus synthetic features with ``good`` as the head. A class with a single real
feature can only repeat it (both endpoints are that feature).

The target count of a class is ``target`` when given, else ``round(target_ratio * n_head)`` with
``n_head`` the largest class's count (``target_ratio = 1``: every class as large as the head).
:class:`BalancedFeatures` records, for each synthetic row, its two endpoints (row indices into the
real features; ``-1`` for the class mean) and ``lam``, so that the claim can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MEAN = -1  # endpoint index meaning "the class mean"


@dataclass(frozen=True)
class BalancedFeatures:
    """A balanced feature set: ``features`` (N x D float32), ``labels`` (N int64), ``synthetic`` (N bool).

    ``endpoints`` (N x 2 int64) and ``weights`` (N float64) are filled by :func:`interpolate_balanced`:
    for a synthetic row ``r``, ``features[r] = (1 - weights[r]) * a + weights[r] * b`` with ``a, b`` the
    real features ``endpoints[r]`` (``-1``: the class mean of the real features); real rows hold
    ``(r, r)`` and 0. Other generators leave them empty (shape ``(0, 2)`` and ``(0,)``).
    """

    features: np.ndarray
    labels: np.ndarray
    synthetic: np.ndarray
    endpoints: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


def target_count(counts: np.ndarray, *, target: int = 0, target_ratio: float = 1.0) -> int:
    """Features per class after balancing: ``target`` when > 0, else ``round(target_ratio * max(counts))``."""
    return int(target) if target > 0 else int(round(target_ratio * int(np.max(counts))))


def interpolate_balanced(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    target: int = 0,
    target_ratio: float = 1.0,
    mean_fraction: float = 0.0,
    seed: int = 0,
) -> BalancedFeatures:
    """Add interpolated features to every class below the target count (module docstring).

    Args:
        features: N x D real features (float).
        labels: N class indices in ``[0, num_classes)``; every class needs at least one sample.
        target, target_ratio: see :func:`target_count`; classes at or above it get nothing.
        mean_fraction: in [0, 1], the share of synthetic features whose second endpoint is the class mean.
        seed: numpy generator seed (deterministic).

    Returns:
        The real features followed by the synthetic ones, with endpoints and weights recorded.

    Raises:
        ValueError: a class without features, or ``mean_fraction`` outside [0, 1] (programming errors:
            the config loader checks user input).
    """
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    counts = np.bincount(y, minlength=num_classes)
    if counts.min() < 1:
        raise ValueError(f"every class needs at least one real feature (counts {counts.tolist()})")
    if not 0.0 <= mean_fraction <= 1.0:
        raise ValueError(f"mean_fraction {mean_fraction} not in [0, 1]")
    n_target = target_count(counts, target=target, target_ratio=target_ratio)
    rng = np.random.default_rng(seed)
    new_x, new_y = [x], [y]
    ends = [np.stack([np.arange(len(y)), np.arange(len(y))], 1)]
    lams = [np.zeros(len(y))]
    for c in range(num_classes):
        k = n_target - int(counts[c])
        if k <= 0:
            continue
        rows = np.flatnonzero(y == c)
        mean = x[rows].astype(np.float64).mean(0)
        i = rows[rng.integers(0, len(rows), k)]
        if len(rows) > 1:  # a second, different endpoint of the same class
            shift = rng.integers(1, len(rows), k)
            j = rows[(np.searchsorted(rows, i) + shift) % len(rows)]
        else:
            j = i.copy()
        to_mean = rng.random(k) < mean_fraction
        j = np.where(to_mean, MEAN, j)
        lam = rng.random(k)
        b = np.where(to_mean[:, None], mean[None], x[np.maximum(j, 0)].astype(np.float64))
        s = (1.0 - lam[:, None]) * x[i].astype(np.float64) + lam[:, None] * b
        new_x.append(s.astype(np.float32))
        new_y.append(np.full(k, c, np.int64))
        ends.append(np.stack([i, j], 1))
        lams.append(lam)
    feats = np.concatenate(new_x)
    labs = np.concatenate(new_y)
    synthetic = np.zeros(len(labs), bool)
    synthetic[len(y) :] = True
    return BalancedFeatures(feats, labs, synthetic, np.concatenate(ends).astype(np.int64), np.concatenate(lams))
