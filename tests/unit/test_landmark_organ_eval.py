"""Landmark evaluation on contoured organs: centroid errors and distance to elongated structures, by hand."""

import numpy as np
import pytest

from alice3d.analysis.landmark_accuracy import LabelledCase, distance_to_structure, evaluate_organ_pairs, organ_point
from alice3d.data.io import Volume

AFF = np.diag([2.0, 2.0, 2.0, 1.0])  # 2 mm voxels, origin at voxel 0


def _case(name, shift):
    label = np.zeros((20, 20, 20), np.int16)
    sx = shift
    label[4 + sx:8 + sx, 4:8, 4:8] = 1  # compact organ: centroid voxel (5.5 + sx, 5.5, 5.5)
    label[14, 14, 2:18] = 2  # a line along z (an elongated structure)
    vol = Volume(np.zeros(label.shape, np.float32), AFF, path=f"{name}.nii.gz", label=label)
    return LabelledCase(name, vol, label, (1, 2), np.zeros(3), np.full(3, 38.0))


def test_organ_points_and_distance_by_hand():
    c = _case("a", 0)
    np.testing.assert_allclose(organ_point(c, 1, on_structure=False), [11.0, 11.0, 11.0])
    np.testing.assert_allclose(organ_point(c, 2, on_structure=True), [28.0, 28.0, 18.0])  # a voxel of the line
    d = distance_to_structure(c, 2, np.array([[28.0, 28.0, 10.0], [28.0, 34.0, 10.0], [22.0, 36.0, 10.0]]))
    np.testing.assert_allclose(d, [0.0, 6.0, 10.0])
    assert organ_point(c, 5, on_structure=False) is None


def test_identity_matcher_errors_are_the_shift_and_zero_on_the_line():
    a, b = _case("a", 0), _case("b", 3)  # b's compact organ 3 voxels (6 mm) further along x

    def identity(ca, cb, pts):
        return pts

    def off_line(ca, cb, pts):
        return pts + np.array([0.0, 4.0, 0.0])  # 4 mm beside everything

    res = evaluate_organ_pairs([a, b], {"identity": identity, "off": off_line}, {1: "organ"}, {2: "line"},
                               n_pairs=4, seed=0)
    assert len(res["pairs"]) == 4
    ident = res["methods"]["identity"]
    assert ident["organ"]["mre_mm"] == pytest.approx(6.0) and ident["organ"]["within_10mm"] == 1.0
    assert ident["line"]["mre_mm"] == pytest.approx(0.0)
    off = res["methods"]["off"]
    assert off["line"]["mre_mm"] == pytest.approx(4.0)
    assert off["organ"]["mre_mm"] == pytest.approx(np.hypot(6.0, 4.0))
    assert ident["compact organs"]["n"] == 4


def test_organs_missing_in_one_case_are_not_scored():
    a, b = _case("a", 0), _case("b", 0)
    b.contoured = (2,)
    res = evaluate_organ_pairs([a, b], {"identity": lambda ca, cb, p: p}, {1: "organ"}, {2: "line"}, n_pairs=2)
    assert "organ" not in res["methods"]["identity"] and res["methods"]["identity"]["line"]["n"] == 2
