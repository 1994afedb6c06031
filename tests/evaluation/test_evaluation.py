"""COCO evaluation: ground truth as predictions scores 1.0; known cases give known numbers."""

import json

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.coco import load_coco_gt
from pipeline.data.convert import convert_category
from pipeline.data.instances import encode_rle
from pipeline.evaluation.coco import coco_eval, evaluate_coco_results, mask_iou_dice


@pytest.fixture(scope="module")
def gt_path(synth_category, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "synth"
    convert_category(synth_category, out)
    return out / "coco" / "train.json"


def _gt_as_results(gt, *, masks=False, score=1.0):
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": score,
            **({"segmentation": a["segmentation"]} if masks else {}),
        }
        for a in gt["annotations"]
    ]


def test_ground_truth_as_predictions_scores_one(gt_path, tmp_path):
    gt = json.loads(gt_path.read_text())
    pred = tmp_path / "gt.json"
    pred.write_text(json.dumps(_gt_as_results(gt, masks=True)))
    m = evaluate_coco_results(gt_path, pred, tmp_path / "ev")
    for kind in ("bbox", "segm"):
        assert m[kind]["AP"] == pytest.approx(1.0)
        assert m[kind]["AP50"] == pytest.approx(1.0)
        assert m[kind]["AR100"] == pytest.approx(1.0)
        assert list(m[kind]["per_class_AP"].values()) == pytest.approx([1.0, 1.0, 1.0])
    assert m["masks"]["mIoU"] == 1.0 and m["masks"]["mDice"] == 1.0 and m["masks"]["pixel_IoU"] == 1.0
    assert (tmp_path / "ev" / f"pr_bbox_{tmp_path.name}-gt.png").stat().st_size > 1000
    assert json.loads((tmp_path / "ev" / f"metrics_{tmp_path.name}-gt.json").read_text())["bbox"][
        "AP"
    ] == pytest.approx(1.0)


def test_no_predictions_gives_zero_without_crash(gt_path, tmp_path):
    pred = tmp_path / "none.json"
    pred.write_text("[]")
    m = evaluate_coco_results(gt_path, pred, tmp_path)
    assert m["bbox"]["AP"] == 0.0 and m["bbox"]["AR100"] == 0.0


def test_predictions_on_good_images_are_false_positives(gt_path):
    coco = load_coco_gt(gt_path)
    gt = coco.dataset
    good = [i["id"] for i in gt["images"] if i["defect_type"] == "good"]
    results = _gt_as_results(gt, score=0.5)
    # one confident false positive per class on a good image ranks above every true positive
    results += [
        {"image_id": good[0], "category_id": c["id"], "bbox": [1, 1, 5, 5], "score": 0.9} for c in gt["categories"]
    ]
    m = coco_eval(coco, results)
    assert m["AP50"] < 0.999
    for name, ap in m["per_class_AP50"].items():
        n = sum(
            1
            for a in gt["annotations"]
            if a["category_id"] == next(c["id"] for c in gt["categories"] if c["name"] == name)
        )
        # precision is 1/2 at recall 1/n ... n/(n+1) at recall 1: interpolated AP = n/(n+1) over the 101 points
        assert ap == pytest.approx(n / (n + 1), abs=0.02)


def test_unknown_image_id_is_rejected(gt_path, tmp_path):
    pred = tmp_path / "bad.json"
    pred.write_text(json.dumps([{"image_id": 99999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}]))
    with pytest.raises(PipelineError, match="image_id 99999 not in the ground truth"):
        evaluate_coco_results(gt_path, pred, tmp_path)


def test_mask_iou_dice_known_values():
    from pycocotools.coco import COCO

    h, w = 10, 10
    g = np.zeros((h, w), bool)
    g[0:4, 0:5] = True  # 20 px
    p = np.zeros((h, w), bool)
    p[0:4, 2:7] = True  # 20 px, 12 overlap
    coco = COCO()
    coco.dataset = {
        "images": [{"id": 1, "width": w, "height": h}],
        "categories": [{"id": 1, "name": "d"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [0, 0, 5, 4],
                "area": 20,
                "iscrowd": 0,
                "segmentation": encode_rle(g),
            }
        ],
    }
    coco.createIndex()
    m = mask_iou_dice(coco, [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": encode_rle(p)}])
    assert m["per_class"]["d"]["IoU"] == pytest.approx(12 / 28)
    assert m["per_class"]["d"]["Dice"] == pytest.approx(24 / 40)
    low = mask_iou_dice(coco, [{"image_id": 1, "category_id": 1, "score": 0.1, "segmentation": encode_rle(p)}])
    assert low["per_class"]["d"]["IoU"] == 0.0  # below the score threshold: nothing predicted


def test_class_agnostic_matches_whatever_the_class(gt_path):
    coco = load_coco_gt(gt_path)
    # every true box predicted, but all labelled with the first class
    results = [dict(r, category_id=1) for r in _gt_as_results(coco.dataset, masks=True)]
    assert coco_eval(coco, results)["AP"] < 0.9
    agnostic = coco_eval(coco, results, class_agnostic=True)
    assert agnostic["AP"] == pytest.approx(1.0) and list(agnostic["per_class_AP"]) == ["all"]
    m = mask_iou_dice(coco, results, class_agnostic=True)
    assert m["per_class"]["all"]["IoU"] == 1.0 and m["pixel_IoU"] == 1.0


@pytest.mark.parametrize(
    "case, needle",
    [
        ("unknown_kind", "not a prediction file"),  # the second file is no prediction file
        ("missing_file", "file not found"),  # the second file does not exist
        ("no_gt", "COCO results need --gt"),  # COCO results without ground truth
        ("missing_gt", "file not found"),  # the ground truth does not exist
        ("val_without_val_gt", "--val-gt"),  # fusion asked for without the val ground truth
        ("val_count", "same prediction sources"),  # one val file for two test files
        ("val_kind", "same order and kinds"),  # val files in another order than the test files
        ("agnostic_not_given", "not one of the prediction files"),  # --class-agnostic FILE not evaluated
        ("agnostic_not_coco", "only COCO results"),  # --class-agnostic on a classifier file
        ("both_matchings", "both --class-agnostic and --class-aware"),  # one file forced both ways
    ],
)
def test_evaluate_files_checks_every_input_before_writing(gt_path, tmp_path, case, needle):
    from pipeline.evaluation.evaluate import evaluate_files

    gt = json.loads(gt_path.read_text())
    det = tmp_path / "det.json"
    det.write_text(json.dumps(_gt_as_results(gt)))
    cls = tmp_path / "cls.json"
    cls.write_text(json.dumps({"kind": "classification", "classes": ["good", "defect"], "predictions": []}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "other"}))
    kw = {"predictions": [det, cls], "gt": gt_path, "val_predictions": None, "val_gt": None}
    kw.update(
        {
            "unknown_kind": {"predictions": [det, other]},
            "missing_file": {"predictions": [det, tmp_path / "nope.json"]},
            "no_gt": {"gt": None},
            "missing_gt": {"gt": tmp_path / "nope_gt.json"},
            "val_without_val_gt": {"val_predictions": [det, cls]},
            "val_count": {"val_predictions": [det], "val_gt": gt_path},
            "val_kind": {"val_predictions": [cls, det], "val_gt": gt_path},
            "agnostic_not_given": {"class_agnostic": [tmp_path / "other_det.json"]},
            "agnostic_not_coco": {"class_agnostic": [cls]},
            "both_matchings": {"class_agnostic": [det], "class_aware": [tmp_path / "." / "det.json"]},
        }[case]
    )
    out = tmp_path / "ev"
    with pytest.raises(PipelineError, match=needle):
        evaluate_files(kw.pop("predictions"), out_dir=out, **kw)
    assert not out.exists()


def test_class_agnostic_decided_per_file(gt_path, tmp_path):
    """PatchCore-like regions (every record marked class_agnostic, all category 1) are matched whatever
    the class beside a class-aware detector, in one call; either can be forced per file."""
    from pipeline.evaluation.evaluate import evaluate_files

    gt = json.loads(gt_path.read_text())
    (tmp_path / "pc").mkdir()
    (tmp_path / "det").mkdir()
    regions = tmp_path / "pc" / "coco_results.json"
    regions.write_text(json.dumps([dict(r, category_id=1, class_agnostic=True) for r in _gt_as_results(gt)]))
    det = tmp_path / "det" / "predictions.json"
    det.write_text(json.dumps(_gt_as_results(gt)))
    unmarked = tmp_path / "det" / "one_class.json"  # class-less in fact, but nothing says so
    unmarked.write_text(json.dumps([dict(r, category_id=1) for r in _gt_as_results(gt)]))

    def metrics(out, name):
        return json.loads((out / f"metrics_{name}.json").read_text())

    out = tmp_path / "ev"
    evaluate_files([regions, det, unmarked], gt=gt_path, out_dir=out)
    m = metrics(out, "pc-coco_results")
    assert (m["class_agnostic"], m["class_agnostic_reason"]) == (True, "auto: class-less source")
    assert m["bbox"]["AP"] == pytest.approx(1.0) and list(m["bbox"]["per_class_AP"]) == ["all"]
    m = metrics(out, "det-predictions")
    assert (m["class_agnostic"], m["class_agnostic_reason"]) == (False, "auto: class-aware source")
    assert m["bbox"]["AP"] == pytest.approx(1.0) and len(m["bbox"]["per_class_AP"]) == 3
    m = metrics(out, "det-one_class")
    assert (m["class_agnostic"], m["class_agnostic_reason"]) == (False, "auto: class-aware source")
    assert m["bbox"]["AP"] < 0.9
    # forced per file, by the path given on the command line
    out2 = tmp_path / "ev2"
    evaluate_files([regions, unmarked], gt=gt_path, out_dir=out2, class_aware=[regions], class_agnostic=[unmarked])
    m = metrics(out2, "pc-coco_results")
    assert (m["class_agnostic"], m["class_agnostic_reason"]) == (False, "option") and m["bbox"]["AP"] < 0.9
    m = metrics(out2, "det-one_class")
    assert (m["class_agnostic"], m["class_agnostic_reason"]) == (True, "option")
    assert m["bbox"]["AP"] == pytest.approx(1.0)


def test_mask_score_threshold_is_an_option_recorded_in_the_metrics(gt_path, tmp_path):
    from pipeline.evaluation.evaluate import evaluate_files

    gt = json.loads(gt_path.read_text())
    pred = tmp_path / "sam" / "predictions.json"
    pred.parent.mkdir()
    pred.write_text(json.dumps(_gt_as_results(gt, masks=True, score=0.9)))
    evaluate_files([pred], gt=gt_path, out_dir=tmp_path / "a")
    m = json.loads((tmp_path / "a" / "metrics_sam-predictions.json").read_text())
    assert m["mask_score_threshold"] == 0.5 and m["masks"]["mIoU"] == 1.0
    evaluate_files([pred], gt=gt_path, out_dir=tmp_path / "b", mask_score_threshold=0.95)
    m = json.loads((tmp_path / "b" / "metrics_sam-predictions.json").read_text())
    assert m["mask_score_threshold"] == 0.95 and m["masks"]["score_threshold"] == 0.95
    assert m["masks"]["mIoU"] == 0.0 and m["segm"]["AP"] == pytest.approx(1.0)  # COCOeval ranks every score


def test_uncomputable_numbers_are_null_with_a_reason(gt_path):
    """A class with no ground truth in the split: per-class AP and mask IoU are null with a reason."""
    coco = load_coco_gt(gt_path)
    cats = coco.loadCats(coco.getCatIds())
    first = cats[0]["id"]
    keep = [a for a in coco.dataset["annotations"] if a["category_id"] == first]
    from pycocotools.coco import COCO

    one = COCO()
    one.dataset = dict(coco.dataset, annotations=keep)
    one.createIndex()
    results = _gt_as_results(one.dataset, masks=True)
    absent = {c["name"] for c in cats[1:]}
    for m in (coco_eval(one, results), coco_eval(one, [])):
        assert {n for n, v in m["per_class_AP"].items() if v is None} == absent
        assert m["per_class_AP_reason"] == {n: "no ground truth of this class in the split" for n in sorted(absent)}
    assert coco_eval(one, results)["per_class_AP"][cats[0]["name"]] == pytest.approx(1.0)
    mk = mask_iou_dice(one, results)
    for n in absent:
        assert mk["per_class"][n]["IoU"] is None and mk["per_class"][n]["reason"].startswith("no ground truth")
    assert mk["mIoU"] == 1.0 and "mIoU_reason" not in mk
