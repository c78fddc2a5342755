"""N-D fixed sin-cos position embeddings and grid interpolation of learned/fixed embeddings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["sincos_pos_embed", "interpolate_pos_embed"]

_LINEAR_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def sincos_pos_embed(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos embedding `(L, dim)`, L = prod(grid) in row-major order (matches `patchify`).

    `dim` is split into equal blocks `[sin(a0), cos(a0), sin(a1), cos(a1), ...]`, one pair per
    axis, each with `dim / (2 * ndim)` frequencies `1 / temperature**(k / n)`. MONAI's
    `build_sincos_position_embedding` uses the same values with the blocks of axes 0 and 1
    swapped.
    """
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    if nd == 0 or any(g < 1 for g in grid):
        raise ValueError(f"sincos_pos_embed: grid {grid} must be a non-empty sequence of positive ints")
    if dim % (2 * nd):
        raise ValueError(
            f"sincos_pos_embed: dim={dim} must be divisible by 2 * len(grid) = {2 * nd} "
            f"(one sin and one cos block per axis of grid {grid})"
        )
    n = dim // (2 * nd)
    omega = 1.0 / temperature ** (torch.arange(n, dtype=torch.float64) / n)
    axes = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    blocks = []
    for coord in axes:
        angle = coord.reshape(-1, 1) * omega
        blocks += [angle.sin(), angle.cos()]
    return torch.cat(blocks, dim=1).float()


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    old_grid: Sequence[int],
    new_grid: Sequence[int],
    num_prefix_tokens: int = 0,
    mode: str | None = None,
) -> torch.Tensor:
    """Resample `(1, P + prod(old_grid), D)` to `(1, P + prod(new_grid), D)` over the grid.

    The P prefix (cls) tokens are kept as they are. `mode=None` picks linear / bilinear /
    trilinear by grid rank (align_corners=False), so a constant embedding stays constant.
    """
    old_grid = tuple(int(g) for g in old_grid)
    new_grid = tuple(int(g) for g in new_grid)
    if len(old_grid) != len(new_grid):
        raise ValueError(f"interpolate_pos_embed: old grid {old_grid} and new grid {new_grid} differ in rank")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"interpolate_pos_embed: expected pos_embed (1, L, D), got {tuple(pos_embed.shape)}")
    expected = num_prefix_tokens + math.prod(old_grid)
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"interpolate_pos_embed: pos_embed has {pos_embed.shape[1]} tokens, expected {expected} "
            f"({num_prefix_tokens} prefix + grid {old_grid})"
        )
    if old_grid == new_grid:
        return pos_embed.clone()
    nd = len(old_grid)
    if mode is None:
        if nd not in _LINEAR_MODES:
            raise ValueError(f"interpolate_pos_embed: no linear mode for a {nd}-D grid; pass mode explicitly")
        mode = _LINEAR_MODES[nd]
    prefix, tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = tokens.shape[-1]
    # Interpolate in float32 at least: half-precision interpolation is not available on all devices.
    work = tokens.float() if tokens.dtype in (torch.float16, torch.bfloat16) else tokens
    work = work.transpose(1, 2).reshape(1, dim, *old_grid)
    kwargs = {"align_corners": False} if mode in ("linear", "bilinear", "bicubic", "trilinear") else {}
    work = F.interpolate(work, size=new_grid, mode=mode, **kwargs)
    work = work.reshape(1, dim, -1).transpose(1, 2).to(tokens.dtype)
    return torch.cat([prefix, work], dim=1)
