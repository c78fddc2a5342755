import numpy as np

from alice3d.cli.pipeline import dice_per_label


def test_dice_per_label_hand_computed():
    ref = np.zeros((4, 4, 1), np.uint8)
    pred = np.zeros((4, 4, 1), np.uint8)
    ref[:2, :2] = 1  # 4 voxels
    pred[:2, :1] = 1  # 2 voxels, all inside
    pred[3, 3] = 2  # label 2 only predicted
    d = dice_per_label(pred, ref, {1: "a", 2: "b", 3: "c"})
    assert d["a"] == 2 * 2 / (2 + 4)
    assert d["b"] == 0.0
    assert np.isnan(d["c"])  # absent from both: undefined, not a perfect score
