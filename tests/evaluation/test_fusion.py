"""Image-level decision per source and fused: scores from each file kind, val thresholds, metrics, fusion."""

import json

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.evaluation.curves import pr_curve, roc_curve
from pipeline.evaluation.fusion import (
    auroc,
    decision_metrics,
    f1_threshold,
    fit_logistic,
    fuse_files,
    load_split_labels,
    source_scores,
)


def _gt(path, ids_types, root="/data/cat"):
    """COCO ground truth with images (id, defect_type) and one box per defect image."""
    images = [
        {"id": i, "file_name": f"test/{t}/{i:03d}.png", "width": 20, "height": 10, "defect_type": t}
        for i, t in ids_types
    ]
    anns = [
        {"id": k + 1, "image_id": i, "category_id": 1, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0}
        for k, (i, t) in enumerate(ids_types)
        if t != "good"
    ]
    path.write_text(
        json.dumps(
            {
                "info": {"image_root": root},
                "images": images,
                "annotations": anns,
                "categories": [{"id": 1, "name": "ring"}],
            }
        )
    )
    return path


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


VAL = [(1, "good"), (2, "good"), (3, "ring"), (4, "ring"), (5, "spot"), (6, "good")]
TEST = [(11, "good"), (12, "ring"), (13, "spot"), (14, "good")]


def test_scores_from_each_kind(tmp_path):
    labels = load_split_labels(_gt(tmp_path / "test.json", TEST))
    assert labels.y.tolist() == [False, True, True, False]
    # COCO: max over boxes/masks per image, 0 when none
    coco = _write(
        tmp_path / "det.json",
        [
            {"image_id": 12, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.3},
            {"image_id": 12, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.8},
            {"image_id": 14, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.1},
        ],
    )
    s = source_scores(coco, labels)
    assert s.kind == "boxes" and s.scores.tolist() == [0.0, 0.8, 0.0, 0.1]
    seg = _write(
        tmp_path / "sam.json",
        [
            {
                "image_id": 13,
                "category_id": 1,
                "bbox": [0, 0, 1, 1],
                "score": 0.5,
                "segmentation": {"size": [10, 20], "counts": "0"},
            }
        ],
    )
    assert source_scores(seg, labels).kind == "masks"
    # classifier: 1 - p(good); one record matched by its image path instead of an id
    preds = [
        {"image_id": i, "image": f"test/{t}/{i:03d}.png", "label": t, "scores": {"good": g, "ring": 1 - g}}
        for (i, t), g in zip(TEST, [0.9, 0.2, 0.4, 0.7])
    ]
    del preds[2]["image_id"]
    cls = _write(tmp_path / "cls.json", {"kind": "classification", "classes": ["good", "ring"], "predictions": preds})
    s = source_scores(cls, labels)
    assert s.kind == "classifier" and np.allclose(s.scores, [0.1, 0.8, 0.6, 0.3])
    # binary classifier without "good": p(defect)
    binp = _write(
        tmp_path / "bin.json",
        {
            "kind": "classification",
            "classes": ["ok", "defect"],
            "predictions": [
                {"image_id": i, "scores": {"ok": 1 - d, "defect": d}} for (i, _), d in zip(TEST, [0.1, 0.9, 0.7, 0.2])
            ],
        },
    )
    assert np.allclose(source_scores(binp, labels).scores, [0.1, 0.9, 0.7, 0.2])
    # anomaly: its score, any range
    an = _write(
        tmp_path / "an.json",
        {
            "kind": "anomaly",
            "threshold": 3.0,
            "predictions": [
                {"image_id": i, "image": "x", "score": v, "label": "good"}
                for (i, _), v in zip(TEST, [1.5, 7.0, 4.0, 2.0])
            ],
        },
    )
    assert source_scores(an, labels).scores.tolist() == [1.5, 7.0, 4.0, 2.0]


@pytest.mark.parametrize(
    "obj, match",
    [
        ([{"image_id": 99, "category_id": 1, "score": 0.5}], "image_id 99 not in the ground truth"),  # foreign image
        (
            {"kind": "anomaly", "predictions": [{"image_id": 11, "score": 1.0}]},
            "no prediction for 3 image",
        ),  # incomplete
        (
            {"kind": "classification", "predictions": [{"image_id": i, "scores": {"a": 1.0}} for i, _ in TEST]},
            "neither",
        ),
        ({"kind": "other"}, "not a prediction file"),
    ],
)
def test_bad_prediction_files(tmp_path, obj, match):
    labels = load_split_labels(_gt(tmp_path / "test.json", TEST))
    with pytest.raises(PipelineError, match=match):
        source_scores(_write(tmp_path / "p.json", obj), labels)


def test_metrics_known_values():
    y = [True, True, True, False, False]
    s = [0.9, 0.6, 0.2, 0.5, 0.1]
    m = decision_metrics(s, y, 0.5)  # called defect: 0.9, 0.6, 0.5 -> TP 2, FP 1, FN 1, TN 1
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["auroc"] == pytest.approx(5 / 6)  # pairs (pos > neg): 0.9>both, 0.6>both, 0.2>0.1 -> 5 of 6
    assert auroc([0.5, 0.5], [True, False]) == 0.5  # ties count one half
    assert auroc([0.1, 0.2], [True, True]) is None
    rng = np.random.default_rng(1)  # matches the pairwise definition on data with many ties
    sc, yy = rng.integers(0, 5, 300).astype(float), rng.random(300) < 0.3
    pairs = (sc[yy][:, None] > sc[~yy][None, :]).mean() + 0.5 * (sc[yy][:, None] == sc[~yy][None, :]).mean()
    assert auroc(sc, yy) == pytest.approx(pairs)
    assert decision_metrics([0.1], [False], 0.5)["precision"] == 0.0  # nothing called defect


def test_f1_threshold_halfway_and_ties():
    # separable: defects 0.6, 0.8; good 0.1, 0.3 -> cut between 0.3 and 0.6
    assert f1_threshold([0.1, 0.3, 0.6, 0.8], [False, False, True, True]) == pytest.approx(0.45)
    # every score the same: the only candidate is that score
    assert f1_threshold([0.0, 0.0], [True, False]) == 0.0
    # F1 tie between t=0.2 (all defect: P 2/3, R 1 -> F1 .8) and t=0.5 (P 1, R 1/2 -> .667): 0.2 wins on F1
    assert f1_threshold([0.2, 0.5, 0.4], [False, True, True]) == pytest.approx(0.3)


def test_curves():
    fpr, tpr = roc_curve([0.9, 0.6, 0.5, 0.1], [True, False, True, False])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    rec, prec = pr_curve([0.9, 0.6, 0.5, 0.1], [True, False, True, False])
    assert rec.tolist() == [0.5, 0.5, 1, 1] and prec.tolist() == [1, 0.5, 2 / 3, 0.5]


def test_logistic_fit_recovers_direction_and_is_finite_on_separable_data():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.5
    x = np.c_[y * 2.0 + rng.normal(0, 1, 200), rng.normal(0, 1, 200)]  # column 0 informative, column 1 noise
    m = fit_logistic(x, y, l2=1.0)
    assert m.w[0] > 1.0 and abs(m.w[1]) < 0.3
    p = m.predict(x)
    assert ((p >= 0.5) == y).mean() > 0.8
    sep = fit_logistic(np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([False, False, True, True]), l2=1.0)
    assert np.isfinite(sep.w).all() and sep.w[0] > 0
    # a constant source (a detector that never fires) gets weight 0, the fit stays finite
    const = fit_logistic(np.c_[np.zeros(4), [0.0, 1.0, 2.0, 3.0]], np.array([False, False, True, True]))
    assert const.w[0] == pytest.approx(0.0, abs=1e-9) and const.w[1] > 0
    with pytest.raises(PipelineError, match="good and defect"):
        fit_logistic(np.zeros((3, 1)), np.array([True, True, True]))


def test_fuse_files_or_and_logistic(tmp_path):
    val_gt, test_gt = _gt(tmp_path / "val.json", VAL), _gt(tmp_path / "test.json", TEST)

    def det(path, scores):  # one box per image with that score (none when 0)
        return _write(
            path,
            [{"image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2], "score": s} for i, s in scores.items() if s > 0],
        )

    def anom(path, scores):
        return _write(
            path,
            {
                "kind": "anomaly",
                "threshold": 0.5,
                "predictions": [
                    {"image_id": i, "image": f"img{i}", "score": s, "label": "good"} for i, s in scores.items()
                ],
            },
        )

    # detector finds ring (3, 4 / 12) but not spot (5 / 13); anomaly finds spot but is weak on ring
    dv = det(tmp_path / "det_val.json", {1: 0.0, 2: 0.1, 3: 0.9, 4: 0.8, 5: 0.0, 6: 0.0})
    av = anom(tmp_path / "an_val.json", {1: 1.0, 2: 2.0, 3: 1.5, 4: 2.5, 5: 5.0, 6: 1.2})
    dt = det(tmp_path / "det_test.json", {11: 0.05, 12: 0.95, 13: 0.0, 14: 0.0})
    at = anom(tmp_path / "an_test.json", {11: 1.1, 12: 1.2, 13: 6.0, 14: 1.3})
    r = fuse_files([dv, av], [dt, at], val_gt=val_gt, test_gt=test_gt)
    names = [s["name"] for s in r["sources"]]
    assert names == ["boxes:det_test", "anomaly:an_test"]
    det_s, an_s = r["sources"]
    assert det_s["threshold"] == pytest.approx(
        0.45
    )  # val: defects 0.9, 0.8 vs best good 0.1 -> F1 at 0.8, halfway to 0.1
    assert det_s["test"]["confusion_matrix"] == [[2, 0], [1, 1]]  # misses the spot
    # val anomaly: good 1.0 1.2 2.0, defect 1.5 2.5 5.0 -> F1 best (6/7) calling >= 1.5 defect; halfway to 1.2
    assert an_s["threshold"] == pytest.approx(1.35)
    assert an_s["test"]["confusion_matrix"] == [[2, 0], [1, 1]]  # misses the ring (1.2)
    # OR catches both defect types on test: ring by the detector, spot by the anomaly score
    assert r["fusion"]["or"]["test"]["confusion_matrix"] == [[2, 0], [0, 2]]
    assert r["fusion"]["or"]["test"]["f1"] == 1.0
    lr = r["fusion"]["logistic"]
    assert set(lr["model"]) == {"mean", "std", "weights", "bias", "l2"}
    assert all(w > 0 for w in lr["model"]["weights"])  # both sources push towards defect
    assert r["better_fusion"] in ("or", "logistic") and r["best"] is not None
    recs = r["images"]["test"]
    assert [x["image_id"] for x in recs] == [11, 12, 13, 14]
    assert recs[2]["decisions"]["fusion:or"] is True and recs[2]["decisions"]["boxes:det_test"] is False
    json.dumps(r)  # JSON-ready


def test_fuse_rejects_mismatched_sources(tmp_path):
    val_gt, test_gt = _gt(tmp_path / "val.json", VAL), _gt(tmp_path / "test.json", TEST)
    d = _write(tmp_path / "d.json", [])
    a = _write(
        tmp_path / "a.json", {"kind": "anomaly", "predictions": [{"image_id": i, "score": 1.0} for i, _ in TEST]}
    )
    with pytest.raises(PipelineError, match="same order and kinds"):
        fuse_files([d], [a], val_gt=val_gt, test_gt=test_gt)
    with pytest.raises(PipelineError, match="same prediction sources"):
        fuse_files([d, d], [a], val_gt=val_gt, test_gt=test_gt)


def test_every_choice_on_val_test_only_reported(tmp_path):
    """Source a is perfect on val and wrong on test, b the reverse: a is chosen (val), and giving other
    test files (a's and b's test scores swapped) changes no choice, only the reported test metrics."""
    val_gt, test_gt = _gt(tmp_path / "val.json", VAL), _gt(tmp_path / "test.json", TEST)

    def det(path, scores):
        return _write(
            path, [{"image_id": i, "category_id": 1, "bbox": [0, 0, 2, 2], "score": s} for i, s in scores.items()]
        )

    av = det(tmp_path / "a_val.json", {1: 0.1, 2: 0.1, 3: 0.9, 4: 0.9, 5: 0.9, 6: 0.1})  # val: perfect
    bv = det(tmp_path / "b_val.json", {1: 0.9, 2: 0.1, 3: 0.9, 4: 0.1, 5: 0.9, 6: 0.1})  # val: 2 of 6 wrong
    a_bad = {11: 0.9, 12: 0.1, 13: 0.1, 14: 0.9}  # test: every image wrong
    b_good = {11: 0.1, 12: 0.9, 13: 0.9, 14: 0.1}  # test: perfect
    at, bt = det(tmp_path / "a_test.json", a_bad), det(tmp_path / "b_test.json", b_good)
    r = fuse_files([av, bv], [at, bt], val_gt=val_gt, test_gt=test_gt)
    a, b = r["sources"]
    assert (a["val"]["balanced_accuracy"], a["test"]["f1"]) == (1.0, 0.0)
    assert b["test"]["f1"] == 1.0 and b["val"]["balanced_accuracy"] < 1.0
    # logistic ties with a on val (perfect), a wins by name; OR inherits b's val false alarm
    assert r["fusion"]["logistic"]["val"]["balanced_accuracy"] == 1.0
    assert r["fusion"]["or"]["val"]["balanced_accuracy"] < 1.0
    assert r["best"] == "boxes:a_test" and r["better_fusion"] == "logistic"
    assert r["chosen_on"] == "val" and a["threshold_chosen_on"] == "val"
    assert r["choices"] == {
        "best": "boxes:a_test",
        "better_fusion": "logistic",
        "gallery": "fusion:logistic",
        "chosen_on": "val",
        "thresholds": "val",
        "rule": "highest val balanced accuracy, then highest val F1, then name (alphabetical)",
    }
    # other test files (scores swapped): the same choices and thresholds, other test metrics
    det(at, b_good)
    det(bt, a_bad)
    r2 = fuse_files([av, bv], [at, bt], val_gt=val_gt, test_gt=test_gt)
    assert r2["choices"] == r["choices"] and r2["thresholds"] == r["thresholds"]
    assert r2["sources"][0]["test"]["f1"] == 1.0 and r2["sources"][1]["test"]["f1"] == 0.0


def test_choose_ranks_by_val_balanced_accuracy_then_f1_then_name():
    from pipeline.evaluation.fusion import choose

    def m(bacc, f1):
        return {"balanced_accuracy": bacc, "f1": f1}

    sources = [
        {"name": "z", "val": m(0.9, 0.5), "test": m(0.1, 0.1)},
        {"name": "y", "val": m(0.9, 0.8), "test": m(0.2, 0.2)},
        {"name": "x", "val": m(0.9, 0.8), "test": m(1.0, 1.0)},  # ties y on val: x by name
        {"name": "w", "val": m(0.5, 1.0), "test": m(1.0, 1.0)},  # best F1 but lower balanced accuracy
    ]
    c = choose(sources, {})
    assert (c["best"], c["better_fusion"], c["gallery"]) == ("x", None, "x")
    fusion = {"or": {"val": m(0.95, 0.1), "test": m(0.0, 0.0)}, "logistic": {"val": m(0.9, 0.9), "test": m(1.0, 1.0)}}
    c = choose(sources, fusion)
    assert (c["best"], c["better_fusion"], c["gallery"]) == ("fusion:or", "or", "fusion:or")


def test_auroc_null_with_a_reason_when_one_class():
    m = decision_metrics([0.1, 0.2], [True, True], 0.15)
    assert m["auroc"] is None and m["auroc_reason"] == "only one class in the split"
    assert "auroc_reason" not in decision_metrics([0.1, 0.2], [False, True], 0.15)


def test_classifier_and_anomaly_metrics_null_with_a_reason(tmp_path):
    """One class in the split: the classifier's and the anomaly file's AUROC are null with a reason, never NaN."""
    from pipeline.evaluation.anomaly import evaluate_anomaly
    from pipeline.evaluation.classification import classification_metrics

    m = classification_metrics(["good", "good"], ["good", "defect"], [0.9, 0.2], ["good", "defect"])
    assert m["auroc_good_vs_defect"] is None and m["auroc_reason"] == "only one class in the split"
    m = classification_metrics(["ok", "bad"], ["ok", "bad"], None, ["ok", "bad"])
    assert m["auroc_good_vs_defect"] is None and m["auroc_reason"].startswith("no p(good)")
    gt = _gt(tmp_path / "good_only.json", [(1, "good"), (2, "good"), (3, "good")], root=str(tmp_path))
    preds = [{"image": f"test/good/{i:03d}.png", "image_id": i, "score": float(i), "label": "good"} for i in (1, 2, 3)]
    pred = _write(tmp_path / "an.json", {"kind": "anomaly", "predictions": preds})
    res = evaluate_anomaly(pred, gt, tmp_path / "ev", pixel=False)
    o = res["overall"]
    assert o["image_auroc"] is None and o["image_auroc_reason"] == "only one class among these images"
    assert res["threshold"] is None and res["threshold_reason"] == "the prediction file has no threshold"
    text = (tmp_path / "ev" / "anomaly_metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["overall"]["image_auroc_reason"] == o["image_auroc_reason"]
