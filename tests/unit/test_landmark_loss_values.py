"""The landmark pixel loss against a value computed by hand, and its InfoNCE as the core one."""

import math

import pytest
import torch
import torch.nn.functional as F

from alice3d.core.losses import info_nce as core_info_nce
from landmark.config import LossConfig
from landmark.loss import info_nce, landmark_loss


def _equicorrelated(m: int, dim: int, c: float) -> torch.Tensor:
    """``m`` unit vectors ``(m, dim)`` with pairwise dot product ``c`` (sqrt(c) e0 + sqrt(1 - c) e_i)."""
    v = torch.zeros(m, dim)
    v[:, 0] = math.sqrt(c)
    v[torch.arange(m), torch.arange(1, m + 1)] = math.sqrt(1 - c)
    return v


def test_landmark_loss_equals_the_hand_computed_value():
    # Two identical views of a 2 x 3 grid of 4 mm pixels: each pixel's positive is itself
    # (similarity 1), every other pixel is a negative at similarity c. The coarse map is one cell,
    # so every coarse similarity is 1. With these sizes no random choice can change the value:
    # all 6 pixels are anchors in both directions, the hard pool holds the 5 other pixels (the
    # pixel itself is inside the 1 mm ignore radius), every drawn slot is valid.
    shape, dim, c, t = (2, 3), 8, 0.5, 0.25
    fine = _equicorrelated(6, dim, c).T.reshape(1, dim, *shape)
    coarse = F.normalize(torch.arange(1.0, dim + 1), dim=0).reshape(1, dim, 1, 1)
    aff = torch.diag(torch.tensor([4.0, 4.0, 1.0]))[None]
    cfg = LossConfig(temperature=t, fine_pos_radius=1.0, fine_ignore_radius=1.0, coarse_ignore_radius=0.0,
                     anchors=64, mine_candidates=64, hard_pool=5, negatives=3, random_negatives=0,
                     coarse_negatives=4, cross_volume_negatives=False, coarse_weight=0.7)
    out = landmark_loss(fine, coarse, aff, fine.clone(), coarse.clone(), aff, cfg, seed=0)
    fine_term = math.log(1 + 3 * math.exp((c - 1) / t))  # -log(e^{1/t} / (e^{1/t} + 3 e^{c/t}))
    coarse_term = math.log(1 + 4)  # positive and 4 negatives all at similarity 1
    assert out["loss_fine"].item() == pytest.approx(fine_term, rel=1e-5)
    assert out["loss_coarse"].item() == pytest.approx(coarse_term, rel=1e-5)
    assert out["loss"].item() == pytest.approx(fine_term + 0.7 * coarse_term, rel=1e-5)
    assert out["anchors"].item() == 12 and out["acc"].item() == 1.0
    assert out["pos_sim"].item() == pytest.approx(1.0, abs=1e-6)


def test_landmark_info_nce_is_the_core_one_with_its_own_negatives():
    torch.manual_seed(0)
    a, p = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    n = torch.randn(4, 3, 6, dtype=torch.float64)
    valid = torch.tensor([[True, False, True], [True, True, True], [False, False, True], [True, True, False]])
    expected = core_info_nce(a, p, 0.4, negatives=n, neg_valid=valid, normalize=False)
    assert torch.equal(info_nce(a, p, n, 0.4, valid), expected)
    # the vectors are used as given: scaling the anchor by 2 is halving the temperature
    torch.testing.assert_close(info_nce(2 * a, p, n, 0.4, valid), info_nce(a, p, n, 0.2, valid))
