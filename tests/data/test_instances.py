"""Mask -> connected components -> RLE -> mask is exact; boxes equal pycocotools' toBbox."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.data.instances import decode_rle, encode_rle, mask_to_instances, mask_to_polygons, rle_bbox_xywh


def _mask(h, w, *pixels):
    m = np.zeros((h, w), np.uint8)
    for y, x in pixels:
        m[y, x] = 255
    return m


def _ring():
    m = np.zeros((9, 9), np.uint8)
    m[2:7, 2:7] = 255
    m[4, 4] = 0
    return m


def _diagonal():
    return np.eye(6, dtype=np.uint8) * 255


@pytest.mark.parametrize(
    "mask, connectivity, expected_boxes",
    [
        # empty mask: no instance
        (np.zeros((5, 7), np.uint8), 8, []),
        # one pixel in a corner: a 1x1 box touching two borders
        (_mask(5, 7, (0, 0)), 8, [(0, 0, 1, 1)]),
        # one pixel at the opposite corner
        (_mask(5, 7, (4, 6)), 8, [(6, 4, 1, 1)]),
        # a ring: one component with a hole, box around the outside
        (_ring(), 8, [(2, 2, 5, 5)]),
        # a 1-pixel diagonal scratch: one component with 8-connectivity ...
        (_diagonal(), 8, [(0, 0, 6, 6)]),
        # ... six with 4-connectivity
        (_diagonal(), 4, [(i, i, 1, 1) for i in range(6)]),
        # two separate blobs in one mask, values 0/1 instead of 0/255
        (
            np.pad(np.ones((2, 3), np.uint8), ((0, 3), (0, 4))) | np.pad(np.ones((1, 1), np.uint8), ((4, 0), (6, 0))),
            8,
            [(0, 0, 3, 2), (6, 4, 1, 1)],
        ),
        # a full-image defect touching all four borders
        (np.full((4, 3), 255, np.uint8), 8, [(0, 0, 3, 4)]),
    ],
)
def test_components_boxes_and_rle(mask, connectivity, expected_boxes):
    inst = mask_to_instances(mask, connectivity=connectivity)
    assert [i.bbox_xywh for i in inst] == expected_boxes
    union = np.zeros(mask.shape, bool)
    for i in inst:
        rle = encode_rle(i.mask)
        assert isinstance(rle["counts"], str)
        assert np.array_equal(decode_rle(rle), i.mask)
        assert rle_bbox_xywh(rle) == list(map(float, i.bbox_xywh))
        assert i.area == int(i.mask.sum())
        assert not (union & i.mask).any()
        union |= i.mask
    assert np.array_equal(union, mask > 0)


def test_ring_keeps_its_hole():
    (inst,) = mask_to_instances(_ring())
    assert inst.area == 24
    assert not decode_rle(encode_rle(inst.mask))[4, 4]


def test_min_area_drops_small_components():
    m = _mask(6, 6, (0, 0))
    m[3:6, 3:6] = 255
    assert [i.area for i in mask_to_instances(m, min_area=2)] == [9]


def test_polygons_have_at_least_three_points():
    polys = mask_to_polygons(_ring())
    assert len(polys) == 1 and len(polys[0]) >= 6


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.sampled_from([0, 255])),
    st.sampled_from([4, 8]),
)
def test_property_round_trip_and_yolo_range(mask, connectivity):
    h, w = mask.shape
    union = np.zeros(mask.shape, bool)
    for inst in mask_to_instances(mask, connectivity=connectivity):
        back = decode_rle(encode_rle(inst.mask))
        assert np.array_equal(back, inst.mask)
        union |= back
        x, y, bw, bh = inst.bbox_xywh
        yolo = ((x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h)
        assert all(0.0 <= v <= 1.0 for v in yolo)
        assert bw >= 1 and bh >= 1
    assert np.array_equal(union, mask > 0)
