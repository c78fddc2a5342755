"""Batched, N-D, device-agnostic strong augmentation and the Alice view maker."""

import math

import pytest
import torch

from alice3d.methods.views import StrongAugConfig, affine_warp, make_alice_views, random_affine, strong_augment

IDENTITY = StrongAugConfig(rotate_deg=0.0, zoom=(1.0, 1.0), flip_prob=0.0, intensity_scale=0.0, intensity_shift=0.0)
SHAPES = [(2, 1, 12, 10, 8), (3, 2, 12, 10)]


def point_image(shape, index):
    x = torch.zeros(1, 1, *shape)
    x[(0, 0, *index)] = 1.0
    return x


def centred_mass(x):
    """Centre of mass of `x[0, 0]` in voxel units about the image centre ((s - 1) / 2 per axis)."""
    img = x[0, 0]
    coords = torch.meshgrid(*(torch.arange(s, dtype=torch.float32) - (s - 1) / 2 for s in img.shape), indexing="ij")
    return torch.stack([(img * c).sum() / img.sum() for c in coords])


@pytest.mark.parametrize("shape", SHAPES)
def test_identity_settings_return_the_input(shape):
    x = torch.rand(shape)
    torch.testing.assert_close(strong_augment(x, IDENTITY), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_flips_are_exact(shape):
    x = torch.rand(shape)
    cfg = StrongAugConfig(rotate_deg=0.0, zoom=(1.0, 1.0), flip_prob=1.0, intensity_scale=0.0, intensity_shift=0.0)
    torch.testing.assert_close(strong_augment(x, cfg), x.flip(list(range(2, x.ndim))), atol=1e-5, rtol=0)


def test_quarter_turn_equals_rot90_2d_and_3d():
    x = torch.rand(2, 1, 6, 6)
    turn = torch.tensor([[0.0, -1.0], [1.0, 0.0]]).expand(2, 2, 2)
    torch.testing.assert_close(affine_warp(x, turn), torch.rot90(x, -1, (2, 3)), atol=1e-5, rtol=0)
    x3 = torch.rand(1, 1, 6, 6, 4)
    turn3 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])[None]
    torch.testing.assert_close(affine_warp(x3, turn3), torch.rot90(x3, -1, (2, 3)), atol=1e-5, rtol=0)


def test_rotation_is_a_true_rotation_on_non_square_grids():
    # Output voxel p samples the input at A p (centred voxel coordinates). On a 16 x 32 image a
    # point at (4.5, 0.5) must land at (0.5, -4.5): the distance to the centre is kept, which
    # rotating normalised coordinates of a non-square image would not do.
    x = point_image((16, 32), (12, 16))
    torch.testing.assert_close(centred_mass(x), torch.tensor([4.5, 0.5]))
    turn = torch.tensor([[[0.0, -1.0], [1.0, 0.0]]])
    torch.testing.assert_close(centred_mass(affine_warp(x, turn)), torch.tensor([0.5, -4.5]), atol=1e-4, rtol=0)
    x3 = point_image((16, 32, 8), (8, 16, 6))  # centred (0.5, 0.5, 2.5)
    turn3 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(centred_mass(affine_warp(x3, turn3)), torch.tensor([0.5, 2.5, -0.5]), atol=1e-4, rtol=0)


def test_zoom_magnifies_about_the_centre():
    x = point_image((16, 16, 16), (10, 6, 11))  # centred (2.5, -1.5, 3.5)
    half = (torch.eye(3) / 2.0)[None]  # samples the input at p / 2: zoom-in by 2
    out = affine_warp(x, half)
    torch.testing.assert_close(centred_mass(out), torch.tensor([5.0, -3.0, 7.0]), atol=0.3, rtol=0)


@pytest.mark.parametrize("nd", [2, 3])
def test_random_affine_is_a_scaled_rotation_with_flips(nd):
    cfg = StrongAugConfig(rotate_deg=20.0, zoom=(0.8, 1.25), flip_prob=0.5)
    mats = random_affine(64, nd, cfg, generator=torch.Generator().manual_seed(0))
    scale = mats.det().abs() ** (1.0 / nd)  # 1 / zoom
    assert bool(((1 / scale >= 0.8 - 1e-5) & (1 / scale <= 1.25 + 1e-5)).all())
    ortho = mats / scale.view(-1, 1, 1)
    torch.testing.assert_close(ortho @ ortho.transpose(1, 2), torch.eye(nd).expand(64, nd, nd), atol=1e-5, rtol=0)
    # Both orientations occur (flips).
    dets = ortho.det()
    assert (dets > 0).any() and (dets < 0).any()
    if nd == 2:
        # Proper 2D matrices are rotations by at most 20 degrees, possibly after flipping both
        # axes (a half turn); improper ones are reflections.
        proper = ortho[dets > 0]
        assert bool((proper[:, 0, 0].abs() >= math.cos(math.radians(20.0)) - 1e-5).all())


@pytest.mark.parametrize("shape", SHAPES)
def test_intensity_scale_and_shift_per_sample(shape):
    cfg = StrongAugConfig(rotate_deg=0.0, zoom=(1.0, 1.0), flip_prob=0.0, intensity_scale=0.2, intensity_shift=0.1)
    x = torch.rand(shape)
    out = strong_augment(x, cfg, torch.Generator().manual_seed(1))
    for i in range(shape[0]):
        a = x[i].reshape(-1)
        b = out[i].reshape(-1)
        scale = (b[0] - b[1]) / (a[0] - a[1])
        shift = b[0] - scale * a[0]
        torch.testing.assert_close(b, a * scale + shift, atol=1e-5, rtol=0)
        assert 0.8 - 1e-5 <= float(scale) <= 1.2 + 1e-5 and abs(float(shift)) <= 0.1 + 1e-5


def test_generator_reproducible_and_samples_independent():
    cfg = StrongAugConfig()
    x = torch.rand(1, 1, 16, 16, 8).expand(4, -1, -1, -1, -1).contiguous()
    a = strong_augment(x, cfg, torch.Generator().manual_seed(5))
    b = strong_augment(x, cfg, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a[0], a[1])
    assert a.dtype == x.dtype and a.device == x.device


def test_make_alice_views():
    q, k = torch.rand(3, 1, 16, 16, 8), torch.rand(3, 1, 16, 16, 8)
    views = make_alice_views(q, k, num_tokens=16, mask_ratio=0.75, generator=torch.Generator().manual_seed(0))
    assert views.batch == 3
    torch.testing.assert_close(views.images, torch.cat([q, k]), rtol=0, atol=0)
    assert views.masking.mask.shape == (6, 16) and views.masking.ids_keep.shape == (6, 4)
    assert (views.masking.mask.sum(1) == 12).all()
    assert len({tuple(r.tolist()) for r in views.masking.ids_keep}) > 1  # independent masks
    assert views.augmented.shape == views.images.shape
    assert not torch.allclose(views.augmented, views.images)
    with pytest.raises(ValueError, match="differ in shape"):
        make_alice_views(q, k[:, :, :8], 16, 0.75)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_batch_device():
    x = torch.rand(2, 1, 16, 16, 8, device="cuda")
    out = strong_augment(x, StrongAugConfig(), torch.Generator(device="cuda").manual_seed(0))
    assert out.device == x.device
    cpu_gen_out = strong_augment(x, StrongAugConfig(), torch.Generator().manual_seed(0))
    assert cpu_gen_out.device == x.device


@pytest.mark.parametrize("size", [(16, 16, 8), (16, 12)])
def test_seeded_views_depend_on_the_pair_not_its_batch_position(size):
    from alice3d.methods.views import make_seeded_alice_views

    g = torch.Generator().manual_seed(0)
    q, k = torch.rand(3, 1, *size, generator=g), torch.rand(3, 1, *size, generator=g)
    seeds = torch.tensor([11, 22, 33])
    full = make_seeded_alice_views(q, k, seeds, num_tokens=16, mask_ratio=0.75)
    # The last pair alone, and the batch in another order: row for row the same views.
    alone = make_seeded_alice_views(q[2:], k[2:], seeds[2:], num_tokens=16, mask_ratio=0.75)
    torch.testing.assert_close(alone.augmented[0], full.augmented[2])  # Q_2
    torch.testing.assert_close(alone.augmented[1], full.augmented[5])  # K_2
    assert torch.equal(alone.masking.mask[0], full.masking.mask[2])
    assert torch.equal(alone.masking.ids_keep[1], full.masking.ids_keep[5])
    perm = [2, 0, 1]
    shuffled = make_seeded_alice_views(q[perm], k[perm], seeds[perm], num_tokens=16, mask_ratio=0.75)
    assert torch.equal(shuffled.masking.mask[:3], full.masking.mask[:3][perm])
    assert torch.equal(shuffled.masking.mask[3:], full.masking.mask[3:][perm])
    torch.testing.assert_close(shuffled.images, torch.cat([q[perm], k[perm]]))
    # Different seeds give different masks; every row keeps the exact count.
    assert not torch.equal(full.masking.mask[0], full.masking.mask[1])
    assert (full.masking.mask.sum(1) == 12).all()
    restored = torch.cat([full.masking.ids_keep, full.masking.ids_masked], 1).gather(1, full.masking.ids_restore)
    assert torch.equal(restored, torch.arange(16).expand(6, 16))


def test_seeded_views_need_one_seed_per_pair():
    from alice3d.methods.views import make_seeded_alice_views

    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="1 seeds for a batch of 2"):
        make_seeded_alice_views(x, x, [5], num_tokens=4, mask_ratio=0.5)


# ---- online (masked-view) augmentation: random resized crop + flips ------------------------

from alice3d.methods.views import OnlineAugConfig, make_seeded_alice_views, random_resized_crop  # noqa: E402


@pytest.mark.parametrize("shape", SHAPES)
def test_full_box_without_flips_is_the_input(shape):
    x = torch.rand(shape)
    out = random_resized_crop(x, OnlineAugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0))
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    flipped = random_resized_crop(x, OnlineAugConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0))
    torch.testing.assert_close(flipped, x.flip(list(range(2, x.ndim))), rtol=0, atol=0)


def test_a_quarter_area_box_is_an_8x8_window_resized_to_16x16():
    # A ramp along axis 0: a box of side 0.5 * 16 = 8 holds 8 consecutive values v0 .. v0 + 7;
    # linear resizing (align_corners=False) keeps the end values, so the output spans exactly 7,
    # stays constant along axis 1, and v0 is a whole number in [0, 8].
    ramp = torch.arange(16.0).view(1, 1, 16, 1).expand(4, 1, 16, 16).contiguous()
    out = random_resized_crop(ramp, OnlineAugConfig(scale=(0.25, 0.25), ratio=(1.0, 1.0), flip_prob=0.0),
                              torch.Generator().manual_seed(0))
    assert out.shape == ramp.shape
    for img in out[:, 0]:
        torch.testing.assert_close(img.amax() - img.amin(), torch.tensor(7.0))
        torch.testing.assert_close(img, img[:, :1].expand(16, 16))
        v0 = float(img.amin())
        assert v0 == int(v0) and 0 <= v0 <= 8
        assert (img[1:, 0] >= img[:-1, 0]).all()  # no flip: still increasing


def test_box_volume_follows_the_scale_in_3d():
    # Ramps of slope 1 along each axis: the value range per axis is the box side - 1.
    size = (16, 16, 8)
    frac = 0.5
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = size[axis]
        ramp = torch.arange(float(size[axis])).view(1, 1, *shape).expand(1, 1, *size).contiguous()
        out = random_resized_crop(ramp, OnlineAugConfig(scale=(frac, frac), ratio=(1.0, 1.0), flip_prob=0.0),
                                  torch.Generator().manual_seed(3))
        side = round(frac ** (1 / 3) * size[axis])
        torch.testing.assert_close(out.amax() - out.amin(), torch.tensor(float(side - 1)))


def test_online_augmentation_leaves_the_target_views_alone():
    q, k = torch.rand(2, 1, 16, 16, 8), torch.rand(2, 1, 16, 16, 8)
    plain = make_alice_views(q, k, 16, 0.75, generator=torch.Generator().manual_seed(1))
    aug = make_alice_views(q, k, 16, 0.75, generator=torch.Generator().manual_seed(1), online_aug=OnlineAugConfig())
    torch.testing.assert_close(aug.augmented, plain.augmented, rtol=0, atol=0)
    assert torch.equal(aug.masking.mask, plain.masking.mask)
    assert not torch.allclose(aug.images, plain.images)
    off = make_alice_views(q, k, 16, 0.75, generator=torch.Generator().manual_seed(1),
                           online_aug=OnlineAugConfig(enabled=False))
    torch.testing.assert_close(off.images, torch.cat([q, k]), rtol=0, atol=0)
    # Seeded per pair: the online views are reproducible from the pair's seed, too.
    a = make_seeded_alice_views(q, k, [4, 5], 16, 0.75, online_aug=OnlineAugConfig())
    b = make_seeded_alice_views(q[1:], k[1:], [5], 16, 0.75, online_aug=OnlineAugConfig())
    torch.testing.assert_close(a.images[1], b.images[0])
    torch.testing.assert_close(a.images[3], b.images[1])


def test_online_aug_config_errors_name_the_key():
    with pytest.raises(ValueError, match="online_aug.scale"):
        OnlineAugConfig(scale=(0.5, 1.2)).validate()
    with pytest.raises(ValueError, match="online_aug.ratio"):
        OnlineAugConfig(ratio=(1.2, 1.5)).validate()
