"""convert-masks: COCO / YOLO / SAM outputs agree with each other and with the masks."""

import json

import numpy as np
import pytest
import yaml

from pipeline.core.errors import PipelineError
from pipeline.data.convert import class_names, convert_category
from pipeline.data.instances import decode_rle, mask_to_instances
from pipeline.data.mvtec import read_mask
from pipeline.data.yolo import read_yolo_labels


@pytest.fixture(scope="module")
def converted(synth_category, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "synth"
    summary = convert_category(synth_category, out)
    return out, summary


def test_counts_match_the_masks(converted, synth_category):
    out, summary = converted
    masks = sorted((synth_category / "ground_truth").rglob("*_mask.png"))
    expected = sum(len(mask_to_instances(read_mask(m))) for m in masks)
    assert sum(summary.masks.values()) == len(masks) == 18
    assert sum(summary.instances.values()) == expected
    assert sum(summary.images.values()) == 24


def test_coco_is_valid_and_exact(converted, synth_category):
    out, _ = converted
    ids_seen, ann_ids = set(), set()
    for split in ("train", "val", "test"):
        coco = json.loads((out / "coco" / f"{split}.json").read_text())
        assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
        assert [c["name"] for c in coco["categories"]] == ["ring", "scratch", "spot"]
        img_by_id = {i["id"]: i for i in coco["images"]}
        assert not ids_seen & set(img_by_id)
        ids_seen |= set(img_by_id)
        assert any(i["defect_type"] == "good" for i in coco["images"])  # good images listed, no annotations
        for a in coco["annotations"]:
            assert a["id"] >= 1 and a["id"] not in ann_ids and a["iscrowd"] == 0
            ann_ids.add(a["id"])
            img = img_by_id[a["image_id"]]
            m = decode_rle(a["segmentation"])
            assert m.shape == (img["height"], img["width"]) == (96, 128)
            assert int(m.sum()) == a["area"]
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            gt_mask = read_mask(
                synth_category / img["file_name"].replace("test/", "ground_truth/").replace(".png", "_mask.png")
            )
            assert not (m & ~gt_mask).any()


def test_yolo_labels_equal_coco_boxes(converted):
    out, _ = converted
    data = yaml.safe_load((out / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "ring", 1: "scratch", 2: "spot"} and data["nc"] == 3
    for split in ("train", "val", "test"):
        coco = json.loads((out / "coco" / f"{split}.json").read_text())
        images = list((out / "yolo" / "images" / split).iterdir())
        assert len(images) == len(coco["images"])
        assert all(p.is_symlink() and p.resolve().is_file() for p in images)
        for img in coco["images"]:
            label, stem = img["defect_type"], img["file_name"].split("/")[-1][:-4]
            rows = read_yolo_labels(out / "yolo" / "labels" / split / f"{label}_{stem}.txt")
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            assert len(rows) == len(anns)
            for row, a in zip(rows, anns):
                c, cx, cy, w, h = row
                assert int(c) == a["category_id"] - 1
                assert 0 <= cx - w / 2 and cx + w / 2 <= 1 + 1e-6
                x, y, bw, bh = a["bbox"]
                np.testing.assert_allclose(
                    [(cx - w / 2) * 128, (cy - h / 2) * 96, w * 128, h * 96], [x, y, bw, bh], atol=1e-3
                )


def test_sam_records_decode_to_their_components(converted):
    out, summary = converted
    n = 0
    for split in ("train", "val", "test"):
        for line in (out / "sam" / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            m = decode_rle(r["segmentation"])
            x0, y0, x1, y1 = r["bbox_xyxy"]
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            assert r["size_hw"] == [96, 128]
            n += 1
    assert n == sum(summary.instances.values())


def test_refuses_to_overwrite_without_force(converted, synth_category):
    out, _ = converted
    before = (out / "coco" / "test.json").read_bytes()
    with pytest.raises(PipelineError, match="--force"):
        convert_category(synth_category, out)
    assert (out / "coco" / "test.json").read_bytes() == before


def test_failure_mid_write_leaves_no_partial_output(synth_category, tmp_path, monkeypatch):
    import pipeline.data.convert as convert

    calls = []

    def failing_check(*args):
        calls.append(1)
        if len(calls) == 7:
            raise PipelineError("injected self-check failure")

    monkeypatch.setattr(convert, "_self_check", failing_check)
    with pytest.raises(PipelineError, match="injected"):
        convert_category(synth_category, tmp_path / "ann")
    assert len(calls) == 7
    assert not list(tmp_path.iterdir())  # neither the output nor its temporary folder remains


def test_empty_split_is_an_error(tmp_path):
    from pipeline.data.synth import generate_category

    small = generate_category(tmp_path / "small", n_train_good=1, n_test_good=2, n_per_defect=2)
    with pytest.raises(PipelineError, match="split 'val' .* is empty"):
        convert_category(small, tmp_path / "ann")  # 2 images per label: round(0.4) = 0 for val
    assert not (tmp_path / "ann").exists()


def test_rename_merges_types(synth_category, tmp_path):
    s = convert_category(synth_category, tmp_path / "a", rename={"ring": "round defect", "spot": "round defect"})
    assert s.classes == ["round defect", "scratch"]
    data = yaml.safe_load((tmp_path / "a" / "yolo" / "data.yaml").read_text())
    assert data["names"] == {0: "round defect", 1: "scratch"}


@pytest.mark.parametrize(
    "rename, message",
    [
        ({"ring": "a/b"}, "without '/'"),  # '/' is a synonym separator for YOLO-World
        ({"nope": "x"}, "unknown defect types"),
    ],
)
def test_bad_class_names(rename, message):
    with pytest.raises(PipelineError, match=message):
        class_names(["ring", "spot"], rename)


def test_natural_names():
    assert class_names(["broken_large", "contamination"])[0] == ["broken large", "contamination"]


def test_force_replaces_only_what_convert_wrote(converted, synth_category):
    """The README puts Label Studio's reviewed labels in coco/reviewed.json: --force keeps them."""
    out, _ = converted
    (out / "coco" / "reviewed.json").write_text('{"images": []}')
    (out / "NOTES.txt").write_text("mine")
    before = (out / "coco" / "test.json").read_bytes()
    s = convert_category(synth_category, out, force=True)
    assert (out / "coco" / "reviewed.json").read_text() == '{"images": []}'
    assert (out / "NOTES.txt").read_text() == "mine"
    assert s.kept == ["NOTES.txt", "coco/reviewed.json"]
    assert (out / "coco" / "test.json").read_bytes() == before


def test_force_on_a_folder_from_before_the_manifest_keeps_other_files(converted, synth_category):
    out, _ = converted
    (out / ".pipeline-run.json").unlink()
    (out / "coco" / "reviewed.json").write_text("{}")
    convert_category(synth_category, out, force=True)
    assert (out / "coco" / "reviewed.json").read_text() == "{}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"connectivity": 6}, "--connectivity 6: expected 4 or 8"),
        ({"min_area": 0}, "--min-area 0"),
    ],
)
def test_bad_options_are_one_line_errors(synth_category, tmp_path, kwargs, message):
    with pytest.raises(PipelineError, match=message):
        convert_category(synth_category, tmp_path / "ann", **kwargs)
    assert not (tmp_path / "ann").exists()


def test_connectivity_6_on_the_cli_is_one_line(synth_category, tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "convert-masks",
            str(synth_category),
            "--out",
            str(tmp_path / "a"),
            "--connectivity",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "expected 4 or 8" in r.stderr


def test_a_rare_defect_type_is_warned_about(tmp_path):
    from pipeline.data.synth import generate_category

    cat = generate_category(tmp_path / "c", n_train_good=2, n_test_good=6, n_per_defect=6)
    for p in sorted((cat / "test" / "spot").glob("*.png"))[2:]:  # leave 2 spot images
        p.unlink()
        (cat / "ground_truth" / "spot" / f"{p.stem}_mask.png").unlink()
    s = convert_category(cat, tmp_path / "ann")
    assert any(w.startswith("'spot' has 2 image(s): the val, test split(s) will have none") for w in s.warnings)
    assert json.loads((tmp_path / "ann" / "summary.json").read_text())["warnings"] == s.warnings


def test_each_file_is_decoded_once(synth_category, tmp_path, monkeypatch):
    import pipeline.core.io as io

    seen = []
    real = io.read_image
    monkeypatch.setattr(io, "read_image", lambda p, **kw: seen.append(str(p)) or real(p, **kw))
    import pipeline.data.mvtec as mvtec

    monkeypatch.setattr(mvtec, "read_image", io.read_image)
    convert_category(synth_category, tmp_path / "ann")
    n_files = 10 + 6 + 3 * 6 + 3 * 6  # train/good, test/good, defect images, masks
    assert len(seen) == len(set(seen)) == n_files


def test_an_empty_mask_kept_as_good_does_not_take_a_good_images_yolo_name(synth_category, tmp_path):
    import shutil

    import cv2

    cat = tmp_path / "c"
    shutil.copytree(synth_category, cat)
    cv2.imwrite(str(cat / "ground_truth/ring/000_mask.png"), np.zeros((96, 128), np.uint8))
    out = tmp_path / "ann"
    convert_category(cat, out, allow_empty_masks=True)
    labels = sorted(p.name for p in (out / "yolo" / "labels").rglob("*.txt"))
    assert "ring_000.txt" in labels and "good_000.txt" in labels and len(labels) == len(set(labels)) == 6 + 3 * 6
