"""ConvMIM and the N-D ResNet backbone: warps, mask-token insertion, loss, export."""

import math

import pytest
import torch
from monai.networks.nets import ResNet

from alice3d.config import ConfigError
from alice3d.core.masking import mask_to_image, random_masking
from alice3d.encoders.resnet import ResNetEncoder, build_resnet
from alice3d.methods.convmim import ConvMIM, ConvMIMConfig, default_mask_patch, intensity_jitter, relative_transform
from alice3d.methods.views import StrongAugConfig, affine_warp, random_affine

SIZES = {2: ((64, 64), 16), 3: ((32, 32, 32), 8)}
TINY_BACKBONE = dict(layers=[1, 1, 1, 1], widths=[8, 16, 16, 16])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_convmim(nd, seed=0, **kw):
    size, patch = SIZES[nd]
    args = dict(encoder="resnet18_tiny", encoder_kwargs=dict(TINY_BACKBONE), img_size=size, spatial_dims=nd,
                mask_patch=patch, feature_dim=16, decoder_dim=16)
    args.update(kw)
    torch.manual_seed(seed)
    return ConvMIM(ConvMIMConfig(**args))


def smooth_pattern(shape, b=2):
    """Low-frequency sinusoids in [0, 1]: interpolation errors stay small."""
    axes = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in shape), indexing="ij")
    imgs = [(sum(torch.sin(2.0 * (i + 1) * a + i) for a in axes) / len(axes) + 1) / 2 for i in range(b)]
    return torch.stack(imgs)[:, None]


@pytest.mark.parametrize("nd", [2, 3])
def test_warp_from_t1_to_t2_frame(nd):
    shape = (48,) * nd
    x = smooth_pattern(shape)
    aug = StrongAugConfig(rotate_deg=20.0, zoom=(0.8, 1.2), flip_prob=0.5)
    g = torch.Generator().manual_seed(nd)
    a1, a2 = random_affine(2, nd, aug, generator=g), random_affine(2, nd, aug, generator=g)
    rel = relative_transform(a1, a2)
    back = affine_warp(affine_warp(x, a1), rel)  # t2(t1^-1(t1(x)))
    direct = affine_warp(x, a2)  # t2(x)
    # Compare where the composed warp saw only image content (no zero padding mixed in).
    valid = affine_warp(affine_warp(torch.ones_like(x), a1), rel) > 0.999
    assert valid.float().mean() > 0.3
    err = (back - direct).abs()[valid]
    assert float(err.max()) < 0.05 and float(err.mean()) < 0.01
    # Identity transforms compose to the identity.
    eye = torch.eye(nd).expand(2, nd, nd)
    torch.testing.assert_close(relative_transform(a1, a1), eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("nd", [2, 3])
def test_mask_token_appears_only_at_masked_stem_positions(nd):
    model = tiny_convmim(nd).eval()
    (size, patch) = SIZES[nd]
    with torch.no_grad():
        model.mask_token.fill_(123.0)
    x = torch.rand(2, 1, *size) + 0.5
    grid = tuple(s // patch for s in size)
    masking = random_masking(2, math.prod(grid), 0.7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.stem_with_mask(x, masking.mask, grid)
        hidden = mask_to_image(masking.mask, grid, patch)
        plain = model.encoder.stem(x * (1 - hidden))
    stem_mask = mask_to_image(masking.mask, grid, patch // 4).bool().expand_as(h)
    assert h.shape == plain.shape and stem_mask.shape == h.shape
    assert bool((h[stem_mask] == 123.0).all())
    assert not bool((h[~stem_mask] == 123.0).any())
    torch.testing.assert_close(h[~stem_mask], plain[~stem_mask])
    # The stem mask is the pixel mask seen at stride 4.
    up = stem_mask[:, :1].float()
    for axis in range(nd):
        up = up.repeat_interleave(4, dim=2 + axis)
    torch.testing.assert_close(up, hidden)
    # Masked pixels are zeroed before the stem, so their content cannot leak into any cell.
    x2 = torch.where(hidden.bool(), torch.rand_like(x), x)
    with torch.no_grad():
        torch.testing.assert_close(model.stem_with_mask(x2, masking.mask, grid), h)


@pytest.mark.parametrize("nd", [2, 3])
def test_a_tiny_run_lowers_the_loss(nd):
    model = tiny_convmim(nd)
    batch = {"image": smooth_pattern(SIZES[nd][0], b=4)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss():
        torch.manual_seed(5)
        return model(batch)

    model.eval()
    with torch.no_grad():
        first = loss()
    model.train()
    assert set(first) == {"loss", "loss_rec", "region_fraction"}
    assert 0.1 < float(first["region_fraction"]) < 0.9
    for _ in range(20):
        opt.zero_grad()
        loss()["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = loss()
    assert float(last["loss"]) < 0.6 * float(first["loss"])


def test_backbone_loads_into_monai_resnet_and_defaults():
    for nd in (2, 3):
        enc = build_resnet("resnet18_tiny", spatial_dims=nd)
        ResNet(**enc.monai_kwargs()).load_state_dict(enc.state_dict(), strict=True)
    model = tiny_convmim(2)
    state, meta = model.encoder_state()
    net = ResNet(**meta["monai_resnet"])
    net.load_state_dict(state, strict=True)
    assert meta["kind"] == "resnet" and meta["method"] == "convmim"
    rebuilt = ResNetEncoder.from_metadata(meta)
    rebuilt.load_state_dict(state, strict=True)
    assert default_mask_patch(2) == 32 and default_mask_patch(3) == 16
    panels = model.eval().preview({"image": smooth_pattern(SIZES[2][0])})
    assert {"input", "view_q_masked", "target_view_k", "reconstruction", "loss_region"} <= set(panels)


# (ratio, masked cells of the 2-D 4x4 grid, of the 3-D 4x4x4 grid): round(ratio * N), halves up;
# None is the default config
MASKED_CELLS = [(None, 11, 45), (0.5, 8, 32), (0.25, 4, 16), (0.9, 14, 58)]


@pytest.mark.parametrize("ratio,cells_2d,cells_3d", MASKED_CELLS)
def test_masking_hides_round_ratio_times_cells_per_sample_2d_and_3d(ratio, cells_2d, cells_3d):
    for nd, cells in ((2, cells_2d), (3, cells_3d)):
        size, patch = SIZES[nd]
        model = tiny_convmim(nd, **({} if ratio is None else {"mask_ratio": ratio}))
        masking, grid = model.masking(torch.zeros(3, 1, *size))
        assert grid == (4,) * nd  # img_size / mask_patch cells per axis
        assert masking.mask.sum(1).tolist() == [cells] * 3
        # the pixels hidden from x_q are exactly those cells
        hidden = mask_to_image(masking.mask, grid, patch)
        assert hidden.flatten(1).mean(1).tolist() == pytest.approx([cells / 4**nd] * 3)


def test_intensity_jitter_is_per_sample_affine():
    x = torch.ones(3, 1, 4, 4)
    y = intensity_jitter(x, 0.2, 0.1, generator=torch.Generator().manual_seed(0))
    per_sample = y.flatten(1)
    assert bool((per_sample == per_sample[:, :1]).all())  # one scale/shift per sample
    assert bool(((per_sample[:, 0] > 0.7) & (per_sample[:, 0] < 1.3)).all())


def test_sizes_must_fit_the_backbone_stride():
    with pytest.raises(ConfigError, match="img_size"):
        ConvMIMConfig(img_size=(48, 48), spatial_dims=2).validate()
    with pytest.raises(ConfigError, match="mask_patch"):
        ConvMIMConfig(img_size=(64, 64), spatial_dims=2, mask_patch=6).validate()
