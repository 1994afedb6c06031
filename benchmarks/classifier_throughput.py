"""Training throughput (images/s) of the classifier loop against a torchvision-reference-style loop.

Same model (one attempt's config), optimiser, loss, batch size, input size and images, in one run:

- ``reference``: the loop of torchvision's ``references/classification/train.py`` — a ``Dataset``
  that opens each image with PIL in ``__getitem__`` and applies ``Resize``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize``; a ``DataLoader`` (``--workers``, shuffle); model step.
- ``ours``: ``pipeline.models.classifier.train`` — images decoded and resized once into a uint8 cache
  (timed separately as a one-time cost), batches sliced from it and augmented on the device.

Reports steady-state images/s (after one warm-up batch), the share of time spent on data
(decode/resize/augment) versus the model step, and ours including the one-time cache fill
amortised over one epoch of the measured images. The loops alternate for ``--rounds`` rounds and
each loop's best round is reported, since a shared machine's load changes from second to second.

Usage::

    python benchmarks/classifier_throughput.py --root $MVTEC_ROOT/bottle --imgsz 128 --batch 16 --steps 6
    python benchmarks/classifier_throughput.py            # synthetic category when no --root / MVTEC_ROOT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _images(root: Path, limit: int) -> list[tuple[Path, int]]:
    from pipeline.data.mvtec import scan_category

    cat = scan_category(root, check_pixels=False)
    classes = ["good"] + cat.defect_types
    items = [(p, 0) for p in cat.train_good] + [(s.image, classes.index(s.label)) for s in cat.test]
    step = max(len(items) // limit, 1)
    return items[::step][:limit], classes


def reference_loop(items, classes, cfg, model, steps: int, workers: int, device: str) -> dict:
    import torch
    from PIL import Image
    from torchvision import transforms as T

    h, w = cfg.data.input_size_hw
    tf = T.Compose([T.Resize((h, w)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg.data.mean, cfg.data.std)])

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            with Image.open(path) as im:
                return tf(im.convert("RGB")), label

    loader = torch.utils.data.DataLoader(
        Folder(),
        batch_size=cfg.train.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
    )
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    model.train()
    seen, data_s, step_s, done = 0, 0.0, 0.0, -1  # batch 0 is the warm-up
    t_start = None
    while done < steps:
        it = iter(loader)
        while done < steps:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            x, y = x.to(device), y.to(device)
            t1 = time.perf_counter()
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            done += 1
            if done == 0:
                t_start = t2
                continue
            seen += len(y)
            data_s += t1 - t0
            step_s += t2 - t1
    wall = time.perf_counter() - t_start
    return {"images_per_s": seen / wall, "data_share": data_s / (data_s + step_s), "images": seen, "wall_s": wall}


def our_loop(items, classes, cfg, model, steps: int, device: str) -> dict:
    import torch

    from pipeline.models.classifier.data import load_image_set
    from pipeline.models.classifier.train import make_loss, make_optimizer, train_one_epoch

    t0 = time.perf_counter()
    data = load_image_set(items, classes, Path("/"), cfg.data.input_size_hw, progress=False)
    cache_s = time.perf_counter() - t0
    opt = make_optimizer(cfg, model)
    loss_fn = make_loss(cfg, data.counts(), device)
    gen = torch.Generator().manual_seed(0)
    bs = cfg.train.batch_size
    # warm-up batch, then exactly `steps` batches of `bs` images
    warm = type(data)(data.images[:bs], data.labels[:bs], data.paths[:bs], classes)
    train_one_epoch(model, warm, cfg, opt, loss_fn, device, gen)
    n = bs * steps
    reps = -(-n // len(data))
    sub = type(data)(
        data.images.repeat(reps, 1, 1, 1)[:n], data.labels.repeat(reps)[:n], (data.paths * reps)[:n], classes
    )
    t1 = time.perf_counter()
    r = train_one_epoch(model, sub, cfg, opt, loss_fn, device, gen)
    wall = time.perf_counter() - t1
    return {
        "images_per_s": n / wall,
        "data_share": r["data_s"] / (r["data_s"] + r["step_s"]),
        "images": n,
        "wall_s": wall,
        "cache_fill_s": cache_s,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--root", type=Path, default=None, help="category folder (default $MVTEC_ROOT/bottle, else synthetic)"
    )
    ap.add_argument("--attempt", default="attempt4_gem")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="measured batches per loop (after one warm-up batch)")
    ap.add_argument("--images", type=int, default=64, help="distinct images used")
    ap.add_argument("--workers", default="0,2", help="reference DataLoader workers to try, comma-separated")
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternate the loops this many times; report each loop's best"
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    from pipeline.core.device import resolve_device
    from pipeline.models.classifier.config import load_config
    from pipeline.models.classifier.model import build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.root
    if root is None and os.environ.get("MVTEC_ROOT") and (Path(os.environ["MVTEC_ROOT"]) / "bottle").is_dir():
        root = Path(os.environ["MVTEC_ROOT"]) / "bottle"
    if root is None:
        from pipeline.data.synth import generate_category

        root = generate_category(Path(tempfile.mkdtemp()) / "synth", seed=0)
    device = resolve_device(args.device)
    cfg = load_config(
        args.attempt,
        {
            "data.input_size_hw": [args.imgsz, args.imgsz],
            "train.batch_size": args.batch,
            "data.augment.rotate_deg": 0.0,
            "data.augment.translate_frac": 0.0,
            "data.augment.brightness": 0.0,
            "data.augment.contrast": 0.0,
        },
    )
    items, classes = _images(root, args.images)
    loops = [(f"reference (PIL decode per item, {w} workers)", int(w)) for w in args.workers.split(",") if w.strip()]
    loops.append(("ours (cached uint8, batch augment)", None))
    best: dict[str, dict] = {}
    cache_fill = None
    for _ in range(args.rounds):  # loops alternate; the best round of each counts (the machine may be shared)
        for name, workers in loops:
            torch.manual_seed(0)
            model = build_model(cfg.model, len(classes)).to(device)
            if workers is None:
                r = our_loop(items, classes, cfg, model, args.steps, device)
                cache_fill = r["cache_fill_s"] if cache_fill is None else cache_fill
                r["cache_fill_s"] = cache_fill
                r["images_per_s_first_epoch_incl_cache"] = len(items) / (len(items) / r["images_per_s"] + cache_fill)
            else:
                r = reference_loop(items, classes, cfg, model, args.steps, workers, device)
            if name not in best or r["images_per_s"] > best[name]["images_per_s"]:
                best[name] = {"loop": name, **r}
    rows = [best[name] for name, _ in loops]

    print(
        f"# {args.attempt} on {root} ({len(items)} images, {args.imgsz} px, batch {args.batch}, "
        f"{args.steps} steps, device {device}, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, best of {args.rounds} alternating rounds)"
    )
    print(f"| {'loop':<48} | {'images/s':>9} | {'data share':>10} | {'wall s':>7} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 12}|{'-' * 9}|")
    for r in rows:
        print(f"| {r['loop']:<48} | {r['images_per_s']:9.2f} | {r['data_share']:10.1%} | {r['wall_s']:7.1f} |")
    ours = rows[-1]
    print(
        f"ours: one-time decode+resize cache fill {ours['cache_fill_s']:.1f} s for {len(items)} images; "
        f"first epoch including it {ours['images_per_s_first_epoch_incl_cache']:.2f} images/s"
    )
    best_ref = max(r["images_per_s"] for r in rows[:-1]) if len(rows) > 1 else None
    if best_ref:
        print(f"speed-up of ours over the best reference loop: {ours['images_per_s'] / best_ref:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
