"""Token masking on N-D patch grids and the gather/scatter helpers that go with it.

Conventions: masks are `(B, L)` bool with True = masked; every row masks the same number of
tokens; `ids_keep` and `ids_masked` list token indices in ascending (raster) order and
`ids_restore` inverts the permutation `cat([ids_keep, ids_masked], 1)` as in MAE, so
`gather_tokens(cat([visible, masked], 1), ids_restore)` puts tokens back in grid order.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .patches import as_tuple

__all__ = [
    "MaskInfo",
    "num_masked",
    "masking_from_mask",
    "mask_from_ids",
    "random_masking",
    "block_masking",
    "importance_masking",
    "gather_tokens",
    "merge_tokens",
    "insert_mask_tokens",
    "mask_to_grid",
    "mask_to_image",
]


@dataclass
class MaskInfo:
    """mask `(B, L)` bool True = masked; ids_keep `(B, L_keep)`; ids_masked `(B, L_mask)`;
    ids_restore `(B, L)` with `cat([ids_keep, ids_masked], 1).gather(1, ids_restore) == arange(L)`."""

    mask: torch.Tensor
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    ids_masked: torch.Tensor

    @property
    def num_keep(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_masked(self) -> int:
        return self.ids_masked.shape[1]

    def to(self, device: torch.device | str) -> MaskInfo:
        return MaskInfo(*(t.to(device) for t in (self.mask, self.ids_keep, self.ids_restore, self.ids_masked)))


def num_masked(num_tokens: int, ratio: float) -> int:
    """Tokens to mask: `floor(L * ratio + 0.5)` (round half up), clamped to [0, L - 1].

    At least one token always stays visible so encoders that see only visible tokens never get
    an empty sequence.
    """
    if num_tokens < 1:
        raise ValueError(f"num_masked: num_tokens must be >= 1, got {num_tokens}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"num_masked: mask ratio must be in [0, 1], got {ratio}")
    return max(0, min(int(math.floor(num_tokens * ratio + 0.5)), num_tokens - 1))


def masking_from_mask(mask: torch.Tensor, n_mask: int | None = None) -> MaskInfo:
    """Build a MaskInfo from a `(B, L)` bool mask with the same number of True per row.

    Pass `n_mask` when the count is known by construction: that skips the check, which
    needs two host-device syncs (and breaks torch.compile graphs) inside a training step.
    """
    if mask.ndim != 2:
        raise ValueError(f"masking_from_mask: expected mask (B, L), got shape {tuple(mask.shape)}")
    mask = mask.bool()
    b, length = mask.shape
    if n_mask is None:
        counts = mask.sum(1)
        if b and not bool((counts == counts[0]).all()):
            raise ValueError(
                f"masking_from_mask: every row must mask the same number of tokens, got counts {counts.tolist()}"
            )
        n_mask = int(counts[0]) if b else 0
    # Stable sort of 0 (visible) before 1 (masked) keeps both groups in ascending index order.
    ids_shuffle = torch.argsort(mask.to(torch.int32), dim=1, stable=True)
    ids_restore = torch.empty_like(ids_shuffle)
    ids_restore.scatter_(1, ids_shuffle, torch.arange(length, device=mask.device).expand(b, length))
    n_keep = length - n_mask
    return MaskInfo(
        mask=mask,
        ids_keep=ids_shuffle[:, :n_keep].contiguous(),
        ids_restore=ids_restore,
        ids_masked=ids_shuffle[:, n_keep:].contiguous(),
    )


def _rand(shape: Sequence[int], device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) on the generator's device (if any), then moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)


def mask_from_ids(ids_masked: torch.Tensor, num_tokens: int) -> MaskInfo:
    """MaskInfo masking the distinct token indices `ids_masked (B, K)` of an L = `num_tokens` grid."""
    if ids_masked.ndim != 2:
        raise ValueError(f"mask_from_ids: expected ids_masked (B, K), got shape {tuple(ids_masked.shape)}")
    mask = torch.zeros(ids_masked.shape[0], num_tokens, dtype=torch.bool, device=ids_masked.device)
    mask.scatter_(1, ids_masked.long(), True)
    # Duplicate ids would make the count smaller than K; only check where that can happen cheaply.
    return masking_from_mask(mask, None if ids_masked.device.type == "cpu" else ids_masked.shape[1])


def random_masking(
    batch: int,
    num_tokens: int,
    ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> MaskInfo:
    """MAE masking: argsort of uniform noise; exactly `num_masked(L, ratio)` tokens per row."""
    n_mask = num_masked(num_tokens, ratio)
    noise = _rand((batch, num_tokens), device, generator)
    ids_masked = torch.argsort(noise, dim=1)[:, num_tokens - n_mask :]
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=noise.device).scatter_(1, ids_masked, True)
    return masking_from_mask(mask, n_mask)  # distinct by construction: no check, no sync


def _box_sizes(area: float, grid: Sequence[int], log_aspect: tuple[float, float], rng: random.Random) -> list[int]:
    """Box with ~`area` cells whose side ratios to a random reference axis are log-uniform.

    In 2D this is BEiT's rule (h / w log-uniform in the aspect range).
    """
    nd = len(grid)
    ref = rng.randrange(nd)
    logs = [0.0 if i == ref else rng.uniform(*log_aspect) for i in range(nd)]
    base = math.log(area) / nd - sum(logs) / nd
    return [max(1, min(g, int(round(math.exp(base + lg))))) for g, lg in zip(grid, logs)]


def _block_mask_one(
    grid: tuple[int, ...],
    n_mask: int,
    min_block: int,
    max_block: int,
    log_aspect: tuple[float, float],
    max_tries: int,
    rng: random.Random,
) -> np.ndarray:
    mask = np.zeros(grid, dtype=bool)
    # On small grids / small targets a min_block box would never fit: scale it down.
    low = max(1, min(min_block, n_mask))
    count = 0
    while count < n_mask:
        remaining = n_mask - count
        cap = min(remaining, max_block)
        added = 0
        for _ in range(max_tries):
            area = rng.uniform(min(low, cap), cap)
            sizes = _box_sizes(area, grid, log_aspect, rng)
            box = tuple(slice(s0, s0 + s) for s0, s in ((rng.randint(0, g - s), s) for g, s in zip(grid, sizes)))
            new = math.prod(sizes) - int(mask[box].sum())
            if 0 < new <= cap:
                mask[box] = True
                added = new
                break
        if added == 0:
            break
        count += added
    if count < n_mask:
        # Blocks stopped fitting: top up with random free tokens so the count is exact.
        free = np.flatnonzero(~mask.reshape(-1))
        mask.reshape(-1)[rng.sample(free.tolist(), n_mask - count)] = True
    return mask


def block_masking(
    batch: int,
    grid: Sequence[int],
    ratio: float,
    min_block: int = 16,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    max_tries: int = 10,
    max_block: int | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> MaskInfo:
    """BEiT/CAE block-wise masking on an N-D grid; exactly `num_masked(prod(grid), ratio)` per row.

    Boxes of uniform area in [min_block, min(remaining, max_block)] tokens and log-uniform
    side ratios in `aspect` are added while they add between 1 and `remaining` new tokens;
    after `max_tries` failed boxes in a row the rest is filled with random tokens. `min_block` is
    lowered to the target count when fewer tokens are to be masked. Randomness comes from
    `generator` (or torch's global RNG), so `torch.manual_seed` makes it reproducible.
    """
    grid = tuple(int(g) for g in grid)
    if not grid or any(g < 1 for g in grid):
        raise ValueError(f"block_masking: grid {grid} must be a non-empty sequence of positive ints")
    if not (0 < aspect[0] <= aspect[1]):
        raise ValueError(f"block_masking: aspect {aspect} must be (low, high) with 0 < low <= high")
    if max_tries < 1:
        raise ValueError(f"block_masking: max_tries must be >= 1, got {max_tries}")
    length = math.prod(grid)
    n_mask = num_masked(length, ratio)
    max_block = length if max_block is None else max(1, int(max_block))
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    gen_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
    rng = random.Random(seed)
    masks = [
        _block_mask_one(grid, n_mask, min_block, max_block, log_aspect, max_tries, rng).reshape(-1)
        for _ in range(batch)
    ]
    mask = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, length, dtype=torch.bool)
    return masking_from_mask(mask.to(device))


def importance_masking(
    scores: torch.Tensor,
    ratio: float,
    noise_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> MaskInfo:
    """ccMIM masking: mask the top `num_masked(L, ratio)` tokens of `scores (B, L)` + noise.

    Scores are min-max normalised per row to [0, 1] (constant rows become 0) before
    `noise_scale * U[0, 1)` is added, so `noise_scale` is relative to the score range:
    0 masks exactly the top scores, large values approach random masking.
    """
    if scores.ndim != 2:
        raise ValueError(f"importance_masking: expected scores (B, L), got shape {tuple(scores.shape)}")
    b, length = scores.shape
    n_mask = num_masked(length, ratio)
    s = scores.detach().float()
    low, high = s.amin(1, keepdim=True), s.amax(1, keepdim=True)
    s = (s - low) / (high - low).clamp_min(1e-12)
    s = s + noise_scale * _rand((b, length), s.device, generator)
    ids_masked = s.topk(n_mask, dim=1).indices
    return mask_from_ids(ids_masked, length)


def sampled_masking(
    probs: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
) -> MaskInfo:
    """Mask `num_masked(L, ratio)` tokens drawn without replacement with probabilities `probs (B, L)`.

    Rows need not sum to 1 (they are normalised); a row of zeros is drawn uniformly. Tokens with a
    higher score are masked more often, and every token keeps a chance (ccMIM's sampling).
    """
    if probs.ndim != 2:
        raise ValueError(f"sampled_masking: expected probabilities (B, L), got shape {tuple(probs.shape)}")
    b, length = probs.shape
    p = probs.detach().float().clamp_min(0)
    p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.ones_like(p))
    # torch.multinomial refuses rows with fewer non-zero entries than draws: give every token a floor
    p = p / p.sum(1, keepdim=True) + 1e-12
    ids_masked = torch.multinomial(p, num_masked(length, ratio), replacement=False, generator=generator)
    return mask_from_ids(ids_masked, length)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`x (B, L, *rest)`, `ids (B, K)` -> `(B, K, *rest)`; differentiable w.r.t. x."""
    if ids.ndim != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"gather_tokens: ids {tuple(ids.shape)} must be (B, K) with B = x.shape[0] = {x.shape[0]}")
    rest = x.shape[2:]
    index = ids.reshape(*ids.shape, *([1] * len(rest))).expand(*ids.shape, *rest)
    return torch.gather(x, 1, index)


def merge_tokens(x_visible: torch.Tensor, x_masked: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """Visible `(B, L_keep, D)` and masked-slot `(B, L_mask, D)` tokens -> `(B, L, D)` in grid order."""
    if x_visible.shape[1] + x_masked.shape[1] != ids_restore.shape[1]:
        raise ValueError(
            f"merge_tokens: {x_visible.shape[1]} visible + {x_masked.shape[1]} masked tokens "
            f"!= {ids_restore.shape[1]} entries of ids_restore"
        )
    return gather_tokens(torch.cat([x_visible, x_masked], dim=1), ids_restore)


def insert_mask_tokens(x_visible: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """MAE decoder input: `x_visible (B, L_keep, D)` + `mask_token (1, 1, D)` -> `(B, L, D)`."""
    b, n_keep, d = x_visible.shape
    n_mask = ids_restore.shape[1] - n_keep
    if n_mask < 0:
        raise ValueError(f"insert_mask_tokens: {n_keep} visible tokens exceed {ids_restore.shape[1]} slots")
    filler = mask_token.to(x_visible.dtype).expand(b, n_mask, d)
    return merge_tokens(x_visible, filler, ids_restore)


def mask_to_grid(mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """`(B, L)` -> `(B, *grid)` (row-major, same order as `patchify`)."""
    grid = tuple(int(g) for g in grid)
    if mask.ndim != 2 or mask.shape[1] != math.prod(grid):
        raise ValueError(f"mask_to_grid: mask {tuple(mask.shape)} does not match grid {grid}")
    return mask.reshape(mask.shape[0], *grid)


def mask_to_image(mask: torch.Tensor, grid: Sequence[int], patch_size: int | Sequence[int]) -> torch.Tensor:
    """`(B, L)` -> float `(B, 1, *(grid * patch))`, 1 on masked pixels (previews, pixel losses)."""
    grid = tuple(int(g) for g in grid)
    patch = as_tuple(patch_size, len(grid))
    img = mask_to_grid(mask, grid).float().unsqueeze(1)
    for axis, p in enumerate(patch):
        img = img.repeat_interleave(p, dim=2 + axis)
    return img
