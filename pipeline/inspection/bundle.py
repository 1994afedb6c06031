"""``pipeline bundle``: trained runs packed into one self-contained folder for ``pipeline inspect``.

A bundle folder (a run folder of kind ``bundle``, :class:`pipeline.core.runs.RunDir`) holds::

    bundle.yaml                 the manifest (below)
    split.json                  the split the models were trained and calibrated on (a copy)
    anomaly/model.pt            PatchCore artefact            (when --anomaly)
    classifier/best.pt          classifier checkpoint         (when --classifier)
    detector/best.pt            YOLO-World weights            (when --detector)
    detector/class_embeddings.pt   its class prompts, when the run has them
    sam/best.pt                 fine-tuned SAM                (when --sam)
    sam/base.pth                SAM base checkpoint, when the fine-tune names one

``bundle.yaml``: ``format``/``version``; ``split`` (``path`` in the bundle, ``source`` path, ``sha256``,
``category``, ``root``, ``classes``; ``dataset_yaml_sha256`` when a ``dataset.yaml`` sits beside it);
``models``: per family ``enabled``, and either ``files`` (``path`` relative to the bundle, ``role``,
``sha256``, ``bytes``), ``source`` and the family's facts (class names, input size), or ``reason``
(why the step is off); ``decision``: the per-source thresholds and the fused rule chosen on the
split's **val** images by :func:`pipeline.inspection.verdict.choose_decision`, with the val metrics.
The models are run on the val images here (through the same code as ``inspect``), so the thresholds
are those of the numbers ``inspect`` will see. Files are copied (a bundle stays valid when the
runs are removed). :func:`check_bundle` re-hashes every listed file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.core.io import atomic_write_text, read_rgb, read_yaml_mapping, sha256_file, to_json_plain
from pipeline.core.runs import RunDir
from pipeline.data.mvtec import GOOD

MANIFEST = "bundle.yaml"
FORMAT = "pipeline.bundle"
VERSION = 1
FAMILIES = ("detector", "sam", "classifier", "anomaly")


# ------------------------------------------------------------------------------ runs -> files
def _weights(run: Path, default: str, what: str) -> Path:
    p = Path(run)
    f = p / default if p.is_dir() else p
    if not f.is_file():
        where = f"{f} not found" if p.is_dir() or not p.exists() else f"{p} is not a weights file"
        raise PipelineError(f"{run}: {where} (expected {what})")
    return f


def resolve_models(*, detector=None, sam=None, classifier=None, anomaly=None) -> dict:
    """What each given run contributes: ``{family: {"files": [(source Path, bundle path, role)], facts...}}``.

    Raises:
        PipelineError: no run given, or a run without its weights file.
    """
    plan: dict = {}
    if anomaly is not None:
        f = _weights(anomaly, "model.pt", "a finetune anomaly run folder or its model.pt")
        plan["anomaly"] = {"source": str(Path(anomaly).resolve()), "files": [(f, "anomaly/model.pt", "weights")]}
    if classifier is not None:
        f = _weights(classifier, "weights/best.pt", "a finetune classifier run folder or a checkpoint .pt")
        plan["classifier"] = {
            "source": str(Path(classifier).resolve()),
            "files": [(f, "classifier/best.pt", "weights")],
        }
    if detector is not None:
        from pipeline.models.yolo.prompts import EMBEDDINGS_FILE, embeddings_beside

        f = _weights(detector, "weights/best.pt", "a finetune yolo run folder or its weights/best.pt")
        files = [(f, "detector/best.pt", "weights")]
        if embeddings_beside(f).is_file():
            files.append((embeddings_beside(f), f"detector/{EMBEDDINGS_FILE}", "class_embeddings"))
        run_dir = Path(detector) if Path(detector).is_dir() else f.parent.parent
        imgsz = int(read_yaml_mapping(run_dir / "config.yaml").get("imgsz", 640))
        plan["detector"] = {"source": str(Path(detector).resolve()), "files": files, "imgsz": imgsz}
    if sam is not None:
        from pipeline.models.sam.model import read_finetuned, resolve_base_checkpoint

        f = _weights(sam, "best.pt", "a finetune sam run folder or its best.pt")
        cfg = read_finetuned(f)["config"]
        base = resolve_base_checkpoint(cfg["model_type"], cfg.get("checkpoint"))
        files = [(f, "sam/best.pt", "weights")]
        if base is not None:
            files.append((Path(base), "sam/base.pth", "base_checkpoint"))
        plan["sam"] = {"source": str(Path(sam).resolve()), "files": files, "model_type": cfg["model_type"]}
    if not plan:
        raise PipelineError("give at least one model: --detector, --sam, --classifier or --anomaly")
    if "sam" in plan and "detector" not in plan:
        raise PipelineError("--sam needs --detector (SAM is prompted by the detector's boxes, never by ground truth)")
    return plan


def _copy_files(run: RunDir, plan: dict) -> dict:
    """Copy every planned file into the bundle; the ``models`` section of the manifest."""
    models: dict = {}
    for fam in FAMILIES:
        if fam not in plan:
            models[fam] = {"enabled": False, "reason": f"no --{fam} given"}
            continue
        entry = {k: v for k, v in plan[fam].items() if k != "files"}
        files = []
        for src, rel, role in plan[fam]["files"]:
            dst = run / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            files.append({"path": rel, "role": role, "sha256": sha256_file(dst), "bytes": dst.stat().st_size})
        models[fam] = {"enabled": True, **entry, "files": files}
    return models


# ------------------------------------------------------------------------------ val -> thresholds and rule
def val_scores(steps: dict, samples, *, batch: int, progress: bool = True) -> tuple[dict, np.ndarray]:
    """Per-source defect scores of the val ``samples`` (``{source: N float}``) and their truth ``N`` bool."""
    from pipeline.core.console import progress as progress_bar
    from pipeline.inspection.steps import run_steps

    scores: dict[str, list[float]] = {}
    with progress_bar("val images", len(samples), enabled=progress, transient=True) as advance:
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            for rec in run_steps(steps, [read_rgb(s.image) for s in chunk]):
                for k, v in rec["scores"].items():
                    scores.setdefault(k, []).append(v)
            advance(len(chunk))
    y = np.array([s.label != GOOD for s in samples], bool)
    return {k: np.array(v) for k, v in scores.items()}, y


def _facts(models: dict, steps: dict) -> None:
    """Add the class names and input sizes the loaded models report to the ``models`` section."""
    if "classifier" in steps:
        c = steps["classifier"]
        models["classifier"].update(classes=c.classes, input_size_hw=list(c.cfg.data.input_size_hw))
    if "anomaly" in steps:
        pc = steps["anomaly"].model
        models["anomaly"].update(
            backbone=pc.config.backbone,
            image_size=pc.config.image_size,
            artefact_threshold=float(pc.threshold),
            pixel_threshold=float(pc.pixel_threshold),
        )
    if "detector" in steps:
        models["detector"].update(classes=list(steps["detector"].names))


def make_bundle(
    *,
    split_path: Path,
    out: Path,
    detector: Path | None = None,
    sam: Path | None = None,
    classifier: Path | None = None,
    anomaly: Path | None = None,
    device: str | None = None,
    batch: int = 8,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """``pipeline bundle``: copy the runs' weights into ``out``, choose the decision on val, write ``bundle.yaml``.

    Args:
        split_path: the ``split.json`` the models were trained on (its val images choose the thresholds).
        detector, sam, classifier, anomaly: run folders (or weights files); at least one; ``sam``
            needs ``detector``.
        device: a ``--device`` value (:func:`pipeline.core.device.resolve_device`).
        batch: images per batch while scoring val.

    Returns:
        The path of ``bundle.yaml``.

    Raises:
        PipelineError: no model, missing weights, a bad split or an empty val split, a val split
            without both classes, ``out`` refused by the run-folder rules. Nothing is left in ``out``
            on failure.
    """
    from pipeline.core.device import resolve_device
    from pipeline.data.split import load_split
    from pipeline.inspection.steps import load_steps
    from pipeline.inspection.verdict import choose_decision

    run = RunDir.open(Path(out), kind="bundle", force=force)
    split_path = Path(split_path)
    split = load_split(split_path)
    plan = resolve_models(detector=detector, sam=sam, classifier=classifier, anomaly=anomaly)
    samples = split.samples("val")
    if not samples:
        raise PipelineError(f"{split_path}: the val split is empty (expected images to choose thresholds on)")
    dev = resolve_device(device)
    try:
        with run:
            models = _copy_files(run, plan)
            shutil.copyfile(split_path, run / "split.json")
            steps = load_steps(run.path, models, device=dev, batch=batch)
            _facts(models, steps)
            scores, y = val_scores(steps, samples, batch=batch, progress=progress)
            decision = choose_decision(scores, y)
            decision["val_images"] = len(samples)
            doc = {
                "format": FORMAT,
                "version": VERSION,
                "split": _split_facts(split, split_path, run),
                "models": models,
                "decision": decision,
            }
            atomic_write_text(run / MANIFEST, _yaml(doc))
    except BaseException:
        run.discard()
        raise
    return run / MANIFEST


def _split_facts(split, split_path: Path, run: RunDir) -> dict:
    facts = {
        "path": "split.json",
        "source": str(split_path.resolve()),
        "sha256": sha256_file(run / "split.json"),
        "category": split.category,
        "root": str(split.root),
        "classes": list(split.classes),
    }
    ds = split_path.parent / "dataset.yaml"
    if ds.is_file():  # a dataset version made by `dataset add-reviewed`
        facts["dataset_yaml_sha256"] = sha256_file(ds)
    return facts


def _yaml(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(to_json_plain(doc), sort_keys=False)


# ------------------------------------------------------------------------------ reading and checking
def load_bundle(bundle: Path, *, verify: bool = True) -> dict:
    """``bundle.yaml`` of a bundle folder, checked (every hash when ``verify``).

    Raises:
        PipelineError: no bundle there, another format or version, or (``verify``) a changed or
            missing file (the first mismatch; :func:`check_bundle` lists them all).
    """
    import yaml

    path = Path(bundle) / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{bundle}: no {MANIFEST} (expected a folder written by 'pipeline bundle')")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PipelineError(f"{path}: not a bundle manifest (expected format {FORMAT!r})")
    if doc.get("version") != VERSION:
        raise PipelineError(f"{path}: bundle version {doc.get('version')} (this code reads {VERSION})")
    if verify:
        problems = check_bundle(bundle)
        if problems:
            raise PipelineError(f"{problems[0]} (run 'pipeline bundle --check {bundle}' for all)")
    return doc


def check_bundle(bundle: Path) -> list[str]:
    """Re-hash every file ``bundle.yaml`` lists: one line per missing or changed file (``[]``: all good)."""
    doc = load_bundle(bundle, verify=False)
    b = Path(bundle)
    listed = [(doc["split"]["path"], doc["split"]["sha256"])]
    for fam in FAMILIES:
        for f in doc["models"].get(fam, {}).get("files", []):
            listed.append((f["path"], f["sha256"]))
    problems = []
    for rel, want in listed:
        p = b / rel
        if not p.is_file():
            problems.append(f"{p}: missing (bundle.yaml lists it)")
        elif sha256_file(p) != want:
            problems.append(f"{p}: SHA-256 {sha256_file(p)[:12]}... differs from bundle.yaml's {want[:12]}...")
    return problems
