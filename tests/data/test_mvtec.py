"""MVTec reader: pairing and validation errors, split manifest."""

import shutil

import cv2
import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.mvtec import read_mask, scan_category
from pipeline.data.split import load_split, make_split, write_split


@pytest.fixture()
def cat(synth_category, tmp_path):
    dst = tmp_path / "synth"
    shutil.copytree(synth_category, dst)
    return dst


def test_scan_pairs_every_defect_image_with_its_mask(synth_category):
    c = scan_category(synth_category)
    assert c.defect_types == ["ring", "scratch", "spot"]
    assert len(c.train_good) == 10 and len(c.test) == 6 + 3 * 6
    for s in c.test:
        if s.label == "good":
            assert s.mask is None
        else:
            assert s.mask.name == f"{s.image.stem}_mask.png" and s.mask.parent.name == s.label
            assert read_mask(s.mask).shape == (96, 128)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        # a defect image without its mask
        (lambda c: (c / "ground_truth/ring/002_mask.png").unlink(), "ring/002.png: no mask"),
        # an orphan mask
        (
            lambda c: shutil.copy(c / "ground_truth/ring/000_mask.png", c / "ground_truth/ring/099_mask.png"),
            "099_mask.png: orphan mask",
        ),
        # a mask of another size than its image
        (
            lambda c: cv2.imwrite(str(c / "ground_truth/spot/001_mask.png"), np.zeros((50, 60), np.uint8)),
            "differs from its image",
        ),
        # a mask with values other than {0, 255} / {0, 1}
        (
            lambda c: cv2.imwrite(str(c / "ground_truth/spot/001_mask.png"), np.full((96, 128), 128, np.uint8)),
            "mask values [128]",
        ),
        # a truncated PNG
        (
            lambda c: (c / "ground_truth/scratch/000_mask.png").write_bytes(
                (c / "ground_truth/scratch/000_mask.png").read_bytes()[:100]
            ),
            "unreadable or truncated",
        ),
        # an unreadable image
        (lambda c: (c / "test/scratch/001.png").write_bytes(b"not a png"), "test/scratch/001.png: unreadable"),
    ],
)
def test_bad_category_gives_one_error_naming_the_file(cat, breakage, expected):
    breakage(cat)
    with pytest.raises(PipelineError) as exc:
        scan_category(cat)
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_errors_list_every_offending_file(cat):
    (cat / "ground_truth/ring/002_mask.png").unlink()
    (cat / "ground_truth/spot/003_mask.png").unlink()
    with pytest.raises(PipelineError, match="2 problem"):
        scan_category(cat)


def test_missing_category_folder(tmp_path):
    with pytest.raises(PipelineError, match="category folder not found"):
        scan_category(tmp_path / "nope")


def test_split_is_stratified_deterministic_and_complete(synth_category, tmp_path):
    c = scan_category(synth_category)
    a = make_split(c, ratios=(0.5, 0.25, 0.25), seed=3)
    assert a == make_split(c, ratios=(0.5, 0.25, 0.25), seed=3)
    assert a != make_split(c, ratios=(0.5, 0.25, 0.25), seed=4)
    images = [e["image"] for s in ("train", "val", "test") for e in a["splits"][s]]
    assert sorted(images) == sorted(s.image.relative_to(c.root).as_posix() for s in c.test)
    for label in ["good", "ring", "scratch", "spot"]:
        counts = [sum(e["label"] == label for e in a["splits"][s]) for s in ("train", "val", "test")]
        assert counts == [2, 2, 2], (label, counts)  # 6 images: round(1.5) = 2 for val and test
    default = make_split(c)
    for label in ["good", "ring", "scratch", "spot"]:
        assert [sum(e["label"] == label for e in default["splits"][s]) for s in ("train", "val", "test")] == [4, 1, 1]
    write_split(a, tmp_path / "split.json")
    loaded = load_split(tmp_path / "split.json")
    assert [s.image for s in loaded.samples("val")] == [c.root / e["image"] for e in a["splits"]["val"]]
    assert len(loaded.train_good()) == 10


def test_bad_ratios(synth_category):
    with pytest.raises(PipelineError, match="summing to 1"):
        make_split(scan_category(synth_category), ratios=(0.5, 0.5, 0.5))


def test_unreadable_image_after_ultralytics_import(cat):
    import ultralytics  # noqa: F401  (patches PIL.Image.open process-wide)

    (cat / "test/scratch/001.png").write_bytes(b"not a png")
    with pytest.raises(PipelineError, match="test/scratch/001.png: unreadable"):
        scan_category(cat)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "breakage, expected",
    [
        # a truncated good training image: decoded too, not only defect images
        (lambda c: _truncate(c / "train/good/003.png"), "train/good/003.png: unreadable or truncated"),
        # a truncated good test image
        (lambda c: _truncate(c / "test/good/002.png"), "test/good/002.png: unreadable or truncated"),
        # an empty file
        (
            lambda c: (c / "test/good/001.png").write_bytes(b""),
            "test/good/001.png: unreadable or truncated image (empty file",
        ),
        # a 16-bit image is refused, not rescaled
        (lambda c: cv2.imwrite(str(c / "train/good/000.png"), np.full((96, 128), 40000, np.uint16)), "uint16 image"),
        # an all-zero mask for a defect image
        (
            lambda c: cv2.imwrite(str(c / "ground_truth/ring/001_mask.png"), np.zeros((96, 128), np.uint8)),
            "ring/001_mask.png: all-zero mask for defect image 001.png",
        ),
        # two images of one folder with one stem would share one mask
        (
            lambda c: shutil.copy(c / "test/ring/000.png", c / "test/ring/000.jpg"),
            "000.jpg, 000.png share the stem '000'",
        ),
        # an orphan mask names the image it expected, whatever its extension would be
        (
            lambda c: (c / "test/ring/004.png").rename(c / "test/ring/004.bak"),
            "004_mask.png: orphan mask (expected its image",
        ),
    ],
)
def test_every_image_is_checked(cat, breakage, expected):
    breakage(cat)
    with pytest.raises(PipelineError) as exc:
        scan_category(cat)
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_allow_empty_masks_keeps_the_image_as_good(cat):
    cv2.imwrite(str(cat / "ground_truth/ring/001_mask.png"), np.zeros((96, 128), np.uint8))
    c = scan_category(cat, allow_empty_masks=True)
    assert c.empty_masks == (cat.resolve() / "test/ring/001.png",)
    labels = {s.image.name + "@" + s.image.parent.name: s.label for s in c.test}
    assert labels["001.png@ring"] == "good" and labels["002.png@ring"] == "ring"


def test_truncated_png_gives_one_line_and_no_library_noise(cat):
    import subprocess
    import sys

    _truncate(cat / "ground_truth/scratch/000_mask.png")
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "convert-masks", str(cat), "--out", str(cat.parent / "ann")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "000_mask.png" in r.stderr
    assert "libpng" not in r.stderr + r.stdout
