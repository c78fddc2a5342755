"""Training views: voxel world positions follow the fine-grid affines; determinism; augmentation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alice3d.train.module import BatchDataset
from landmark.config import CropConfig
from landmark.loss import grid_world
from landmark.sampling import (
    ViewPairDataset,
    crop_grid,
    gaussian_blur,
    make_train_volume,
    sample_crop,
    sample_view_pair,
    views_overlap,
)

AFF = np.array([[0.0, -2.0, 0, 40], [2.0, 0, 0, -40], [0, 0, 2.5, -30], [0, 0, 0, 1]])  # rotated axes
SHAPE = (40, 36, 30)


def _world_volume(axis: int) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(np.float64)
    return (idx @ AFF[:3, :3].T + AFF[:3, 3])[..., axis].astype(np.float32)


def test_crop_grid_and_sample_crop_are_exact_for_a_linear_image():
    img = torch.from_numpy(np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))[0].astype(np.float32))
    m = crop_grid(np.array([20.0, 10.0, 5.0]), 0.5, (4, 4, 4))
    out = sample_crop(img[None], m, (4, 4, 4))[0]
    np.testing.assert_allclose(out[:, 0, 0].numpy(), 20 + (np.arange(4) - 1.5) * 0.5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_fine_grid_affines_give_world_positions_of_view_voxels(axis):
    """Pooling a view 2x gives the image at the fine voxels; the image stores world coordinates."""
    world = _world_volume(axis)
    vol = make_train_volume(world, AFF, body_threshold=-1e9)
    vol.image = torch.cat([vol.image, torch.ones_like(vol.image)])  # second channel flags "inside"
    cfg = CropConfig(size=(16, 16, 16), noise_std=0.0, blur_prob=0.0, intensity_jitter=0.0, gamma_range=(1.0, 1.0))
    pair = sample_view_pair(vol, cfg, np.random.default_rng(axis))
    for k in (1, 2):
        pooled = F.avg_pool3d(pair[f"view{k}"][None], 2)[0]
        expect = grid_world(pair[f"affine{k}"], (8, 8, 8))[:, axis].reshape(8, 8, 8)
        inside = pooled[1] > 0.999
        assert inside.sum() > 20
        np.testing.assert_allclose(pooled[0][inside].numpy(), expect[inside].numpy(), atol=2e-3)


def test_views_differ_in_scale_within_range_and_overlap():
    vol = make_train_volume(np.random.rand(*SHAPE).astype(np.float32), AFF, body_threshold=0.5)
    cfg = CropConfig(size=(16, 16, 16), scale_range=(0.8, 1.2), shared_seed_prob=1.0)
    for seed in range(5):
        pair = sample_view_pair(vol, cfg, np.random.default_rng(seed))
        s1 = np.linalg.norm(pair["affine1"][:3, 0].numpy()) / (2 * 2.0)
        s2 = np.linalg.norm(pair["affine2"][:3, 0].numpy()) / (2 * 2.0)
        assert 0.8 <= s1 <= 1.2 and 0.8 <= s2 <= 1.2
        c1 = pair["affine1"][:3] @ torch.tensor([3.5, 3.5, 3.5, 1.0])
        c2 = pair["affine2"][:3] @ torch.tensor([3.5, 3.5, 3.5, 1.0])
        assert (c1 - c2).norm() < 0.6 * 16 * 2.0 * 1.2 * np.sqrt(3)  # centres within the shift range


def test_views_overlap_by_hand():
    e = np.array([10.0, 10.0, 10.0])
    c = np.zeros(3)
    assert views_overlap(c, e, c + [7.0, 0, 0], e)  # 3 of 10 shared along x
    assert not views_overlap(c, e, c + [8.0, 0, 0], e)  # 2 of 10 < 0.25
    assert not views_overlap(c, e, c + [0, 0, 30.0], e)  # apart along z only
    assert views_overlap(c, e, c + [4.0, 0, 0], e / 2)  # the smaller box sets the fraction


def _box(affine: torch.Tensor, fine: int) -> tuple[np.ndarray, np.ndarray]:
    """World corners of a view's fine grid (axis-aligned test affine)."""
    lo = (affine[:3] @ torch.tensor([0.0, 0, 0, 1])).numpy()
    hi = (affine[:3] @ torch.tensor([fine - 1.0, fine - 1, fine - 1, 1])).numpy()
    return np.minimum(lo, hi), np.maximum(lo, hi)


def test_independent_seeds_are_redrawn_until_the_views_overlap():
    """Body at both ends of a long volume: independent seeds far apart would give the loss no
    anchors; every pair must still overlap, in world space, on every axis."""
    shape = (200, 20, 20)
    img = np.zeros(shape, np.float32)
    img[:10] = img[-10:] = 1.0
    vol = make_train_volume(img, np.diag([2.0, 2.0, 2.0, 1.0]), body_threshold=0.5)
    cfg = CropConfig(size=(16, 16, 16), shared_seed_prob=0.0)
    for seed in range(40):
        pair = sample_view_pair(vol, cfg, np.random.default_rng(seed))
        (lo1, hi1), (lo2, hi2) = _box(pair["affine1"], 8), _box(pair["affine2"], 8)
        assert np.all(np.minimum(hi1, hi2) > np.maximum(lo1, lo2)), seed


def test_dataset_is_deterministic_per_index():
    vols = [make_train_volume(np.random.rand(*SHAPE).astype(np.float32), AFF, 0.5, seed=i) for i in range(3)]
    ds = ViewPairDataset(vols, CropConfig(size=(16, 16, 16)), batch_size=2, seed=4)
    a, b, c = ds[10], ds[10], ds[11]
    assert a["view1"].shape == (2, 1, 16, 16, 16) and a["affine2"].shape == (2, 4, 4)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["view1"], c["view1"])
    assert isinstance(ds, BatchDataset)


def test_gaussian_blur_preserves_mass_and_constants():
    x = torch.zeros(1, 9, 9, 9)
    x[0, 4, 4, 4] = 1.0
    y = gaussian_blur(x, 1.0)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5) and y[0, 4, 4, 4] < 0.1
    torch.testing.assert_close(gaussian_blur(torch.full((2, 6, 6), 3.0), 0.7), torch.full((2, 6, 6), 3.0))


def test_volume_without_body_still_gives_seeds():
    vol = make_train_volume(np.zeros(SHAPE, np.float32), AFF, body_threshold=0.5)
    assert len(vol.body) > 0


def test_gamma_augmentation_is_monotonic_and_keeps_the_range():
    from landmark.sampling import augment

    cfg = CropConfig(noise_std=0.0, blur_prob=0.0, intensity_jitter=0.0, gamma_range=(0.5, 2.0))
    x = torch.linspace(0, 1, 101).reshape(1, 101)
    outs = [augment(x, cfg, np.random.default_rng(s)) for s in range(4)]
    for y in outs:
        assert y[0, 0] == 0 and y[0, -1] == 1 and (y.diff() >= 0).all()
    assert any(not torch.allclose(y, x) for y in outs)
