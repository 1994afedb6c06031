"""Label-safe augmentation policies: known categories switch off what would change a label."""

from __future__ import annotations

import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.augmentation import policy_for, restrict_classifier_augment, ultralytics_overrides

TODAY = {"hflip": 0.5, "vflip": 0.5, "rotate_deg": 10.0, "brightness": 0.1, "saturation": 0.2, "hue": 0.05}


@pytest.mark.parametrize(
    "category, classifier, yolo",
    [
        # cable_swap is the left-right colour order: no flips, rotations or colour jitter
        (
            "cable",
            {"hflip": 0.0, "vflip": 0.0, "rotate_deg": 0.0, "saturation": 0.0, "hue": 0.0},
            {"fliplr": 0.0, "flipud": 0.0, "degrees": 0.0, "hsv_h": 0.0, "hsv_s": 0.0},
        ),
        # misplaced is a position: no flips, rotations or mosaic; colour stays
        (
            "transistor",
            {"hflip": 0.0, "vflip": 0.0, "rotate_deg": 0.0},
            {"fliplr": 0.0, "flipud": 0.0, "degrees": 0.0, "mosaic": 0.0, "close_mosaic": 0},
        ),
        # color is a defect type of pill: only the colour jitter goes
        ("pill", {"saturation": 0.0, "hue": 0.0}, {"hsv_h": 0.0, "hsv_s": 0.0}),
        # an unknown category keeps today's augmentation and says so
        ("bottle", {}, {}),
    ],
)
def test_policies(category, classifier, yolo):
    p = policy_for(category)
    assert restrict_classifier_augment(TODAY, p) == {**TODAY, **classifier}
    assert ultralytics_overrides(p) == yolo
    assert ("not listed" in p.source) == (category == "bottle")


def test_unknown_kind_is_an_error(tmp_path):
    f = tmp_path / "aug.yaml"
    f.write_text("default: {flips: true}\ncategories:\n  cable: {flipz: false}\n")
    with pytest.raises(PipelineError, match=r"cable: unknown augmentation kind\(s\) \['flipz'\]"):
        policy_for("cable", f)
