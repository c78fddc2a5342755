"""N-D patch grids: image `(B, C, *spatial)` <-> tokens `(B, L, prod(patch) * C)`.

Token layout per patch is `(*patch, C)` (channel last, as in MAE) and tokens run over the
grid in row-major order, i.e. the order of `conv_patch_embed(x).flatten(2)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["as_tuple", "grid_size", "patchify", "unpatchify"]


def as_tuple(value: int | Sequence[int], ndim: int, name: str = "patch_size") -> tuple[int, ...]:
    """Broadcast an int to `ndim` ints, or check a sequence has `ndim` positive ints."""
    if isinstance(value, int):
        out = (value,) * ndim
    else:
        out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"{name}={tuple(out)} has {len(out)} entries, expected {ndim} (one per spatial axis)")
    if any(v < 1 for v in out):
        raise ValueError(f"{name}={out} must contain positive integers")
    return out


def grid_size(spatial_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """Number of patches per axis; raises ValueError if `spatial_shape` is not divisible by the patch."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    patch = as_tuple(patch_size, len(spatial_shape))
    if any(s % p for s, p in zip(spatial_shape, patch)):
        raise ValueError(
            f"spatial shape {spatial_shape} is not divisible by patch size {patch}; "
            "crop or pad the input to a multiple of the patch size"
        )
    return tuple(s // p for s, p in zip(spatial_shape, patch))


def patchify(x: torch.Tensor, patch_size: int | Sequence[int]) -> torch.Tensor:
    """`(B, C, *spatial)` -> `(B, L, prod(patch) * C)`, L = prod(grid) in row-major grid order."""
    if x.ndim < 3:
        raise ValueError(f"patchify expects (B, C, *spatial) with >= 1 spatial axis, got shape {tuple(x.shape)}")
    nd = x.ndim - 2
    b, c = x.shape[:2]
    patch = as_tuple(patch_size, nd)
    grid = grid_size(x.shape[2:], patch)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., p0, p1, ..., C)
    interleaved = [d for g, p in zip(grid, patch) for d in (g, p)]
    x = x.reshape(b, c, *interleaved)
    grid_axes = [2 + 2 * i for i in range(nd)]
    patch_axes = [3 + 2 * i for i in range(nd)]
    x = x.permute(0, *grid_axes, *patch_axes, 1)
    return x.reshape(b, math.prod(grid), math.prod(patch) * c)


def unpatchify(
    tokens: torch.Tensor, patch_size: int | Sequence[int], grid: Sequence[int], channels: int
) -> torch.Tensor:
    """`(B, L, prod(patch) * C)` -> `(B, C, *(grid * patch))`; exact inverse of `patchify`."""
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    patch = as_tuple(patch_size, nd)
    if tokens.ndim != 3:
        raise ValueError(f"unpatchify expects tokens (B, L, P), got shape {tuple(tokens.shape)}")
    b, length, dim = tokens.shape
    if length != math.prod(grid) or dim != math.prod(patch) * channels:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} do not match grid {grid}, patch {patch} and "
            f"{channels} channels: expected (B, {math.prod(grid)}, {math.prod(patch) * channels})"
        )
    x = tokens.reshape(b, *grid, *patch, channels)
    # (B, g0.., p0.., C) -> (B, C, g0, p0, g1, p1, ...)
    order = [0, 2 * nd + 1]
    for i in range(nd):
        order += [1 + i, 1 + nd + i]
    x = x.permute(*order)
    return x.reshape(b, channels, *(g * p for g, p in zip(grid, patch)))
