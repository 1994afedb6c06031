"""The README table: the four classifier attempts and the long-tail options on one split.

Trains each configuration (``pipeline.models.classifier.train.train_classifier``), predicts the manifest's
``test`` subset, evaluates both subsets, and prints a markdown table with accuracy, balanced
accuracy, macro-F1, AUROC good-vs-defect and per-class recall. Runs whose folder already holds
``metrics.json`` are reused, so an interrupted table resumes.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/classifier_bottle_table.py --category $MVTEC_ROOT/bottle \\
        --out runs/bottle_table --epochs 15 --imgsz 128 [--weights none|imagenet|PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RUNS = [
    ("attempt1_resnet18", "-", {}),
    ("attempt2_selfattention", "-", {}),
    ("attempt3_dropblock", "-", {}),
    ("attempt4_gem", "-", {}),
    ("attempt4_gem", "reweight (Cui)", {"longtail.balance": "reweight"}),
    ("attempt4_gem", "resample (Cui)", {"longtail.balance": "resample"}),
    ("attempt4_gem", "gaussian synthesis", {"longtail.feature_synthesis": "gaussian"}),
]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/bottle_table"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument(
        "--weights",
        default="none",
        help="initial weights; none (the README table: from scratch, explicitly, since finetune classifier "
        "defaults to imagenet), imagenet or a ResNet-18 state-dict path",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated row numbers (1-based) to run")
    args = ap.parse_args(argv)

    from pipeline.core.io import read_json
    from pipeline.data.mvtec import scan_category
    from pipeline.data.split import make_split, write_split
    from pipeline.evaluation.classification import evaluate_classification
    from pipeline.models.classifier.config import load_config
    from pipeline.models.classifier.predict import PREDICTIONS, predict_classifier
    from pipeline.models.classifier.train import train_classifier

    args.out.mkdir(parents=True, exist_ok=True)
    split = args.out / "split.json"
    if not split.is_file():
        write_split(make_split(scan_category(args.category), seed=args.seed), split)
    only = {int(x) for x in args.only.split(",") if x.strip()}
    rows = []
    for i, (attempt, option, extra) in enumerate(RUNS, 1):
        if only and i not in only:
            continue
        run = args.out / f"{i}_{attempt}_{option.split(' ')[0].replace('-', 'base')}"
        if not (run / "metrics.json").is_file():
            cfg = load_config(
                attempt,
                {
                    "train.epochs": args.epochs,
                    "data.input_size_hw": [args.imgsz, args.imgsz],
                    "train.seed": args.seed,
                    **extra,
                },
            )
            train_classifier(cfg, split, run, weights=args.weights, force=True)
        metrics = read_json(run / "metrics.json")
        pred = predict_classifier(run, split, run / "test_predict", force=True, progress=False) / PREDICTIONS
        test = evaluate_classification(pred, run / "test_eval")
        rows.append((attempt, option, metrics, test))
        print(f"done {run}", flush=True)
    classes = rows[0][3]["classes"] if rows else []
    print()
    print(
        f"Bottle, split seed {args.seed}, {args.imgsz} px, {args.epochs} epochs, "
        f"weights: {rows[0][2]['weights'] if rows else '?'}"
    )
    head = (
        "| attempt | long-tail option | val acc | val bal. acc | "
        "test acc | test bal. acc | test macro-F1 | test AUROC | " + " | ".join(f"recall {c}" for c in classes) + " |"
    )
    print(head)
    print("|" + "---|" * (8 + len(classes)))
    for attempt, option, m, t in rows:
        val = m.get("val") or {}
        rec = " | ".join(_fmt(t["per_class"][c]["recall"]) for c in classes)
        print(
            f"| {attempt} | {option} | {_fmt(val.get('accuracy'))} | {_fmt(val.get('balanced_accuracy'))} | "
            f"{_fmt(t['accuracy'])} | "
            f"{_fmt(t['balanced_accuracy'])} | {_fmt(t['macro_f1'])} | {_fmt(t['auroc_good_vs_defect'])} | {rec} |"
        )
    (args.out / "table.json").write_text(
        json.dumps([{"attempt": a, "option": o, "train": m, "test": t} for a, o, m, t in rows], indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
