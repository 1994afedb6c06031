"""GPU check: a few training steps of each trainer, tiny and real-size models, printed as a table.

Usage (normally through ``scripts/gpu_check.sh``)::

    python benchmarks/gpu_check.py                 # CUDA: tiny + real-size models, every trainer
    python benchmarks/gpu_check.py --dry-run       # CPU: tiny models, 2 steps (what the test runs)

Trainers (random initialisation everywhere: no weights are read or downloaded):

- ``classifier``: ResNet-18 (attempt 1 head), ``pipeline.models.classifier.train.train_one_epoch`` with bf16
  autocast, channels_last and pinned-memory batches on CUDA. tiny = 32 px batch 4, real = 224 px batch 32.
- ``sam-decoder``: ``pipeline.models.sam.train.train_one_epoch`` (mask decoder, cached embeddings, 4 images
  per step). tiny = the tiny SAM, real = ViT-B (``vit_b``) size.
- ``sam-encoder``: the frozen image encoder filling the embedding cache (one image per call).
- ``anomaly``: PatchCore patch features (``pipeline.models.anomaly.patchcore.patch_features``). tiny = ResNet-18 at
  64 px, real = Wide-ResNet-50-2 at 256 px; batch 8.
- ``yolo``: one epoch of ``pipeline.models.yolo.train.train_yolo_world`` from the model YAML
  (tiny = YOLOv8n-worldv2 at 64 px, real = YOLOv8s-worldv2 at 640 px). ultralytics owns its loop,
  so only images/s and peak memory are reported. Off in ``--dry-run`` unless asked for.

Columns: images/s over the timed steps (after one warm-up step), seconds per step spent on data
(decode/copy/augment, embeddings from cache) and on compute (forward, backward, optimizer; CUDA
synchronised), the data share, and peak CUDA memory allocated by torch (MiB; ``-`` on CPU).
Synthetic MVTec-layout data (``pipeline.data.synth``) is generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAINERS = ("classifier", "sam-decoder", "sam-encoder", "anomaly", "yolo")


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def _reset_peak(device: str) -> None:
    import torch

    if _cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: str):
    import torch

    if _cuda(device):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _row(trainer, size, model, device, batch, steps, images, seconds, data_s, compute_s, peak) -> dict:
    return {
        "trainer": trainer,
        "size": size,
        "model": model,
        "device": device,
        "batch": batch,
        "steps": steps,
        "images_per_s": images / seconds if seconds > 0 else float("nan"),
        "data_s_per_step": data_s / steps if data_s is not None else None,
        "compute_s_per_step": compute_s / steps if compute_s is not None else None,
        "data_pct": 100 * data_s / (data_s + compute_s) if data_s is not None and (data_s + compute_s) > 0 else None,
        "peak_mib": peak,
    }


# ----------------------------------------------------------------------------- trainers


def check_classifier(size: str, device: str, steps: int) -> dict:
    import torch

    from pipeline.models.classifier.config import load_config
    from pipeline.models.classifier.data import ImageSet
    from pipeline.models.classifier.model import build_model
    from pipeline.models.classifier.train import make_loss, make_optimizer, train_one_epoch

    hw, bs = ((32, 32), 4) if size == "tiny" else ((224, 224), 32)
    cfg = load_config(
        "attempt1_resnet18", {"data.input_size_hw": list(hw), "train.batch_size": bs, "train.device": device}
    )
    g = torch.Generator().manual_seed(0)
    n = bs * (steps + 1)
    images = torch.randint(0, 255, (n, 3, *hw), generator=g, dtype=torch.uint8)
    data = ImageSet(
        images, torch.randint(0, 4, (n,), generator=g), [f"{i}.png" for i in range(n)], ["good", "a", "b", "c"]
    )
    warm = ImageSet(images[:bs], data.labels[:bs], data.paths[:bs], data.classes)
    timed = ImageSet(images[bs:], data.labels[bs:], data.paths[bs:], data.classes)
    channels_last = _cuda(device)
    model = build_model(cfg.model, 4).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    loss_fn = make_loss(cfg, None, device)
    pinned = {} if _cuda(device) else None
    kw = dict(amp=True, channels_last=channels_last, pinned=pinned)
    train_one_epoch(model, warm, cfg, opt, loss_fn, device, g, **kw)  # warm-up (cudnn autotune, allocator)
    _reset_peak(device)
    t0 = time.perf_counter()
    tr = train_one_epoch(model, timed, cfg, opt, loss_fn, device, g, **kw)
    wall = time.perf_counter() - t0
    return _row(
        "classifier",
        size,
        f"resnet18 {hw[0]}px",
        device,
        bs,
        steps,
        len(timed),
        wall,
        tr["data_s"],
        tr["step_s"],
        _peak_mib(device),
    )


def _sam_inputs(work: Path):
    from pipeline.data.convert import convert_category
    from pipeline.data.sam_records import group_by_image, read_records
    from pipeline.data.synth import generate_category

    ann = work / "ann"
    if not (ann / "sam" / "train.jsonl").is_file():
        cat = work / "synth" if (work / "synth").is_dir() else generate_category(work / "synth", seed=0)
        convert_category(cat, ann)
    return ann, group_by_image(read_records(ann / "sam" / "train.jsonl"))


def check_sam(size: str, device: str, steps: int, work: Path) -> list[dict]:
    import math

    import torch

    from pipeline.models.sam.model import Embedder, build_sam
    from pipeline.models.sam.train import SamTrainConfig, _set_trainable, train_one_epoch, train_step_module

    ann, groups = _sam_inputs(work)
    model_type = "tiny" if size == "tiny" else "vit_b"
    per = 4
    need = per * (steps + 1)
    groups = (groups * math.ceil(need / len(groups)))[:need]
    torch.manual_seed(0)
    sam = build_sam(model_type, device=device)
    cfg = SamTrainConfig(
        train_records=str(ann / "sam" / "train.jsonl"),
        val_records=str(ann / "sam" / "val.jsonl"),
        model_type=model_type,
        device=device,
        images_per_step=per,
        epochs=1,
    )
    params = _set_trainable(sam, cfg.train)
    rows = []
    # encoder: fill the cache (first sight of each distinct image), timed per image
    embedder = Embedder(sam, cache_dir=work / f"cache_{model_type}")
    distinct = list({str(g.image): g for g in groups}.values())
    embedder.compute(distinct[0].image)  # warm-up
    _reset_peak(device)
    from pipeline.core.io import read_rgb
    from pipeline.models.sam.model import image_to_input

    data_s = compute_s = 0.0
    t0 = time.perf_counter()
    for g in distinct:
        ta = time.perf_counter()
        x = image_to_input(sam, read_rgb(g.image))
        if _cuda(device):
            torch.cuda.synchronize()
        tb = time.perf_counter()
        with torch.no_grad():
            sam.image_encoder(x)
        if _cuda(device):
            torch.cuda.synchronize()
        data_s += tb - ta
        compute_s += time.perf_counter() - tb
        embedder(g.image)  # the cache the decoder reads (untimed part repeats the encoder once)
    wall = data_s + compute_s
    rows.append(
        _row(
            "sam-encoder",
            size,
            f"{model_type} image encoder",
            device,
            1,
            len(distinct),
            len(distinct),
            wall,
            data_s,
            compute_s,
            _peak_mib(device),
        )
    )
    # decoder: steps of images_per_step images from the cache
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    gen = torch.Generator().manual_seed(0)
    step_module = train_step_module(sam, device)
    train_one_epoch(sam, groups[:per], embedder, opt, sched, cfg, gen, step_module=step_module)  # warm-up
    _reset_peak(device)
    timing: dict = {}
    t0 = time.perf_counter()
    train_one_epoch(sam, groups[per:], embedder, opt, sched, cfg, gen, step_module=step_module, timing=timing)
    wall = time.perf_counter() - t0
    rows.append(
        _row(
            "sam-decoder",
            size,
            f"{model_type} mask decoder",
            device,
            per,
            steps,
            len(groups) - per,
            wall,
            timing["data_s"],
            timing["compute_s"],
            _peak_mib(device),
        )
    )
    return rows


def check_anomaly(size: str, device: str, steps: int, work: Path) -> dict:
    import torch

    from pipeline.data.synth import generate_category
    from pipeline.models.anomaly.patchcore import load_batch, patch_features
    from pipeline.models.backbones import SPECS, Backbone, build_stages

    name, img = ("resnet18", 64) if size == "tiny" else ("wide_resnet50_2", 256)
    bs = 8
    cat = work / "synth" if (work / "synth").is_dir() else generate_category(work / "synth", seed=0)
    paths = sorted((cat / "train" / "good").glob("*.png"))
    paths = (paths * (bs * (steps + 1) // max(len(paths), 1) + 1))[: bs * (steps + 1)]
    torch.manual_seed(0)
    bb = Backbone(spec=SPECS[name], model=build_stages(name).to(device), weights_path=Path("random-init"))
    if _cuda(device):
        bb.model = bb.model.to(memory_format=torch.channels_last)
    x, _ = load_batch(paths[:bs], size=img, spec=bb.spec, device=device)
    patch_features(bb, x)  # warm-up
    _reset_peak(device)
    data_s = compute_s = 0.0
    for i in range(bs, len(paths), bs):
        ta = time.perf_counter()
        x, _ = load_batch(paths[i : i + bs], size=img, spec=bb.spec, device=device)
        if _cuda(device):
            torch.cuda.synchronize()
        tb = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16) if _cuda(device) else torch.autocast("cpu", enabled=False):
            patch_features(bb, x)
        data_s += tb - ta
        compute_s += time.perf_counter() - tb
    return _row(
        "anomaly",
        size,
        f"{name} {img}px features",
        device,
        bs,
        steps,
        len(paths) - bs,
        data_s + compute_s,
        data_s,
        compute_s,
        _peak_mib(device),
    )


def check_yolo(size: str, device: str, steps: int, work: Path) -> dict:
    import torch

    from pipeline.data.convert import convert_category
    from pipeline.data.synth import generate_category
    from pipeline.models.yolo.train import train_yolo_world

    ann = work / "ann"
    if not (ann / "yolo" / "data.yaml").is_file():
        cat = work / "synth" if (work / "synth").is_dir() else generate_category(work / "synth", seed=0)
        convert_category(cat, ann)
    model, imgsz, bs = ("yolov8n-worldv2.yaml", 64, 8) if size == "tiny" else ("yolov8s-worldv2.yaml", 640, 16)
    n_train = len(list((ann / "yolo" / "images" / "train").iterdir()))
    _reset_peak(device)
    t0 = time.perf_counter()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_yolo_world(
            data_yaml=ann / "yolo" / "data.yaml",
            model=model,
            out_dir=work / f"yolo_{size}",
            epochs=1,
            imgsz=imgsz,
            batch=bs,
            device="0" if _cuda(device) else "cpu",
            force=True,
        )
    wall = time.perf_counter() - t0  # includes validation and model build: a lower bound on training speed
    del torch
    return _row(
        "yolo",
        size,
        f"{model.split('.')[0]} {imgsz}px (1 epoch + val)",
        device,
        bs,
        max(n_train // bs, 1),
        n_train,
        wall,
        None,
        None,
        _peak_mib(device),
    )


# ----------------------------------------------------------------------------- table


def format_table(rows: list[dict]) -> str:
    cols = [
        ("trainer", "trainer", "{}"),
        ("size", "size", "{}"),
        ("model", "model", "{}"),
        ("device", "device", "{}"),
        ("batch", "batch", "{}"),
        ("steps", "steps", "{}"),
        ("images_per_s", "img/s", "{:.1f}"),
        ("data_s_per_step", "data s/step", "{:.4f}"),
        ("compute_s_per_step", "compute s/step", "{:.4f}"),
        ("data_pct", "data %", "{:.0f}"),
        ("peak_mib", "peak MiB", "{:.0f}"),
    ]
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else f.format(r[k]) for k, _, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(cols))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run(*, device: str, sizes: list[str], trainers: list[str], steps: int, work: Path, echo=print) -> list[dict]:
    """Run the checks; a check that fails gives a row with its error instead of stopping the others."""
    rows: list[dict] = []
    for size in sizes:
        for trainer in trainers:
            t0 = time.perf_counter()
            try:
                if trainer == "classifier":
                    got = [check_classifier(size, device, steps)]
                elif trainer in ("sam-decoder", "sam-encoder"):
                    if any(r["trainer"].startswith("sam") and r["size"] == size for r in rows):
                        continue  # both SAM rows come from one check
                    got = check_sam(size, device, steps, work)
                elif trainer == "anomaly":
                    got = [check_anomaly(size, device, steps, work)]
                else:
                    got = [check_yolo(size, device, steps, work)]
            except Exception as exc:  # report and go on: the table should show what works
                got = [
                    {
                        "trainer": trainer,
                        "size": size,
                        "model": f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}",
                        "device": device,
                    }
                ]
            rows += got
            echo(f"  {trainer} {size}: {time.perf_counter() - t0:.1f} s")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny models, 2 steps (exercises the code without a GPU)"
    )
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    ap.add_argument("--sizes", default=None, help="comma list of tiny,real (default: both on CUDA, tiny on CPU)")
    ap.add_argument(
        "--trainers", default=None, help=f"comma list of {','.join(TRAINERS)} (default: all; no yolo in --dry-run)"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per check (default 10 on CUDA, 2 on CPU)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    import torch

    if args.dry_run:
        device = "cpu"
    elif args.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = args.device
    if _cuda(device) and not torch.cuda.is_available():
        print("CUDA requested but not available (use --dry-run or --device cpu)", file=sys.stderr)
        return 2
    cuda = _cuda(device)
    sizes = args.sizes.split(",") if args.sizes else (["tiny", "real"] if cuda else ["tiny"])
    trainers = args.trainers.split(",") if args.trainers else [t for t in TRAINERS if cuda or t != "yolo"]
    bad = sorted(set(trainers) - set(TRAINERS)) + sorted(set(sizes) - {"tiny", "real"})
    if bad:
        print(f"unknown trainer/size {bad}: expected trainers {TRAINERS}, sizes tiny,real", file=sys.stderr)
        return 2
    steps = args.steps or (10 if cuda else 2)
    if not cuda:
        torch.set_num_threads(
            1 if args.dry_run else max(1, min(4, os.cpu_count() or 1))
        )  # small ops: 1 thread is fastest
    env = f"torch {torch.__version__}"
    if cuda:
        p = torch.cuda.get_device_properties(torch.device(device))
        env += f", {p.name}, {p.total_memory / 2**30:.0f} GiB, "
        f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}"
    else:
        env += f", CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"gpu_check: {env}; steps {steps}; sizes {sizes}; trainers {trainers}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rows = run(device=device, sizes=sizes, trainers=trainers, steps=steps, work=work)
    print()
    print(format_table(rows))
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 1 if any(str(r.get("model", "")).startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
