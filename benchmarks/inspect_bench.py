"""``pipeline inspect`` on CPU: images/s, peak RSS at two image counts, and the separate predicts.

Usage::

    python benchmarks/inspect_bench.py [--work /tmp/bench_inspect] [--sizes 100,1000] [--compare 100]
        [--threads 2] [--json out.json]

Builds once (cached in ``--work``): a synthetic category of 900x900 images
(:func:`pipeline.data.synth.generate_category`), and on it PatchCore (EfficientNet-Lite0, 224 px,
1% coreset), a classifier (attempt 4, 160 px, 1 epoch from scratch), YOLO-World v8n (random init,
1 epoch at 320 px) and the tiny SAM (random init; SAM-tiny is this project's test-size SAM, see
``build_sam("tiny")``), then two bundles: all four models, and PatchCore + classifier alone.
The weights are barely trained: this measures speed and memory, not accuracy.

The images to inspect are ``N`` 900x900 PNGs drawn from another seed's category (40 distinct images,
repeated under new names), laid out as ``new/test/good/*.png`` so that the separate ``predict``
commands can read them through a split (``convert-masks`` with ratios 0/0/1).

Every measured run is one child process (``python -m pipeline ...``), timed from start to exit
(interpreter start, imports, model loading, PNG decoding, every model, writing every file); its
peak RSS is the ``VmHWM`` the child reads from ``/proc/self/status`` as it exits. Rows:

- ``inspect`` with the full bundle at each of ``--sizes`` images (overlays on);
- the same ``--compare`` images through ``predict anomaly`` (``--no-maps --overlays 0``, COCO
  regions on, as inspect writes regions), ``predict classifier``, ``predict yolo`` and
  ``predict sam`` (prompted by the detector's boxes at the bundle's detector threshold,
  ``--overlays 0``), one after the other: their summed time and the largest peak RSS;
- PatchCore + classifier alone (the moonshot: >= 10 images/s end to end), with and without overlays;
- then the detector boxes ``inspect`` kept, and SAM-tiny alone on one image with 3 box prompts
  (:func:`sam_cost`): a detector trained for one epoch may keep no box, and SAM then never runs.
"""

from __future__ import annotations

import argparse  # noqa: E402
import json  # noqa: E402
import os
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys
import time  # noqa: E402
from pathlib import Path  # noqa: E402

SIZE_HW = (900, 900)


# ``python -m pipeline ARGS`` that writes its own peak RSS (VmHWM of /proc/self/status, KiB) at exit into
# $BENCH_HWM. Not ru_maxrss from wait4: Linux starts a forked child's maxrss at the parent's RSS, and
# this parent holds the trained models (about 1.8 GiB), so every child would report at least that.
_RUN_PIPELINE = """
import atexit, os, runpy, sys
def _hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["BENCH_HWM"], "w").write(line.split()[1])
atexit.register(_hwm)
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


def child(cmd: list[str], *, env: dict) -> dict:
    """Run ``cmd`` (:func:`pipeline_cmd`); ``{"seconds" from start to exit, "rss_mib" its VmHWM}``."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".hwm") as hwm:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env={**env, "BENCH_HWM": hwm.name}, capture_output=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write((proc.stdout + proc.stderr).decode(errors="replace")[-4000:])
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
        kib = int(Path(hwm.name).read_text())
    return {"seconds": seconds, "rss_mib": kib / 1024.0}


def pipeline_cmd(*args) -> list[str]:
    return [sys.executable, "-c", _RUN_PIPELINE, *map(str, args)]


# ------------------------------------------------------------------------------ models and images
def build_models(work: Path) -> dict:
    """Train (or reuse) the four runs and the two bundles in ``work``."""
    import warnings

    from pipeline.data.convert import convert_category
    from pipeline.data.synth import generate_category
    from pipeline.inspection.bundle import make_bundle
    from pipeline.models.anomaly.patchcore import PatchCoreConfig
    from pipeline.models.anomaly.train import fit_run
    from pipeline.models.classifier.config import load_config
    from pipeline.models.classifier.train import train_classifier
    from pipeline.models.sam.model import build_sam, save_finetuned
    from pipeline.models.yolo.train import train_yolo_world

    paths = {k: work / k for k in ("bundle_all", "bundle_pc_cls")}
    if all((p / "bundle.yaml").is_file() for p in paths.values()):
        return paths
    cat = generate_category(work / "train_cat" / "synth", seed=0, size_hw=SIZE_HW, n_train_good=20)
    ann = work / "ann"
    convert_category(cat, ann, force=True)
    split = ann / "split.json"
    cfg = PatchCoreConfig(backbone="efficientnet_lite0", image_size=224, coreset_ratio=0.01)
    fit_run(None, out=work / "pc", config=cfg, split_path=split, progress=False, device="cpu", echo=False, force=True)
    ccfg = load_config("attempt4_gem", {"data.input_size_hw": [160, 160], "train.epochs": 1, "train.device": "cpu"})
    train_classifier(ccfg, split, work / "cls", weights="none", progress=False, echo=False, force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_yolo_world(
            data_yaml=ann / "yolo" / "data.yaml",
            model="yolov8n-worldv2.yaml",
            out_dir=work / "yolo",
            epochs=1,
            imgsz=320,
            batch=8,
            force=True,
        )
    sam = build_sam("tiny", tiny_seed=0)
    (work / "sam").mkdir(exist_ok=True)
    save_finetuned(
        work / "sam" / "best.pt",
        sam=sam,
        config={"model_type": "tiny", "tiny_seed": 0, "checkpoint": None},
        trained=["mask_decoder"],
    )
    common = {"split_path": split, "device": "cpu", "progress": False, "force": True}
    make_bundle(
        out=paths["bundle_all"],
        anomaly=work / "pc",
        classifier=work / "cls",
        detector=work / "yolo",
        sam=work / "sam",
        **common,
    )
    make_bundle(out=paths["bundle_pc_cls"], anomaly=work / "pc", classifier=work / "cls", **common)
    return paths


def make_images(work: Path, n: int) -> Path:
    """``work/new<n>/test/good/0000.png ...``: ``n`` 900x900 PNGs (40 distinct ones, repeated), and
    their split (all in test) under ``work/new<n>_ann``."""
    from pipeline.data.convert import convert_category
    from pipeline.data.synth import generate_category

    src = work / "new_src" / "synth"
    if not src.is_dir():
        generate_category(src, seed=1, size_hw=SIZE_HW, n_train_good=0, n_test_good=10, n_per_defect=10)
    distinct = sorted(src.glob("test/*/*.png"))
    cat = work / f"new{n}" / "synth"
    folder = cat / "test" / "good"
    if not folder.is_dir() or len(list(folder.glob("*.png"))) != n:
        shutil.rmtree(cat, ignore_errors=True)
        folder.mkdir(parents=True)
        (cat / "train" / "good").mkdir(parents=True)
        for k in range(n):
            shutil.copyfile(distinct[k % len(distinct)], folder / f"{k:04d}.png")
        convert_category(cat, work / f"new{n}_ann", ratios=(0.0, 0.0, 1.0), force=True)
    return cat


# ------------------------------------------------------------------------------ the measured runs
def run_inspect(bundle: Path, images: Path, out: Path, *, env: dict, overlays: bool = True) -> dict:
    args = ["inspect", images / "test" / "good", "--bundle", bundle, "--out", out, "--device", "cpu", "--force"]
    return child(pipeline_cmd(*args, *([] if overlays else ["--no-overlays"])), env=env)


def run_predicts(work: Path, images: Path, n: int, *, env: dict) -> dict:
    """The four predict commands on the same images: per command and summed."""
    import yaml

    ann = work / f"new{n}_ann"
    split, gt = ann / "split.json", ann / "coco" / "test.json"
    thr = yaml.safe_load((work / "bundle_all" / "bundle.yaml").read_text())["decision"]["thresholds"]["detector"]
    imgsz = yaml.safe_load((work / "yolo" / "config.yaml").read_text()).get("imgsz", 320)
    p = work / f"predict{n}"
    cmds = {
        "predict anomaly": ["predict", "anomaly", work / "pc", "--split", split, "--subset", "test"]
        + ["--no-maps", "--overlays", 0, "--out", p / "pc", "--device", "cpu", "--force"],
        "predict classifier": ["predict", "classifier", "--run", work / "cls", "--split", split]
        + ["--subset", "test", "--out", p / "cls", "--device", "cpu", "--force"],
        "predict yolo": ["predict", "yolo", "--weights", work / "yolo" / "weights" / "best.pt", "--gt", gt]
        + ["--imgsz", imgsz, "--out", p / "yolo", "--device", "cpu", "--force"],
        "predict sam": ["predict", "sam", "--gt", gt, "--boxes", p / "yolo" / "predictions.json"]
        + ["--weights", work / "sam" / "best.pt", "--min-score", thr, "--overlays", 0]
        + ["--cache-dir", p / "sam_cache", "--out", p / "sam", "--device", "cpu", "--force"],
    }
    shutil.rmtree(p / "sam_cache", ignore_errors=True)
    res = {name: child(pipeline_cmd(*args), env=env) for name, args in cmds.items()}
    res["sum"] = {
        "seconds": sum(r["seconds"] for r in res.values()),
        "rss_mib": max(r["rss_mib"] for r in res.values()),
    }
    return res


def sam_cost(work: Path, *, boxes: int = 3, repeats: int = 5) -> dict:
    """SAM-tiny alone, in this process: seconds per 900x900 image with ``boxes`` box prompts (image
    embedding included). The barely trained detector may keep no box, and SAM then never runs in
    ``inspect``; this says what it adds per image once boxes are kept."""
    import numpy as np

    from pipeline.core.io import read_rgb
    from pipeline.inspection.steps import SamStep

    step = SamStep(work / "bundle_all" / "sam" / "best.pt", device="cpu")
    image = read_rgb(sorted((work / "new_src" / "synth").glob("test/*/*.png"))[0])
    xyxy = np.array([[100 + 200 * k, 100, 250 + 200 * k, 300] for k in range(boxes)], np.float32)
    step.masks(image, xyxy)  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        step.masks(image, xyxy)
    return {"seconds_per_image": (time.perf_counter() - t0) / repeats, "boxes": boxes}


def table(rows: list[tuple[str, int, dict]]) -> str:
    lines = ["| run | images | seconds | images/s | peak RSS MiB |", "|---|---|---|---|---|"]
    for name, n, r in rows:
        lines.append(f"| {name} | {n} | {r['seconds']:.1f} | {n / r['seconds']:.2f} | {r['rss_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_inspect"))
    ap.add_argument("--sizes", default="100,1000", help="image counts for inspect with the full bundle")
    ap.add_argument("--compare", type=int, default=100, help="image count for the separate predicts")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every child process")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "COLUMNS": "200"}
    t0 = time.perf_counter()
    bundles = build_models(work)
    print(f"models and bundles ready in {time.perf_counter() - t0:.0f} s ({work})", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: list[tuple[str, int, dict]] = []
    for n in sorted(set(sizes + [args.compare])):
        imgs = make_images(work, n)
        if n in sizes:
            r = run_inspect(bundles["bundle_all"], imgs, work / f"inspect_all{n}", env=env)
            rows.append(("inspect: PatchCore + classifier + detector + SAM-tiny", n, r))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
        if n == args.compare:
            pred = run_predicts(work, imgs, n, env=env)
            for name, r in pred.items():
                if name != "sum":
                    rows.append((name, n, r))
            rows.append(("separate predicts, summed (largest RSS)", n, pred["sum"]))
            for overlays in (True, False):
                r = run_inspect(bundles["bundle_pc_cls"], imgs, work / f"inspect_pc{n}", env=env, overlays=overlays)
                label = "inspect: PatchCore + classifier" + ("" if overlays else ", --no-overlays")
                rows.append((label, n, r))
            print(table(rows[-7:]), flush=True)
    load = os.getloadavg()
    print()
    print(f"CPU, {args.threads} threads per process, {os.cpu_count()} cores, load average {load[0]:.1f} (shared)")
    print(table(rows))
    full = [(n, r) for name, n, r in rows if name.startswith("inspect: PatchCore + classifier + detector")]
    if len(full) >= 2:
        (n0, r0), (n1, r1) = full[0], full[-1]
        rate = (n1 - n0) / max(r1["seconds"] - r0["seconds"], 1e-9)
        growth = 100.0 * (r1["rss_mib"] / r0["rss_mib"] - 1.0)
        print(
            f"full bundle from {n0} to {n1} images: {rate:.2f} images/s marginal (start-up excluded), "
            f"peak RSS {growth:+.1f}%"
        )
    boxes = sum(
        1
        for line in (work / f"inspect_all{max(sizes)}" / "verdicts.jsonl").open()
        for g in json.loads(line)["regions"]
        if g["source"] == "detector"
    )
    sam = sam_cost(work)
    print(
        f"detector boxes kept at the bundle's threshold over {max(sizes)} images: {boxes}; SAM-tiny alone: "
        f"{1000 * sam['seconds_per_image']:.0f} ms per image with {sam['boxes']} boxes (embedding included)"
    )
    if args.json:
        args.json.write_text(json.dumps([{"run": a, "images": n, **r} for a, n, r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
