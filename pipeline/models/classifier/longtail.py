"""Long-tail handling for the image classifier: ``good`` is the head, the defect types the tail.

1. **Class-balanced weights** (Cui et al., "Class-Balanced Loss Based on Effective Number of
   Samples", CVPR 2019). The effective number of a class with ``n`` samples is
   ``E_n = (1 - beta**n) / (1 - beta)``; its weight is ``1 / E_n``, normalised so that the weights
   sum to the number of classes. Used either as loss weights (``reweight``) or as per-sample
   sampling probabilities (``resample``, sampling with replacement).

2. **Feature-space rebalancing** after Xu et al., "Constructing Balance from Imbalance for
   Long-tailed Image Recognition" (ECCV 2022, DLSA). What is implemented, and how:

   - *Decoupled two-stage training* (which DLSA builds on: the paper works on the features of an
     already trained backbone): the embedding network is trained first; its pooled features of the
     training images are then extracted once, in eval mode, and only the classifier head is retrained.
   - *A generative model of the learned feature space*: DLSA fits a Gaussian-mixture model in the
     latent space of a normalising flow (FlowGMM). Here the flow is the identity and the mixture has
     one Gaussian per class (mean = class mean; covariance = the class covariance shrunk towards the
     pooled within-class covariance by ``shrinkage``, plus a small ridge), so few-shot tail classes
     borrow the covariance structure learned from the head.
   - *Constructing a balanced set*: synthetic feature vectors are drawn from each tail class's
     Gaussian until every class has ``target`` features (default: the head's count). Synthetic
     features are clipped below at the minimum of the real features (0 after ReLU pooling).
   - *Retraining the head* on real + synthetic features (fresh initialisation, AdamW, cross-entropy
     with the run's label smoothing).

   Not implemented: the normalising flow itself, DLSA's contrastive cluster-purity and balance
   losses, the likelihood-based filtering that routes confidently clustered samples to a
   cluster-aided classifier, and the progressive (recursive) label-space division. Generating
   synthetic tail features, as asked here, is closer to distribution calibration (Yang et al.,
   ICLR 2021) than to DLSA's sample filtering; the two share the Gaussian model of feature space.
   :func:`feature_rebalance` runs the three steps on a trained classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipeline.models.classifier.config import ClassifierConfig
from pipeline.models.classifier.data import ImageSet
from pipeline.models.classifier.predict import extract_features


def effective_number(counts: Sequence[int], beta: float) -> np.ndarray:
    """``(1 - beta**n) / (1 - beta)`` per class; float64, same length as ``counts``."""
    n = np.asarray(counts, np.float64)
    return (1.0 - np.power(beta, n)) / (1.0 - beta)


def class_balanced_weights(counts: Sequence[int], beta: float = 0.999) -> np.ndarray:
    """Per-class weights ``1 / E_n`` normalised to sum to the number of classes (Cui et al. 2019).

    Args:
        counts: images per class (every count >= 1).
        beta: in (0, 1); ``beta -> 0`` gives equal weights, ``beta -> 1`` inverse frequency.

    Returns:
        float64 array of length ``len(counts)``.

    Raises:
        ValueError: a count below 1 or beta outside (0, 1) (programming errors: the caller checks
            user input first).
    """
    c = np.asarray(counts, np.float64)
    if c.size == 0 or c.min() < 1:
        raise ValueError(f"every class needs at least one sample (counts {list(counts)})")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta {beta} not in (0, 1)")
    w = 1.0 / effective_number(c, beta)
    return w * (len(c) / w.sum())


def sample_weights(labels: Sequence[int], class_weights: Sequence[float]) -> np.ndarray:
    """Per-sample sampling probabilities (sum 1) from per-class weights."""
    lab = np.asarray(labels, np.int64)
    w = np.asarray(class_weights, np.float64)[lab]
    return w / w.sum()


@dataclass(frozen=True)
class BalancedFeatures:
    """A balanced feature set: ``features`` (N x D float32), ``labels`` (N int64), ``synthetic`` (N bool)."""

    features: np.ndarray
    labels: np.ndarray
    synthetic: np.ndarray

    def counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


def class_gaussians(
    features: np.ndarray, labels: np.ndarray, num_classes: int, *, shrinkage: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class means (C x D) and shrunk covariances (C x D x D) of a feature set.

    ``cov_c = (1 - shrinkage) * S_c + shrinkage * S_pooled + ridge * I`` with ``S_c`` the class's
    sample covariance (zero for a single sample), ``S_pooled`` the pooled within-class covariance,
    and ``ridge = 1e-4 * trace(S_pooled) / D`` (at least 1e-8) to keep it positive definite.
    """
    x = np.asarray(features, np.float64)
    y = np.asarray(labels, np.int64)
    d = x.shape[1]
    means = np.zeros((num_classes, d))
    covs = np.zeros((num_classes, d, d))
    centred = np.zeros_like(x)
    for c in range(num_classes):
        xc = x[y == c]
        if len(xc) == 0:
            continue
        means[c] = xc.mean(0)
        centred[y == c] = xc - means[c]
        if len(xc) > 1:
            covs[c] = np.cov(xc, rowvar=False).reshape(d, d)
    dof = max(len(x) - len(np.unique(y)), 1)
    pooled = centred.T @ centred / dof
    ridge = max(1e-4 * np.trace(pooled) / d, 1e-8)
    covs = (1.0 - shrinkage) * covs + shrinkage * pooled[None] + ridge * np.eye(d)[None]
    return means, covs


def synthesize_balanced(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    target: int = 0,
    shrinkage: float = 0.5,
    seed: int = 0,
) -> BalancedFeatures:
    """Add synthetic features to every class below ``target`` (0 = the largest class's count).

    Args:
        features: N x D real features (float).
        labels: N class indices in ``[0, num_classes)``; every class needs at least one sample.
        target: features per class after balancing.
        shrinkage: see :func:`class_gaussians`.
        seed: numpy generator seed (deterministic).

    Returns:
        The real features followed by the synthetic ones.
    """
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    counts = np.bincount(y, minlength=num_classes)
    if counts.min() < 1:
        raise ValueError(f"every class needs at least one real feature (counts {counts.tolist()})")
    target = int(target) or int(counts.max())
    means, covs = class_gaussians(x, y, num_classes, shrinkage=shrinkage)
    rng = np.random.default_rng(seed)
    floor = x.min(0)
    new_x, new_y = [x], [y]
    for c in range(num_classes):
        k = target - int(counts[c])
        if k <= 0:
            continue
        vals, vecs = np.linalg.eigh(covs[c])
        root = vecs * np.sqrt(np.clip(vals, 0, None))[None]
        z = rng.standard_normal((k, x.shape[1]))
        s = means[c][None] + z @ root.T
        new_x.append(np.maximum(s, floor[None]).astype(np.float32))
        new_y.append(np.full(k, c, np.int64))
    feats = np.concatenate(new_x)
    labs = np.concatenate(new_y)
    synthetic = np.zeros(len(labs), bool)
    synthetic[len(y) :] = True
    return BalancedFeatures(feats, labs, synthetic)


def retrain_head(
    head,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int = 200,
    lr: float = 1e-3,
    batch_size: int = 128,
    label_smoothing: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    reset: bool = True,
) -> list[float]:
    """Retrain ``head`` (an ``nn.Module`` mapping N x D features to N x C logits) in place.

    Re-initialises every sub-module with ``reset_parameters`` when ``reset`` (decoupled classifier
    retraining), then runs AdamW over shuffled mini-batches. Returns the mean loss of each epoch.
    """
    import torch

    torch.manual_seed(seed)
    if reset:
        for m in head.modules():
            if hasattr(m, "reset_parameters") and m is not head:
                m.reset_parameters()
    head.to(device).train()
    x = torch.as_tensor(np.asarray(features, np.float32), device=device)
    y = torch.as_tensor(np.asarray(labels, np.int64), device=device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen).to(device)
        total = 0.0
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2 and any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()):
                continue
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(y))
    head.eval()
    return losses


def feature_rebalance(model, train_set: ImageSet, cfg: ClassifierConfig, device: str) -> dict:
    """Feature-space rebalancing (module docstring, point 2) of a trained classifier: extract the
    pooled training features, balance them with synthetic tail features and retrain ``model.head``
    in place (``cfg.longtail.fr_*`` settings); ``model`` is left in eval mode.

    Returns:
        ``{"counts_before", "counts_after"}`` (features per class), ``"n_synthetic"`` and
        ``"head_loss_first_last"`` (mean loss of the first and last head epoch, or None).
    """
    lt = cfg.longtail
    feats = extract_features(model, train_set, cfg, device)
    labels = train_set.labels.numpy()
    n_classes = len(train_set.classes)
    bal = synthesize_balanced(
        feats, labels, n_classes, target=lt.fr_target, shrinkage=lt.fr_shrinkage, seed=cfg.train.seed
    )
    losses = retrain_head(
        model.head,
        bal.features,
        bal.labels,
        epochs=lt.fr_epochs,
        lr=lt.fr_lr,
        batch_size=lt.fr_batch_size,
        label_smoothing=cfg.train.label_smoothing,
        weight_decay=cfg.train.weight_decay,
        seed=cfg.train.seed,
        device=device,
    )
    model.eval()
    return {
        "counts_before": np.bincount(labels, minlength=n_classes).tolist(),
        "counts_after": bal.counts(n_classes).tolist(),
        "n_synthetic": int(bal.synthetic.sum()),
        "head_loss_first_last": [losses[0], losses[-1]] if losses else None,
    }
