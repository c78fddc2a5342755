import numpy as np
import pytest

from alice3d.cli.pipeline import dice_per_label


def test_dice_per_label_hand_computed():
    ref = np.zeros((4, 4, 1), np.uint8)
    pred = np.zeros((4, 4, 1), np.uint8)
    ref[:2, :2] = 1  # 4 voxels
    pred[:2, :1] = 1  # 2 voxels, all inside
    pred[3, 3] = 2  # label 2 only predicted
    d = dice_per_label(pred, ref, {1: "a", 2: "b", 3: "c"})
    assert d["a"] == pytest.approx(2 * 2 / (2 + 4), rel=1e-6)  # MONAI's compute_dice divides in float32
    assert d["b"] == 0.0
    assert np.isnan(d["c"])  # absent from both: undefined, not a perfect score


def test_dice_per_label_agrees_with_monai_where_both_maps_hold_the_organ():
    import torch
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 4, size=(6, 5, 4))
    pred = np.where(rng.random(ref.shape) < 0.7, ref, rng.integers(0, 4, size=ref.shape))
    d = dice_per_label(pred, ref, {1: "a", 2: "b", 3: "c"})
    hot = [one_hot(torch.as_tensor(x)[None, None], num_classes=4) for x in (pred, ref)]
    expected = compute_dice(*hot, include_background=False)[0]
    assert [d[k] for k in "abc"] == pytest.approx(expected.tolist(), rel=1e-6)
