"""PatchCore settings sweep on val, then the chosen setting of each trunk fitted and scored on test.

Usage::

    python benchmarks/patchcore_sweep.py [--category $MVTEC_ROOT/bottle] [--split split.json]
        [--backbones efficientnet_lite0,mobilenet_v2] [--threads 2] [--fit-budget 60] [--json out.json]

The sweep starts from the settings before it (224 px, area resize, bilinear maps, ``blocks.4,blocks.10``
/ ``features.6,features.13``, full feature width); the settings it chose are now ``finetune anomaly``'s
defaults. Choices are made on the split's ``val`` images only (default: the seed-0 60/20/20 split that
``convert-masks`` and ``finetune anomaly`` draw); the score of a setting is val pixel AUROC + val PRO
(the two pixel metrics the goal names), among settings whose val image AUROC is the best seen and
whose estimated fit time is within ``--fit-budget`` seconds. A coordinate sweep from the current
default, per trunk:

1. ``--resize`` area vs bilinear_aa (224 px, default stages);
2. ``--imgsz`` 224 / 256 / 320 with the better resize;
3. ``--stages``: the starting pair and its neighbouring stride-8 / stride-16 stages;
4. ``--feature-dim``: the full width and half of it.

Features depend on (trunk, size, resize, stages) and are extracted once per such setting from
decoded images kept in memory; ``--feature-dim`` pools those features (what ``patch_features`` does)
and only redoes the coreset; ``--upsample`` (bilinear vs nearest before the blur) reuses the val
patch scores, so both are scored for every setting. The estimated fit time is decoding + features +
coreset as measured here (the real fit adds start-up, val calibration and writing; it is measured
in step 5). Then, per trunk:

5. the chosen setting is fitted with ``python -m pipeline finetune anomaly`` in a subprocess (wall time
   of the whole command, and the run's ``fit_wall_seconds``), and the artefact scores the full 83-image
   ``test/`` folder and the split's held-out ``test`` images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESIZES = ("area", "bilinear_aa")
SIZES = (224, 256, 320)
STAGE_CHOICES = {  # the starting pair first, then its neighbours (one stage moved to the next tap)
    "efficientnet_lite0": ("blocks.4,blocks.10", "blocks.4,blocks.7", "blocks.3,blocks.10"),
    "mobilenet_v2": ("features.6,features.13", "features.6,features.10", "features.5,features.13"),
}


def pixel_metrics(maps, masks, sizes) -> dict:
    from pipeline.evaluation.anomaly import PixelHist, resize_map

    h = PixelHist(float(maps.min()), float(maps.max()))
    for m, mask, size in zip(maps, masks, sizes):
        h.add(resize_map(m, size), mask)
    return h.metrics()


class Sweep:
    def __init__(self, category: Path, split_path: Path | None, threads: int):
        import torch

        from pipeline.core.io import read_rgb
        from pipeline.data.mvtec import read_mask
        from pipeline.models.anomaly.predict import resolve_split
        from pipeline.models.anomaly.train import _train_good

        torch.set_num_threads(threads)
        self.split = resolve_split(category, split_path)
        self.category = category
        self.train_paths = _train_good(self.split, category)
        t0 = time.perf_counter()
        self.train = [read_rgb(p) for p in self.train_paths]
        self.decode_s = time.perf_counter() - t0
        val = self.split.samples("val")
        self.val = [read_rgb(s.image) for s in val]
        self.val_y = np.array([s.label != "good" for s in val])
        self.val_masks = [read_mask(s.mask) if s.mask else None for s in val]
        self.val_sizes = [im.shape[:2] for im in self.val]
        self._feats: dict = {}

    def features(self, bb, imgs, size, resize):
        from pipeline.models.anomaly import patchcore as pc

        out, grid = [], None
        for i in range(0, len(imgs), 16):
            x = pc.preprocess(imgs[i : i + 16], size=size, spec=bb.spec, resize=resize)
            f, grid = pc.patch_features(bb, x)
            out.append(f)
        return np.concatenate(out), grid

    def feature_set(self, name, size, resize, stages):
        """Train and val features of one (trunk, size, resize, stages), cached (the last one only)."""
        from pipeline.models import backbones

        key = (name, size, resize, stages)
        if key not in self._feats:
            self._feats.clear()
            bb = backbones.load_backbone_at(name, tuple(stages.split(",")), device="cpu")
            t0 = time.perf_counter()
            ft, grid = self.features(bb, self.train, size, resize)
            t_feat = time.perf_counter() - t0
            fv, _ = self.features(bb, self.val, size, resize)
            self._feats[key] = (bb, ft, fv, grid, t_feat)
        return self._feats[key]

    def evaluate(self, name, size, resize, stages, feature_dim=None) -> list[dict]:
        """Fit the bank of one setting on train/good; score val with both map upsamplings."""
        import torch
        import torch.nn.functional as F

        from pipeline.models.anomaly import patchcore as pc

        bb, ft, fv, grid, t_feat = self.feature_set(name, size, resize, stages)
        if feature_dim is not None and feature_dim != ft.shape[1]:  # what patch_features(feature_dim=) does
            pool = lambda f: F.adaptive_avg_pool1d(torch.from_numpy(f).unsqueeze(1), feature_dim).squeeze(1).numpy()  # noqa: E731
            ft, fv = pool(ft), pool(fv)
        cfg = pc.PatchCoreConfig(
            backbone=name, image_size=size, resize=resize, stages=stages, feature_dim=feature_dim, coreset_ratio=0.01
        )
        t0 = time.perf_counter()
        bank = pc.coreset_bank(ft, cfg)
        t_core = time.perf_counter() - t0
        model = pc.PatchCore(config=cfg, backbone=bb, memory_bank=np.ascontiguousarray(bank), grid_hw=grid)
        scores, patch = model.score_features(fv, len(self.val), grid)
        from pipeline.evaluation.anomaly import auroc

        rows = []
        for up in ("bilinear", "nearest"):
            maps = pc.patch_maps(patch, size=size, sigma=cfg.sigma, upsample=up)
            px = pixel_metrics(maps, self.val_masks, self.val_sizes)
            rows.append(
                {
                    "backbone": name,
                    "imgsz": size,
                    "resize": resize,
                    "stages": stages,
                    "feature_dim": int(ft.shape[1]),
                    "pooled": feature_dim is not None,
                    "upsample": up,
                    "bank": list(bank.shape),
                    "fit_est_s": round(self.decode_s + t_feat + t_core, 1),
                    "val_image_auroc": round(auroc(scores, self.val_y), 4),
                    "val_pixel_auroc": round(px["pixel_auroc"], 5),
                    "val_pro": round(px["pro"], 4),
                }
            )
            print(rows[-1], flush=True)
        return rows


def best(rows: list[dict], budget: float) -> dict:
    ok = [r for r in rows if r["fit_est_s"] <= budget] or rows
    top_img = max(r["val_image_auroc"] for r in ok)
    ok = [r for r in ok if r["val_image_auroc"] == top_img]
    return max(ok, key=lambda r: r["val_pixel_auroc"] + r["val_pro"])


def sweep_trunk(sw: Sweep, name: str, budget: float) -> tuple[dict, list[dict]]:
    rows: list[dict] = []
    stages0 = STAGE_CHOICES[name][0]
    for resize in RESIZES:  # 1. resize
        rows += sw.evaluate(name, 224, resize, stages0)
    resize = best(rows, budget)["resize"]
    for size in SIZES[1:]:  # 2. input size
        rows += sw.evaluate(name, size, resize, stages0)
    size = best(rows, budget)["imgsz"]
    for stages in STAGE_CHOICES[name][1:]:  # 3. stages
        rows += sw.evaluate(name, size, resize, stages)
    b = best(rows, budget)
    stages = b["stages"]
    rows += sw.evaluate(name, size, resize, stages, feature_dim=b["feature_dim"] // 2)  # 4. feature_dim
    return best(rows, budget), rows


def final_fit(category: Path, split_path: Path | None, chosen: dict, threads: int) -> dict:
    """5. Fit the chosen setting with the CLI (wall time of the command), score all of test/ and the split's test."""
    from pipeline.data.mvtec import read_mask, scan_category
    from pipeline.evaluation.anomaly import auroc
    from pipeline.models.anomaly.patchcore import load_artefact

    out = Path(tempfile.mkdtemp(prefix="patchcore_sweep_")) / chosen["backbone"]
    cmd = [sys.executable, "-m", "pipeline", "finetune", "anomaly", str(category), "--out", str(out)]
    cmd += ["--backbone", chosen["backbone"], "--imgsz", str(chosen["imgsz"]), "--resize", chosen["resize"]]
    cmd += ["--upsample", chosen["upsample"], "--stages", chosen["stages"]]
    if split_path:
        cmd += ["--split", str(split_path)]
    if chosen["pooled"]:
        cmd += ["--feature-dim", str(chosen["feature_dim"])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    import torch

    torch.set_num_threads(threads)
    model = load_artefact(out / "model.pt", device="cpu")
    cat = scan_category(category, check_pixels=False)
    res = {"command": " ".join(cmd[1:]), "command_wall_s": round(wall, 1)}
    res.update({k: metrics[k] for k in ("fit_seconds", "fit_wall_seconds", "memory_bank")})
    from pipeline.models.anomaly.predict import resolve_split

    held_out = {s.image for s in resolve_split(category, split_path).samples("test")}
    for name, samples in (("test_all", cat.test), ("test_split", [s for s in cat.test if s.image in held_out])):
        scores, maps, sizes = model.score_paths([s.image for s in samples])
        px = pixel_metrics(maps, [read_mask(s.mask) if s.mask else None for s in samples], sizes)
        y = np.array([s.label != "good" for s in samples])
        res[name] = {
            "n": len(samples),
            "image_auroc": round(auroc(scores, y), 4),
            "pixel_auroc": round(px["pixel_auroc"], 5),
            "pro": round(px["pro"], 4),
            "decisions_right": int(((scores >= model.threshold) == y).sum()),
        }
    print(chosen["backbone"], res, flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--category", type=Path, default=Path(os.environ.get("MVTEC_ROOT", "../shared/data/mvtec_ad")) / "bottle"
    )
    ap.add_argument("--split", type=Path, default=None)
    ap.add_argument("--backbones", default="efficientnet_lite0,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit-budget", type=float, default=60.0)
    ap.add_argument("--no-final", action="store_true", help="sweep val only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    sw = Sweep(args.category, args.split, args.threads)
    print(
        f"{len(sw.train)} train/good decoded in {sw.decode_s:.1f} s; {len(sw.val)} val images "
        f"({int(sw.val_y.sum())} defect); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    doc: dict = {"rows": [], "chosen": {}, "final": {}}
    for name in args.backbones.split(","):
        chosen, rows = sweep_trunk(sw, name, args.fit_budget)
        doc["rows"] += rows
        doc["chosen"][name] = chosen
        print(f"chosen on val for {name}: {chosen}", flush=True)
    doc["sweep_wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"sweep wall time {doc['sweep_wall_s']} s", flush=True)
    del sw
    if not args.no_final:
        for name, chosen in doc["chosen"].items():
            doc["final"][name] = final_fit(args.category, args.split, chosen, args.threads)
    doc["total_wall_s"] = round(time.perf_counter() - t0, 1)

    print(
        "\n| trunk | imgsz | resize | stages | feature dim | upsample | est. fit s "
        "| val image AUROC | val pixel AUROC | val PRO |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in doc["rows"]:
        print(
            f"| {r['backbone']} | {r['imgsz']} | {r['resize']} | {r['stages']} | {r['feature_dim']} "
            f"| {r['upsample']} | "
            f"{r['fit_est_s']} | {r['val_image_auroc']:.4f} | {r['val_pixel_auroc']:.4f} | {r['val_pro']:.4f} |"
        )
    print(f"total wall time {doc['total_wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
