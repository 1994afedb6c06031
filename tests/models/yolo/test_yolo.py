"""YOLO-World training and prediction (``pipeline.models.yolo``), offline, on a tiny synthetic YOLO dataset.

One 1-epoch training from ``yolov8n-worldv2.yaml`` at 64 px is shared by the module (about 10 s on
two CPU cores); every ultralytics call runs with the network cut off and any attempt recorded.
"""

from __future__ import annotations

import inspect
import json
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.core.errors import PipelineError

NAMES = ["ring", "scratch"]
SIZE = 64
TRAIN_WARNINGS: list[str] = []  # filled by the trained_run fixture


def _write_png(path: Path, img: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def _square_image(rng: np.random.Generator, cls: int) -> tuple[np.ndarray, str]:
    """64x64 dark image with one bright square; its YOLO label line ``cls cx cy w h`` (normalised)."""
    img = np.full((SIZE, SIZE, 3), 40, np.uint8)
    side = 14 + 4 * cls
    x0, y0 = (int(v) for v in rng.integers(2, SIZE - side - 2, size=2))
    img[y0 : y0 + side, x0 : x0 + side] = (230, 230, 230) if cls == 0 else (60, 200, 240)
    cx, cy, w = (x0 + side / 2) / SIZE, (y0 + side / 2) / SIZE, side / SIZE
    return img, f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {w:.6f}\n"


def make_yolo_dataset(root: Path, *, n: int = 6, label_override: str | None = None) -> Path:
    """``root/{images,labels}/{train,val}``: ``n`` one-square images and one background image per split.

    The val images are symlinks to the train images (as ``pipeline convert-masks`` links them).
    """
    rng = np.random.default_rng(0)
    for i in range(n + 1):
        stem = f"im{i}"
        if i < n:
            img, line = _square_image(rng, i % 2)
        else:  # background: empty label file
            img, line = np.full((SIZE, SIZE, 3), 40, np.uint8), ""
        if label_override is not None and i == 0:
            line = label_override
        _write_png(root / "images" / "train" / f"{stem}.png", img)
        (root / "images" / "val").mkdir(parents=True, exist_ok=True)
        (root / "images" / "val" / f"{stem}.png").symlink_to(root / "images" / "train" / f"{stem}.png")
        for split in ("train", "val"):
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{stem}.txt").write_text(line)
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": dict(enumerate(NAMES))}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


def _cut_network(mp: pytest.MonkeyPatch) -> list:
    """Make every socket connection and DNS lookup fail; return the list the attempts are recorded in."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access is forbidden in tests")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)
    mp.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture(scope="module")
def yolo_data(tmp_path_factory) -> Path:
    return make_yolo_dataset(tmp_path_factory.mktemp("yolo") / "ds")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, yolo_data) -> Path:
    """One epoch of YOLOv8n-worldv2 from its YAML (random init), imgsz 64, offline."""
    from pipeline.models.yolo.train import train_yolo_world

    out = tmp_path_factory.mktemp("runs") / "yolo"
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attempts = _cut_network(mp)
        result = train_yolo_world(
            data_yaml=yolo_data, model="yolov8n-worldv2.yaml", out_dir=out, epochs=1, imgsz=SIZE, batch=8
        )
    TRAIN_WARNINGS.extend(str(w.message) for w in caught)
    assert attempts == [], f"training tried the network: {attempts}"
    assert result == out.resolve()
    return result


def test_train_writes_the_run_folder(trained_run):
    from pipeline.models.yolo.train import train_yolo_world

    for rel in (
        "weights/best.pt",
        "weights/last.pt",
        "weights/class_embeddings.pt",
        "metrics.json",
        "config.yaml",
        "data.yaml",
        "log.txt",
        "results.csv",
        "args.yaml",
    ):
        assert (trained_run / rel).is_file(), rel
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("mAP50", "mAP50-95", "precision", "recall"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert set(inspect.signature(train_yolo_world).parameters) <= set(config)
    assert config["device"] in {"cpu", "0"} and config["names"] == NAMES


def test_closed_set_is_said_once(trained_run):
    import torch

    source = torch.load(trained_run / "weights" / "class_embeddings.pt", weights_only=True)["source"]
    said = [w for w in TRAIN_WARNINGS if "closed-set" in w]
    assert len(said) == (1 if source == "sha256-normal" else 0)
    assert (trained_run / "log.txt").read_text().count("closed-set") == len(said)


def test_embeddings_file_holds_the_trained_names(trained_run):
    import torch

    payload = torch.load(trained_run / "weights" / "class_embeddings.pt", weights_only=True)
    assert payload["names"] == NAMES
    emb = payload["embeddings"]
    assert emb.shape == (len(NAMES), 512) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(NAMES)))
    assert payload["source"] in {"sha256-normal", "clip:ViT-B/32"}


def test_nothing_written_beside_the_data(trained_run, yolo_data):
    root = yolo_data.parent
    written = sorted(p.name for p in root.rglob("*") if p.suffix in {".cache", ".pt"})
    assert written == []  # no labels/*.cache, no text_embeddings_*.pt


def test_predict_returns_original_pixel_boxes(trained_run, tmp_path):
    from pipeline.models.yolo.predict import load_class_names, predict_yolo_world

    sizes_hw = [(48, 80), (100, 30), (SIZE, SIZE)]  # non-square, tall grey, training size
    images = []
    for i, (h, w) in enumerate(sizes_hw):
        img = np.full((h, w), 40, np.uint8) if i == 1 else np.full((h, w, 3), 40, np.uint8)
        img[h // 4 : h // 2, w // 4 : w // 2] = 230
        _write_png(tmp_path / f"p{i}.png", img)
        images.append(tmp_path / f"p{i}.png")
    with pytest.MonkeyPatch.context() as mp:
        attempts = _cut_network(mp)
        # conf=0: keep every box of the barely trained model so the coordinate checks see some
        preds = predict_yolo_world(weights=trained_run / "weights" / "best.pt", images=images, imgsz=SIZE, conf=0.0)
        names = load_class_names(trained_run / "weights" / "best.pt")
    assert attempts == []
    assert names == NAMES
    assert len(preds) == len(images)
    for dets, (h, w) in zip(preds, sizes_hw):
        assert dets, "expected some boxes at conf=0"
        for d in dets:
            assert set(d) == {"bbox_xyxy", "class_index", "score"}
            x0, y0, x1, y1 = d["bbox_xyxy"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h, (d, (h, w))
            assert isinstance(d["class_index"], int) and 0 <= d["class_index"] < len(NAMES)
            assert 0.0 <= d["score"] <= 1.0
    assert predict_yolo_world(weights=trained_run / "weights" / "best.pt", images=[]) == []


def _coco_gt(root: Path, path: Path, names: list[str]) -> Path:
    """COCO ground truth for the val images of a :func:`make_yolo_dataset` folder (no annotations needed here)."""
    files = sorted((root / "images" / "val").glob("*.png"))
    gt = {
        "info": {"image_root": str(root)},
        "images": [
            {"id": i + 1, "file_name": str(f.relative_to(root)), "height": SIZE, "width": SIZE}
            for i, f in enumerate(files)
        ],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
    }
    path.write_text(json.dumps(gt))
    return path


def test_predict_split_writes_a_run_folder(trained_run, yolo_data, tmp_path):
    from pipeline.models.yolo.predict import predict_split

    gt = _coco_gt(yolo_data.parent, tmp_path / "gt.json", NAMES)
    out = tmp_path / "pred"
    weights = trained_run / "weights" / "best.pt"
    with pytest.MonkeyPatch.context() as mp:
        attempts = _cut_network(mp)
        res = predict_split(weights=weights, gt=gt, out=out, imgsz=SIZE, conf=0.0)
    assert attempts == []
    assert res.run == out and res.predictions == out / "predictions.json" and res.n_images == 7
    preds = json.loads(res.predictions.read_text())
    assert isinstance(preds, list) and len(preds) == res.n_detections > 0  # conf=0 keeps boxes
    for p in preds:
        assert set(p) == {"image_id", "category_id", "bbox", "score"}
        assert 1 <= p["image_id"] <= 7 and p["category_id"] in (1, 2) and 0.0 <= p["score"] <= 1.0
        x, y, w, h = p["bbox"]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= SIZE + 1e-6 and y + h <= SIZE + 1e-6
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["weights"] == str(weights.resolve()) and config["gt"] == str(gt.resolve())
    assert config["imgsz"] == SIZE and config["conf"] == 0.0 and config["device"] in {"cpu", "0"}
    assert config["names"] == NAMES
    with pytest.raises(PipelineError, match="already exists"):
        predict_split(weights=weights, gt=gt, out=out, imgsz=SIZE)
    (out / "notes.txt").write_text("mine")
    predict_split(weights=weights, gt=gt, out=out, imgsz=SIZE, conf=0.5, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert yaml.safe_load((out / "config.yaml").read_text())["conf"] == 0.5
    other = _coco_gt(yolo_data.parent, tmp_path / "other.json", ["ring", "spot"])
    with pytest.raises(PipelineError, match=r"lack the ground truth's \['spot'\]"):
        predict_split(weights=weights, gt=other, out=tmp_path / "pred2")
    assert not (tmp_path / "pred2").exists()


def test_predict_split_records_provenance(trained_run, yolo_data, tmp_path):
    import hashlib

    from pipeline.data.predictions import load_predictions, upper_bound
    from pipeline.models.yolo.predict import predict_split

    gt = _coco_gt(yolo_data.parent, tmp_path / "gt.json", NAMES)
    weights = trained_run / "weights" / "best.pt"
    res = predict_split(weights=weights, gt=gt, out=tmp_path / "pred", imgsz=SIZE, conf=0.0)
    record = {
        "family": "yolo",
        "model": str(weights.resolve()),
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "prompt": None,
        "split": str(gt.resolve()),
        "created_by": "pipeline predict yolo",
    }
    unset = {"score_threshold": None, "score_threshold_chosen_on": None}
    assert json.loads((res.run / "provenance.json").read_text()) == {**record, "files": {"predictions.json": unset}}
    pf = load_predictions(res.predictions)
    assert pf.provenance == {**record, **unset} and upper_bound(pf) is None


def test_second_run_without_force_is_refused(trained_run, yolo_data):
    from pipeline.models.yolo.train import train_yolo_world

    with pytest.raises(PipelineError, match="already exists") as err:
        train_yolo_world(data_yaml=yolo_data, model="yolov8n-worldv2.yaml", out_dir=trained_run, epochs=1, imgsz=SIZE)
    assert str(trained_run) in str(err.value)
    with pytest.raises(PipelineError, match="either --resume or --force"):
        train_yolo_world(
            data_yaml=yolo_data, model="yolov8n-worldv2.yaml", out_dir=trained_run, resume=True, force=True
        )


def test_resume_of_a_finished_run_is_refused(trained_run, yolo_data):
    from pipeline.models.yolo.train import train_yolo_world

    with pytest.raises(PipelineError, match="nothing to resume"):
        train_yolo_world(data_yaml=yolo_data, model="yolov8n-worldv2.yaml", out_dir=trained_run, resume=True)


def test_missing_real_weights_name_the_file(yolo_data, tmp_path, monkeypatch):
    import pipeline.core.weights
    from pipeline.models.yolo.train import train_yolo_world

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline.core.weights, "search_dirs", lambda: [tmp_path / "empty"])
    attempts = _cut_network(monkeypatch)
    with pytest.raises(PipelineError, match="yolov8s-worldv2.pt") as err:
        train_yolo_world(data_yaml=yolo_data, model="yolov8s-worldv2.pt", out_dir=tmp_path / "run", epochs=1)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists() and attempts == []


@pytest.mark.parametrize(
    "label, where",
    [
        ("5 0.5 0.5 0.2 0.2\n", "class index beyond nc"),
        ("0 0.5 0.5 1.4 0.2\n", "width above 1"),
        ("0 0.5 0.5 0.2\n", "four values"),
    ],
)
def test_bad_labels_are_refused_before_training(tmp_path, label, where):
    from pipeline.models.yolo.train import train_yolo_world

    data = make_yolo_dataset(tmp_path / "ds", n=2, label_override=label)
    with pytest.raises(PipelineError, match=r"im0\.txt:1: bad YOLO label"):
        train_yolo_world(data_yaml=data, model="yolov8n-worldv2.yaml", out_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists(), where


def test_corrupt_images_are_refused_before_training(tmp_path, monkeypatch, capsys):
    """ultralytics would log the truncated image as corrupt and train on the rest; it is refused in one line."""
    import sys

    from pipeline.cli import app as cli

    data = make_yolo_dataset(tmp_path / "ds", n=2)
    broken = tmp_path / "ds" / "images" / "train" / "im1.png"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a truncated PNG
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "pipeline",
            "finetune",
            "yolo",
            "--data",
            str(data),
            "--model",
            "yolov8n-worldv2.yaml",
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
        ],
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    # im1.png and its val link are one file: counted once, named by its train path
    assert err == (
        f"error: {data}: ultralytics found 1 corrupt image(s)/label(s), e.g. {broken}: Truncated File Read\n"
    )
    assert not (tmp_path / "run").exists()


def test_unavailable_device_is_refused(yolo_data, tmp_path, monkeypatch):
    import torch

    from pipeline.models.yolo.predict import predict_yolo_world
    from pipeline.models.yolo.train import train_yolo_world

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match="CUDA is not available"):
        train_yolo_world(data_yaml=yolo_data, model="yolov8n-worldv2.yaml", out_dir=tmp_path / "run", device="cuda:0")
    with pytest.raises(PipelineError, match="device '0,1': CUDA is not available"):
        train_yolo_world(data_yaml=yolo_data, model="yolov8n-worldv2.yaml", out_dir=tmp_path / "run", device="0,1")
    image = next((yolo_data.parent / "images" / "train").glob("*.png"))
    with pytest.raises(PipelineError, match="one device only"):
        predict_yolo_world(weights=yolo_data, images=[image], device="0,1")
    with pytest.raises(PipelineError, match="CUDA is not available"):
        predict_yolo_world(weights=yolo_data, images=[image], device="0")  # any file passes the weights check


def test_missing_data_yaml_is_named(tmp_path):
    from pipeline.models.yolo.train import train_yolo_world

    with pytest.raises(PipelineError, match="nope.yaml: file not found"):
        train_yolo_world(data_yaml=tmp_path / "nope.yaml", model="yolov8n-worldv2.yaml", out_dir=tmp_path / "run")


def test_hash_embeddings_are_deterministic_and_distinct():
    import torch

    from pipeline.models.yolo.prompts import hash_text_embeddings

    a = hash_text_embeddings(["ring", "scratch", "spot"])
    b = hash_text_embeddings(["spot", "ring", "scratch"])
    assert a.shape == (3, 512) and a.dtype == torch.float32
    torch.testing.assert_close(a, b[[1, 2, 0]])  # a name's vector does not depend on the others
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    cos = a @ a.T
    assert (cos - torch.eye(3)).abs().max() < 0.3  # different, nearly orthogonal directions
    assert hash_text_embeddings(["ring"], dim=64).shape == (1, 64)
    # pinned values: stable across processes and machines (SHA-256 seed + NumPy PCG64 normals)
    torch.testing.assert_close(a[0, :3], torch.tensor([0.0156381, 0.0955377, -0.0407285]), atol=1e-6, rtol=0)


def test_prompt_texts_cover_synonyms():
    from pipeline.models.yolo.prompts import class_prompt, prompt_texts

    assert prompt_texts(["ring", "scratch / crack"]) == ["ring", "scratch ", "scratch", " crack", "crack"]
    assert class_prompt("scratch / crack") == "scratch"


def test_plot_font_is_local():
    from pipeline.models.yolo.offline import _local_font

    assert _local_font("Arial.ttf").is_file()
    assert _local_font("Arial.Unicode.ttf").is_file()


@pytest.mark.parametrize("category, flip_p", [("cable", 0.0), ("bottle", 0.5)])
def test_no_flip_reaches_a_cable_image(tmp_path, category, flip_p):
    """Label-safe augmentation: for cable (cable_swap is the colour order) every RandomFlip ultralytics
    applies during training has probability 0; for a category without restrictions it keeps 0.5."""
    import ultralytics.data.augment as aug

    from pipeline.models.yolo.train import train_yolo_world

    data_yaml = make_yolo_dataset(tmp_path / "ds")
    data = yaml.safe_load(data_yaml.read_text())
    data_yaml.write_text(yaml.safe_dump({**data, "category": category}))
    seen: list[tuple[str, float]] = []
    real = aug.RandomFlip.__call__

    def spy(self, labels):
        seen.append((self.direction, self.p))
        return real(self, labels)

    with pytest.MonkeyPatch.context() as mp:
        _cut_network(mp)
        mp.setattr(aug.RandomFlip, "__call__", spy)
        out = train_yolo_world(
            data_yaml=data_yaml, model="yolov8n-worldv2.yaml", out_dir=tmp_path / "run", epochs=1, imgsz=SIZE, batch=8
        )
    assert seen, "no RandomFlip ran during training"
    assert {p for d, p in seen if d == "horizontal"} == {flip_p}
    assert {p for d, p in seen if d == "vertical"} <= {0.0}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["augmentation"]["category"] == category
    assert (config["augmentation_overrides"].get("fliplr", 0.5)) == flip_p
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["fliplr"] == flip_p and args["flipud"] == 0.0
