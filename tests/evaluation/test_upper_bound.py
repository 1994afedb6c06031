"""SAM masks prompted with the ground-truth boxes: scored as an upper bound, refused by the fusion."""

import json

import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.convert import convert_category
from pipeline.data.predictions import write_provenance
from pipeline.evaluation.evaluate import evaluate_files
from pipeline.evaluation.fusion import fuse_files


@pytest.fixture(scope="module")
def ann(synth_category, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "synth"
    convert_category(synth_category, out)
    return out


def _sam_run(root, name, gt_path, prompt):
    """A ``predict sam`` run folder: the ground truth as mask results, and its provenance with ``prompt``."""
    gt = json.loads(gt_path.read_text())
    run = root / name
    run.mkdir()
    res = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")}, "score": 0.9}
        for a in gt["annotations"]
    ]
    (run / "predictions.json").write_text(json.dumps(res))
    write_provenance(run, family="sam", model=None, split=gt_path, prompt=prompt)
    return run / "predictions.json"


def test_evaluate_labels_ground_truth_prompts_as_an_upper_bound(ann, tmp_path):
    gt = ann / "coco" / "test.json"
    upper = _sam_run(tmp_path, "sam_gt", gt, "gt")
    own = _sam_run(tmp_path, "sam_det", gt, f"detector:{tmp_path / 'boxes.json'}")
    (tmp_path / "old.json").write_text(own.read_text())  # no provenance: scored as before
    lines = evaluate_files([upper, own, tmp_path / "old.json"], gt=gt, out_dir=tmp_path / "ev")
    assert lines[0].startswith("[upper bound: ground-truth prompts] sam_gt-predictions: bbox AP 1.0000")
    assert lines[1].startswith("sam_det-predictions: bbox AP 1.0000")
    assert lines[2].startswith(f"{tmp_path.name}-old: bbox AP 1.0000")
    m = json.loads((tmp_path / "ev" / "metrics_sam_gt-predictions.json").read_text())
    assert m["upper_bound"] == "ground-truth prompts" and m["segm"]["AP"] == pytest.approx(1.0)
    for tag in ("sam_det-predictions", f"{tmp_path.name}-old"):
        m = json.loads((tmp_path / "ev" / f"metrics_{tag}.json").read_text())
        assert "upper_bound" not in m and m["segm"]["AP"] == pytest.approx(1.0)


def test_fusion_refuses_ground_truth_prompts_before_writing(ann, tmp_path):
    val_gt, gt = ann / "coco" / "val.json", ann / "coco" / "test.json"
    (tmp_path / "val").mkdir()
    val = _sam_run(tmp_path / "val", "sam_det", val_gt, f"detector:{tmp_path / 'boxes.json'}")
    upper = _sam_run(tmp_path, "sam_gt", gt, "gt")
    message = (
        f"{upper}: SAM masks prompted with ground-truth boxes (an upper bound, not a model's own output); "
        "the fused image-level decision (evaluate --val-predictions) needs predictions prompted by a detector "
        "(pipeline predict sam --boxes <detector predictions.json>)"
    )
    with pytest.raises(PipelineError) as err:
        evaluate_files([upper], gt=gt, out_dir=tmp_path / "ev", val_predictions=[val], val_gt=val_gt)
    assert str(err.value) == message
    assert not (tmp_path / "ev").exists()
    with pytest.raises(PipelineError) as err:
        fuse_files([val], [upper], val_gt=val_gt, test_gt=gt)
    assert str(err.value) == message
    own = _sam_run(tmp_path, "sam_det", gt, f"detector:{tmp_path / 'boxes.json'}")
    assert fuse_files([val], [own], val_gt=val_gt, test_gt=gt)["sources"][0]["name"] == "masks:sam_det"
