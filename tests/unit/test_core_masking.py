import math

import pytest
import torch

from alice3d.core.masking import (
    MaskInfo,
    block_masking,
    gather_tokens,
    importance_masking,
    insert_mask_tokens,
    mask_from_ids,
    mask_to_grid,
    mask_to_image,
    masking_from_mask,
    merge_tokens,
    num_masked,
    random_masking,
)
from alice3d.core.patches import patchify


def check_mask_info(info: MaskInfo, batch: int, length: int, n_mask: int) -> None:
    assert info.mask.shape == (batch, length) and info.mask.dtype == torch.bool
    assert (info.mask.sum(1) == n_mask).all()
    assert info.ids_keep.shape == (batch, length - n_mask) and info.ids_masked.shape == (batch, n_mask)
    assert info.num_keep == length - n_mask and info.num_masked == n_mask
    assert not info.mask.gather(1, info.ids_keep).any()
    assert info.mask.gather(1, info.ids_masked).all()
    assert (info.ids_keep.diff(dim=1) > 0).all() and (info.ids_masked.diff(dim=1) > 0).all()
    shuffled = torch.cat([info.ids_keep, info.ids_masked], dim=1)
    assert torch.equal(shuffled.gather(1, info.ids_restore), torch.arange(length).expand(batch, length))


def test_num_masked_rounds_half_up_and_keeps_one_visible():
    assert num_masked(196, 0.75) == 147
    assert num_masked(10, 0.75) == 8  # 7.5 -> 8
    assert num_masked(6, 0.75) == 5  # 4.5 -> 5 (Python's round would give 4)
    assert num_masked(8, 0.0) == 0
    assert num_masked(4, 1.0) == 3
    assert num_masked(1, 0.9) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        num_masked(10, 1.5)


def test_masking_from_mask_hand_example_and_unequal_rows():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    info = masking_from_mask(mask)
    assert info.ids_keep.tolist() == [[1, 3], [0, 1]]
    assert info.ids_masked.tolist() == [[0, 2], [2, 3]]
    assert info.ids_restore.tolist() == [[2, 0, 3, 1], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="same number"):
        masking_from_mask(torch.tensor([[True, False], [True, True]]))
    from_ids = mask_from_ids(torch.tensor([[2, 0], [3, 2]]), 4)
    assert torch.equal(from_ids.mask, mask) and torch.equal(from_ids.ids_restore, info.ids_restore)
    with pytest.raises(ValueError, match="same number"):
        mask_from_ids(torch.tensor([[1, 1], [0, 1]]), 4)  # repeated id masks only one token


@pytest.mark.parametrize("grid", [(14, 14), (6, 6, 4)])
def test_random_masking_exact_count_and_reproducible(grid):
    length = math.prod(grid)
    info = random_masking(4, length, 0.75, generator=torch.Generator().manual_seed(0))
    check_mask_info(info, 4, length, num_masked(length, 0.75))
    again = random_masking(4, length, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(info.mask, again.mask)
    assert not torch.equal(info.mask[0], info.mask[1])


def _masked_neighbours(mask_grid: torch.Tensor) -> float:
    """Mean number of masked axis-neighbours of a masked token (grid `(B, *grid)`)."""
    m = mask_grid.float()
    count = torch.zeros_like(m)
    for axis in range(1, m.ndim):
        pad = [0, 0] * (m.ndim - 1 - axis) + [1, 1]
        p = torch.nn.functional.pad(m, pad)
        n = m.shape[axis]
        count += p.narrow(axis, 0, n) + p.narrow(axis, 2, n)
    return float((count * m).sum() / m.sum())


@pytest.mark.parametrize("grid, min_block", [((14, 14), 16), ((8, 8, 6), 16)])
def test_block_masking_exact_count_and_blocky(grid, min_block):
    torch.manual_seed(0)
    length = math.prod(grid)
    info = block_masking(8, grid, 0.4, min_block=min_block)
    check_mask_info(info, 8, length, num_masked(length, 0.4))
    rand = random_masking(8, length, 0.4)
    block_nb = _masked_neighbours(mask_to_grid(info.mask, grid))
    rand_nb = _masked_neighbours(mask_to_grid(rand.mask, grid))
    # Blocks give masked tokens many more masked neighbours than scattered masking does.
    assert block_nb > rand_nb + 1.0


@pytest.mark.parametrize("grid", [(2, 2), (2, 2, 2), (1, 5), (3, 1, 1)])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 1.0])
def test_block_masking_terminates_on_tiny_grids(grid, ratio):
    length = math.prod(grid)
    info = block_masking(5, grid, ratio, min_block=16, generator=torch.Generator().manual_seed(1))
    check_mask_info(info, 5, length, num_masked(length, ratio))


def test_block_masking_reproducible_with_generator():
    a = block_masking(3, (6, 6, 4), 0.5, generator=torch.Generator().manual_seed(7))
    b = block_masking(3, (6, 6, 4), 0.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("grid", [(4, 5), (2, 3, 4)])
def test_importance_masking_without_noise_masks_top_scores(grid):
    length = math.prod(grid)
    scores = torch.stack([torch.randperm(length).float() * 3.0 - 5.0 for _ in range(3)])
    info = importance_masking(scores, 0.6, noise_scale=0.0)
    n = num_masked(length, 0.6)
    check_mask_info(info, 3, length, n)
    top = scores.topk(n, dim=1).indices.sort(dim=1).values
    assert torch.equal(info.ids_masked, top)


def test_importance_masking_noise_changes_selection_and_handles_constant_rows():
    scores = torch.arange(50.0).expand(4, 50)
    info = importance_masking(scores, 0.5, noise_scale=10.0, generator=torch.Generator().manual_seed(0))
    check_mask_info(info, 4, 50, 25)
    assert not torch.equal(info.ids_masked[0], torch.arange(25, 50))
    flat = importance_masking(torch.ones(2, 9), 0.5, noise_scale=0.5)
    check_mask_info(flat, 2, 9, num_masked(9, 0.5))


def test_gather_merge_insert_round_trip_and_grads():
    b, length, d = 2, 6, 3
    info = random_masking(b, length, 0.5, generator=torch.Generator().manual_seed(3))
    x = torch.randn(b, length, d, requires_grad=True)
    visible = gather_tokens(x, info.ids_keep)
    assert torch.equal(visible[1, 0], x[1, info.ids_keep[1, 0]])
    masked = gather_tokens(x, info.ids_masked)
    assert torch.equal(merge_tokens(visible, masked, info.ids_restore), x)

    token = torch.randn(1, 1, d, requires_grad=True)
    full = insert_mask_tokens(visible, token, info.ids_restore)
    assert full.shape == (b, length, d)
    assert torch.equal(full[~info.mask], x[~info.mask])
    assert torch.equal(full[info.mask], token[0].expand(b * info.num_masked, d))
    full.sum().backward()
    torch.testing.assert_close(token.grad, torch.full((1, 1, d), float(b * info.num_masked)))
    torch.testing.assert_close(x.grad, (~info.mask).float().unsqueeze(-1).expand(b, length, d))


@pytest.mark.parametrize("grid, patch", [((2, 3), (4, 2)), ((2, 2, 3), (2, 3, 1))])
def test_mask_to_image_matches_patch_layout(grid, patch):
    length = math.prod(grid)
    info = random_masking(2, length, 0.5, generator=torch.Generator().manual_seed(0))
    img = mask_to_image(info.mask, grid, patch)
    assert img.shape == (2, 1, *(g * p for g, p in zip(grid, patch))) and img.dtype == torch.float32
    tokens = patchify(img, patch)  # every pixel of a patch carries that token's mask value
    torch.testing.assert_close(tokens, info.mask.float().unsqueeze(-1).expand_as(tokens))
