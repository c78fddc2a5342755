"""Visible-token primitives for a MONAI Swin transformer with masked patches discarded.

Following the "green hierarchical ViT" idea, masked tokens are dropped instead of being
replaced by mask tokens. Visible tokens are kept packed as ``(T, C)`` rows (all samples
of the batch together) with their batch index ``(T,)`` and grid coordinates ``(T, n)``.

Token order is fixed: by sample, then visible mask unit (row-major unit id), then a
Morton (bit-interleaved) order inside the unit. That order puts the ``2**n`` children of
every coarser position next to each other, so patch merging is a reshape.

Window attention on visible tokens: every token gets a group id (sample, window of the
padded and rolled grid, shift region) and groups are packed into padded rows; groups of
similar size share a "bucket" so little work is spent on padding. MONAI's zero padding of
the grid takes part as keys only. A few attention calls per block (one per bucket), no
Python loop over windows; the index tensors are built once per stage and shift.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2, get_window_size
from torch import nn


def ravel(coords: torch.Tensor, shape) -> torch.Tensor:
    """Row-major flat index of integer coordinates ``(..., n)`` in a grid of ``shape``."""
    flat = torch.zeros(coords.shape[:-1], dtype=torch.long, device=coords.device)
    for axis, size in enumerate(shape):
        flat = flat * int(size) + coords[..., axis]
    return flat


def grid_coords(shape, device=None) -> torch.Tensor:
    """All integer coordinates of a grid in row-major order: ``(prod(shape), n)``."""
    axes = [torch.arange(int(s), device=device) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))


class _GatherRows(torch.autograd.Function):
    """``table.index_select(dim, index)`` whose backward is a gather through ``inverse``."""

    @staticmethod
    def forward(ctx, table, index, inverse, dim):
        ctx.save_for_backward(inverse)
        ctx.dim = dim
        return table.index_select(dim, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        zero_shape = list(grad.shape)
        zero_shape[ctx.dim] = 1
        grad = torch.cat([grad, grad.new_zeros(zero_shape)], ctx.dim)
        return grad.index_select(ctx.dim, inverse), None, None, None


def gather_rows(table: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Select entries ``index`` of ``table`` along ``dim`` when no entry is picked twice.

    ``inverse[r]`` is the output position of table entry ``r``, or ``len(index)`` for an
    entry that is not picked or whose gradient is known to be zero. The backward pass is
    then a gather instead of an index-add, which is several times faster on CPU.
    """
    return _GatherRows.apply(table, index, inverse, dim)


def inverse_index(index: torch.Tensor, size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``inverse`` for ``gather_rows``: entries never picked (or picked where ``valid`` is
    False) point past the end."""
    inverse = torch.full((size,), index.shape[0], dtype=torch.long, device=index.device)
    positions = torch.arange(index.shape[0], device=index.device)
    if valid is not None:
        index, positions = index[valid], positions[valid]
    inverse[index] = positions
    return inverse


def morton_offsets(side: int, spatial_dims: int, device=None) -> torch.Tensor:
    """Coordinates inside a cube of ``side**n`` positions in Morton order: ``(side**n, n)``.

    The lowest bit of every axis varies fastest (axis 0 most significant), so consecutive
    groups of ``2**n`` rows are the children of one position of the ``side // 2`` grid,
    listed in ``itertools.product`` order of their offsets.
    """
    if side & (side - 1):
        raise ValueError(f"mask unit side in tokens must be a power of two, got {side}")
    coords = grid_coords((side,) * spatial_dims, device)
    key = torch.zeros(coords.shape[0], dtype=torch.long, device=device)
    for bit in range(max(side.bit_length() - 1, 0)):
        for axis in range(spatial_dims):
            level = (coords[:, axis] >> bit) & 1
            key |= level << (bit * spatial_dims + spatial_dims - 1 - axis)
    return coords[torch.argsort(key)]


def merge_order(downsample: nn.Module, spatial_dims: int) -> list[int]:
    """Order in which MONAI's patch merging concatenates the ``2**n`` children.

    Returned as indices into the ``itertools.product`` order of the child offsets.
    """
    if spatial_dims == 2 and isinstance(downsample, PatchMergingV2):
        # both variants run PatchMergingV2.forward in 2D: x[:, j::2, i::2] for i, j in product
        offsets = [(j, i) for i, j in itertools.product(range(2), range(2))]
    elif isinstance(downsample, PatchMerging):
        # PatchMerging.forward ("merging", the v0.9.0 order), 3D
        offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    elif isinstance(downsample, PatchMergingV2):
        offsets = list(itertools.product(range(2), repeat=spatial_dims))
    else:
        raise ValueError(
            f"forward_masked supports downsample 'merging' or 'mergingv2', got {type(downsample).__name__}"
        )
    return [sum(o << (spatial_dims - 1 - a) for a, o in enumerate(off)) for off in offsets]


@dataclass
class Bucket:
    """Groups of similar size packed into ``groups x length`` consecutive slots."""

    groups: int
    length: int  # key slots per group
    queries: int  # leading slots that hold visible tokens in some group (padding tokens follow)
    # (groups, length) flat in-window position of each slot, ``window_tokens`` for unused
    # slots; None when every group is a complete window (its slots are then in order 0..n-1)
    rel: torch.Tensor | None


@dataclass
class WindowPlan:
    """Index tensors for one (stage, shift) of the masked forward; shared by its blocks.

    Slots of all buckets are concatenated (``S`` in total). The extended qkv table has the
    ``T`` visible tokens, then ``num_pad`` padding tokens, then one filler row.
    """

    window_tokens: int  # tokens in one (possibly clamped) window
    num_pad: int  # padding tokens of the grid attended to as zero vectors
    buckets: list[Bucket]
    src: torch.Tensor  # (S,) row of the extended qkv table feeding each slot
    src_inverse: torch.Tensor  # (T + num_pad + 1,) slot of each row (S for the filler)
    gather_back: torch.Tensor  # (T,) row of cat(bucket outputs) holding each visible token
    back_inverse: torch.Tensor  # (R,) visible token of each output row (T when none)


def _pad_coords(grid, padded_grid, device) -> torch.Tensor:
    """Coordinates of the zero padding MONAI adds to reach a multiple of the window."""
    coords = grid_coords(padded_grid, device)
    inside = (coords < torch.as_tensor(grid, device=device)).all(-1)
    return coords[~inside]


def window_plan(
    coords: torch.Tensor,
    batch_index: torch.Tensor,
    batch_size: int,
    grid,
    window_size,
    shift_size,
    bucket_ratio: float = 2.0**0.5,
) -> WindowPlan:
    """Group visible tokens by (shifted) window as MONAI's SwinTransformerBlock would.

    Args:
        coords: ``(T, n)`` grid coordinates of the visible tokens.
        batch_index: ``(T,)`` sample of each token.
        grid: unpadded token grid of the stage.
        window_size, shift_size: the block's nominal sizes (clamped here like MONAI does).
        bucket_ratio: groups whose sizes differ by less than this factor share a bucket.

    MONAI pads the grid with zero tokens (after ``norm1``) up to a multiple of the window and
    lets them take part in attention; those padding tokens are included here as well
    (only in windows holding visible tokens), so an all-visible mask reproduces the dense
    forward. With a shift, MONAI adds -100 to logits between different shift regions of one
    window (a weight below ``exp(-100)``, zero in float32); here those regions simply form
    separate groups.
    """
    device = coords.device
    n = coords.shape[1]
    ws, ss = get_window_size(tuple(grid), tuple(window_size), tuple(shift_size))
    padded = tuple(math.ceil(g / w) * w for g, w in zip(grid, ws))
    shifted = any(s > 0 for s in ss)
    num_windows = math.prod(p // w for p, w in zip(padded, ws))
    num_regions = 3**n if shifted else 1
    window_tokens = math.prod(ws)

    pads = _pad_coords(grid, padded, device)
    num_vis = coords.shape[0]
    all_coords = torch.cat([coords, pads.repeat(batch_size, 1)])
    all_batch = torch.cat([batch_index, torch.arange(batch_size, device=device).repeat_interleave(pads.shape[0])])

    ws_t = torch.as_tensor(ws, device=device)
    ss_t = torch.as_tensor(ss, device=device)
    padded_t = torch.as_tensor(padded, device=device)
    # torch.roll(x, -shift) moves grid position c to (c - shift) mod padded
    rolled = (all_coords - ss_t) % padded_t
    window_id = ravel(torch.div(rolled, ws_t, rounding_mode="floor"), [p // w for p, w in zip(padded, ws)])
    rel = ravel(rolled % ws_t, ws)
    region = torch.zeros_like(window_id)
    if shifted:
        # compute_mask's labels per axis: [0, P-w) -> 0, [P-w, P-s) -> 1, [P-s, P) -> 2
        labels = (rolled >= padded_t - ws_t).long() + (rolled >= padded_t - ss_t).long()
        labels = torch.where(ss_t > 0, labels, torch.zeros_like(labels))
        region = ravel(labels, (3,) * n)
    group_id = (all_batch * num_windows + window_id) * num_regions + region

    occupied = torch.zeros(batch_size * num_windows * num_regions, dtype=torch.bool, device=device)
    occupied[group_id[:num_vis]] = True
    pad_keep = occupied[group_id[num_vis:]]
    group_id = torch.cat([group_id[:num_vis], group_id[num_vis:][pad_keep]])
    rel = torch.cat([rel[:num_vis], rel[num_vis:][pad_keep]])
    num_tokens = group_id.shape[0]

    # sorted by group, visible before padding tokens, then by in-window position: a
    # complete window without padding lists positions 0..n-1 in order
    is_pad = torch.arange(num_tokens, device=device) >= num_vis
    order = torch.argsort((group_id * 2 + is_pad.long()) * window_tokens + rel)
    _, counts = torch.unique_consecutive(group_id[order], return_counts=True)
    num_groups = counts.shape[0]
    group_sorted = torch.repeat_interleave(torch.arange(num_groups, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(num_tokens, device=device) - starts[group_sorted]
    rel_sorted = rel[order]
    vis_counts = torch.zeros(num_groups, dtype=torch.long, device=device)
    vis_counts.index_add_(0, group_sorted, (~is_pad[order]).long())

    counts_cpu, vis_cpu = counts.cpu(), vis_counts.cpu()
    bucket_of_group = torch.ceil(torch.log(counts_cpu.double()) / math.log(bucket_ratio) - 1e-9).long()
    bucket_of_group[(counts_cpu == window_tokens) & (vis_cpu == window_tokens)] = -1  # share one bias
    empty_row = num_tokens  # filler row of the extended qkv table
    srcs, buckets, out_rows = [], [], 0
    gather_back = torch.empty(num_vis, dtype=torch.long, device=device)
    for bucket in torch.unique(bucket_of_group).tolist():
        groups_cpu = torch.nonzero(bucket_of_group == bucket).flatten()
        length = int(counts_cpu[groups_cpu].max())
        queries = int(vis_cpu[groups_cpu].max())
        n_groups = groups_cpu.shape[0]
        local = torch.full((num_groups,), -1, dtype=torch.long, device=device)
        local[groups_cpu.to(device)] = torch.arange(n_groups, device=device)
        local_sorted = local[group_sorted]
        pick = torch.nonzero(local_sorted >= 0).flatten()
        slot = local_sorted[pick] * length + rank_sorted[pick]
        src = torch.full((n_groups * length,), empty_row, dtype=torch.long, device=device)
        src[slot] = order[pick]
        srcs.append(src)
        rel_pack = None
        if bucket != -1:
            rel_pack = torch.full((n_groups * length,), window_tokens, dtype=torch.long, device=device)
            rel_pack[slot] = rel_sorted[pick]
            rel_pack = rel_pack.view(n_groups, length)
        buckets.append(Bucket(n_groups, length, queries, rel_pack))
        # outputs exist for the first ``queries`` slots of each group only
        token = order[pick]
        is_vis = token < num_vis
        gather_back[token[is_vis]] = out_rows + (local_sorted[pick] * queries + rank_sorted[pick])[is_vis]
        out_rows += n_groups * queries
    src = torch.cat(srcs)
    src_inverse = inverse_index(src, num_tokens + 1, src != empty_row)
    back_inverse = inverse_index(gather_back, out_rows)
    return WindowPlan(window_tokens, num_tokens - num_vis, buckets, src, src_inverse, gather_back, back_inverse)


def _drop_path(module: nn.Module, x: torch.Tensor, batch_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """MONAI's per-sample DropPath for packed tokens ``(T, C)``."""
    prob = float(getattr(module, "drop_prob", 0.0))
    if not module.training or prob == 0.0:
        return x
    keep = x.new_empty(batch_size).bernoulli_(1.0 - prob)
    if prob < 1.0 and getattr(module, "scale_by_keep", True):
        keep = keep / (1.0 - prob)
    return x * keep[batch_index, None]


def attend(q, k, v, bias, scale: float, drop: float = 0.0, fused: bool | None = None) -> torch.Tensor:
    """Softmax attention: queries ``(..., Lq, d)``, keys/values ``(..., L, d)``, additive
    ``bias`` broadcastable to ``(..., Lq, L)``. ``fused`` (default: on CUDA) uses PyTorch's
    scaled_dot_product_attention kernels."""
    if q.is_cuda if fused is None else fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=drop, scale=scale)
    # MONAI's own arithmetic (scale q, add bias, softmax); on CPU this also avoids the
    # extra passes SDPA's math kernel makes to guard against fully masked rows
    attn = torch.matmul(q * scale, k.transpose(-2, -1))
    attn.add_(bias)
    attn = torch.softmax(attn, dim=-1)
    if drop > 0.0:
        attn = F.dropout(attn, drop)
    return torch.matmul(attn.to(v.dtype), v)


def window_attention(attn: nn.Module, x: torch.Tensor, plan: WindowPlan) -> torch.Tensor:
    """MONAI ``WindowAttention`` on packed visible tokens ``(T, C)`` -> ``(T, C)``."""
    channels = x.shape[1]
    heads = attn.num_heads
    qkv = attn.qkv(x)
    # padding tokens are zeros after norm1, so their qkv is the bias; the last row fills
    # unused slots (finite values, masked out as keys, their outputs never read)
    fill = attn.qkv.bias if attn.qkv.bias is not None else qkv.new_zeros(3 * channels)
    qkv = torch.cat([qkv, fill.to(qkv.dtype).expand(plan.num_pad + 1, -1)])

    n = plan.window_tokens
    # same slicing as MONAI: index[:n, :n], also when the window was clamped to the grid
    index = attn.relative_position_index[:n, :n].reshape(-1)
    full = attn.relative_position_bias_table[index].view(n, n, heads).permute(2, 0, 1)  # (h, n, n)
    extended = None
    drop = attn.attn_drop.p if attn.training else 0.0
    packed = gather_rows(qkv, plan.src, plan.src_inverse)  # (S, 3C)
    outs, offset = [], 0
    for bucket in plan.buckets:
        groups, length, queries = bucket.groups, bucket.length, bucket.queries
        rows = packed[offset : offset + groups * length].view(groups, length, 3, heads, -1)
        offset += groups * length
        # heads first, so the gathered bias (h, groups, Lq, L) needs no transpose; padding
        # tokens only serve as keys, so queries stop after the visible slots
        q = rows[:, :queries, 0].permute(2, 0, 1, 3)
        k, v = rows[:, :, 1:].permute(2, 3, 0, 1, 4)
        if bucket.rel is None:
            bias = full[:, None]
        else:
            if extended is None:
                # row/column n stands for an unused slot: -inf as a key, 0 as a query
                extended = F.pad(full, (0, 1, 0, 1))
                extended[:, :n, n] = float("-inf")
                extended = extended.reshape(heads, -1)
            pair = bucket.rel[:, :queries, None] * (n + 1) + bucket.rel[:, None, :]
            bias = extended.index_select(1, pair.reshape(-1)).view(heads, groups, queries, length)
        out = attend(q, k, v, bias, attn.scale, drop)  # (h, groups, Lq, d)
        outs.append(out.permute(1, 2, 0, 3).reshape(groups * queries, channels))
    out = gather_rows(torch.cat(outs), plan.gather_back, plan.back_inverse)
    return attn.proj_drop(attn.proj(out))


def swin_block(
    block: nn.Module, x: torch.Tensor, plan: WindowPlan, batch_index: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """MONAI ``SwinTransformerBlock`` on packed visible tokens ``(T, C)``."""

    def part1(t):
        return window_attention(block.attn, block.norm1(t), plan)

    def part2(t):
        return block.mlp(block.norm2(t))

    if block.use_checkpoint and torch.is_grad_enabled():
        y = torch.utils.checkpoint.checkpoint(part1, x, use_reentrant=False)
    else:
        y = part1(x)
    x = x + _drop_path(block.drop_path, y, batch_index, batch_size)
    if block.use_checkpoint and torch.is_grad_enabled():
        y = torch.utils.checkpoint.checkpoint(part2, x, use_reentrant=False)
    else:
        y = part2(x)
    return x + _drop_path(block.drop_path, y, batch_index, batch_size)


def patch_merge(downsample: nn.Module, x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Patch merging of Morton-ordered tokens ``(T, C)`` -> ``(T / 2**n, 2C)``."""
    children = len(order)
    index = torch.as_tensor(order, device=x.device)
    x = gather_rows(x.view(-1, children, x.shape[-1]), index, torch.argsort(index), dim=1)
    return downsample.reduction(downsample.norm(x.reshape(-1, children * x.shape[-1])))
