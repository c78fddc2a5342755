"""Dice / NSD on hand-made masks (hand-computed values), aggregation, AUC, Markdown."""

from __future__ import annotations

import math

import numpy as np
import pytest

from alice3d.finetune.metrics import aggregate, case_metrics, dice_per_class, nsd_per_class, results_markdown, roc_auc


def _cube(shape, lo, hi, value=1):
    a = np.zeros(shape, np.int64)
    a[tuple(slice(l, h) for l, h in zip(lo, hi))] = value
    return a


def test_dice_hand_values_2d_and_3d():
    # 2-D: 4x4 square vs the same square shifted by one column: overlap 12 -> 2*12/(16+16)
    gt = _cube((8, 8), (2, 2), (6, 6))
    pred = _cube((8, 8), (2, 3), (6, 7))
    assert dice_per_class(pred, gt, [1])[0] == pytest.approx(24 / 32)
    # 3-D, two classes: class 1 perfect, class 2 predicted 8 voxels where gt has 27 (all inside)
    gt3 = _cube((10, 10, 10), (0, 0, 0), (3, 3, 3), 1) + _cube((10, 10, 10), (5, 5, 5), (8, 8, 8), 2)
    pred3 = _cube((10, 10, 10), (0, 0, 0), (3, 3, 3), 1) + _cube((10, 10, 10), (5, 5, 5), (7, 7, 7), 2)
    d = dice_per_class(pred3, gt3, [1, 2])
    assert d[0] == pytest.approx(1.0)
    assert d[1] == pytest.approx(2 * 8 / (8 + 27))


def test_empty_class_conventions():
    gt = _cube((6, 6, 6), (1, 1, 1), (3, 3, 3), 1)
    pred = gt.copy()
    pred[5, 5, 5] = 3  # class 3: predicted but absent from gt -> 0; class 2: absent from both -> NaN
    d = dice_per_class(pred, gt, [1, 2, 3])
    assert d[0] == 1.0 and math.isnan(d[1]) and d[2] == 0.0
    n = nsd_per_class(pred, gt, [1, 2, 3], [1.0, 1.0, 1.0], (1.0, 1.0, 1.0))
    assert n[0] == pytest.approx(1.0) and math.isnan(n[1]) and n[2] == 0.0
    missed = nsd_per_class(np.zeros_like(gt), gt, [1], [1.0], (1.0, 1.0, 1.0))
    assert missed[0] == 0.0


def _two_class_maps_2d():
    """Class 1: gt 5 px, pred 4 px, 3 shared (Dice 2*3/(4+5)); class 2: gt 2 px, pred 3 px, 2 shared (4/5)."""
    gt, pred = np.zeros((4, 6), np.int64), np.zeros((4, 6), np.int64)
    gt[0, 0:5] = 1
    pred[0, 2:6] = 1
    gt[2, 0:2] = 2
    pred[2, 0:2] = 2
    pred[3, 0] = 2
    return pred, gt


def _two_class_maps_3d():
    """Class 1: two 2x2x2 cubes one voxel apart, 4 shared (8/16); class 2: gt 5, pred 4, 3 shared (6/9)."""
    gt, pred = np.zeros((4, 4, 4), np.int64), np.zeros((4, 4, 4), np.int64)
    gt[0:2, 0:2, 0:2] = 1
    pred[1:3, 0:2, 0:2] = 1
    for v in [(3, 3, 0), (3, 3, 1), (3, 3, 2), (3, 2, 0), (3, 2, 1)]:
        gt[v] = 2
    for v in [(3, 3, 0), (3, 3, 1), (3, 2, 0), (2, 3, 3)]:
        pred[v] = 2
    return pred, gt


def test_dice_two_classes_hand_values_2d_and_3d():
    pred, gt = _two_class_maps_2d()
    assert dice_per_class(pred, gt, [1, 2]) == pytest.approx([2 * 3 / (4 + 5), 2 * 2 / (2 + 3)])
    pred, gt = _two_class_maps_3d()
    assert dice_per_class(pred, gt, [1, 2]) == pytest.approx([2 * 4 / (8 + 8), 2 * 3 / (4 + 5)])
    # the order of the ids asked for is the order of the result; a (1, *S) channel axis is dropped
    assert dice_per_class(pred[None], gt[None], [2, 1]) == pytest.approx([6 / 9, 0.5])


def test_dice_absent_from_both_is_nan_and_one_sided_is_zero_2d_and_3d():
    for pred, gt in (_two_class_maps_2d(), _two_class_maps_3d()):
        only_pred, only_gt = pred.copy(), gt.copy()
        only_pred[pred == 2] = 7  # class 7 predicted, never in the ground truth
        only_gt[gt == 2] = 5  # class 5 in the ground truth, never predicted
        d = dice_per_class(only_pred, only_gt, [1, 3, 5, 7])
        assert d[0] == pytest.approx(dice_per_class(pred, gt, [1])[0])  # class 1 untouched
        assert math.isnan(d[1])  # absent from both: not applicable, neither 1 nor 0
        assert d[2] == 0.0 and d[3] == 0.0  # a miss and a false positive both count as 0


def test_dice_of_background_and_of_a_single_id():
    pred, gt = _two_class_maps_2d()
    # background (id 0): gt 17 px, pred 17 px; foreground union 9 of 24 px, so 15 shared -> 30/34
    assert dice_per_class(pred, gt, [0])[0] == pytest.approx(30 / 34)
    assert dice_per_class(pred, gt, [2])[0] == pytest.approx(4 / 5)
    assert dice_per_class(pred, gt, []).shape == (0,)


def test_dice_matches_voxel_counting_on_random_maps():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(7, 6, 5))
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 5, size=gt.shape))
    expected = [2 * ((pred == c) & (gt == c)).sum() / ((pred == c).sum() + (gt == c).sum()) for c in range(1, 5)]
    assert dice_per_class(pred, gt, [1, 2, 3, 4]) == pytest.approx(expected, rel=1e-6)


def test_dice_refuses_mismatched_shapes_and_negative_ids():
    pred, gt = _two_class_maps_2d()
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(pred[:3], gt, [1])
    with pytest.raises(ValueError, match="label ids >= 0"):
        dice_per_class(pred, gt, [-1])


def test_nsd_hand_value_depends_on_tolerance_and_spacing():
    # 4x4x4 cube vs the same cube shifted by one voxel along z.
    gt = _cube((10, 10, 10), (3, 3, 3), (7, 7, 7))
    pred = _cube((10, 10, 10), (3, 3, 4), (7, 7, 8))
    # 1 mm voxels, tolerance 1 mm: every surface voxel of one is within 1 mm of the other's surface
    assert nsd_per_class(pred, gt, [1], [1.0], (1, 1, 1))[0] == pytest.approx(1.0)
    # 2 mm along z, tolerance 1 mm: MONAI counts 5/7 of the surface within tolerance here
    # (the shifted cube's bottom/top faces are 2 mm from any surface of the other)
    v = nsd_per_class(pred, gt, [1], [1.0], (1, 1, 2))[0]
    assert v == pytest.approx(5 / 7, abs=1e-4)
    # a tolerance of 2 mm covers the 2 mm shift again
    assert nsd_per_class(pred, gt, [1], [2.0], (1, 1, 2))[0] == pytest.approx(1.0)


def test_nsd_uses_one_tolerance_per_class():
    gt = _cube((12, 12, 12), (1, 1, 1), (5, 5, 5), 1) + _cube((12, 12, 12), (6, 6, 6), (10, 10, 10), 2)
    pred = np.roll(gt, 1, axis=2)  # both shifted one voxel (2 mm along z)
    v = nsd_per_class(pred, gt, [1, 2], [1.0, 2.0], (1, 1, 2))
    assert v[0] == pytest.approx(5 / 7, abs=1e-4) and v[1] == pytest.approx(1.0)


def test_case_metrics_aggregate_and_markdown():
    organs = {1: "liver", 2: "spleen"}
    gt = _cube((8, 8, 8), (0, 0, 0), (4, 4, 4), 1)
    a = case_metrics(gt, gt, organs, [1.0, 1.0], (1, 1, 1))
    b_pred = _cube((8, 8, 8), (0, 0, 0), (4, 4, 2), 1)  # half of the liver
    b = case_metrics(b_pred, gt, organs, [1.0, 1.0], (1, 1, 1))
    assert a["dice"] == {"liver": 1.0, "spleen": None}
    assert b["dice"]["liver"] == pytest.approx(2 * 32 / 96)
    agg = aggregate({"a": a, "b": b}, ["liver", "spleen"])
    liver = agg["per_organ"]["liver"]["dice"]
    assert liver["n"] == 2 and liver["mean"] == pytest.approx((1 + 2 / 3) / 2)
    assert agg["per_organ"]["spleen"]["dice"] == {"mean": None, "std": None, "n": 0}
    assert agg["mean_dice"] == pytest.approx(liver["mean"])  # spleen has no value anywhere
    md = results_markdown({"task": "t", "model": "m", "n_cases": 2, "metrics": agg,
                           "nsd_tolerance_mm": {"liver": 1.0, "spleen": 1.0}, "bad_cases": {"c9": "label ids [20]"}})
    assert "| liver | 83.33" in md and "| spleen | n/a" in md and "c9: label ids [20]" in md


def test_roc_auc_hand_values():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert roc_auc([0.9, 0.1], [1, 0]) == 1.0
    assert math.isnan(roc_auc([0.2, 0.3], [1, 1]))
