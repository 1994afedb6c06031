"""The image-id rule: one id per image of the manifest, the one coco/<subset>.json has."""

from __future__ import annotations

import json

from pipeline.data.convert import convert_category
from pipeline.data.split import image_ids


def test_image_ids_equal_the_coco_ids_of_every_split(synth_category, tmp_path):
    out = tmp_path / "ann"
    convert_category(synth_category, out)
    manifest = json.loads((out / "split.json").read_text())
    ids = image_ids(manifest)
    seen = set()
    for subset in ("train", "val", "test"):
        coco = json.loads((out / "coco" / f"{subset}.json").read_text())
        for im in coco["images"]:
            assert ids[im["file_name"]] == im["id"]
            seen.add(im["id"])
    split_ids = sorted(ids[e["image"]] for entries in manifest["splits"].values() for e in entries)
    assert split_ids == list(range(1, len(split_ids) + 1)) == sorted(seen)
    good = manifest["train_good"]
    assert sorted(ids[g] for g in good) == list(range(len(split_ids) + 1, len(split_ids) + len(good) + 1))
