"""Epoch time of SAM decoder fine-tuning with the image-embedding cache vs recomputing embeddings.

Same images, same model, one process. For each model type:

1. epoch with a cold cache (every image encoded once and stored),
2. epoch with the warm cache (no encoder work: the cost of a normal epoch after the first),
3. epoch with no cache (every image encoded again: what training without a cache costs every epoch).

Reports seconds per epoch, the encoder forward time per image, and the ratio (3) / (2). Models use
random init (timing only; no weights are needed or downloaded). Data: the first ``--images`` images
of the bottle train split when ``$MVTEC_ROOT`` is set (900x900), else a synthetic 900x900 category.

    python benchmarks/sam_embedding_cache.py --models tiny,vit_b --images 6,3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path


def _records(tmp: Path) -> Path:
    """Annotation folder (convert-masks output) for the bottle category or a synthetic stand-in."""
    from pipeline.data.convert import convert_category
    from pipeline.data.synth import generate_category

    root = os.environ.get("MVTEC_ROOT")
    if root and (Path(root) / "bottle").is_dir():
        cat = Path(root) / "bottle"
    else:
        cat = generate_category(tmp / "synth", size_hw=(900, 900), n_per_defect=8, n_train_good=2, n_test_good=3)
    convert_category(cat, tmp / "ann")
    return tmp / "ann"


def bench(model_type: str, n_images: int, ann: Path, cache: Path, *, loss_resolution: str) -> dict:
    import torch

    from pipeline.data.sam_records import group_by_image, read_records
    from pipeline.models.sam.model import Embedder, build_sam
    from pipeline.models.sam.train import SamTrainConfig, _set_trainable, train_one_epoch

    cfg = SamTrainConfig(
        train_records=str(ann / "sam" / "train.jsonl"),
        val_records=str(ann / "sam" / "val.jsonl"),
        model_type=model_type,
        lr=1e-4,
        loss_resolution=loss_resolution,
    )
    groups = group_by_image(read_records(ann / "sam" / "train.jsonl"))[:n_images]
    sam = build_sam(model_type, device="cpu")  # random init: timing only
    params = _set_trainable(sam, cfg.train)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    cached = Embedder(sam, cache_dir=cache / model_type)
    _ = cached.fingerprint  # hashing the encoder weights once is part of setup, not of an epoch
    cold = train_one_epoch(sam, groups, cached, opt, sched, cfg, gen)
    warm = train_one_epoch(sam, groups, cached, opt, sched, cfg, gen)
    none = train_one_epoch(sam, groups, Embedder(sam, cache_dir=None), opt, sched, cfg, gen)
    assert warm["encoder_calls"] == 0 and none["encoder_calls"] == len(groups) == cold["encoder_calls"]
    enc = (none["seconds"] - warm["seconds"]) / len(groups)
    return {
        "model": model_type,
        "images": len(groups),
        "components": sum(len(g.records) for g in groups),
        "size": f"{groups[0].size_hw[1]}x{groups[0].size_hw[0]}",
        "img_size": sam.image_encoder.img_size,
        "cold": cold["seconds"],
        "warm": warm["seconds"],
        "none": none["seconds"],
        "enc_per_image": enc,
        "step": warm["seconds"] / len(groups),
        "ratio": none["seconds"] / warm["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,vit_b", help="comma-separated model types")
    ap.add_argument("--images", default="8,3", help="images per model (comma-separated, same order)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument(
        "--loss-resolution", default="lowres", choices=["lowres", "native"], help="where the loss is computed"
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    counts = [int(v) for v in args.images.split(",")]
    counts += [counts[-1]] * (len(models) - len(counts))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ann = _records(tmp)
        rows = []
        for m, n in zip(models, counts):
            rows.append(bench(m, n, ann, tmp / "cache", loss_resolution=args.loss_resolution))
            print(f"done {m}", file=sys.stderr, flush=True)
    print(
        f"# SAM embedding cache, CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__}, {args.threads} threads, random init, loss at {args.loss_resolution} resolution"
    )
    print(
        "| model | input | images (components) | encoder s/image | decoder step s | epoch cold cache s | "
        "epoch cached s | epoch recompute s | recompute / cached |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['size']} -> {r['img_size']} | {r['images']} ({r['components']}) | "
            f"{r['enc_per_image']:.3f} | "
            f"{r['step']:.3f} | {r['cold']:.2f} | {r['warm']:.2f} | {r['none']:.2f} | {r['ratio']:.1f}x |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
