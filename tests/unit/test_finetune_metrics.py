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
