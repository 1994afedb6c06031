"""The README trunk table: attempts 1-4 x {ResNet-18 from scratch, EfficientNet-Lite0 and MobileNetV2
with their registry ImageNet weights} x split seeds, on real MVTec AD bottle, CPU.

Each run goes through the pipeline itself (``train_classifier`` -> ``weights/best.pt`` chosen on val
-> ``predict_classifier`` on the manifest's ``test`` subset -> ``evaluate_classification``). Decoded,
resized images stay in the process-wide memory cache of ``pipeline.models.classifier.data``, so each
image is decoded once for the whole table. A run whose folder already holds ``metrics.json`` (and,
unless ``--val-only``, ``test_eval/metrics.json``) is reused, so an interrupted table resumes.

Headline: mean +- std of accuracy over the 2 x len(seeds) numbers (val and test of every seed) per
attempt x trunk; also balanced accuracy and the per-class recall of the best row (mean over val+test
and seeds). ``--val-only`` (exploration: choose settings on val only) skips the test predictions.

Usage::

    python benchmarks/classifier_trunks_bottle.py --category $MVTEC_ROOT/bottle --out runs/trunks \\
        [--seeds 0,1,2 --attempts 1,2,3,4 --trunks resnet18:none,efficientnet_lite0:imagenet,mobilenet_v2:imagenet
         --epochs 8 --imgsz 224 --max-train-good 48 --set train.lr=2e-3 --val-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ATTEMPTS = {1: "attempt1_resnet18", 2: "attempt2_selfattention", 3: "attempt3_dropblock", 4: "attempt4_gem"}
TRUNKS = "resnet18:none,efficientnet_lite0:imagenet,mobilenet_v2:imagenet"


def _ms(values) -> str:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return "-" if v.size == 0 else f"{v.mean():.3f} ± {v.std():.3f}"


def _parse_set(texts) -> dict:
    from pipeline.models.classifier.config import parse_override

    return dict(parse_override(t) for t in texts)


def run_one(args, attempt: str, backbone: str, weights: str, imgsz: int, seed: int, split: Path, out: Path) -> dict:
    """Train (or reuse) one run; returns its val and test metrics and wall times."""
    from pipeline.core.io import read_json
    from pipeline.evaluation.classification import evaluate_classification
    from pipeline.models.classifier.config import load_config
    from pipeline.models.classifier.predict import PREDICTIONS, predict_classifier
    from pipeline.models.classifier.train import train_classifier

    t0 = time.perf_counter()
    if not (out / "metrics.json").is_file():
        overrides = {
            "model.backbone": backbone,
            "train.epochs": args.epochs,
            "train.seed": seed,
            "train.device": "cpu",
            "data.input_size_hw": [imgsz, imgsz],
            "data.max_train_good": args.max_train_good,
            **_parse_set(args.set),
        }
        if args.lr_scale != 1.0:  # each attempt's own (published) lr, scaled
            overrides["train.lr"] = load_config(attempt).train.lr * args.lr_scale
        cfg = load_config(attempt, overrides)
        train_classifier(cfg, split, out, weights=weights, force=True, progress=False, echo=False)
    train_s = time.perf_counter() - t0
    metrics = read_json(out / "metrics.json")
    test = None
    if not args.val_only:
        if (out / "test_eval" / "metrics.json").is_file():
            test = read_json(out / "test_eval" / "metrics.json")
        else:
            pred = predict_classifier(out, split, out / "test_predict", force=True, progress=False) / PREDICTIONS
            test = evaluate_classification(pred, out / "test_eval")
    return {
        "val": metrics["val"],
        "test": test,
        "best_epoch": metrics["best_epoch"],
        "wall_s": time.perf_counter() - t0,
        "train_s": train_s,
    }


def summarise(rows: list[dict], classes: list[str]) -> list[str]:
    """Markdown lines: the headline table and the per-class recall of the best row."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["attempt"], r["trunk"]), []).append(r)
    lines = [
        "| attempt | trunk (weights) | accuracy val+test | balanced acc. val+test | val acc. | test acc. | runs |",
        "|---|---|---|---|---|---|---|",
    ]
    best, best_key = -1.0, None
    for (attempt, trunk), rs in sorted(groups.items()):
        subsets = [m for r in rs for m in (r["val"], r["test"]) if m is not None]
        acc = [m["accuracy"] for m in subsets]
        lines.append(
            f"| {attempt} | {trunk} | {_ms(acc)} | {_ms(m['balanced_accuracy'] for m in subsets)} | "
            f"{_ms(r['val']['accuracy'] for r in rs)} | {_ms(r['test']['accuracy'] for r in rs if r['test'])} | "
            f"{len(rs)} |"
        )
        if np.mean(acc) > best:
            best, best_key = float(np.mean(acc)), (attempt, trunk)
    if best_key:
        subsets = [m for r in groups[best_key] for m in (r["val"], r["test"]) if m is not None]
        lines += [
            "",
            f"Per-class recall of the best row ({best_key[0]}, {best_key[1]}), mean ± std over val+test and seeds:",
            "",
        ]
        lines.append("| " + " | ".join(classes) + " |")
        lines.append("|" + "---|" * len(classes))
        lines.append("| " + " | ".join(_ms(m["per_class"][c]["recall"] for m in subsets) for c in classes) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/classifier_trunks"))
    ap.add_argument("--seeds", default="0,1,2", help="split seeds (also the training seed)")
    ap.add_argument("--attempts", default="1,2,3,4")
    ap.add_argument("--trunks", default=TRUNKS, help="comma-separated backbone:weights[:imgsz] (imgsz: --imgsz)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=224)
    ap.add_argument("--max-train-good", type=int, default=48, help="train/good images added as good (-1 = all 209)")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="multiply each attempt's train.lr by this")
    ap.add_argument("--set", action="append", default=[], help="extra dotted override, repeatable")
    ap.add_argument("--val-only", action="store_true", help="exploration: no test predictions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stop-after-min", type=float, default=0, help="start no new training after this (0: no limit)")
    ap.add_argument("--existing-only", action="store_true", help="summarise the runs already there, train nothing")
    args = ap.parse_args(argv)

    import torch

    from pipeline.data.mvtec import scan_category
    from pipeline.data.split import make_split, write_split

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    trunks = [(t.split(":") + [str(args.imgsz)])[:3] for t in args.trunks.split(",")]
    t_all = time.perf_counter()
    rows, classes, skipped = [], [], []
    for seed in seeds:
        split = args.out / f"split_seed{seed}.json"
        if not split.is_file():
            write_split(make_split(scan_category(args.category), seed=seed), split)
    # attempt-major, in the order given: a table cut short still has whole attempts
    for a in (int(x) for x in args.attempts.split(",")):
        for seed in seeds:
            split = args.out / f"split_seed{seed}.json"
            for backbone, weights, imgsz in trunks:
                run = args.out / f"seed{seed}" / f"{backbone}_{weights}" / ATTEMPTS[a]
                late = args.stop_after_min and time.perf_counter() - t_all > 60 * args.stop_after_min
                if (args.existing_only or late) and not (run / "metrics.json").is_file():
                    skipped.append(f"{ATTEMPTS[a]} {backbone} seed {seed}")
                    continue
                r = run_one(args, ATTEMPTS[a], backbone, weights, int(imgsz), seed, split, run)
                classes = list(r["val"]["per_class"])
                trunk = f"{backbone} ({weights}, {imgsz} px)"
                rows.append({"attempt": ATTEMPTS[a], "trunk": trunk, "seed": seed, **r})
                test = r["test"]["accuracy"] if r["test"] else None
                print(
                    f"seed {seed} {backbone:18s} {ATTEMPTS[a]:22s} val acc {r['val']['accuracy']:.3f} "
                    f"bal {r['val']['balanced_accuracy']:.3f} test acc {test if test is None else round(test, 3)} "
                    f"best epoch {r['best_epoch']} ({r['wall_s']:.0f} s)",
                    flush=True,
                )
    wall = time.perf_counter() - t_all
    lines = [
        f"Bottle, split seeds {args.seeds}, {args.imgsz} px, {args.epochs} epochs, "
        f"max_train_good {args.max_train_good}, "
        f"lr x {args.lr_scale}, overrides {args.set or 'none'}, {args.threads} threads: {wall / 60:.1f} min",
        *([f"not run (time limit): {', '.join(skipped)}"] if skipped else []),
        "",
        *summarise(rows, classes),
    ]
    print("\n".join(lines))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    (args.out / "table.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
