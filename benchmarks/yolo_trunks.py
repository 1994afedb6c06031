"""YOLO-World on real MVTec AD bottle, CPU: random-init CSPDarknet vs the ImageNet trunks, same budget.

Usage::

    flock /tmp/cpu.lock python benchmarks/yolo_trunks.py [--category $MVTEC_ROOT/bottle] [--out runs/bench_yolo_trunks]
        [--models cspdarknet,mobilenet_v2,efficientnet_lite0] [--epochs 20] [--imgsz 320] [--batch 8]
        [--close-mosaic 20] [--freeze-trunk-epochs 0] [--threads 2] [--json out.json]

One ``convert-masks`` of the category (default split 60/20/20 of ``test/``, seed 0), then per model a
``finetune yolo`` run (``yolov8n-worldv2.yaml``: the random-init CSPDarknet for ``cspdarknet``, its
neck and head on the trunk otherwise; offline, hash class embeddings), ``predict yolo`` on val and
test, and the project's ``evaluate`` on each: bbox AP50 class-aware (classes must match) and
class-agnostic (any defect box matches any defect; what PatchCore's regions are scored with).
Choices are read on val; test is only reported. Wall times: training (ultralytics' epochs, its
per-epoch validation and final evaluation included) and prediction of both splits.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--category", type=Path, default=Path(os.environ.get("MVTEC_ROOT", "data/mvtec_ad")) / "bottle")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_yolo_trunks"))
    ap.add_argument("--models", default="cspdarknet,mobilenet_v2,efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--close-mosaic", type=int, default=None, help=">= --epochs: no mosaic (default ultralytics' 10)")
    ap.add_argument("--freeze-trunk-epochs", type=int, default=0)
    ap.add_argument("--nbs", type=int, default=None, help="ultralytics' nominal batch size (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--splits", default="val,test", help="val only while choosing settings")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch
    import ultralytics.utils.torch_utils as ul_torch_utils

    from pipeline.data.convert import convert_category
    from pipeline.evaluation.evaluate import evaluate_file
    from pipeline.models.yolo.predict import predict_split
    from pipeline.models.yolo.train import train_yolo_world

    torch.set_num_threads(args.threads)
    ul_torch_utils.NUM_THREADS = args.threads  # its select_device sets min(8, cores - 1) threads: 1 here
    ann = args.out / "annotations" / args.category.name
    convert_category(args.category, ann, force=True)
    print(
        f"{args.category.name}: {args.epochs} epochs @ {args.imgsz} px, batch {args.batch}, close_mosaic "
        f"{args.close_mosaic}, nbs {args.nbs}, freeze_trunk_epochs {args.freeze_trunk_epochs}, seed {args.seed}, "
        f"torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    rows = []
    for name in args.models.split(","):
        run = args.out / name
        t0 = time.perf_counter()
        train_yolo_world(
            data_yaml=ann / "yolo" / "data.yaml",
            model="yolov8n-worldv2.yaml",
            backbone=None if name == "cspdarknet" else name,
            freeze_trunk_epochs=0 if name == "cspdarknet" else args.freeze_trunk_epochs,
            close_mosaic=args.close_mosaic,
            nbs=args.nbs,
            out_dir=run,
            epochs=args.epochs,
            imgsz=args.imgsz,
            batch=args.batch,
            seed=args.seed,
            device="cpu",
            force=True,
        )
        train_s = time.perf_counter() - t0
        row = {"model": name, "train_s": round(train_s, 1), "threads": torch.get_num_threads()}
        t0 = time.perf_counter()
        for split in args.splits.split(","):
            gt = ann / "coco" / f"{split}.json"
            pred = predict_split(
                weights=run / "weights" / "best.pt",
                gt=gt,
                out=args.out / f"pred_{name}_{split}",
                imgsz=args.imgsz,
                device="cpu",
                force=True,
            )
            for agnostic in (False, True):
                m = evaluate_file(pred.predictions, gt=gt, out_dir=args.out / "eval", class_agnostic=agnostic)
                key = f"{split}_AP50_{'agnostic' if agnostic else 'aware'}"
                row[key] = round(float(m["bbox"]["AP50"]), 4)
                if split == "test" and not agnostic:
                    row["test_per_class_AP50"] = {
                        k: None if v is None else round(float(v), 3)
                        for k, v in (m["bbox"].get("per_class_AP50") or {}).items()
                    }
        row["epoch_s"] = _epoch_seconds(run / "results.csv")
        row["val_mAP50_by_epoch"] = _column(run / "results.csv", "metrics/mAP50(B)")
        row["predict_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | train wall | val AP50 aware / agnostic | test AP50 aware / agnostic |")
    print("|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r.get(f'{s}_AP50_aware', float('nan')):.3f} / {r.get(f'{s}_AP50_agnostic', float('nan')):.3f}"
            for s in ("val", "test")
        ]
        print(f"| {r['model']} | {r['train_s'] / 60:.1f} min | {cells[0]} | {cells[1]} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    return 0


def _column(results_csv: Path, key: str) -> list[float]:
    import csv

    with open(results_csv, newline="") as fh:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(fh)]
    return [round(float(r[key]), 4) for r in rows if key in r]


def _epoch_seconds(results_csv: Path) -> float | None:
    """Median seconds per epoch from ultralytics' cumulative ``time`` column (training + validation)."""
    import statistics

    t = _column(results_csv, "time")
    return round(statistics.median([b - a for a, b in zip([0.0, *t], t)]), 1) if t else None


if __name__ == "__main__":
    raise SystemExit(main())
