"""Prediction files: kinds, and the provenance record every ``pipeline predict`` writes beside them."""

import hashlib
import json

import pytest

from pipeline.core.errors import PipelineError
from pipeline.core.io import sha256_file
from pipeline.data.predictions import (
    GT_PROMPTS,
    load_predictions,
    read_provenance,
    require_model_output,
    upper_bound,
    write_provenance,
)


def test_sha256_file_streams_the_bytes(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: more than two 1 MiB chunks
    (tmp_path / "w.pt").write_bytes(data)
    assert sha256_file(tmp_path / "w.pt") == hashlib.sha256(data).hexdigest()
    with pytest.raises(PipelineError, match="file not found"):
        sha256_file(tmp_path / "missing.pt")


def test_provenance_beside_a_coco_file_and_embedded_in_a_dict_file(tmp_path):
    (tmp_path / "best.pt").write_bytes(b"weights")
    (tmp_path / "gt.json").write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    records = write_provenance(
        run,
        family="anomaly",
        model=tmp_path / "best.pt",
        split=tmp_path / "gt.json",
        subset="test",
        files={"predictions.json": {"score_threshold": 2.5, "score_threshold_chosen_on": "val"}, "coco.json": {}},
    )
    base = {
        "family": "anomaly",
        "model": str((tmp_path / "best.pt").resolve()),
        "weights_sha256": hashlib.sha256(b"weights").hexdigest(),
        "prompt": None,
        "split": str((tmp_path / "gt.json").resolve()),
        "subset": "test",
        "created_by": "pipeline predict anomaly",
    }
    on_disk = json.loads((run / "provenance.json").read_text())
    assert on_disk == {
        **base,
        "files": {
            "predictions.json": {"score_threshold": 2.5, "score_threshold_chosen_on": "val"},
            "coco.json": {"score_threshold": None, "score_threshold_chosen_on": None},
        },
    }
    assert records["coco.json"] == {**base, "score_threshold": None, "score_threshold_chosen_on": None}
    (run / "coco.json").write_text("[]")
    assert read_provenance(run / "coco.json") == records["coco.json"]
    assert load_predictions(run / "coco.json").provenance == records["coco.json"]
    # a dict-shaped file's embedded record wins over the one beside it
    embedded = {**records["predictions.json"], "split": "elsewhere"}
    (run / "predictions.json").write_text(
        json.dumps({"kind": "anomaly", "threshold": 2.5, "provenance": embedded, "predictions": []})
    )
    assert load_predictions(run / "predictions.json").provenance == embedded
    # a file provenance.json does not list, and a folder without one: no record, loaded as before
    (run / "mine.json").write_text("[]")
    assert read_provenance(run / "mine.json") is None and load_predictions(run / "mine.json").provenance is None
    (tmp_path / "old.json").write_text("[]")
    old = load_predictions(tmp_path / "old.json")
    assert old.provenance is None and upper_bound(old) is None and require_model_output(old, "fusion") is old
    (run / "provenance.json").write_text("[1]")
    with pytest.raises(PipelineError, match="not a provenance record"):
        load_predictions(run / "coco.json")


def test_gt_prompted_sam_is_an_upper_bound_and_refused_for_model_output(tmp_path):
    (tmp_path / "gt.json").write_text("{}")
    for name, prompt in (("gt_run", "gt"), ("det_run", f"detector:{tmp_path / 'boxes.json'}")):
        (tmp_path / name).mkdir()
        write_provenance(tmp_path / name, family="sam", model=None, split=tmp_path / "gt.json", prompt=prompt)
        (tmp_path / name / "predictions.json").write_text("[]")
    gt_pf = load_predictions(tmp_path / "gt_run" / "predictions.json")
    det_pf = load_predictions(tmp_path / "det_run" / "predictions.json")
    assert gt_pf.provenance["prompt"] == "gt" and gt_pf.provenance["weights_sha256"] is None
    assert upper_bound(gt_pf) == GT_PROMPTS == "ground-truth prompts" and upper_bound(det_pf) is None
    assert require_model_output(det_pf, "fusion") is det_pf
    with pytest.raises(PipelineError) as err:
        require_model_output(gt_pf, "fusion")
    assert str(err.value) == (
        f"{tmp_path / 'gt_run' / 'predictions.json'}: SAM masks prompted with ground-truth boxes (an upper bound, "
        "not a model's own output); fusion needs predictions prompted by a detector "
        "(pipeline predict sam --boxes <detector predictions.json>)"
    )


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(family="detr", model=None), "family 'detr'"),  # an unknown family
        (dict(family="yolo", model=None, prompt="gt"), "only SAM has one"),  # a prompt outside SAM
        (dict(family="sam", model=None, prompt="boxes"), "only SAM has one"),  # a prompt of no known form
    ],
)
def test_write_provenance_refuses_bad_records(tmp_path, kw, match):
    with pytest.raises(PipelineError, match=match):
        write_provenance(tmp_path, split=tmp_path / "gt.json", **kw)
    assert not (tmp_path / "provenance.json").exists()
