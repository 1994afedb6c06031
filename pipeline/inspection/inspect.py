"""``pipeline inspect``: a bundle's models on new, unlabelled images, one batch at a time.

Each image is decoded once (:func:`pipeline.core.io.read_rgb`: any size, grey/RGB/RGBA, 8 bits) and
fed to every model of the bundle (:mod:`pipeline.inspection.steps`, each model loaded once); the
verdict comes from the bundle's val-chosen decision (:mod:`pipeline.inspection.verdict`). The run
folder (kind ``inspect``) holds:

- ``verdicts.jsonl``, written as it goes, one line per image in id order: ``id``, ``path``, ``name``,
  ``size_hw``, ``verdict`` (``good`` / ``defect`` / ``error``), ``defect_type``, ``confidence``,
  ``fused_score``, ``reason``, ``scores`` (per source), ``classifier`` (probabilities), ``anomaly``
  (score), ``regions`` (``source``, ``bbox_xywh`` pixels, ``class``, ``score``, ``mask`` COCO RLE or
  ``None``), ``timing_ms``, ``error`` (one line, or ``None``);
- at the end ``verdicts.csv`` (one row per image), ``images.json`` (COCO ``images`` with ``id``,
  ``file_name`` absolute path, ``width``, ``height``, ``name``; ``categories``; unreadable files under
  ``errors``) and ``predictions.json`` (COCO results on those ids: the detector's boxes with their
  SAM masks, or without a detector the PatchCore regions as class ``defect``);
- ``masks/<name>.png`` (union of the image's region masks, 0/255) and ``overlays/<name>.png``
  (heat map, boxes, masks, verdict; ``overlays=False`` skips them).

A file that cannot be read gets verdict ``error`` and the run goes on. Ctrl-C finishes the batch
and stops resumably; ``resume=True`` skips the images already in ``verdicts.jsonl``. Under torchrun
each rank inspects its share and rank 0 merges the same files (:mod:`pipeline.inspection.shards`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.core.console import Interrupted, stop_on_interrupt
from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_rgb
from pipeline.core.runs import RunDir
from pipeline.data.mvtec import GOOD
from pipeline.inspection.sources import ImageItem, resolve_images

VERDICTS = "verdicts.jsonl"
ERROR = "error"


@dataclass
class InspectResult:
    """What :func:`inspect_images` did: the run folder, counts per verdict, images per second of this call."""

    out: Path
    counts: dict = field(default_factory=dict)
    n_images: int = 0
    skipped: int = 0
    seconds: float = 0.0
    rank: int = 0  # this process's rank under torchrun (the CLI prints on rank 0 only)

    @property
    def errors(self) -> int:
        return self.counts.get(ERROR, 0)

    @property
    def images_per_s(self) -> float:
        done = self.n_images - self.skipped
        return done / self.seconds if self.seconds > 0 else 0.0


def inspect_images(
    images: Sequence[str | Path],
    *,
    bundle: Path,
    out: Path,
    batch: int = 8,
    device: str | None = None,
    overlays: bool = True,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> InspectResult:
    """Inspect ``images`` (files, folders, globs; :func:`pipeline.inspection.sources.resolve_images`)
    with the bundle ``bundle`` into the run folder ``out`` (files: module docstring).

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same arguments: each inspects
    its contiguous share of whole batches and rank 0 merges them (:mod:`pipeline.inspection.shards`);
    every rank returns the same counts. The process group is joined here (gloo on CPU, NCCL on CUDA)
    and left again at the end when this call joined it.

    Raises:
        PipelineError: no images, a bad or changed bundle, ``out`` refused by the run-folder rules,
            ``resume`` with another image list, a failure on any rank. Unreadable images are no
            error (verdict ``error``).
        Interrupted: after Ctrl-C, once the current batch is written (resumable).
    """
    from pipeline.core import distributed as D

    joined = D.env_world_size() > 1 and not D.is_initialized()
    dist = D.init_from_env(device)
    try:
        return _inspect(
            images,
            bundle=Path(bundle),
            out=Path(out),
            batch=batch,
            device=device,
            overlays=overlays,
            resume=resume,
            force=force,
            progress=progress,
            rank=dist.rank,
            world_size=dist.world_size,
        )
    finally:
        if joined:
            D.cleanup()


def _agree(error: str | None) -> None:
    """Raise the first rank's error on every rank (so no rank waits for one that gave up)."""
    from pipeline.core.distributed import all_gather_objects

    errors = [e for e in all_gather_objects(error) if e]
    if errors:
        raise PipelineError(errors[0])


def _open(images, *, bundle: Path, out: Path, batch: int, resume: bool, force: bool, rank: int):
    """Check everything before anything is written (every rank): ``(RunDir, items, bundle doc)``."""
    err = run = items = doc = None
    try:
        run = RunDir.open(out, kind="inspect", force=force, resume=resume, resume_file=VERDICTS)
        if batch < 1:
            raise PipelineError(f"--batch {batch}: expected at least 1")
        items = resolve_images(images)
        from pipeline.inspection.bundle import load_bundle

        doc = load_bundle(bundle, verify=rank == 0)  # rank 0 re-hashes; the others read the same files
    except PipelineError as exc:
        err = str(exc)
    _agree(err)
    return run, items, doc


def _start(run: RunDir, items: list[ImageItem], config: dict, *, resume: bool) -> set[int]:
    """Rank 0: create the run folder (clearing an old run's parts), write the config; the ids already done."""
    from pipeline.inspection.shards import PARTS, merge_parts

    if not resume and (run / PARTS).is_dir():  # parts of a killed run: ours, whatever the manifest says
        shutil.rmtree(run / PARTS)
    run.start()
    if resume:
        merge_parts(run.path)  # a run killed before its ranks' parts were merged
        done = _resume_state(run / VERDICTS, items)
    else:
        atomic_write_text(run / VERDICTS, "")
        done = set()
    run.write_config(config)
    return done


def _inspect(
    images,
    *,
    bundle: Path,
    out: Path,
    batch: int,
    device,
    overlays: bool,
    resume: bool,
    force: bool,
    progress: bool,
    rank: int,
    world_size: int,
) -> InspectResult:
    from pipeline.core import distributed as D
    from pipeline.core.device import resolve_device
    from pipeline.inspection.shards import merge_parts, part_dir, shard
    from pipeline.inspection.steps import load_steps

    run, items, doc = _open(images, bundle=bundle, out=out, batch=batch, resume=resume, force=force, rank=rank)
    dev = resolve_device(device)
    config = {
        "bundle": str(bundle.resolve()),
        "images": [str(a) for a in images],
        "n_images": len(items),
        "batch": batch,
        "device": dev,
        "overlays": overlays,
        "world_size": world_size,
    }
    t0 = time.perf_counter()
    main = rank == 0
    with run if main else contextlib.nullcontext(run):
        done, err = set(), None
        if main:
            try:
                done = _start(run, items, config, resume=resume)
            except PipelineError as exc:
                err = str(exc)
        done, err = D.broadcast_object((done, err))
        if err:
            raise PipelineError(err)
        mine = shard([it for it in items if it.id not in done], batch, rank=rank, world_size=world_size)
        dest = run.path if world_size == 1 else part_dir(run.path, rank)
        status = _inspect_shard(
            mine,
            load_steps(bundle, doc["models"], device=dev, batch=batch),
            doc,
            dest=dest,
            batch=batch,
            overlays=overlays,
            progress=progress and main,
        )
        statuses = D.all_gather_objects(status)
        counts = None
        if main:
            if world_size > 1:
                merge_parts(run.path)
            if not any(s["error"] or s["stopped"] for s in statuses):
                counts = write_outputs(run, doc)
        counts = D.broadcast_object(counts)
        _raise_for(statuses, run, n_done=len(done), n_items=len(items))
    return InspectResult(run.path, counts, len(items), len(done), time.perf_counter() - t0, rank=rank)


def _inspect_shard(
    todo: list[ImageItem], steps: dict, doc: dict, *, dest: Path, batch: int, overlays: bool, progress: bool
) -> dict:
    """One rank's images, a batch at a time, appended to ``dest/verdicts.jsonl``:
    ``{"done": images written, "stopped": Ctrl-C before the end, "error": one line or None}``."""
    from pipeline.core.console import progress as progress_bar

    n, stopped = 0, False
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with (
            stop_on_interrupt("this batch of images") as stop,
            progress_bar("inspect", len(todo), enabled=progress) as advance,
        ):
            for i in range(0, len(todo), batch):
                recs = inspect_batch(todo[i : i + batch], steps, doc, dest=dest, overlays=overlays)
                with open(dest / VERDICTS, "a", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r, allow_nan=False) + "\n" for r in recs)
                n += len(recs)
                advance(len(recs))
                if stop and i + batch < len(todo):
                    stopped = True
                    break
    except PipelineError as exc:
        return {"done": n, "stopped": False, "error": str(exc).splitlines()[0]}
    return {"done": n, "stopped": stopped, "error": None}


def _raise_for(statuses: list[dict], run: RunDir, *, n_done: int, n_items: int) -> None:
    """Every rank raises the first rank's error, or :class:`Interrupted` when any rank stopped."""
    errors = [s["error"] for s in statuses if s["error"]]
    if errors:
        raise PipelineError(errors[0])
    if any(s["stopped"] for s in statuses):
        n = n_done + sum(s["done"] for s in statuses)
        raise Interrupted(f"{run / VERDICTS} ({n} of {n_items} images)", resumable=True)


def _resume_state(path: Path, items: list[ImageItem]) -> set[int]:
    """Ids of the images ``verdicts.jsonl`` already holds; a torn last line (a killed run) is dropped.

    Raises:
        PipelineError: a record whose path is not the same id in ``items`` (the image list changed).
    """
    by_path = {it.path.as_posix(): it.id for it in items}
    good_lines, done = [], set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        if by_path.get(rec.get("path")) != rec.get("id"):
            raise PipelineError(
                f"{path}: {rec.get('path')} is not image {rec.get('id')} of this image list "
                "(the images changed since the first run; pass --force instead of --resume)"
            )
        good_lines.append(line + "\n")
        done.add(rec["id"])
    atomic_write_text(path, "".join(good_lines))
    return done


# ------------------------------------------------------------------------------ one batch
def inspect_batch(items: Sequence[ImageItem], steps: dict, doc: dict, *, dest: Path, overlays: bool) -> list[dict]:
    """Decode, score, decide and draw one batch (images into ``dest/masks``, ``dest/overlays``); its
    ``verdicts.jsonl`` records, in ``items`` order."""
    from pipeline.inspection.steps import run_steps

    decoded, recs = [], []
    for it in items:
        t0 = time.perf_counter()
        try:
            img = read_rgb(it.path)
        except PipelineError as exc:
            img, err = None, str(exc).splitlines()[0]
        else:
            err = None
        rec = {"id": it.id, "path": it.path.as_posix(), "name": it.name, "error": err}
        rec["timing_ms"] = {"decode": round(1000.0 * (time.perf_counter() - t0), 3)}
        decoded.append(img)
        recs.append(rec)
    ok = [k for k, im in enumerate(decoded) if im is not None]
    box_thr = doc["decision"]["thresholds"].get("detector")
    results = run_steps(steps, [decoded[k] for k in ok], box_threshold=box_thr if box_thr is not None else 0.0)
    for k, res in zip(ok, results):
        t0 = time.perf_counter()
        _fill(recs[k], res, decoded[k], doc)
        _write_images(dest, recs[k], res, decoded[k], overlays=overlays)
        recs[k]["timing_ms"].update(res["timing_ms"], write=round(1000.0 * (time.perf_counter() - t0), 3))
    for rec, im in zip(recs, decoded):
        if im is None:
            rec.update(
                size_hw=None,
                verdict=ERROR,
                defect_type=None,
                confidence=None,
                fused_score=None,
                reason=rec["error"],
                scores={},
                regions=[],
            )
    return [_ordered(r) for r in recs]


_KEYS = ("id", "path", "name", "size_hw", "verdict", "defect_type", "confidence", "fused_score", "reason", "scores")


def _ordered(rec: dict) -> dict:
    return {**{k: rec.get(k) for k in _KEYS}, **{k: v for k, v in rec.items() if k not in _KEYS}}


def _defect_type(res: dict) -> str | None:
    """The defect class the models name: the classifier's likeliest defect class (multiclass), else
    the detector's highest box."""
    from pipeline.inspection.verdict import DEFECT

    probs = res.get("classifier", {}).get("probs", {})
    types = {c: p for c, p in probs.items() if c not in (GOOD, DEFECT)}
    if types:
        return max(types, key=types.get)
    boxes = res.get("detector", {}).get("boxes", [])
    return max(boxes, key=lambda b: b["score"])["class"] if boxes else None


def _fill(rec: dict, res: dict, image: np.ndarray, doc: dict) -> None:
    """The record of a decoded image: verdict, scores and regions."""
    from pipeline.data.instances import encode_rle
    from pipeline.inspection.verdict import decide

    rec.update(size_hw=list(image.shape[:2]), **decide(doc["decision"], res["scores"], defect_type=_defect_type(res)))
    rec["scores"] = dict(res["scores"])
    if "classifier" in res:
        rec["classifier"] = {"label": res["classifier"]["label"], "probs": res["classifier"]["probs"]}
    if "anomaly" in res:
        rec["anomaly"] = {"score": res["anomaly"]["score"], "score_norm": res["anomaly"]["score_norm"]}
    regions = []
    masks = res.get("masks")
    for j, b in enumerate(res.get("detector", {}).get("boxes", [])):
        x0, y0, x1, y1 = b["bbox_xyxy"]
        r = {"source": "detector", "bbox_xywh": [x0, y0, x1 - x0, y1 - y0], "class": b["class"], "score": b["score"]}
        r["class_index"] = b["class_index"]
        r["mask"] = encode_rle(masks[j]) if masks is not None else None
        if masks is not None:
            r["mask_iou"] = float(res["mask_iou"][j])
        regions.append(r)
    for a in res.get("anomaly", {}).get("regions", []):
        regions.append(
            {
                "source": "anomaly",
                "bbox_xywh": a["bbox"],
                "class": None,
                "score": a["score"],
                "score_raw": a["score_raw"],
                "mask": a["segmentation"],
            }
        )
    rec["regions"] = regions


def _union_mask(rec: dict, size_hw) -> np.ndarray:
    from pycocotools import mask as mask_utils

    out = np.zeros(size_hw, bool)
    srcs = {r["source"] for r in rec["regions"] if r["mask"] is not None}
    use = "detector" if "detector" in srcs else "anomaly"  # SAM masks when there are, else PatchCore's
    for r in rec["regions"]:
        if r["mask"] is not None and r["source"] == use:
            out |= mask_utils.decode({"size": r["mask"]["size"], "counts": r["mask"]["counts"].encode()}) > 0
    return out


def _png(path: Path, img: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise PipelineError(f"{path}: could not encode PNG")
    atomic_write_bytes(path, buf.tobytes())


def _write_images(dest: Path, rec: dict, res: dict, image: np.ndarray, *, overlays: bool) -> None:
    """``masks/<name>.png`` and (``overlays``) ``overlays/<name>.png`` of one image."""
    import cv2

    mask = _union_mask(rec, image.shape[:2])
    (dest / "masks").mkdir(exist_ok=True)
    _png(dest / "masks" / f"{rec['name']}.png", mask.astype(np.uint8) * 255)
    if not overlays:
        return
    if "anomaly" in res:
        from pipeline.models.anomaly.predict import overlay

        a = res["anomaly"]
        canvas = overlay(image, a["map"], lo=a["map_range"][0], hi=a["map_range"][1])
    else:
        canvas = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    h = image.shape[0]
    lw = max(1, h // 300)
    if mask.any():
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, (0, 255, 255), lw)
    for r in rec["regions"]:
        if r["source"] == "detector":
            x, y, w, bh = (int(round(v)) for v in r["bbox_xywh"])
            cv2.rectangle(canvas, (x, y), (x + w, y + bh), (0, 0, 255), lw)
            cv2.putText(canvas, f"{r['class']} {r['score']:.2f}", (x, max(10, y - 3)), 0, 0.4, (0, 0, 255), 1)
    text = f"{rec['verdict']} {rec['defect_type'] or ''} {rec['confidence']:.2f}".replace("  ", " ")
    colour = (0, 0, 255) if rec["verdict"] != GOOD else (0, 200, 0)
    cv2.putText(canvas, text, (4, 14), 0, 0.5, colour, 1, cv2.LINE_AA)
    (dest / "overlays").mkdir(exist_ok=True)
    _png(dest / "overlays" / f"{rec['name']}.png", canvas)


# ------------------------------------------------------------------------------ the end: CSV, COCO
def iter_verdicts(path: Path):
    """The records of a ``verdicts.jsonl``, one at a time."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_outputs(run: RunDir, doc: dict) -> dict:
    """``verdicts.csv``, ``images.json`` and ``predictions.json`` from ``verdicts.jsonl`` (read
    streaming, sorted by id); returns the counts per verdict."""
    models = doc["models"]
    det = models.get("detector", {})
    names = det.get("classes") if det.get("enabled") else ["defect"]
    sources = list(doc["decision"]["sources"])
    cols = ["id", "path", "verdict", "defect_type", "confidence", "fused_score"]
    cols += [f"score_{s}" for s in sources] + ["n_regions", "reason"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    images, errors, results, counts = [], [], [], {}
    for rec in sorted(iter_verdicts(run / VERDICTS), key=lambda r: r["id"]):
        counts[rec["verdict"]] = counts.get(rec["verdict"], 0) + 1
        row = [rec["id"], rec["path"], rec["verdict"], rec["defect_type"] or "", rec["confidence"], rec["fused_score"]]
        w.writerow(row + [rec["scores"].get(s, "") for s in sources] + [len(rec["regions"]), rec["reason"]])
        if rec["verdict"] == ERROR:
            errors.append({"id": rec["id"], "file_name": rec["path"], "reason": rec["reason"]})
            continue
        h, wd = rec["size_hw"]
        images.append({"id": rec["id"], "file_name": rec["path"], "width": wd, "height": h, "name": rec["name"]})
        results += _coco_results(rec, with_detector=bool(det.get("enabled")))
    atomic_write_text(run / "verdicts.csv", buf.getvalue())
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    atomic_write_json(
        run / "images.json",
        {
            "info": {"description": "pipeline inspect", "bundle": doc.get("split", {}).get("category")},
            "images": images,
            "categories": cats,
            "errors": errors,
        },
    )
    atomic_write_json(run / "predictions.json", results, indent=None)
    return counts


def _coco_results(rec: dict, *, with_detector: bool) -> list[dict]:
    out = []
    for r in rec["regions"]:
        if (r["source"] == "detector") != with_detector:
            continue
        res = {
            "image_id": rec["id"],
            "category_id": r["class_index"] + 1 if with_detector else 1,
            "bbox": [round(float(v), 2) for v in r["bbox_xywh"]],
            "score": round(float(r["score"]), 6),
        }
        if r["mask"] is not None:
            res["segmentation"] = r["mask"]
        out.append(res)
    return out


def summary_table(result: InspectResult):
    """A rich table: images per verdict, errors, images/s."""
    from rich.table import Table

    t = Table(title=f"inspect -> {result.out}")
    t.add_column("verdict")
    t.add_column("images", justify="right")
    for k in sorted(result.counts):
        t.add_row(k, str(result.counts[k]))
    t.add_row("total", str(result.n_images))
    if result.skipped:
        t.add_row("resumed (already done)", str(result.skipped))
    t.add_row("images/s (this run)", f"{result.images_per_s:.2f}")
    return t
