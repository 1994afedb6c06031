"""Anomaly-detection metrics: image AUROC, pixel AUROC, F1-max and PRO, per defect type and overall.

Definitions (what :func:`evaluate_anomaly` reports):

- **image AUROC**: area under the ROC of image scores, defect images positive, good negative; exact
  (Mann-Whitney U with average ranks for ties).
- **image F1-max**: the best F1 over all thresholds on the image scores (exact); also precision,
  recall and F1 at the prediction file's own ``threshold`` (``score >= threshold`` is a defect).
- **pixel AUROC**: ROC over every pixel of every evaluated image at the mask's native resolution
  (anomaly maps are resized bilinearly to the mask size; masks read as ``> 0``). Scores are quantised
  into ``PIXEL_BINS`` equal bins spanning the min-max of all maps and the ROC is integrated by
  trapezoids over the bin edges (pixels sharing a bin count as ties).
- **PRO** (per-region overlap; Bergmann et al., "Uninformed Students", CVPR 2020, and the MVTec AD
  evaluation code, IJCV 2021): the ground-truth masks are split into 8-connected components; at a
  threshold ``t`` the PRO is the mean over all components (of all images in the group) of
  ``|{map >= t} & C| / |C|``, and the FPR is the fraction of all good pixels (outside every mask,
  in good and defect images) with ``map >= t``. PRO is the area under PRO(FPR) for FPR in
  ``[0, max_fpr]`` (default 0.3, linear interpolation at the limit), divided by ``max_fpr`` so a perfect
  map scores 1. Same quantisation as pixel AUROC.
- **pixel F1-max**: best F1 of pixel decisions over the bin thresholds.
- **per defect type** ``D``: the images of type ``D`` plus all good images; **overall**: all images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_savefig, atomic_write_json, image_size_hw, read_image, read_json
from pipeline.data.mvtec import GOOD
from pipeline.data.predictions import load_predictions
from pipeline.evaluation.curves import binary_auroc, roc_curve

PIXEL_BINS = 1 << 16
_trapz = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed trapz


# ------------------------------------------------------------------------------- image level
def auroc(scores, labels) -> float:
    """Exact ROC AUC of ``scores`` (higher = more anomalous) for binary ``labels`` (1 = defect).

    Returns ``nan`` when one class is absent. Ties count as half
    (:func:`pipeline.evaluation.curves.binary_auroc`).
    """
    value = binary_auroc(scores, labels)
    return float("nan") if value is None else value


def f1_max(scores, labels) -> tuple[float, float]:
    """Best F1 over thresholds ``score >= t`` and a threshold achieving it.

    The threshold returned is the midpoint between the lowest score flagged and the next lower
    distinct score (so a slightly lower unseen score is still flagged), or that score itself when it
    is the minimum. Returns ``(nan, nan)`` without positives.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if y.sum() == 0 or len(s) == 0:
        return float("nan"), float("nan")
    uniq = np.unique(s)[::-1]  # descending candidate thresholds
    best, best_i = -1.0, 0
    for i, t in enumerate(uniq):
        pred = s >= t
        tp = int((pred & y).sum())
        fp = int((pred & ~y).sum())
        fn = int((~pred & y).sum())
        f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
        if f1 > best:
            best, best_i = f1, i
    t = uniq[best_i]
    thr = (t + uniq[best_i + 1]) / 2.0 if best_i + 1 < len(uniq) else t
    return float(best), float(thr)


def at_threshold(scores, labels, threshold: float) -> dict:
    """Precision, recall, F1 and accuracy of ``score >= threshold`` against ``labels``."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    pred = s >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    return {
        "threshold": float(threshold),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "accuracy": (tp + tn) / len(s) if len(s) else float("nan"),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


# ------------------------------------------------------------------------------- pixel level
@dataclass
class PixelHist:
    """Quantised pixel statistics of a group of images (see module docstring).

    ``neg``/``pos``: pixel counts per score bin outside / inside the masks; ``pro``: per-bin sum over
    mask pixels of ``1 / |component|``; ``regions``: number of mask components.
    """

    lo: float
    hi: float
    bins: int = PIXEL_BINS
    neg: np.ndarray = field(default=None)
    pos: np.ndarray = field(default=None)
    pro: np.ndarray = field(default=None)
    regions: int = 0

    def __post_init__(self):
        if self.neg is None:
            self.neg = np.zeros(self.bins, np.float64)
            self.pos = np.zeros(self.bins, np.float64)
            self.pro = np.zeros(self.bins, np.float64)

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        span = self.hi - self.lo if self.hi > self.lo else 1.0
        idx = np.floor((values.astype(np.float64) - self.lo) / span * self.bins).astype(np.int64)
        return np.clip(idx, 0, self.bins - 1)

    def add(self, amap: np.ndarray, mask: np.ndarray | None, *, connectivity: int = 8) -> None:
        """Add one image: ``amap`` ``HxW`` float scores, ``mask`` ``HxW`` bool (``None`` = good)."""
        idx = self.bin_of(amap).ravel()
        if mask is None or not mask.any():
            self.neg += np.bincount(idx, minlength=self.bins)
            return
        import cv2

        m = mask.ravel()
        self.neg += np.bincount(idx[~m], minlength=self.bins)
        self.pos += np.bincount(idx[m], minlength=self.bins)
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=connectivity)
        lab = labels.ravel()[m]
        areas = np.bincount(lab, minlength=n).astype(np.float64)
        self.pro += np.bincount(idx[m], weights=1.0 / areas[lab], minlength=self.bins)
        self.regions += n - 1

    def __add__(self, other: "PixelHist") -> "PixelHist":
        return PixelHist(
            self.lo,
            self.hi,
            self.bins,
            self.neg + other.neg,
            self.pos + other.pos,
            self.pro + other.pro,
            self.regions + other.regions,
        )

    def curves(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(fpr, tpr, pro)`` at every bin edge from the top, each starting at 0."""
        fp = np.concatenate([[0.0], np.cumsum(self.neg[::-1])])
        tp = np.concatenate([[0.0], np.cumsum(self.pos[::-1])])
        pro = np.concatenate([[0.0], np.cumsum(self.pro[::-1])]) / max(self.regions, 1)
        return fp / max(self.neg.sum(), 1), tp / max(self.pos.sum(), 1), pro

    def metrics(self, *, max_fpr: float = 0.3) -> dict:
        """``pixel_auroc``, ``pro`` (normalised area up to ``max_fpr``), ``pixel_f1_max`` and its threshold."""
        n_neg, n_pos = self.neg.sum(), self.pos.sum()
        # thresholds at the lower edge of each bin, from the highest bin down; prepend "nothing flagged"
        fp = np.concatenate([[0.0], np.cumsum(self.neg[::-1])])
        tp = np.concatenate([[0.0], np.cumsum(self.pos[::-1])])
        out: dict = {
            "pixel_auroc": float("nan"),
            "pro": float("nan"),
            "pixel_f1_max": float("nan"),
            "pixel_threshold": float("nan"),
            "regions": int(self.regions),
        }
        if n_neg == 0 or n_pos == 0:
            return out
        fpr, tpr = fp / n_neg, tp / n_pos
        out["pixel_auroc"] = float(_trapz(tpr, fpr))
        pro = np.concatenate([[0.0], np.cumsum(self.pro[::-1])]) / max(self.regions, 1)
        out["pro"] = float(pro_area(fpr, pro, max_fpr=max_fpr))
        f1 = 2 * tp / np.maximum(tp + fp + n_pos, 1e-12)
        k = int(np.argmax(f1))
        out["pixel_f1_max"] = float(f1[k])
        # k bins flagged from the top -> threshold = lower edge of bin (bins - k)
        edge = self.bins - k
        out["pixel_threshold"] = float(self.lo + (self.hi - self.lo) * edge / self.bins)
        return out


def pro_area(fpr: np.ndarray, pro: np.ndarray, *, max_fpr: float = 0.3) -> float:
    """Area under ``pro`` over ``fpr`` (both ascending) for FPR in ``[0, max_fpr]``, divided by ``max_fpr``."""
    fpr = np.asarray(fpr, np.float64)
    pro = np.asarray(pro, np.float64)
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr and keep.sum() < len(fpr):
        j = int(np.argmax(fpr > max_fpr))
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        yi = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.append(x, max_fpr), np.append(y, yi)
    return float(_trapz(y, x) / max_fpr)


# ------------------------------------------------------------------------------- files
def load_map(path: Path) -> np.ndarray:
    """Read an anomaly map: ``.npy`` (float, any size) or ``.png`` (8/16-bit grey, scaled to 0-1)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: anomaly map not found (expected a .npy or .png map)")
    if path.suffix.lower() == ".npy":
        m = np.load(path, allow_pickle=False)
    else:
        m = read_image(path)
        if m.ndim == 3:
            m = m[..., 0]
        m = m.astype(np.float32) / (65535.0 if m.dtype == np.uint16 else 255.0)
    if m.ndim != 2:
        raise PipelineError(f"{path}: anomaly map has shape {m.shape} (expected HxW)")
    return m.astype(np.float32)


def resize_map(amap: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``hxw`` float map to ``size_hw`` (H, W)."""
    import cv2

    h, w = size_hw
    if amap.shape == (h, w):
        return amap.astype(np.float32)
    return cv2.resize(amap.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def _ground_truth(split_or_gt, pred: dict, pred_path: Path) -> tuple[Path, dict]:
    """Category root and ``{image rel path: (label, mask loader)}`` from a split manifest, a COCO
    ground-truth file (``coco/<split>.json``: ``defect_type`` and the union of the RLE annotations),
    a category folder or a :class:`pipeline.data.split.Split`. A mask loader returns an ``HxW`` bool
    array or ``None`` for good images."""
    from pipeline.data.mvtec import read_mask, scan_category
    from pipeline.data.split import Split, load_split

    def from_path(mask_path):
        return (lambda: read_mask(mask_path)) if mask_path is not None else (lambda: None)

    if split_or_gt is None:
        root = pred.get("root")
        if not root:
            raise PipelineError(
                f"{pred_path}: no ground truth given and no 'root' recorded (pass the split or category)"
            )
        split_or_gt = Path(root)
    if isinstance(split_or_gt, Split):
        split = split_or_gt
    else:
        p = Path(split_or_gt)
        if p.is_dir():
            cat = scan_category(p, check_pixels=False)
            return cat.root, {s.image.relative_to(cat.root).as_posix(): (s.label, from_path(s.mask)) for s in cat.test}
        doc = read_json(p)
        if isinstance(doc, dict) and "images" in doc and "annotations" in doc:
            return _coco_ground_truth(doc, p, pred)
        split = load_split(p)
    gt = {}
    for name in split.manifest["splits"]:
        for s in split.samples(name):
            gt[s.image.relative_to(split.root).as_posix()] = (s.label, from_path(s.mask))
    return split.root, gt


def _coco_ground_truth(doc: dict, path: Path, pred: dict) -> tuple[Path, dict]:
    from pipeline.data.instances import decode_rle

    root = Path(doc.get("info", {}).get("image_root") or pred.get("root") or path.parent)
    anns: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    gt = {}
    for im in doc["images"]:
        label = im.get("defect_type")
        if label is None:
            raise PipelineError(
                f"{path}: image {im.get('id')} has no 'defect_type' (expected pipeline convert-masks output)"
            )

        def loader(im=im):
            a = anns.get(im["id"], [])
            if not a:
                return None
            m = np.zeros((im["height"], im["width"]), bool)
            for ann in a:
                m |= decode_rle(ann["segmentation"])
            return m

        gt[im["file_name"]] = (label, loader)
    return root, gt


def _image_metrics(labels: list[str], scores: np.ndarray, threshold: float) -> dict[str, dict]:
    """Image-level metrics of ``overall`` and each defect type (that type plus all good images).

    Args:
        labels: ``N`` true labels (:data:`GOOD` or a defect type). scores: ``N`` image scores.
        threshold: the prediction file's decision threshold (``nan``: no ``at_threshold``).
    """
    lab = np.array(labels)
    groups = {"overall": np.ones(len(lab), bool)}
    for t in sorted({t for t in labels if t != GOOD}):
        groups[t] = (lab == t) | (lab == GOOD)
    res = {}
    for name, sel in groups.items():
        y = lab[sel] != GOOD
        s = scores[sel]
        f1, thr = f1_max(s, y)
        g = {
            "n_images": int(sel.sum()),
            "n_defect": int(y.sum()),
            "image_auroc": auroc(s, y),
            "image_f1_max": f1,
            "image_f1_threshold": thr,
        }
        if np.isfinite(threshold):
            g["at_threshold"] = at_threshold(s, y, threshold)
        res[name] = g
    return res


def _pixel_hists(records: list[dict], labels: list[str], gt: dict, root: Path, pred_path: Path) -> dict[str, PixelHist]:
    """One :class:`PixelHist` per true label (:data:`GOOD` first), every map resized to its mask's
    native size (a good image's size from its file) over one score range, that of all maps."""
    maps = []
    for p in records:
        mp = Path(p["map"])
        maps.append(load_map(mp if mp.is_absolute() else pred_path.parent / mp))
    lo = float(min(m.min() for m in maps))
    hi = float(max(m.max() for m in maps))
    hists = {t: PixelHist(lo, hi) for t in [GOOD, *sorted({t for t in labels if t != GOOD})]}
    for p, m, t in zip(records, maps, labels):
        mask = gt[p["image"]][1]()
        size = mask.shape if mask is not None else image_size_hw(root / p["image"])
        hists[t].add(resize_map(m, size), mask)
    return hists


def _definitions(max_fpr: float) -> dict[str, str]:
    return {
        "image_auroc": "exact ROC AUC of image scores (defect = positive)",
        "pixel_auroc": f"pixel ROC AUC at native mask resolution, maps resized bilinearly, {PIXEL_BINS} score bins",
        "pro": f"normalised area under per-region overlap vs good-pixel FPR for FPR <= {max_fpr} "
        "(8-connected GT components; Bergmann et al. 2020)",
        "per_type": "images of that defect type plus all good images",
    }


def _summary(pred_path: Path, out: dict) -> str:
    o = out["overall"]
    line = f"{pred_path.name}: image AUROC {o['image_auroc']:.4f}, image F1-max {o['image_f1_max']:.4f}"
    if out["pixel_metrics"]:
        line += f", pixel AUROC {o['pixel_auroc']:.4f}, PRO {o['pro']:.4f}"
    return line + f" ({out['backbone']}, {o['n_images']} images)"


def evaluate_anomaly(pred_path, split_or_gt=None, out_dir=None, *, max_fpr: float = 0.3, pixel: bool = True) -> dict:
    """Evaluate an anomaly prediction file (``{"kind": "anomaly", ...}``) against ground-truth masks.

    Args:
        pred_path: the predictions JSON (``predictions[i]``: ``image`` relative to the category root,
            ``score``, ``label``, optional ``map`` path relative to the JSON's folder or absolute).
        split_or_gt: split manifest path, COCO ground truth (``coco/<split>.json``), category folder
            or ``Split``; default the ``root`` recorded in the predictions (category folder).
        out_dir: when given, ``anomaly_metrics.json``, ``anomaly_table.json`` and ``anomaly_curves.png``
            (image ROC, pixel ROC, PRO up to ``max_fpr``; overall) are written there.
        max_fpr: PRO integration limit (Bergmann et al. use 0.3).
        pixel: compute pixel metrics (needs every prediction to have a map).

    Returns:
        ``{"kind": "anomaly", "model", "threshold", "definitions", "overall": {...},
        "per_type": {type: {...}}}``; each group has ``n_images``, ``image_auroc``, ``image_f1_max``,
        ``image_f1_threshold``, ``at_threshold`` and, with maps, ``pixel_auroc``, ``pro``,
        ``pixel_f1_max``, ``pixel_threshold``, ``regions``. A number that cannot be computed (AUROC of a
        group with one class, the threshold of a file without one) is ``None`` beside ``<key>_reason``.

    Raises:
        PipelineError: not an anomaly file, images missing from the ground truth, unreadable maps.
    """
    pred_path = Path(pred_path)
    loaded = load_predictions(pred_path)
    if loaded.kind != "anomaly":
        raise PipelineError(
            f"{pred_path}: not an anomaly prediction file (a {loaded.kind} file; "
            "expected {'kind': 'anomaly', 'predictions': [...]})"
        )
    pred, records = loaded.doc, loaded.records
    if not records:
        raise PipelineError(f"{pred_path}: no predictions to evaluate")
    root, gt = _ground_truth(split_or_gt, pred, pred_path)
    missing = [p["image"] for p in records if p["image"] not in gt]
    if missing:
        raise PipelineError(
            f"{pred_path}: {len(missing)} image(s) not in the ground truth of {root}, e.g. {missing[0]}"
        )
    labels = [gt[p["image"]][0] for p in records]
    scores = np.array([float(p["score"]) for p in records])
    threshold = float(pred.get("threshold", float("nan")))
    res = _image_metrics(labels, scores, threshold)
    with_pixels = pixel and all(p.get("map") for p in records)
    total = None
    if with_pixels:
        hists = _pixel_hists(records, labels, gt, root, pred_path)
        good = hists.pop(GOOD)
        total = good
        for t, h in hists.items():
            total = total + h
            res[t].update((good + h).metrics(max_fpr=max_fpr))
        res["overall"].update(total.metrics(max_fpr=max_fpr))
    out = {
        "kind": "anomaly",
        "model": pred.get("model"),
        "backbone": pred.get("backbone"),
        "threshold": threshold,
        "predictions": str(pred_path),
        "definitions": _definitions(max_fpr),
        "pixel_metrics": bool(with_pixels),
        "overall": res.pop("overall"),
        "per_type": res,
    }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "anomaly_table.json", table_rows(out))
        _plot_curves(out_dir / "anomaly_curves.png", scores, np.array(labels) != GOOD, total, max_fpr, out)
    summary = _summary(pred_path, out)
    out = null_reasons(out)
    if out_dir is not None:
        atomic_write_json(out_dir / "anomaly_metrics.json", out)
    out["_summary"] = summary
    return out


NULL_REASONS = {  # why a number of evaluate_anomaly cannot be computed
    "threshold": "the prediction file has no threshold",
    "image_auroc": "only one class among these images",
    "image_f1_max": "no defect images",
    "image_f1_threshold": "no defect images",
    "pixel_auroc": "no defect pixels or no good pixels",
    "pro": "no defect pixels or no good pixels",
    "pixel_f1_max": "no defect pixels or no good pixels",
    "pixel_threshold": "no defect pixels or no good pixels",
    "accuracy": "no images",
}


def null_reasons(doc: dict) -> dict:
    """A copy of ``doc`` (nested dicts) where each NaN number is ``None`` beside ``<key>_reason``
    (:data:`NULL_REASONS`), so the metrics JSON never holds NaN."""
    out: dict = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out[k] = null_reasons(v)
        elif isinstance(v, float) and np.isnan(v):
            out[k] = None
            out[f"{k}_reason"] = NULL_REASONS.get(k, "not computable")
        else:
            out[k] = v
    return out


def _plot_curves(
    path: Path, scores: np.ndarray, y: np.ndarray, hist: "PixelHist | None", max_fpr: float, m: dict
) -> None:
    """Image ROC, pixel ROC and the PRO curve (overall) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 if hist is not None else 1
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
    fx, ty = roc_curve(scores, y)
    ax = axes[0, 0]
    ax.plot(fx, ty)
    ax.set(title=f"image ROC (AUROC {m['overall']['image_auroc']:.4f})", xlabel="FPR", ylabel="TPR")
    if hist is not None:
        fpr, tpr, pro = hist.curves()
        axes[0, 1].plot(fpr, tpr)
        axes[0, 1].set(title=f"pixel ROC (AUROC {m['overall']['pixel_auroc']:.4f})", xlabel="FPR", ylabel="TPR")
        keep = fpr <= max_fpr
        axes[0, 2].plot(fpr[keep], pro[keep])
        axes[0, 2].set(
            title=f"PRO up to FPR {max_fpr} (area {m['overall']['pro']:.4f})",
            xlabel="FPR",
            ylabel="PRO",
            xlim=(0, max_fpr),
            ylim=(0, 1),
        )
    fig.suptitle(f"{m.get('backbone') or ''} {Path(m['predictions']).name}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)


def table_rows(metrics: dict) -> list[dict]:
    """One row per group (``overall`` first) with the headline numbers, for printing."""
    rows = []
    for name, g in [("overall", metrics["overall"]), *metrics["per_type"].items()]:
        rows.append(
            {
                "group": name,
                "n": g["n_images"],
                "image_auroc": g["image_auroc"],
                "image_f1_max": g["image_f1_max"],
                "pixel_auroc": g.get("pixel_auroc"),
                "pro": g.get("pro"),
                "pixel_f1_max": g.get("pixel_f1_max"),
            }
        )
    return rows
