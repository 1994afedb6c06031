"""COCO detection and segmentation metrics: pycocotools COCOeval (bbox / segm), mask IoU and Dice.

COCOeval follows Lin et al. 2014 (https://cocodataset.org/#detection-eval): AP averaged over IoU
0.50:0.05:0.95 and 101 recall points. Boxes are ``bbox_xywh`` in pixels; masks are COCO RLE at the
image's native size.

Class-agnostic matching is decided per file (:func:`matching`): a results file whose every record
carries ``"class_agnostic": true`` (what ``pipeline predict anomaly`` writes for PatchCore's
regions, all with ``category_id`` 1) is class-less and matched whatever the class; any other file
by class; the caller may force either. A number that cannot be computed (per-class AP of a class
with no ground truth in the split, mask IoU of a class with no true masks) is ``None`` with a
``*_reason``, never NaN or -1.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_savefig, atomic_write_json
from pipeline.data.coco import check_results, load_coco_gt
from pipeline.data.predictions import load_predictions

CLASS_LESS = "auto: class-less source"
CLASS_AWARE = "auto: class-aware source"
BY_OPTION = "option"
NO_GT_OF_CLASS = "no ground truth of this class in the split"

COCO_STATS = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def coco_eval(coco_gt, results: list, *, iou_type: str = "bbox", class_agnostic: bool = False) -> dict:
    """Run COCOeval and return its summary numbers, per-class AP and the PR curves at IoU 0.5.

    Args:
        coco_gt: a pycocotools ``COCO`` with the ground truth (every image of the split).
        results: COCO results; ``segmentation`` (RLE) needed for ``iou_type="segm"``.
        iou_type: ``"bbox"`` or ``"segm"``.
        class_agnostic: match predictions to ground truth whatever their classes (pycocotools
            ``useCats=0``), for class-less sources such as PatchCore's thresholded maps; the
            per-class entries then hold one key, ``"all"``.

    Returns:
        ``{"AP", "AP50", ..., "AR100", "per_class_AP": {name: AP}, "per_class_AP50": {...},
        "pr_curve_50": {name: [precision at recall 0, 0.01, ..., 1]}, "n_predictions"}``; values in
        [0, 1] (the summary numbers -1 where COCOeval has nothing to average, e.g. no ground truth in a
        size bucket, as COCOeval prints them). A class with no ground truth in the split has per-class
        AP ``None`` and is named in ``"per_class_AP_reason": {name: reason}`` (absent when every class
        has ground truth). With no predictions at all every AP/AR is 0.0 (pycocotools' ``loadRes([])``
        would crash) and classes without ground truth are ``None`` too.
    """
    from pycocotools.cocoeval import COCOeval

    cats = coco_gt.loadCats(coco_gt.getCatIds())
    if not results:
        zero = {k: 0.0 for k in COCO_STATS}
        names = ["all"] if class_agnostic else [c["name"] for c in cats]
        absent = set() if class_agnostic else _classes_without_gt(coco_gt, cats)
        per = {n: None if n in absent else 0.0 for n in names}
        return {
            **zero,
            "per_class_AP": per,
            "per_class_AP50": dict(per),
            "pr_curve_50": {},
            "n_predictions": 0,
        } | ({"per_class_AP_reason": {n: NO_GT_OF_CLASS for n in sorted(absent)}} if absent else {})
    if iou_type == "segm":
        results = [r for r in results if "segmentation" in r]
        if not results:
            raise PipelineError("segm evaluation needs predictions with 'segmentation' (RLE)")
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes([dict(r) for r in results])
        ev = COCOeval(coco_gt, dt, iouType=iou_type)
        if class_agnostic:
            ev.params.useCats = 0
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: float(v) for k, v in zip(COCO_STATS, ev.stats)}
    prec = ev.eval["precision"]  # [T=10 IoU, R=101 recall, K classes, A=4 areas, M=3 maxDets]
    per_ap, per_ap50, curves = {}, {}, {}
    names = {c["id"]: c["name"] for c in cats}
    for k, cid in enumerate(ev.params.catIds if ev.params.useCats else [None]):
        name = names[int(cid)] if cid is not None else "all"
        p = prec[:, :, k, 0, -1]
        per_ap[name] = float(p[p > -1].mean()) if (p > -1).any() else None  # -1: no ground truth of the class
        p50 = prec[0, :, k, 0, -1]
        per_ap50[name] = float(p50[p50 > -1].mean()) if (p50 > -1).any() else None
        curves[name] = [float(max(v, 0.0)) for v in p50]
    out.update(
        {"per_class_AP": per_ap, "per_class_AP50": per_ap50, "pr_curve_50": curves, "n_predictions": len(results)}
    )
    absent = sorted(n for n, v in per_ap.items() if v is None)
    if absent:
        out["per_class_AP_reason"] = {n: NO_GT_OF_CLASS for n in absent}
    return out


def _classes_without_gt(coco_gt, cats: list[dict]) -> set[str]:
    return {c["name"] for c in cats if not coco_gt.getAnnIds(catIds=[c["id"]])}


def mask_iou_dice(coco_gt, results: list, *, score_threshold: float = 0.5, class_agnostic: bool = False) -> dict:
    """Per-class mean IoU and Dice of predicted vs true masks at native resolution.

    For each image whose ground truth has class ``c``, the union of its true ``c`` masks is compared
    with the union of predicted ``c`` masks scoring ``>= score_threshold`` (empty when none):
    IoU = |P & G| / |P | G|, Dice = 2|P & G| / (|P| + |G|). Means are over those images.
    With ``class_agnostic`` all classes are pooled into one, ``"all"``.
    ``pixel_*`` pool all pixels of all images and classes (false positives on good images count).

    Args:
        score_threshold: predicted masks scoring at least this are compared (``evaluate
            --mask-score-threshold``, default 0.5); COCOeval's AP ranks every score instead.

    Returns:
        ``{"per_class": {name: {"IoU", "Dice", "n_images"}}, "mIoU", "mDice", "pixel_IoU", "pixel_Dice",
        "score_threshold"}``; a class with no true masks in the split has IoU/Dice ``None`` and a
        ``"reason"``, ``mIoU``/``mDice`` are ``None`` with ``"mIoU_reason"`` when no class has any.
    """
    from pipeline.data.instances import decode_rle

    cats = [(c["name"], [c["id"]]) for c in coco_gt.loadCats(coco_gt.getCatIds())]
    if class_agnostic:
        cats = [("all", coco_gt.getCatIds())]
    by_img: dict[tuple[int, int], list] = {}
    for r in results:
        if r.get("score", 1.0) >= score_threshold and "segmentation" in r:
            key = (r["image_id"], cats[0][1][0] if class_agnostic else r["category_id"])
            by_img.setdefault(key, []).append(r["segmentation"])
    per: dict[str, dict] = {}
    inter_all = union_all = sum_all = 0
    for name, cat_ids in cats:
        ious, dices = [], []
        for img_id in coco_gt.getImgIds():
            info = coco_gt.imgs[img_id]
            h, w = info["height"], info["width"]
            anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_id, catIds=cat_ids))
            g = np.zeros((h, w), bool)
            for a in anns:
                g |= decode_rle(a["segmentation"])
            p = np.zeros((h, w), bool)
            for rle in by_img.get((img_id, cat_ids[0]), []):
                m = decode_rle(rle)
                if m.shape != (h, w):
                    raise PipelineError(
                        f"prediction mask {m.shape[::-1]} for image {img_id} is not at its native size {w}x{h}"
                    )
                p |= m
            inter, union, total = int((p & g).sum()), int((p | g).sum()), int(p.sum() + g.sum())
            inter_all, union_all, sum_all = inter_all + inter, union_all + union, sum_all + total
            if anns:
                ious.append(inter / union if union else 1.0)
                dices.append(2 * inter / total if total else 1.0)
        per[name] = {
            "IoU": float(np.mean(ious)) if ious else None,
            "Dice": float(np.mean(dices)) if dices else None,
            "n_images": len(ious),
        } | ({} if ious else {"reason": NO_GT_OF_CLASS})
    valid = [v for v in per.values() if v["n_images"]]
    out = {
        "per_class": per,
        "mIoU": float(np.mean([v["IoU"] for v in valid])) if valid else None,
        "mDice": float(np.mean([v["Dice"] for v in valid])) if valid else None,
        "pixel_IoU": inter_all / union_all if union_all else 1.0,
        "pixel_Dice": 2 * inter_all / sum_all if sum_all else 1.0,
        "score_threshold": score_threshold,
    }
    if not valid:
        out["mIoU_reason"] = "no true masks in the split"
    return out


def plot_pr_curves(curves: dict[str, list[float]], path: Path, *, title: str) -> None:
    """PR curves (precision vs recall at IoU 0.5, COCO's 101 recall points) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    recall = np.linspace(0, 1, 101)
    for name, prec in curves.items():
        ax.plot(recall, prec, label=f"{name} (AP50 {np.mean(prec):.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    if curves:
        ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)


def matching(results: list, class_agnostic: bool | None = None) -> tuple[bool, str]:
    """Whether a results file is matched class-agnostically, and why.

    Args:
        results: the file's COCO results.
        class_agnostic: the caller's choice (``evaluate --class-agnostic FILE`` / ``--class-aware FILE``);
            ``None`` decides from the file: class-less when it is non-empty and every record carries
            ``"class_agnostic": true``.

    Returns:
        ``(class_agnostic, reason)``, reason :data:`BY_OPTION`, :data:`CLASS_LESS` or :data:`CLASS_AWARE`.
    """
    if class_agnostic is not None:
        return bool(class_agnostic), BY_OPTION
    if results and all(isinstance(r, dict) and r.get("class_agnostic") is True for r in results):
        return True, CLASS_LESS
    return False, CLASS_AWARE


def evaluate_coco_results(
    gt_path: Path,
    pred_path: Path,
    out_dir: Path,
    *,
    class_agnostic: bool | None = None,
    mask_score_threshold: float = 0.5,
) -> dict:
    """Score a COCO results file against COCO ground truth; write metrics JSON and PR plots.

    bbox metrics always; segm metrics and mask IoU/Dice when the predictions carry ``segmentation``.
    Class-agnostic matching (see :func:`coco_eval`; mask IoU/Dice then compare all predicted against
    all true defect pixels of each image) follows :func:`matching`: ``None`` decides from the file.

    Returns:
        ``{"ground_truth", "predictions", "class_agnostic", "class_agnostic_reason", "mask_score_threshold",
        "bbox": {...}, "segm": {...}?, "masks": {...}?}`` (also written to ``out_dir/metrics_<parent>-<stem>.json``,
        see :func:`result_tag`).

    Raises:
        PipelineError: unreadable files, a prediction file of another kind, results naming unknown
            images or categories.
    """
    gt = load_coco_gt(gt_path)
    results = load_predictions(pred_path, expect="coco").doc
    check_results(results, gt, pred_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = result_tag(pred_path)
    agnostic, why = matching(results, class_agnostic)
    metrics: dict = {"ground_truth": str(gt_path), "predictions": str(pred_path)}
    metrics.update(class_agnostic=agnostic, class_agnostic_reason=why, mask_score_threshold=mask_score_threshold)
    metrics["bbox"] = coco_eval(gt, [r for r in results if "bbox" in r], iou_type="bbox", class_agnostic=agnostic)
    plot_pr_curves(metrics["bbox"]["pr_curve_50"], out_dir / f"pr_bbox_{tag}.png", title=f"bbox PR @ IoU 0.5: {tag}")
    if any("segmentation" in r for r in results):
        metrics["segm"] = coco_eval(gt, results, iou_type="segm", class_agnostic=agnostic)
        metrics["masks"] = mask_iou_dice(gt, results, score_threshold=mask_score_threshold, class_agnostic=agnostic)
        plot_pr_curves(
            metrics["segm"]["pr_curve_50"], out_dir / f"pr_segm_{tag}.png", title=f"mask PR @ IoU 0.5: {tag}"
        )
    atomic_write_json(out_dir / f"metrics_{tag}.json", metrics)
    return metrics


def result_tag(pred_path: Path) -> str:
    """Name for a prediction file's outputs: ``<parent folder>-<stem>`` (``runs/sam-ft/predictions.json``
    -> ``sam-ft-predictions``), so several runs' files can be scored into one folder."""
    p = Path(pred_path).resolve()
    return f"{p.parent.name}-{p.stem}"
