"""PatchCore on CPU: fit time, memory-bank size, per-image latency, and the coreset ratio's effect.

Usage::

    python benchmarks/patchcore.py [--category $MVTEC_ROOT/bottle] [--backbone efficientnet_lite0]
        [--imgsz 224] [--resize area] [--upsample bilinear] [--stages blocks.4,blocks.10]
        [--ratios 0.001,0.0025,0.005,0.01,0.025] [--threads 2] [--json out.json]

``--imgsz``, ``--resize``, ``--upsample`` and ``--stages`` default to ``finetune anomaly``'s defaults.

Fits once on ``train/good`` with the largest ratio; greedy k-center selection is nested (the first
``n`` centres do not depend on how many follow, same seed and start), so every smaller ratio's memory
bank is a prefix of that selection and its fit time is the feature time plus the prefix's share of the
coreset loop (measured per ratio as the time to reach that many centres). Each ratio then scores every
``test/`` image: latency is per image, pre-processed tensor in, score and map out (backbone + faiss
search + re-weighting + map), measured after reading and resizing the files (timed separately).
Metrics as in :mod:`pipeline.evaluation.anomaly` (image AUROC, pixel AUROC and PRO at native resolution).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cat = Path(os.environ.get("MVTEC_ROOT", "../shared/data/mvtec_ad")) / "bottle"
    ap.add_argument("--category", type=Path, default=default_cat)
    ap.add_argument("--backbone", default=None, help="default: the best available")
    ap.add_argument("--imgsz", type=int, default=None)
    ap.add_argument("--resize", default=None)
    ap.add_argument("--upsample", default=None)
    ap.add_argument("--stages", default=None)
    ap.add_argument("--ratios", default="0.001,0.0025,0.005,0.01,0.025")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from pipeline.core.io import read_rgb
    from pipeline.data.mvtec import read_mask, scan_category
    from pipeline.evaluation.anomaly import PixelHist, auroc, resize_map
    from pipeline.models import backbones
    from pipeline.models.anomaly import patchcore as anomaly

    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = sorted(float(r) for r in args.ratios.split(","))
    cat = scan_category(args.category, check_pixels=False)
    name = args.backbone or backbones.default_backbone()
    given = {"image_size": args.imgsz, "resize": args.resize, "upsample": args.upsample, "stages": args.stages}
    cfg = anomaly.PatchCoreConfig(backbone=name, coreset_ratio=max(ratios), **{k: v for k, v in given.items() if v})
    cfg = anomaly.resolve_backbone(cfg)
    bb = backbones.load_backbone_at(name, cfg.stage_names(), device="cpu")
    args.imgsz = cfg.image_size
    print(
        f"category {cat.root.name}: {len(cat.train_good)} train/good, {len(cat.test)} test; backbone {name} "
        f"({', '.join(bb.spec.layers)}), input {args.imgsz}x{args.imgsz} ({cfg.resize} resize, {cfg.upsample} maps), "
        f"torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )

    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(cat.train_good), cfg.batch_size):
        x, _ = anomaly.load_batch(
            cat.train_good[i : i + cfg.batch_size], size=cfg.image_size, spec=bb.spec, resize=cfg.resize
        )
        f, grid = anomaly.patch_features(bb, x)
        feats.append(f)
    feats = np.concatenate(feats)
    t_feat = time.perf_counter() - t0
    print(f"train features: {feats.shape[0]} patches x {feats.shape[1]} in {t_feat:.1f} s", flush=True)

    n_max = max(1, round(max(ratios) * len(feats)))
    marks = {max(1, round(r * len(feats))): r for r in ratios}
    reached: dict[int, float] = {}
    t1 = time.perf_counter()

    done = {"i": 0}

    def progress(_k):  # called every 256 centres
        done["i"] += 256
        for n in marks:
            if n not in reached and done["i"] >= n:
                reached[n] = time.perf_counter() - t1

    idx = anomaly.greedy_coreset(feats, n_max, projection_dim=cfg.projection_dim, seed=cfg.seed, progress=progress)
    t_core = time.perf_counter() - t1
    for n in marks:  # ratios reached between progress calls: interpolate linearly in the count
        reached.setdefault(n, t_core * n / n_max)
    print(f"coreset {n_max} centres in {t_core:.1f} s", flush=True)

    t2 = time.perf_counter()
    imgs = [read_rgb(s.image) for s in cat.test]
    sizes = [im.shape[:2] for im in imgs]
    x_test = anomaly.preprocess(imgs, size=cfg.image_size, spec=bb.spec, resize=cfg.resize)
    t_read = (time.perf_counter() - t2) / len(imgs)
    del imgs
    masks = [read_mask(s.mask) if s.mask else None for s in cat.test]
    y = [s.label != "good" for s in cat.test]

    rows = []
    for n in sorted(marks):
        r = marks[n]
        model = anomaly.PatchCore(
            config=anomaly.PatchCoreConfig(**{**cfg.__dict__, "coreset_ratio": r}),
            backbone=bb,
            memory_bank=np.ascontiguousarray(feats[idx[:n]]),
            grid_hw=grid,
        )
        model.index()
        t3 = time.perf_counter()
        scores, maps = [], []
        for i in range(0, len(x_test), cfg.batch_size):
            s, m = model.score_batch(x_test[i : i + cfg.batch_size])
            scores.append(s)
            maps.append(m)
        latency = (time.perf_counter() - t3) / len(x_test)
        scores, maps = np.concatenate(scores), np.concatenate(maps)
        h = PixelHist(float(maps.min()), float(maps.max()))
        for m, mask, size in zip(maps, masks, sizes):
            h.add(resize_map(m, size), mask)
        px = h.metrics()
        row = {
            "coreset_ratio": r,
            "memory_bank": n,
            "bank_mb": round(n * feats.shape[1] * 4 / 2**20, 2),
            "fit_s": round(t_feat + reached[n], 1),
            "latency_ms": round(1000 * latency, 1),
            "image_auroc": round(auroc(scores, y), 4),
            "pixel_auroc": round(px["pixel_auroc"], 4),
            "pro": round(px["pro"], 4),
        }
        rows.append(row)
        print(row, flush=True)

    print(
        f"\nPatchCore, {name}, {args.imgsz}px, {cat.root.name}: fit on {len(cat.train_good)} images, "
        f"{len(cat.test)} test images; read+resize {1000 * t_read:.0f} ms/image (not in latency)"
    )
    print("| coreset ratio | memory bank | bank MB | fit s | latency ms/image | image AUROC | pixel AUROC | PRO |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['coreset_ratio']} | {r['memory_bank']} | {r['bank_mb']} | {r['fit_s']} | {r['latency_ms']} | "
            f"{r['image_auroc']:.4f} | {r['pixel_auroc']:.4f} | {r['pro']:.4f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "backbone": name,
                    "imgsz": args.imgsz,
                    "feature_s": t_feat,
                    "coreset_s": t_core,
                    "read_ms": 1000 * t_read,
                    "rows": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
