"""dataset add-reviewed: a reviewed COCO file becomes a new dataset version; the parent never changes."""

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.data.convert import convert_category
from pipeline.data.dataset import add_reviewed
from pipeline.data.instances import decode_rle, encode_rle, mask_to_instances
from pipeline.data.mvtec import read_mask
from pipeline.data.split import SPLITS, image_ids
from pipeline.data.synth import generate_category
from pipeline.data.yolo import check_labels, read_data_yaml, split_image_files

# the reviewed file names its categories in another order than the parent (ring 1, scratch 2, spot 3)
REVIEWED_CATEGORIES = [{"id": 1, "name": "spot"}, {"id": 2, "name": "ring"}, {"id": 3, "name": "scratch"}]
REVIEWED_ID = {c["name"]: c["id"] for c in REVIEWED_CATEGORIES}


def _tree_hashes(folder: Path) -> dict[str, str]:
    """Every file (content hash) and symlink (target) under ``folder``."""
    out = {}
    for dirpath, _dirs, names in os.walk(folder):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(folder).as_posix()
            out[rel] = "-> " + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _instance(category: Path, defect: str, stem: str):
    return mask_to_instances(read_mask(category / "ground_truth" / defect / f"{stem}_mask.png"))[0]


def _reviewed_doc(root: Path, images: list[tuple[str, list[dict]]]) -> dict:
    """A reviewed COCO file as ``import labelstudio`` writes it: ``(file_name, [(class, bbox, rle)])``."""
    doc = {"info": {"image_root": str(root)}, "images": [], "annotations": [], "categories": REVIEWED_CATEGORIES}
    for k, (file_name, anns) in enumerate(images, 1):
        doc["images"].append({"id": k, "file_name": file_name, "width": 128, "height": 96})
        for name, bbox, rle in anns:
            ann = {"id": len(doc["annotations"]) + 1, "image_id": k, "category_id": REVIEWED_ID[name], "iscrowd": 0}
            ann.update({"bbox": bbox} if bbox is not None else {})
            ann.update({"segmentation": rle} if rle is not None else {})
            doc["annotations"].append(ann)
    return doc


def _write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def world(synth_category, tmp_path_factory):
    """Parent version, new images (seed 7), the reviewed file, the new version, parent hashes before."""
    base = tmp_path_factory.mktemp("dataset")
    parent = base / "annotations" / "synth"
    convert_category(synth_category, parent)
    new = generate_category(base / "new", seed=7)
    inspect = base / "inspect"  # the inspection folder, cleaned up after the version is made
    for rel in ("test/ring/000.png", "test/spot/000.png", "test/good/000.png"):
        (inspect / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(new / rel, inspect / rel)
    ring, spot = _instance(new, "ring", "000"), _instance(new, "spot", "000")
    x, y, w, h = spot.bbox_xywh
    corrected = [x + 1, y, w - 1, h + 2]  # the reviewer moved the left edge and the bottom edge
    doc = _reviewed_doc(
        inspect,
        [
            ("test/ring/000.png", [("ring", list(ring.bbox_xywh), encode_rle(ring.mask))]),  # accepted
            ("test/spot/000.png", [("spot", corrected, encode_rle(spot.mask))]),  # corrected box
            ("test/good/000.png", []),  # reviewed as good
        ],
    )
    reviewed = _write(inspect / "reviewed.json", doc)
    saved = _write(base / "reviewed.json", doc)  # the reviewed file outlives the inspection folder
    before = _tree_hashes(parent)
    out = base / "annotations" / "synth-v2"
    summary = add_reviewed(parent, reviewed, out)
    shutil.rmtree(inspect)
    return {
        "base": base,
        "parent": parent,
        "new": new,
        "out": out,
        "summary": summary,
        "before": before,
        "corrected": corrected,
        "ring": ring,
        "reviewed_sha256": hashlib.sha256(saved.read_bytes()).hexdigest(),
        "reviewed_path": reviewed,
    }


def _coco(folder: Path, split: str) -> dict:
    return json.loads((folder / "coco" / f"{split}.json").read_text())


def _image(coco: dict, suffix: str) -> tuple[dict, list[dict]]:
    img = next(i for i in coco["images"] if i["file_name"].endswith(suffix))
    return img, [a for a in coco["annotations"] if a["image_id"] == img["id"]]


def test_parent_is_byte_identical_afterwards(world):
    assert _tree_hashes(world["parent"]) == world["before"]


def test_parent_split_kept_and_reviewed_images_appended_to_train(world):
    parent = json.loads((world["parent"] / "split.json").read_text())
    new = json.loads((world["out"] / "split.json").read_text())
    assert new["root"] == parent["root"] and new["train_good"] == parent["train_good"]
    assert new["splits"]["val"] == parent["splits"]["val"] and new["splits"]["test"] == parent["splits"]["test"]
    n = len(parent["splits"]["train"])
    assert new["splits"]["train"][:n] == parent["splits"]["train"]
    added = new["splits"]["train"][n:]
    assert [e["label"] for e in added] == ["ring", "spot", "good"]
    assert new["added"] == [e["image"] for e in added]
    root = Path(new["root"])
    for e, rel in zip(added, ("test/ring/000.png", "test/spot/000.png", "test/good/000.png")):
        held = world["out"] / "images" / "reviewed" / rel
        assert (root / e["image"]).resolve() == held.resolve()  # the manifest path resolves to the held copy
        assert held.read_bytes() == (world["new"] / rel).read_bytes()
    assert added[2]["mask"] is None
    mask = read_mask(root / added[0]["mask"])  # the reviewed mask, 0/255, for anomaly metrics
    assert (mask == world["ring"].mask).all()


def test_parent_ids_unchanged_and_new_ids_after_them(world):
    parent_ids = image_ids(json.loads((world["parent"] / "split.json").read_text()))
    new_ids = image_ids(json.loads((world["out"] / "split.json").read_text()))
    assert {r: new_ids[r] for r in parent_ids} == parent_ids
    assert sorted(set(new_ids.values()) - set(parent_ids.values())) == [len(parent_ids) + k for k in (1, 2, 3)]
    for split in SPLITS:  # COCO of the parent's images: same ids, same annotations
        old, new = _coco(world["parent"], split), _coco(world["out"], split)
        assert new["images"][: len(old["images"])] == old["images"]
        assert new["annotations"][: len(old["annotations"])] == old["annotations"]
        assert new["categories"] == old["categories"]
        assert _sam(world["out"], split)[: len(_sam(world["parent"], split))] == _sam(world["parent"], split)


def test_corrected_box_is_in_coco_and_yolo_exactly(world):
    coco = _coco(world["out"], "train")
    img, anns = _image(coco, "images/reviewed/test/spot/000.png")
    assert [a["bbox"] for a in anns] == [world["corrected"]] and anns[0]["category_id"] == 3  # spot in the parent
    assert img["defect_type"] == "spot" and (img["width"], img["height"]) == (128, 96)
    x, y, w, h = world["corrected"]
    expected = "2 " + " ".join(f"{v:.6f}" for v in ((x + w / 2) / 128, (y + h / 2) / 96, w / 128, h / 96))
    label = world["out"] / "yolo" / "labels" / "train" / "reviewed_test_spot_000.txt"
    assert label.read_text() == expected + "\n"
    ids = {a["id"] for s in SPLITS for a in _coco(world["out"], s)["annotations"]}
    assert len(ids) == sum(len(_coco(world["out"], s)["annotations"]) for s in SPLITS)  # unique over splits
    parent_max = max(a["id"] for s in SPLITS for a in _coco(world["parent"], s)["annotations"])
    assert anns[0]["id"] > parent_max


def test_accepted_mask_kept_and_good_review_is_a_negative(world):
    coco = _coco(world["out"], "train")
    _, anns = _image(coco, "images/reviewed/test/ring/000.png")
    assert len(anns) == 1 and anns[0]["category_id"] == 1 and anns[0]["bbox"] == list(world["ring"].bbox_xywh)
    assert (decode_rle(anns[0]["segmentation"]) == world["ring"].mask).all()
    assert anns[0]["area"] == world["ring"].area
    img, anns = _image(coco, "images/reviewed/test/good/000.png")
    assert img["defect_type"] == "good" and anns == []
    assert (world["out"] / "yolo" / "labels" / "train" / "reviewed_test_good_000.txt").read_text() == ""


def test_parent_yolo_labels_and_sam_records_regenerated_identically(world):
    old, new = world["parent"] / "yolo", world["out"] / "yolo"
    for split in SPLITS:
        for label in (old / "labels" / split).iterdir():
            assert (new / "labels" / split / label.name).read_text() == label.read_text()
        old_sam = _sam(world["parent"], split)
        new_sam = _sam(world["out"], split)
        # the same records (image ids aside: the id test checks those)
        assert [dict(r, image_id=0) for r in new_sam[: len(old_sam)]] == [dict(r, image_id=0) for r in old_sam]
        assert len(new_sam) == len(old_sam) + (2 if split == "train" else 0)


def _sam(folder: Path, split: str) -> list[dict]:
    return [json.loads(ln) for ln in (folder / "sam" / f"{split}.jsonl").read_text().splitlines()]


def test_dataset_yaml(world):
    doc = yaml.safe_load((world["out"] / "dataset.yaml").read_text())
    assert doc["parent"] == str(world["parent"].resolve())
    assert doc["reviewed_sha256"] == world["reviewed_sha256"]
    assert doc["to"] == "train" and doc["replaced"] == []
    assert doc["added"] == {"images": 3, "negatives": 1, "instances_per_class": {"ring": 1, "scratch": 0, "spot": 1}}
    parent = json.loads((world["parent"] / "split.json").read_text())
    assert doc["images"] == {s: len(parent["splits"][s]) + (3 if s == "train" else 0) for s in SPLITS}


def test_finetune_inputs_of_the_new_version_check(world):
    """What finetune yolo and sam read passes their checks, with the inspection folder gone."""
    from pipeline.data.sam_records import read_records

    data = read_data_yaml(world["out"] / "yolo" / "data.yaml")
    assert data["names"] == {0: "ring", 1: "scratch", 2: "spot"}
    for split in SPLITS:
        images = split_image_files(Path(data["path"]) / "images", split, world["out"] / "yolo" / "data.yaml")
        check_labels(images, data["nc"])
        assert len(images) == len(_coco(world["out"], split)["images"])
        records = read_records(world["out"] / "sam" / f"{split}.jsonl")
        assert len(records) == len(_coco(world["out"], split)["annotations"])
    spot = [
        r
        for r in read_records(world["out"] / "sam" / "train.jsonl")
        if r.image.name == "000.png" and "reviewed" in str(r.image)
    ]
    x, y, w, h = world["corrected"]
    assert (x, y, x + w, y + h) in [r.bbox_xyxy for r in spot]


@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_classifier_trains_on_the_new_split(world, monkeypatch, capsys, tmp_path):
    from pipeline.cli import app as cli

    args = ["finetune", "classifier", "--config", "attempt1_resnet18", "--split", str(world["out"] / "split.json")]
    args += ["--out", str(tmp_path / "run"), "--epochs", "1", "--batch", "8", "--imgsz", "32", "--device", "cpu"]
    args += ["--weights", "none", "--set", "data.max_train_good=2"]
    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
        raise SystemExit(0)
    assert exc.value.code == 0, capsys.readouterr()
    assert (tmp_path / "run" / "metrics.json").is_file()


# ----------------------------------------------------------------------------- refusals


@pytest.fixture()
def parent_images(world):
    """Parent file names by split (copies made under a fresh image root, so only their content matches)."""
    manifest = json.loads((world["parent"] / "split.json").read_text())
    return {s: [e["image"] for e in manifest["splits"][s]] for s in SPLITS}


def _copy_into(src: Path, root: Path, rel: str) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, root / rel)
    return rel


@pytest.mark.parametrize(
    "case, needles",
    [
        # a train image of the parent, renamed: same content, refused without --replace-labels
        ("train-duplicate", ["is the parent's train image", "--replace-labels"]),
        # a test image of the parent can never become training data
        ("test-image", ["is the parent's test image", "test images can never be added to train"]),
        # a file name that climbs out of the image root
        ("escape", ["outside the image root"]),
        # an absolute file name elsewhere
        ("absolute", ["outside the image root"]),
        # a class the parent does not have
        ("unknown-class", ["class 'crack' is not a class of the parent"]),
        # the same image listed twice under two names
        ("twice", ["same image"]),
    ],
)
def test_refused_with_one_line_and_nothing_written(world, parent_images, tmp_path, case, needles, synth_category):
    root = tmp_path / "imgs"
    good = _copy_into(world["new"] / "test/good/001.png", root, "a/good.png")
    doc = _reviewed_doc(root, [(good, [])])
    if case == "train-duplicate":
        doc["images"][0]["file_name"] = _copy_into(synth_category / parent_images["train"][0], root, "b/x.png")
    elif case == "test-image":
        doc["images"][0]["file_name"] = _copy_into(synth_category / parent_images["test"][0], root, "b/y.png")
    elif case == "escape":
        _copy_into(world["new"] / "test/good/002.png", tmp_path, "outside.png")
        doc["images"][0]["file_name"] = "a/../../outside.png"
    elif case == "absolute":
        doc["images"][0]["file_name"] = str(world["new"] / "test/good/002.png")
    elif case == "unknown-class":
        doc["categories"].append({"id": 9, "name": "crack"})
        doc["annotations"].append({"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 5, 5], "iscrowd": 0})
    elif case == "twice":
        doc["images"].append(dict(doc["images"][0], id=2, file_name=_copy_into(root / good, root, "c/same.png")))
    reviewed = _write(tmp_path / "reviewed.json", doc)
    with pytest.raises(PipelineError) as exc:
        add_reviewed(world["parent"], reviewed, tmp_path / "v2")
    msg = str(exc.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    assert not (tmp_path / "v2").exists()


def test_out_must_be_a_new_folder(world, tmp_path):
    with pytest.raises(PipelineError, match="folder of its own"):
        add_reviewed(world["parent"], world["base"] / "reviewed.json", world["parent"])
    with pytest.raises(PipelineError, match="folder of its own"):
        add_reviewed(world["parent"], world["base"] / "reviewed.json", world["parent"] / "v2")
    with pytest.raises(PipelineError, match="already exists; pass --force"):
        add_reviewed(world["parent"], world["base"] / "reviewed.json", world["out"])


def test_replace_labels_changes_the_image_in_its_own_split(world, parent_images, synth_category, tmp_path):
    """A parent val image reviewed with one box: its labels are replaced in val, nothing joins train."""
    root = tmp_path / "imgs"
    rel = parent_images["val"][0]
    name = _copy_into(synth_category / rel, root, "again.png")
    doc = _reviewed_doc(root, [(name, [("scratch", [10, 20, 7, 5], None)])])
    reviewed = _write(tmp_path / "reviewed.json", doc)
    with pytest.raises(PipelineError, match="--replace-labels"):
        add_reviewed(world["parent"], reviewed, tmp_path / "v2")
    s = add_reviewed(world["parent"], reviewed, tmp_path / "v2", replace_labels=True)
    assert s.replaced == [{"image": rel, "split": "val"}] and s.added["images"] == 0
    parent = json.loads((world["parent"] / "split.json").read_text())
    new = json.loads((tmp_path / "v2" / "split.json").read_text())
    assert new["splits"]["train"] == parent["splits"]["train"] and new["added"] == []
    assert image_ids(new) == image_ids(parent)  # nothing added: every id stays under any rule
    entry = next(e for e in new["splits"]["val"] if e["image"] == rel)
    assert entry["label"] == "scratch"
    img, anns = _image(_coco(tmp_path / "v2", "val"), rel)
    assert img["id"] == image_ids(parent)[rel] and [a["bbox"] for a in anns] == [[10, 20, 7, 5]]
    m = decode_rle(anns[0]["segmentation"])  # a box alone gets the filled box as its mask
    assert m.sum() == anns[0]["area"] == 35 and m[20:25, 10:17].all()
    assert (read_mask(Path(new["root"]) / entry["mask"]) == m).all()


def test_to_val_and_cli(world, tmp_path):
    """The CLI writes a version with the reviewed images in val; a second run without --force is one line."""
    import subprocess

    out = tmp_path / "v2"
    cmd = [sys.executable, "-m", "pipeline", "dataset", "add-reviewed", "--from", str(world["parent"])]
    cmd += ["--reviewed", str(world["base"] / "reviewed-kept.json"), "--out", str(out), "--to", "val"]
    doc = json.loads((world["base"] / "reviewed.json").read_text())
    kept = world["base"] / "kept"
    for img in doc["images"]:
        _copy_into(world["new"] / img["file_name"], kept, img["file_name"])
    doc["info"]["image_root"] = str(kept)
    _write(world["base"] / "reviewed-kept.json", doc)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "added 3 image(s) to val (1 reviewed good" in r.stdout
    new = json.loads((out / "split.json").read_text())
    assert [e["label"] for e in new["splits"]["val"][-3:]] == ["ring", "spot", "good"]
    assert yaml.safe_load((out / "dataset.yaml").read_text())["to"] == "val"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "already exists; pass --force" in lines[0], r.stderr
    r = subprocess.run([*cmd, "--force"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
