import math
import warnings

import pytest
import torch
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

from alice3d.core.pos_embed import interpolate_pos_embed, sincos_pos_embed


def test_sincos_1d_hand_values():
    pe = sincos_pos_embed((3,), 2)  # one frequency (omega = 1): [sin(x), cos(x)]
    expected = torch.tensor([[math.sin(x), math.cos(x)] for x in range(3)])
    torch.testing.assert_close(pe, expected)


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 4)])
def test_sincos_blocks_follow_row_major_axes(grid):
    nd = len(grid)
    dim = 4 * nd
    pe = sincos_pos_embed(grid, dim).reshape(*grid, nd, 4)  # per axis: [sin f0, sin f1, cos f0, cos f1]
    coords = torch.meshgrid(*(torch.arange(g, dtype=torch.float32) for g in grid), indexing="ij")
    for axis in range(nd):
        torch.testing.assert_close(pe[..., axis, 0], coords[axis].sin())  # frequency 1
        torch.testing.assert_close(pe[..., axis, 2], coords[axis].cos())
        torch.testing.assert_close(pe[..., axis, 1], (coords[axis] / 100.0).sin())  # 1/10000**(1/2)


@pytest.mark.parametrize("grid", [(3, 4), (2, 3, 4)])
def test_sincos_equals_monai_with_first_two_axis_blocks_swapped(grid):
    nd = len(grid)
    dim = 12 * nd
    ours = sincos_pos_embed(grid, dim).reshape(-1, nd, dim // nd)
    ours = ours[:, [1, 0] + list(range(2, nd))].reshape(-1, dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's meshgrid call warns about indexing
        monai = build_sincos_position_embedding(list(grid), dim, spatial_dims=nd)[0]
    torch.testing.assert_close(ours, monai.detach(), atol=1e-5, rtol=1e-5)


def test_sincos_dim_error():
    with pytest.raises(ValueError, match="divisible by 2 \\* len\\(grid\\) = 6"):
        sincos_pos_embed((2, 2, 2), 16)


@pytest.mark.parametrize("old, new", [((4, 6), (7, 3)), ((2, 3, 4), (4, 3, 5))])
def test_interpolate_keeps_constant_and_prefix(old, new):
    d = 8
    const = torch.full((1, 1, d), 0.7) + torch.arange(d) * 0.1  # constant over tokens
    prefix = torch.randn(1, 1, d)
    pe = torch.cat([prefix, const.expand(1, math.prod(old), d)], dim=1)
    out = interpolate_pos_embed(pe, old, new, num_prefix_tokens=1)
    assert out.shape == (1, 1 + math.prod(new), d)
    torch.testing.assert_close(out[:, :1], prefix)
    torch.testing.assert_close(out[:, 1:], const.expand(1, math.prod(new), d))


@pytest.mark.parametrize("grid", [(4, 6), (2, 3, 4)])
def test_interpolate_identity_on_equal_grids(grid):
    pe = torch.randn(1, math.prod(grid), 6)
    out = interpolate_pos_embed(pe, grid, grid)
    assert torch.equal(out, pe) and out is not pe


def test_interpolate_hand_values_align_corners_false():
    pe = torch.tensor([[[0.0], [1.0]]])  # grid (1, 2), D = 1
    out = interpolate_pos_embed(pe, (1, 2), (1, 4))
    # sample points -0.25, 0.25, 0.75, 1.25 in source index space, clamped at the border
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_interpolate_3d_row_major_matches_sincos_layout():
    # Upsampling along the last axis only must not mix the other axes' blocks.
    pe = sincos_pos_embed((2, 3, 2), 12).unsqueeze(0)
    out = interpolate_pos_embed(pe, (2, 3, 2), (2, 3, 4)).reshape(2, 3, 4, 3, 4)
    ref = sincos_pos_embed((2, 3, 2), 12).reshape(2, 3, 2, 3, 4)
    torch.testing.assert_close(out[..., 0, :], ref[:, :, :1, 0, :].expand(2, 3, 4, 4))
    torch.testing.assert_close(out[..., 1, :], ref[:, :, :1, 1, :].expand(2, 3, 4, 4))


def test_interpolate_errors():
    with pytest.raises(ValueError, match="expected 13"):
        interpolate_pos_embed(torch.zeros(1, 12, 4), (3, 4), (4, 4), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="rank"):
        interpolate_pos_embed(torch.zeros(1, 12, 4), (3, 4), (2, 2, 3))
