"""Long-tail handling for the image classifier: ``good`` is the head, the defect types the tail.

1. **Class-balanced weights** (Cui et al., "Class-Balanced Loss Based on Effective Number of
   Samples", CVPR 2019). The effective number of a class with ``n`` samples is
   ``E_n = (1 - beta**n) / (1 - beta)``; its weight is ``1 / E_n``, normalised so that the weights
   sum to the number of classes. Used either as loss weights (``reweight``) or as per-sample
   sampling probabilities (``resample``, sampling with replacement).

2. **Feature synthesis** on the frozen features of the trained embedding network (decoupled
   two-stage training: the pooled features of the training images are extracted once, in eval
   mode, synthetic tail features are added until every class reaches the target count, and only the
   classifier head is retrained on real + synthetic features: fresh initialisation, AdamW,
   cross-entropy with the run's label smoothing). Two generators:

   - ``interpolate`` (the design's method, after Xu et al., ECCV 2022, who construct balance in the
     learned feature space): points on segments between two real features of the class, or towards
     the class mean (:mod:`pipeline.models.classifier.synthesis`).
   - ``gaussian``: draws from one Gaussian per class (mean = class mean; covariance = the class
     covariance shrunk towards the pooled within-class covariance by ``shrinkage``, plus a small
     ridge), so few-shot tail classes borrow the covariance shape of the head; clipped below at the
     real features' minimum. This is distribution calibration (Yang et al., "Free Lunch for Few-shot
     Learning: Distribution Calibration", ICLR 2021) without its Tukey transform and base-class
     neighbour selection; ``feature_rebalance: true`` is its older name.

3. **DLSA** (Xu et al., ECCV 2022, the paper's own method): a Gaussian-mixture normalising flow per
   stage, the likelihood filter, cluster-aided classifiers and the staged cascade replace the head
   (:mod:`pipeline.models.classifier.dlsa`, whose docstring lists what differs from the paper).

:func:`longtail_step` runs 2 or 3 on a trained classifier; :func:`fit_feature_head` fits any of the
methods on a fixed feature set (the benchmark ``benchmarks/longtail.py`` and the tests use it).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.models.classifier.config import ClassifierConfig, LongTailConfig
from pipeline.models.classifier.data import ImageSet
from pipeline.models.classifier.predict import extract_features
from pipeline.models.classifier.synthesis import BalancedFeatures, interpolate_balanced, target_count

FEATURE_METHODS = ("plain", "reweight", "resample", "gaussian", "interpolate", "dlsa")


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
    target_ratio: float = 1.0,
    shrinkage: float = 0.5,
    seed: int = 0,
) -> BalancedFeatures:
    """Add Gaussian synthetic features to every class below the target count
    (:func:`pipeline.models.classifier.synthesis.target_count`: ``target``, else ``target_ratio`` x the head's count).

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
    target = target_count(counts, target=target, target_ratio=target_ratio)
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
    class_weights: Sequence[float] | None = None,
    sample_probs: Sequence[float] | None = None,
) -> list[float]:
    """Retrain ``head`` (an ``nn.Module`` mapping N x D features to N x C logits) in place.

    Re-initialises every sub-module with ``reset_parameters`` when ``reset`` (decoupled classifier
    retraining), then runs AdamW over shuffled mini-batches. ``class_weights``: cross-entropy weights
    per class; ``sample_probs``: each epoch draws N samples with replacement with these probabilities
    instead of a permutation. Returns the mean loss of each epoch.
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
    weight = None if class_weights is None else torch.as_tensor(np.asarray(class_weights), dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing).to(device)
    gen = torch.Generator().manual_seed(seed)
    probs = None if sample_probs is None else torch.as_tensor(np.asarray(sample_probs), dtype=torch.float64)
    losses = []
    for _ in range(epochs):
        if probs is None:
            order = torch.randperm(len(y), generator=gen).to(device)
        else:
            order = torch.multinomial(probs, len(y), replacement=True, generator=gen).to(device)
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


def synthesize(features: np.ndarray, labels: np.ndarray, num_classes: int, lt: LongTailConfig, seed: int):
    """The :class:`BalancedFeatures` of ``lt.synthesis`` (``gaussian`` or ``interpolate``)."""
    if lt.synthesis == "interpolate":
        return interpolate_balanced(
            features,
            labels,
            num_classes,
            target=lt.fr_target,
            target_ratio=lt.target_ratio,
            mean_fraction=lt.interp_mean_fraction,
            seed=seed,
        )
    return synthesize_balanced(
        features,
        labels,
        num_classes,
        target=lt.fr_target,
        target_ratio=lt.target_ratio,
        shrinkage=lt.fr_shrinkage,
        seed=seed,
    )


def dlsa_settings(lt: LongTailConfig):
    """The :class:`pipeline.models.classifier.dlsa.DLSASettings` of the ``longtail.dlsa_*`` keys."""
    from pipeline.models.classifier.dlsa import DLSASettings

    return DLSASettings(
        stages=lt.dlsa_stages,
        ratio=lt.dlsa_ratio,
        flow_blocks=lt.dlsa_flow_blocks,
        flow_hidden=lt.dlsa_flow_hidden,
        flow_hidden_layers=lt.dlsa_flow_hidden_layers,
        flow_epochs=lt.dlsa_flow_epochs,
        flow_lr=lt.dlsa_flow_lr,
        center_std=lt.dlsa_center_std,
        weight_q=lt.dlsa_weight_q,
        cls_epochs=lt.dlsa_cls_epochs,
        cls_lr=lt.dlsa_cls_lr,
    )


def linear_of(head, dim: int):
    """``(W, b)`` numpy arrays of ``head`` when it is a linear classifier on ``dim`` features (a
    ``Linear``, or ``Dropout`` + ``Linear``), else ``None``."""
    import torch

    lins = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    if len(lins) != 1 or lins[0].in_features != dim:
        return None
    return lins[0].weight.detach().cpu().numpy(), lins[0].bias.detach().cpu().numpy()


def fit_feature_head(
    method: str,
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    lt: LongTailConfig | None = None,
    *,
    seed: int = 0,
    label_smoothing: float = 0.0,
):
    """Fit a classifier on fixed features ``N x D`` with one long-tail ``method`` of
    :data:`FEATURE_METHODS`: a linear head trained plainly, with class-balanced loss weights or
    sampling (``lt.cb_beta``), on real + synthetic features (gaussian, interpolate), or the DLSA
    cascade (started from the plain linear head, as DLSA starts from the trained classifier).
    Head training uses ``lt.fr_epochs``, ``fr_lr``, ``fr_batch_size``.

    Returns:
        ``(head, info)``: an ``nn.Module`` mapping ``N x D`` float32 features to ``N x C`` logits (eval
        mode, CPU) and a dict (counts after synthesis, or the DLSA report).

    Raises:
        ValueError: an unknown method.
    """
    import torch

    if method not in FEATURE_METHODS:
        raise ValueError(f"unknown method {method!r} (expected one of {', '.join(FEATURE_METHODS)})")
    lt = lt or LongTailConfig()
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    counts = np.bincount(y, minlength=num_classes)
    train = dict(epochs=lt.fr_epochs, lr=lt.fr_lr, batch_size=lt.fr_batch_size, label_smoothing=label_smoothing)
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes)
    info: dict = {}
    if method in ("gaussian", "interpolate"):
        from dataclasses import replace

        bal = synthesize(x, y, num_classes, replace(lt, feature_synthesis=method), seed)
        x, y = bal.features, bal.labels
        info["counts_after"] = bal.counts(num_classes).tolist()
    cw = class_balanced_weights(np.maximum(counts, 1), lt.cb_beta)
    retrain_head(
        head,
        x,
        y,
        seed=seed,
        class_weights=cw if method == "reweight" else None,
        sample_probs=sample_weights(y, cw) if method == "resample" else None,
        **train,
    )
    if method == "dlsa":
        from pipeline.models.classifier.dlsa import fit_dlsa

        head, info = fit_dlsa(x, y, num_classes, dlsa_settings(lt), init=linear_of(head, x.shape[1]), seed=seed)
    return head.eval(), info


def longtail_step(model, train_set: ImageSet, cfg: ClassifierConfig, device: str) -> dict | None:
    """The post-training long-tail step of ``cfg.longtail`` on a trained classifier, in place
    (``model`` is left in eval mode); ``None`` when there is none.

    - ``feature_synthesis`` (``gaussian``/``interpolate``): extract the pooled training features,
      add synthetic tail features (module docstring, point 2) and retrain ``model.head``.
    - ``method: dlsa``: fit the DLSA cascade on the features and make it ``model.head``; the report's
      ``"head"`` is the :meth:`pipeline.models.classifier.dlsa.DLSAHead.spec` the checkpoint must keep
      (:func:`pipeline.models.classifier.model.model_from_checkpoint` rebuilds the head from it).

    Returns:
        ``{"step", "counts_before", ...}``: for synthesis ``"counts_after"``, ``"n_synthetic"``,
        ``"head_loss_first_last"``; for DLSA ``"head"``, ``"thresholds"``, ``"stage_counts"``,
        ``"stages_used"``, ``"train_stage_sizes"``.
    """
    lt = cfg.longtail
    if lt.synthesis == "none" and lt.method == "none":
        return None
    feats = extract_features(model, train_set, cfg, device)
    labels = train_set.labels.numpy()
    n_classes = len(train_set.classes)
    out: dict = {"counts_before": np.bincount(labels, minlength=n_classes).tolist()}
    if lt.method == "dlsa":
        from pipeline.models.classifier.dlsa import fit_dlsa

        head, rep = fit_dlsa(
            feats, labels, n_classes, dlsa_settings(lt), init=linear_of(model.head, feats.shape[1]), seed=cfg.train.seed
        )
        model.head = head.to(device)
        model.eval()
        stage_of = np.asarray(rep["stage_of"])
        sizes = np.bincount(stage_of, minlength=lt.dlsa_stages + 1).tolist()
        keep = ("thresholds", "stage_counts", "stages_used", "flow_loss_first_last")
        return {"step": "dlsa", **out, "head": head.spec(), "train_stage_sizes": sizes, **{k: rep[k] for k in keep}}
    bal = synthesize(feats, labels, n_classes, lt, cfg.train.seed)
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
        "step": lt.synthesis,
        **out,
        "counts_after": bal.counts(n_classes).tolist(),
        "n_synthetic": int(bal.synthetic.sum()),
        "head_loss_first_last": [losses[0], losses[-1]] if losses else None,
    }
