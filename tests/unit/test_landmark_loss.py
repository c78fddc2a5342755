"""Pixel InfoNCE: hand-computed values, gradients, toy views with known correspondences."""

import math

import pytest
import torch
import torch.nn.functional as F

from landmark.config import LossConfig
from landmark.loss import coarse_at, grid_world, info_nce, landmark_loss, nearest_index, upsample_to


def test_info_nce_hand_computed():
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])
    n = torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])
    t = 0.5
    # logits: pos 1/0.5 = 2, negs 0 and -2
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    assert info_nce(a, p, n, t).item() == pytest.approx(expected, rel=1e-6)
    # an empty slot is left out of the softmax
    valid = torch.tensor([[True, False]])
    expected2 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    assert info_nce(a, p, n, t, valid).item() == pytest.approx(expected2, rel=1e-6)


def test_info_nce_gradcheck():
    torch.manual_seed(0)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    p = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    n = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, p, n: info_nce(a, p, n, 0.5), (a, p, n))


def test_nearest_index_and_grid_world_roundtrip():
    aff = torch.tensor([[0.0, -4, 0, 10], [3, 0, 0, -5], [0, 0, 2, 1], [0, 0, 0, 1]])
    shape = (5, 4, 3)
    world = grid_world(aff, shape)
    assert world.shape == (60, 3)
    flat, inside = nearest_index(aff, shape, world + 0.4)
    assert inside.all()
    torch.testing.assert_close(flat, torch.arange(60))
    _, inside = nearest_index(aff, shape, torch.tensor([[1000.0, 0, 0]]))
    assert not inside.any()


@pytest.mark.parametrize("n", [2, 3])
def test_coarse_at_matches_full_upsampling(n):
    torch.manual_seed(0)
    coarse = torch.randn(1, 6, *([3] * n))
    fine_shape = (22, 24, 20)[:n]  # cropped below 8 * 3 on some axes
    full = upsample_to(coarse, fine_shape, normalize=False)[0].flatten(1).T
    idx = torch.randperm(full.shape[0])[:50]
    torch.testing.assert_close(coarse_at(coarse[0], idx, fine_shape, 8, normalize=False), full[idx], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(coarse_at(coarse[0], idx, fine_shape, 8), F.normalize(full[idx], dim=1), atol=1e-5, rtol=1e-5)


def _views(shift_mm=(4.0, 0.0, 0.0), shape=(8, 8, 6)):
    """Two fine grids (4 mm voxels) of one volume, the second shifted by ``shift_mm``."""
    a1 = torch.eye(4) * 4
    a1[3, 3] = 1
    a2 = a1.clone()
    a2[:3, 3] = torch.tensor(shift_mm)
    return a1[None], a2[None], shape


def _position_code(world: torch.Tensor, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Unit vectors that are a smooth, injective function of the world position (M, 3) -> (M, dim)."""
    g = torch.Generator().manual_seed(seed)
    freqs = torch.randn(3, dim // 2, generator=g) * 0.15
    ang = world @ freqs
    return F.normalize(torch.cat([ang.sin(), ang.cos()], dim=1), dim=1)


def _embed_by_world(aff, shape, dim=32):
    from landmark.loss import grid_world

    w = grid_world(aff[0], shape)
    fine = _position_code(w, dim).T.reshape(1, dim, *shape)
    coarse = F.normalize(torch.randn(1, dim, *[max(1, s // 8) for s in shape]), dim=1)
    return fine, coarse


def test_loss_is_low_for_world_consistent_embeddings_and_high_for_random():
    torch.manual_seed(0)
    a1, a2, shape = _views()
    cfg = LossConfig(anchors=64, hard_pool=100, negatives=20, coarse_negatives=20, coarse_weight=0.0,
                     fine_pos_radius=1.0, fine_ignore_radius=8.0)
    f1, c1 = _embed_by_world(a1, shape)
    f2, c2 = _embed_by_world(a2, shape)
    good = landmark_loss(f1, c1, a1, f2, c2, a2, cfg, seed=0)
    rnd = F.normalize(torch.randn_like(f2), dim=1)
    bad = landmark_loss(f1, c1, a1, rnd, c2, a2, cfg, seed=0)
    # positives match exactly (voxels coincide after the 4 mm shift) -> pos similarity 1
    assert good["pos_sim"].item() == pytest.approx(1.0, abs=1e-5)
    assert good["acc"].item() == 1.0
    assert good["loss"].item() < bad["loss"].item() - 0.5
    # 7 x 8 x 6 voxels of view 1 have a partner in view 2, both directions, capped at 64 anchors each
    assert good["anchors"].item() == 128


def test_loss_has_no_anchors_without_overlap_and_stays_differentiable():
    a1, a2, shape = _views(shift_mm=(500.0, 0, 0))
    f1, c1 = _embed_by_world(a1, shape)
    f2, c2 = _embed_by_world(a2, shape)
    f1.requires_grad_(True)
    out = landmark_loss(f1, c1, a1, f2, c2, a2, LossConfig(), seed=0)
    assert out["anchors"].item() == 0 and out["loss"].item() == 0
    out["loss"].backward()
    assert f1.grad is not None


def test_loss_gradients_reach_fine_and_coarse_and_pull_positives_together():
    torch.manual_seed(0)
    a1, a2, shape = _views(shift_mm=(2.0, 2.0, 0.0))
    cfg = LossConfig(anchors=32, hard_pool=50, negatives=10, coarse_negatives=10, fine_pos_radius=3.0)
    f1 = F.normalize(torch.randn(1, 16, *shape), dim=1)
    c1 = F.normalize(torch.randn(1, 16, 1, 1, 1), dim=1)
    f2 = F.normalize(torch.randn(1, 16, *shape), dim=1)
    c2 = F.normalize(torch.randn(1, 16, 1, 1, 1), dim=1)
    params = [t.clone().requires_grad_(True) for t in (f1, c1, f2, c2)]
    opt = torch.optim.SGD(params, lr=2.0)
    first = None
    for _ in range(8):
        p1, q1, p2, q2 = params
        out = landmark_loss(F.normalize(p1, dim=1), F.normalize(q1, dim=1), a1, F.normalize(p2, dim=1),
                            F.normalize(q2, dim=1), a2, cfg, seed=0)
        first = out if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
    assert out["loss_fine"] < first["loss_fine"] and out["pos_sim"] > first["pos_sim"]


def test_cross_volume_negatives_change_the_coarse_term_only():
    torch.manual_seed(0)
    a1, a2, shape = _views(shape=(4, 4, 4))  # 16 mm views: every voxel pair is closer than 25 mm
    a1, a2 = a1.repeat(2, 1, 1), a2.repeat(2, 1, 1)
    f1 = F.normalize(torch.randn(2, 8, *shape), dim=1)
    f2 = F.normalize(torch.randn(2, 8, *shape), dim=1)
    c1 = F.normalize(torch.randn(2, 8, 1, 1, 1), dim=1)
    c2 = F.normalize(torch.randn(2, 8, 1, 1, 1), dim=1)
    on = landmark_loss(f1, c1, a1, f2, c2, a2, LossConfig(cross_volume_negatives=True), seed=3)
    off = landmark_loss(f1, c1, a1, f2, c2, a2, LossConfig(cross_volume_negatives=False), seed=3)
    # without other volumes every coarse negative is inside the ignore radius (loss 0);
    # with them, the coarse loss is positive, while the fine term is unchanged
    assert off["loss_coarse"].item() == pytest.approx(0.0, abs=1e-6)
    assert on["loss_coarse"].item() > 0.1
    assert on["loss_fine"].item() == pytest.approx(off["loss_fine"].item(), rel=1e-6)
