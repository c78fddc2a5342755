import pytest
import torch
import torch.nn.functional as F

from alice3d.core.patches import grid_size, patchify, unpatchify


@pytest.mark.parametrize(
    "spatial, patch",
    [((8, 12), (4, 3)), ((8, 12), 4), ((8, 12, 6), (4, 3, 2)), ((4, 4, 4), 2)],
)
def test_round_trip_exact(spatial, patch):
    x = torch.randn(2, 3, *spatial)
    tokens = patchify(x, patch)
    grid = grid_size(spatial, patch)
    p = (patch,) * len(spatial) if isinstance(patch, int) else patch
    assert tokens.shape == (2, torch.tensor(grid).prod().item(), torch.tensor(p).prod().item() * 3)
    assert torch.equal(unpatchify(tokens, patch, grid, 3), x)


def test_token_layout_is_patch_then_channel_2d():
    # 1 image, 2 channels, 2x4 pixels, patch (2, 2): grid (1, 2)
    x = torch.arange(16.0).reshape(1, 2, 2, 4)
    tokens = patchify(x, (2, 2))
    # first patch: pixels (0,0),(0,1),(1,0),(1,1); channel 0 values 0,1,4,5; channel 1 adds 8
    assert tokens[0, 0].tolist() == [0, 8, 1, 9, 4, 12, 5, 13]
    assert tokens[0, 1].tolist() == [2, 10, 3, 11, 6, 14, 7, 15]


@pytest.mark.parametrize("spatial, patch", [((8, 12), (4, 3)), ((8, 12, 6), (4, 3, 2))])
def test_matches_strided_conv_patch_embedding(spatial, patch):
    nd = len(spatial)
    c, d = 2, 5
    x = torch.randn(2, c, *spatial, dtype=torch.float64)
    weight = torch.randn(d, c, *patch, dtype=torch.float64)
    conv = (F.conv2d if nd == 2 else F.conv3d)(x, weight, stride=patch)
    expected = conv.flatten(2).transpose(1, 2)  # (B, L, D) in row-major grid order
    # conv weight (D, C, *patch) in the (*patch, C) token layout
    w_tok = weight.permute(0, *range(2, 2 + nd), 1).reshape(d, -1)
    got = patchify(x, patch) @ w_tok.t()
    torch.testing.assert_close(got, expected)


def test_grid_size_errors_name_shapes():
    assert grid_size((8, 12, 6), (4, 3, 2)) == (2, 4, 3)
    with pytest.raises(ValueError, match=r"\(8, 10\).*\(4, 3\)"):
        grid_size((8, 10), (4, 3))
    with pytest.raises(ValueError, match="expected 3"):
        grid_size((8, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="do not match"):
        unpatchify(torch.zeros(1, 4, 8), 2, (2, 2), 3)
