"""DLSA: Dynamic Label Space Adjustment (Xu et al., "Constructing Balance from Imbalance for
Long-tailed Image Recognition", ECCV 2022), on frozen features of a trained embedding network.

Sources: the paper (its method section: a Gaussian-mixture flow filter, a cluster-aided classifier,
stages that divide the data) and its public code (github.com/silicx/DLSA: ``models/Flows.py``,
``models/FlowGMM.py``, ``train_dlsa.py``, ``solvers/*.py``, ``models/losses.py``,
``config/ImgNet_PaCo_R50_bsm.yaml``), which fixes the details below. Only the paper's introduction
could be read here, so equations are tied to the public code and to the papers it builds on.
Features ``x`` are ``N x D`` float32; ``C`` classes; ``S`` stages.

1. **Flow** ``u = f(x)`` (MAF, Papamakarios et al., NeurIPS 2017, Sec. 3; as ``models/Flows.py``):
   ``flow_blocks`` blocks of [MADE layer, batch-norm layer]. A MADE layer (Germain et al., ICML 2015)
   computes ``u_i = (x_i - m_i(x_<i)) * exp(-a_i(x_<i))`` with masked linear layers (``flow_hidden_layers``
   hidden layers of width ``flow_hidden``, ReLU), ``log|det| = -sum_i a_i``; the variable order is
   reversed from one block to the next. The batch-norm layer (RealNVP, Dinh et al., ICLR 2017,
   Sec. 3.7) is ``y = exp(g) * (x - mu) / sqrt(var + eps) + b`` with ``log|det| = sum(g - log(var + eps) / 2)``
   (batch statistics in training, running ones, momentum 0.9, in eval).
2. **Gaussian-mixture base** (FlowGMM, Izmailov et al., ICML 2020, Sec. 3): ``p(u) = sum_k N(u; mu_k, I) / C``
   with **one component per class** and fixed means ``mu_k ~ N(0, center_std**2 I)``, so
   ``log p(x, k) = log N(f(x); mu_k, I) + log|det df/dx| - log C`` and ``log p(x) = logsumexp_k log p(x, k)``
   (``models/FlowGMM.py``). The flow is trained on the labelled objective ``-log p(x | y)`` (FlowGMM's
   supervised term), weighted per class by ``((n_max / n_y) ** weight_q)`` normalised over classes,
   on class-balanced draws (``utils/datasets.py: ContrastiveDataset``).
3. **Adaptive filter** (``train_dlsa.py: divide_and_conquer``, ``filter.llh_proportion``): in each
   stage the threshold ``t_s`` is the ``(1 - ratio)`` quantile of ``log p(x)`` over the stage's training
   samples (``sorted(llh)[int(n * (1 - ratio))]``); samples with ``log p(x) >= t_s`` (explained well by
   the flow) leave the stage and are classified by its cluster-aided classifier; the others go on.
4. **Cluster-aided classifier** (``models/Classifiers.py``, ``solvers/cluster_aided_classifier.py``):
   ``logits = W_x x + W_p p + b`` with ``p = P_s[argmax_k log p(x, k)]`` the cluster prior: row ``k``
   of ``P_s`` is the class histogram of the training samples whose most likely component is ``k``
   (over all training samples, as the public code). Trained on the samples filtered at this stage.
5. **Label space divided stage by stage**: the samples that go on are those of the classes the flow
   explains badly, so each stage sees a smaller, more balanced label distribution; after ``S`` stages
   a regular linear classifier ``W x + b`` is trained on what is left (``train_dlsa.py``, ``max_depth``).
6. **Losses of the classifiers**: balanced softmax (Ren et al., NeurIPS 2020): cross-entropy of
   ``logits + log(n_c + 1e-6)``, prediction with the raw logits (``models/losses.py: BalancedSoftmaxLoss``;
   the CAC's ``n_c`` counts its training samples, the regular classifier's the whole training set, as there).
   Both start their ``W_x`` from the trained linear head when there is one (``backbone_weight_path``).
7. **Cascade at prediction**: stage ``s = 1..S`` in order; the first whose flow gives ``log p(x) >= t_s``
   answers with its CAC; otherwise the regular classifier answers (``train_dlsa.py``, ``final_test_pred``).
   :class:`DLSAHead` returns the logits of the classifier that answered.

Differences from the paper's setup, and why:
- One flow component per class (the design's head/tail classes) instead of ``K`` unsupervised
  clusters (500 on ImageNet-LT) with random means of std 0.05; so the cluster-purity (contrastive) and
  cluster-balance (entropy) losses, which make unsupervised clusters pure and even, are not used:
  labelled components are pure by construction, and a balance term would fight the labels. The
  means' std defaults to 1 (FlowGMM's setting) so that components stay apart in low dimension.
- Optimisers: AdamW (``flow_lr``, ``cls_lr``) instead of SGD with lr 0.2 (flow) and 1e-4 (classifiers);
  the classifiers keep their last epoch: the public code picks the epoch by test accuracy.
- The MADE width defaults to the feature dimension (public code: ``hidden_size = feat_dim``);
  ``flow_hidden`` can make it smaller.
- A stage is skipped when fewer than ``max(2, C)`` samples are left; when no sample is left for the
  regular classifier it is trained on the whole training set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class DLSASettings:
    """DLSA settings (defaults from the public code's ImageNet-LT config unless noted in the module docstring)."""

    stages: int = 3
    ratio: float = 0.3
    flow_blocks: int = 2
    flow_hidden: int = 0  # 0: the feature dimension
    flow_hidden_layers: int = 1
    flow_epochs: int = 50
    flow_lr: float = 1e-3
    flow_batch_size: int = 1024
    center_std: float = 1.0
    weight_q: float = 2.0
    cls_epochs: int = 150
    cls_lr: float = 1e-3
    cls_batch_size: int = 128


# ----------------------------------------------------------------------------- the flow


def made_masks(dim: int, hidden: int, n_hidden: int, order: torch.Tensor) -> list[torch.Tensor]:
    """Masks of a MADE network (Germain et al. 2015, Sec. 4) for input degrees ``order`` (a permutation
    of ``0..dim-1``): hidden unit degrees ``arange(hidden) % (dim - 1)``; a hidden unit sees inputs of
    degree <= its own, an output of degree ``d`` sees hidden units of degree < ``d``. Returns
    ``n_hidden + 1`` masks, ``out x in`` float."""
    degrees = [order] + [torch.arange(hidden) % max(dim - 1, 1) for _ in range(n_hidden)]
    masks = [(d1[:, None] >= d0[None]).float() for d0, d1 in zip(degrees[:-1], degrees[1:])]
    masks.append((order[:, None] > degrees[-1][None]).float())
    return masks


class MaskedLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """One MAF layer: ``u = (x - m(x)) * exp(-a(x))``, autoregressive in ``order``; ``log|det| = -sum a``."""

    def __init__(self, dim: int, hidden: int, n_hidden: int, order: torch.Tensor) -> None:
        super().__init__()
        masks = made_masks(dim, hidden, n_hidden, order)
        sizes = [dim] + [hidden] * n_hidden
        layers: list[nn.Module] = []
        for i, m in enumerate(masks[:-1]):
            layers += [MaskedLinear(sizes[i], sizes[i + 1], m), nn.ReLU()]
        layers.append(MaskedLinear(sizes[-1], 2 * dim, masks[-1].repeat(2, 1)))
        self.net = nn.Sequential(*layers)
        self.register_buffer("order", order)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, a = self.net(x).chunk(2, dim=1)
        return (x - m) * torch.exp(-a), -a.sum(1)

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        """``x`` from ``u``, one variable at a time in ``order`` (D network passes)."""
        x = torch.zeros_like(u)
        for i in torch.argsort(self.order).tolist():  # degree 0 first
            m, a = self.net(x).chunk(2, dim=1)
            x[:, i] = u[:, i] * torch.exp(a[:, i]) + m[:, i]
        return x


class FlowBatchNorm(nn.Module):
    """RealNVP batch normalisation as an invertible layer (Dinh et al. 2017, Sec. 3.7)."""

    def __init__(self, dim: int, momentum: float = 0.9, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and len(x) > 1:
            mean, var = x.mean(0), x.var(0)
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_(mean.detach() * (1 - self.momentum))
                self.running_var.mul_(self.momentum).add_(var.detach() * (1 - self.momentum))
            return mean, var
        return self.running_mean, self.running_var

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self._stats(x)
        y = torch.exp(self.log_gamma) * (x - mean) / torch.sqrt(var + self.eps) + self.beta
        logdet = (self.log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return y, logdet.expand(len(x))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse with the running statistics (eval mode)."""
        return (y - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(
            self.running_var + self.eps
        ) + self.running_mean


class GaussianMixtureFlow(nn.Module):
    """MAF flow with a Gaussian-mixture base, one unit-covariance component per class (module docstring 1-2).

    ``forward(x)`` -> ``(u, log_p_xk, log_p_x)``: latent ``N x D``, ``log p(x, k)`` ``N x C`` and
    ``log p(x)`` ``N`` (natural log, density w.r.t. Lebesgue measure on R^D).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        *,
        blocks: int = 2,
        hidden: int = 0,
        hidden_layers: int = 1,
        center_std: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"the flow needs at least 2 feature dimensions (got {dim})")
        hidden = hidden or dim
        order = torch.arange(dim)
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [MADE(dim, hidden, hidden_layers, order), FlowBatchNorm(dim)]
            order = order.flip(0)  # each block conditions on the other end first
        self.layers = nn.ModuleList(layers)
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("means", torch.randn(num_classes, dim, generator=gen) * center_std)

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``u = f(x)`` and ``log|det df/dx|`` (``N``)."""
        logdet = torch.zeros(len(x), device=x.device, dtype=x.dtype)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            u = layer.inverse(u)
        return u

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, logdet = self.transform(x)
        d = u.shape[1]
        log_n = -0.5 * (u[:, None, :] - self.means[None]).square().sum(-1) - 0.5 * d * math.log(2 * math.pi)
        log_p_xk = log_n + logdet[:, None] - math.log(self.means.shape[0])
        return u, log_p_xk, torch.logsumexp(log_p_xk, 1)


# ----------------------------------------------------------------------------- the classifiers and the cascade


class ClusterAidedClassifier(nn.Module):
    """``logits = W_x x + W_p p + b``: features ``N x D`` and cluster priors ``N x C`` -> ``N x C``."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.x = nn.Linear(dim, num_classes)
        self.p = nn.Linear(num_classes, num_classes, bias=False)

    def forward(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.x(x) + self.p(p)


class DLSAHead(nn.Module):
    """The DLSA cascade (module docstring 7) as a classifier head: ``N x D`` features -> ``N x C`` logits
    (those of the classifier that answers each sample). Rebuild from :meth:`spec` with :func:`build_head`."""

    def __init__(self, dim: int, num_classes: int, stages: int, *, blocks: int, hidden: int, hidden_layers: int):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.flow_args = {"blocks": blocks, "hidden": hidden or dim, "hidden_layers": hidden_layers}
        self.flows = nn.ModuleList(GaussianMixtureFlow(dim, num_classes, **self.flow_args) for _ in range(stages))
        self.cacs = nn.ModuleList(ClusterAidedClassifier(dim, num_classes) for _ in range(stages))
        self.final = nn.Linear(dim, num_classes)
        self.register_buffer("thresholds", torch.full((stages,), math.inf))
        self.register_buffer("priors", torch.zeros(stages, num_classes, num_classes))

    def spec(self) -> dict:
        """What :func:`build_head` needs (plain JSON types)."""
        return {
            "kind": "dlsa",
            "dim": self.dim,
            "num_classes": self.num_classes,
            "stages": len(self.flows),
            **self.flow_args,
        }

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage index answering each sample (``len(flows)`` = the regular classifier) and the logits."""
        out = self.final(x)
        stage = torch.full((len(x),), len(self.flows), dtype=torch.int64, device=x.device)
        for s in reversed(range(len(self.flows))):  # reversed: the earliest accepting stage is written last
            _, log_p_xk, log_p_x = self.flows[s](x)
            p = self.priors[s][log_p_xk.argmax(1)]
            take = log_p_x >= self.thresholds[s]
            out = torch.where(take[:, None], self.cacs[s](x, p), out)
            stage = torch.where(take, torch.full_like(stage, s), stage)
        return stage, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.route(x)[1]


def build_head(spec: dict) -> DLSAHead:
    """An untrained :class:`DLSAHead` of the shape ``spec`` (from :meth:`DLSAHead.spec`) describes.

    Raises:
        ValueError: ``spec`` is not a DLSA head description.
    """
    if not isinstance(spec, dict) or spec.get("kind") != "dlsa":
        raise ValueError(f"not a DLSA head description: {spec!r}")
    return DLSAHead(
        int(spec["dim"]),
        int(spec["num_classes"]),
        int(spec["stages"]),
        blocks=int(spec["blocks"]),
        hidden=int(spec["hidden"]),
        hidden_layers=int(spec["hidden_layers"]),
    )


# ----------------------------------------------------------------------------- fitting


def class_weights_q(counts: np.ndarray, q: float) -> np.ndarray:
    """``(n_max / n_c) ** q`` normalised to sum 1 over the classes present (0 for absent classes)."""
    c = np.asarray(counts, np.float64)
    w = np.where(c > 0, (c.max() / np.maximum(c, 1)) ** q, 0.0)
    return w / w.sum()


def balanced_draw(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices: a class uniformly among those present, then a sample of it uniformly."""
    classes = np.unique(labels)
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    picks = rng.choice(classes, n)
    return np.array([by_class[c][rng.integers(len(by_class[c]))] for c in picks], np.int64)


def train_flow(flow: GaussianMixtureFlow, x: torch.Tensor, y: np.ndarray, st: DLSASettings, seed: int) -> list[float]:
    """Train ``flow`` on ``-w_y log p(x | y)`` over class-balanced draws (module docstring 2); returns epoch losses."""
    rng = np.random.default_rng(seed)
    w = torch.as_tensor(class_weights_q(np.bincount(y, minlength=flow.means.shape[0]), st.weight_q), dtype=x.dtype)
    yt = torch.as_tensor(y, dtype=torch.int64)
    opt = torch.optim.AdamW(flow.parameters(), lr=st.flow_lr, weight_decay=0.0)
    flow.train()
    losses = []
    for _ in range(st.flow_epochs):
        order = torch.as_tensor(balanced_draw(y, len(y), rng))
        total = 0.0
        for i in range(0, len(order), st.flow_batch_size):
            idx = order[i : i + st.flow_batch_size]
            if len(idx) < 2:  # batch statistics need two samples
                continue
            _, log_p_xk, _ = flow(x[idx])
            log_p_x_given_y = log_p_xk.gather(1, yt[idx, None])[:, 0] + math.log(flow.means.shape[0])
            loss = -(log_p_x_given_y * w[yt[idx]]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(order))
    flow.eval()
    return losses


def train_linear(
    model: nn.Module, inputs: tuple, y: np.ndarray, log_prior: torch.Tensor, st: DLSASettings, seed: int
) -> None:
    """Train ``model(*inputs)`` with the balanced softmax (cross-entropy of ``logits + log_prior``)."""
    gen = torch.Generator().manual_seed(seed)
    yt = torch.as_tensor(y, dtype=torch.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=st.cls_lr, weight_decay=0.0)
    model.train()
    for _ in range(st.cls_epochs):
        order = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(order), st.cls_batch_size):
            idx = order[i : i + st.cls_batch_size]
            loss = F.cross_entropy(model(*(t[idx] for t in inputs)) + log_prior, yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def _log_prior(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.log(torch.as_tensor(np.bincount(labels, minlength=num_classes), dtype=torch.float32) + 1e-6)


def fit_dlsa(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    settings: DLSASettings = DLSASettings(),
    *,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[DLSAHead, dict]:
    """Fit the DLSA cascade on frozen training features (module docstring), on the CPU.

    Args:
        features: ``N x D`` float features; labels ``N`` ints in ``[0, num_classes)``.
        init: ``(W, b)`` (``C x D``, ``C``) of a trained linear head to start ``W_x`` from.

    Returns:
        ``(head, report)``: the :class:`DLSAHead` in eval mode and ``{"stage_of"`` (``N`` ints: the
        stage that classifies each training sample, ``S`` = the regular classifier), ``"thresholds"``,
        ``"stage_counts"`` (class counts entering each stage, then those reaching the regular classifier),
        ``"stages_used"``, ``"flow_loss_first_last"}``.
    """
    st = settings
    torch.manual_seed(seed)
    x = torch.as_tensor(np.asarray(features, np.float32))
    y = np.asarray(labels, np.int64)
    n, d = x.shape
    head = DLSAHead(
        d, num_classes, st.stages, blocks=st.flow_blocks, hidden=st.flow_hidden, hidden_layers=st.flow_hidden_layers
    )
    for s, flow in enumerate(head.flows):  # fixed means, drawn per stage
        flow.means.copy_(torch.randn(num_classes, d, generator=torch.Generator().manual_seed(seed + s)) * st.center_std)
    if init is not None:
        with torch.no_grad():
            for lin in [c.x for c in head.cacs] + [head.final]:
                lin.weight.copy_(torch.as_tensor(init[0]))
                lin.bias.copy_(torch.as_tensor(init[1]))
    remaining = np.arange(n)
    stage_of = np.full(n, st.stages, np.int64)
    report: dict = {"thresholds": [], "stage_counts": [], "flow_loss_first_last": []}
    for s in range(st.stages):
        if len(remaining) < max(2, num_classes):
            break
        report["stage_counts"].append(np.bincount(y[remaining], minlength=num_classes).tolist())
        flow = head.flows[s]
        losses = train_flow(flow, x[remaining], y[remaining], st, seed + 100 * s)
        report["flow_loss_first_last"].append([losses[0], losses[-1]] if losses else None)
        with torch.no_grad():
            _, log_p_xk, log_p_x = flow(x)
        llh, comp = log_p_x.numpy(), log_p_xk.argmax(1).numpy()
        thr = float(np.sort(llh[remaining])[int(len(remaining) * (1.0 - st.ratio))])
        prior = np.zeros((num_classes, num_classes), np.float32)
        for k in range(num_classes):  # class histogram of each component (all training samples)
            hist = np.bincount(y[comp == k], minlength=num_classes)
            prior[k] = hist / max(hist.sum(), 1)
        head.thresholds[s] = thr
        head.priors[s] = torch.as_tensor(prior)
        filt = remaining[llh[remaining] >= thr]
        p = torch.as_tensor(prior[comp[filt]])
        train_linear(head.cacs[s], (x[filt], p), y[filt], _log_prior(y[filt], num_classes), st, seed + 100 * s + 1)
        stage_of[filt] = s
        remaining = remaining[llh[remaining] < thr]
        report["thresholds"].append(thr)
    report["stages_used"] = len(report["thresholds"])
    final_rows = remaining if len(remaining) else np.arange(n)
    report["stage_counts"].append(np.bincount(y[remaining], minlength=num_classes).tolist())
    train_linear(head.final, (x[final_rows],), y[final_rows], _log_prior(y, num_classes), st, seed + 999)
    report["stage_of"] = stage_of.tolist()
    report["settings"] = asdict(st)
    head.eval()
    return head, report
