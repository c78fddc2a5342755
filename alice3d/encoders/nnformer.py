"""nnFormer (Zhou et al., "nnFormer: Volumetric Medical Image Segmentation via a 3D
Transformer") for any input size divisible by the network's total stride.

Standalone on purpose: this file imports only torch and the standard library, so it can be
copied verbatim into a MONAI bundle that runs without alice3d installed.

Layout (Synapse/BTCV configuration, tensors ``(B, C, X, Y, Z)`` with Z the slice axis):

- stem: two conv pairs with total stride ``patch_stride`` (default ``(4, 4, 2)``: in-plane 4,
  through-plane 2), GELU + LayerNorm between convs, then a LayerNorm ("patch norm");
- encoder: ``len(depths)`` stages of local-volume multi-head self-attention (LV-MSA, windowed
  attention with a relative position bias; odd blocks use shifted windows), LayerNorm'd stage
  outputs are the skips, strided 3x3x3 convs (stride 2) between stages;
- decoder: one stage per skip but the deepest, each starting with a transposed-conv patch
  expanding, then a *skip-attention* block (queries = up-sampled decoder features, keys and
  values = a linear projection of the encoder skip, residual = their sum), then (shifted)
  self-attention blocks;
- heads: a transposed conv with kernel = stride = ``patch_stride`` per decoder stage, so the
  deep-supervision outputs are at full, 1/2, 1/4, ... resolution.

Sizes: the input must be divisible by ``total_stride = patch_stride * 2 ** (len(depths) - 1)``
per axis (a ``ValueError`` names the size and the divisor otherwise). Window partitions are
derived from the actual feature size at run time, per axis: a window larger than or equal to
the feature map along an axis is clamped to the map (and that axis is not shifted); when the
map is larger than the window but not a multiple of it, the map is zero-padded at the end to a
multiple and the padded positions are masked out as keys, so valid positions never attend to
padding and the result does not depend on it. The relative position bias table is sized by the
configured window, and a clamped window uses the matching sub-range of it, so the parameters
do not depend on the input size.

Differences from the public code, all deliberate: per-axis strides and windows; the relative
position index is the standard collision-free one (the public code mixes offsets); padding is
masked; windows are clamped per axis instead of to the smallest axis; decoder blocks after
the skip-attention block alternate shifted/unshifted windows (the public code shifts them all,
which is the same for the default decoder depth 2).

TorchScript: ``torch.jit.trace`` works on the full network in eval mode, where the output is
the full-resolution logits tensor only. A trace is specialised to the traced input size (the
window layout is computed from it), like any traced Swin-style network; trace with the
sliding-window ROI size.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "NNFormer",
    "NNFormerEncoder",
    "build_nnformer",
    "build_nnformer_encoder",
    "nnformer_configs",
    "window_partition",
    "window_reverse",
]

IntOrSeq = int | Sequence[int]

# Presets. "nnformer" is the paper's Synapse/BTCV configuration.
nnformer_configs: dict[str, dict[str, Any]] = {
    "nnformer": {
        "embed_dim": 192,
        "depths": (2, 2, 2, 2),
        "num_heads": (6, 12, 24, 48),
        "window_sizes": (4, 4, 8, 4),
        "patch_stride": (4, 4, 2),
    },
    "nnformer_small": {
        "embed_dim": 96,
        "depths": (2, 2, 2, 2),
        "num_heads": (3, 6, 12, 24),
        "window_sizes": (4, 4, 8, 4),
        "patch_stride": (4, 4, 2),
    },
    "nnformer_tiny": {
        "embed_dim": 16,
        "depths": (2, 2, 2, 2),
        "num_heads": (1, 2, 4, 8),
        "window_sizes": (4, 4, 8, 4),
        "patch_stride": (4, 4, 2),
        "drop_path_rate": 0.0,
    },
}

_MASKED = -100.0  # additive attention mask value (as in Swin); finite so fp16 stays finite


# ----------------------------------------------------------------------------- helpers


def _as_tuple(value: IntOrSeq, n: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        out = (value,) * n
    else:
        out = tuple(int(v) for v in value)
    if len(out) != n or any(v < 1 for v in out):
        raise ValueError(f"{name} must be a positive int or {n} positive ints, got {value!r}")
    return out


def _conv_cls(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    table = {
        (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
        (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
    }
    if (spatial_dims, transposed) not in table:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
    return table[(spatial_dims, transposed)]


def _static_shape(t: torch.Tensor) -> tuple[int, ...]:
    """``t.shape`` as Python ints. A trace is meant to fix the window layout to the traced
    size, so the tracer's warning about turning sizes into constants is silenced."""
    if not torch.jit.is_tracing():
        return tuple(t.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        return tuple(int(s) for s in t.shape)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, *S, C)."""
    return x.movedim(1, -1)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, *S, C) -> (B, C, *S)."""
    return x.movedim(-1, 1)


def _linspace(end: float, n: int) -> list[float]:
    """n evenly spaced stochastic-depth rates from 0 to end (plain floats, any device)."""
    return [end * i / (n - 1) for i in range(n)] if n > 1 else [0.0] * n


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first tensor (B, C, *S)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_first(super().forward(_channels_last(x)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# ------------------------------------------------------------------- window primitives


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, *S, C) with S divisible by window -> (B * nW, N, C), N = prod(window).

    Windows are ordered batch-major, then row-major over the window grid.
    """
    nd = len(window)
    b, c = x.shape[0], x.shape[-1]
    shape = [b]
    for size, w in zip(x.shape[1:-1], window):
        shape += [size // w, w]
    x = x.reshape(*shape, c)
    perm = [0] + [1 + 2 * a for a in range(nd)] + [2 + 2 * a for a in range(nd)] + [2 * nd + 1]
    return x.permute(perm).reshape(-1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * nW, N, C) -> (B, *spatial, C)."""
    nd = len(window)
    counts = [s // w for s, w in zip(spatial, window)]
    c = windows.shape[-1]
    x = windows.reshape(-1, *counts, *window, c)
    perm = [0]
    for a in range(nd):
        perm += [1 + a, 1 + nd + a]
    perm.append(2 * nd + 1)
    return x.permute(perm).reshape(-1, *spatial, c)


def effective_window(
    spatial: Sequence[int], window: Sequence[int], shifted: bool
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Window and shift actually used on a feature map of size ``spatial``.

    Along an axis where the map is not larger than the window, the window is clamped to the
    map (one window covers the axis) and the axis is not shifted.
    """
    eff = tuple(min(int(w), int(s)) for w, s in zip(window, spatial))
    shift = tuple(
        (w // 2) if (shifted and int(s) > w) else 0 for w, s in zip(eff, spatial)
    )
    return eff, shift


def window_attention_mask(
    ref: torch.Tensor,
    spatial: Sequence[int],
    padded: Sequence[int],
    window: Sequence[int],
    shift: Sequence[int],
) -> torch.Tensor | None:
    """Additive mask (nW, N, N) for windows of a padded, cyclically shifted map, or None.

    Tokens may attend to each other only if they were contiguous before the roll (Swin's
    region ids) and neither is padding. ``ref`` only supplies the device, through
    ``new_zeros``, so a traced graph follows the input's device.
    """
    nd = len(spatial)
    has_pad = any(p != s for p, s in zip(padded, spatial))
    if not has_pad and not any(shift):
        return None
    labels = ref.new_zeros((1, *padded, 1), dtype=torch.float32)
    per_axis = []
    for size, w, s in zip(padded, window, shift):
        if s > 0:
            per_axis.append((slice(0, size - w), slice(size - w, size - s), slice(size - s, size)))
        else:
            per_axis.append((slice(0, size),))
    for region, combo in enumerate(itertools.product(*per_axis)):
        labels[(slice(None), *combo, slice(None))] = float(region)
    # After torch.roll(-s), original positions >= size sit at [size - s, padded - s).
    for a, (size, p, s) in enumerate(zip(spatial, padded, shift)):
        if p > size:
            index = [slice(None)] * (nd + 2)
            index[a + 1] = slice(size - s, p - s)
            labels[tuple(index)] = -1.0
    win = window_partition(labels, window).squeeze(-1)  # (nW, N)
    different = win.unsqueeze(1) != win.unsqueeze(2)
    return torch.zeros_like(different, dtype=torch.float32).masked_fill(different, _MASKED)


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """(N, N) long: index into a table of prod(2w - 1) relative offsets, N = prod(window)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij"))
    coords = coords.flatten(1)  # (nd, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (nd, N, N)
    index = torch.zeros(rel.shape[1:], dtype=torch.long)
    for a, w in enumerate(window):
        stride = math.prod(2 * v - 1 for v in window[a + 1:])
        index += (rel[a] + w - 1) * stride
    return index


# ------------------------------------------------------------------------- attention


class WindowAttention(nn.Module):
    """Multi-head attention inside windows with a learned relative position bias.

    Self-attention projects q, k, v from the input windows. With ``cross=True`` (skip
    attention) the queries are the input windows themselves and k, v are projected from
    ``context`` windows, as in the paper.
    """

    def __init__(
        self,
        dim: int,
        window: Sequence[int],
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        cross: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window = tuple(window)
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.cross = cross
        self.attn_drop = float(attn_drop)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros(math.prod(2 * w - 1 for w in self.window), num_heads)
        )
        # Derived from the window: not saved, but moved with the module.
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window), persistent=False
        )
        if cross:
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self, window: Sequence[int]) -> torch.Tensor:
        """(heads, N, N) for a window no larger than the configured one (per axis)."""
        n = math.prod(window)
        index = self.relative_position_index.reshape(*self.window, *self.window)
        index = index[tuple(slice(0, w) for w in window) * 2].reshape(n * n)
        bias = self.relative_position_bias_table[index].reshape(n, n, self.num_heads)
        return bias.permute(2, 0, 1)

    def forward(
        self,
        x: torch.Tensor,
        window: Sequence[int],
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x, context: (B * nW, N, C); mask: (nW, N, N) additive or None -> (B * nW, N, C)."""
        bw, n, c = x.shape
        h = self.num_heads
        if self.cross:
            if context is None:
                raise ValueError("skip attention needs the encoder skip as context")
            k, v = self.kv(context).reshape(bw, n, 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
            # LayerNorm output stays fp32 under autocast while k, v come out of a Linear.
            q = x.reshape(bw, n, h, c // h).transpose(1, 2).to(k.dtype)
        else:
            q, k, v = self.qkv(x).reshape(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = self.position_bias(window).unsqueeze(0)  # (1, h, N, N)
        if mask is not None:
            # (B, nW, h, N, d) so the per-window mask broadcasts over the batch.
            nw = mask.shape[0]
            q, k, v = (t.reshape(-1, nw, h, n, c // h) for t in (q, k, v))
            attn_mask = attn_mask + mask.unsqueeze(1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask.to(q.dtype),
            dropout_p=self.attn_drop if self.training else 0.0,
            scale=self.scale,
        )
        out = out.reshape(bw, h, n, c // h).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class LocalTransformerBlock(nn.Module):
    """Pre-norm transformer block with (shifted) local-volume attention, channels-last.

    ``skip_attention=True`` makes the decoder's first block: residual = x + skip, queries =
    LN(x) (the up-sampled features), keys/values projected from LN(skip); never shifted.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: Sequence[int],
        shifted: bool = False,
        skip_attention: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window = tuple(window)
        self.shifted = bool(shifted) and not skip_attention
        self.skip_attention = skip_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, self.window, num_heads, qkv_bias, qk_scale, attn_drop, drop, cross=skip_attention
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _attend(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """x, context: (B, *S, C) normalised -> attention output (B, *S, C)."""
        nd = x.ndim - 2
        spatial = _static_shape(x)[1:-1]
        window, shift = effective_window(spatial, self.window, self.shifted)
        padded = tuple(math.ceil(s / w) * w for s, w in zip(spatial, window))
        pad: list[int] = [0, 0]
        for s, p in zip(reversed(spatial), reversed(padded)):
            pad += [0, p - s]
        dims = tuple(range(1, nd + 1))

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            if any(pad):
                t = F.pad(t, pad)
            if any(shift):
                t = torch.roll(t, shifts=[-s for s in shift], dims=dims)
            return window_partition(t, window)

        mask = window_attention_mask(x, spatial, padded, window, shift)
        out = self.attn(to_windows(x), window, mask, None if context is None else to_windows(context))
        out = window_reverse(out, window, padded)
        if any(shift):
            out = torch.roll(out, shifts=list(shift), dims=dims)
        if any(pad):
            out = out[(slice(None), *(slice(0, s) for s in spatial), slice(None))]
        return out

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """x (and skip for skip attention): (B, *S, C) -> (B, *S, C)."""
        if self.skip_attention:
            if skip is None:
                raise ValueError("the skip-attention block needs the encoder skip")
            shortcut = x + skip
            h = self._attend(self.norm1(x), self.norm1(skip))
        else:
            shortcut = x
            h = self._attend(self.norm1(x), None)
        x = shortcut + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, skip: torch.Tensor | None, use_checkpoint: bool
) -> torch.Tensor:
    for i, block in enumerate(blocks):
        s = skip if i == 0 else None
        if use_checkpoint and torch.is_grad_enabled() and not torch.jit.is_tracing():
            x = checkpoint(block, x, s, use_reentrant=False)
        else:
            x = block(x, s)
    return x


# --------------------------------------------------------------------------- encoder


class StemStage(nn.Module):
    """conv(stride) -> GELU -> LN -> conv(3, stride 1) [-> GELU -> LN unless last]."""

    def __init__(self, in_ch: int, out_ch: int, stride: Sequence[int], spatial_dims: int, last: bool) -> None:
        super().__init__()
        conv = _conv_cls(spatial_dims)
        # kernel 3 / padding 1 keeps size // stride for strides 1 and 2; larger strides use
        # non-overlapping kernels (kernel = stride, no padding) for the same output size.
        kernel = tuple(3 if s <= 2 else s for s in stride)
        padding = tuple(1 if s <= 2 else 0 for s in stride)
        self.conv1 = conv(in_ch, out_ch, kernel, tuple(stride), padding)
        self.conv2 = conv(out_ch, out_ch, 3, 1, 1)
        self.act = nn.GELU()
        self.norm1 = ChannelLayerNorm(out_ch)
        self.norm2 = None if last else ChannelLayerNorm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.norm1(self.act(self.conv1(x))))
        if self.norm2 is not None:
            x = self.norm2(self.act(x))
        return x


class PatchEmbedding(nn.Module):
    """Two-stage conv stem (B, C_in, *S) -> (B, D, *S / patch_stride), LayerNorm'd."""

    def __init__(self, in_channels: int, embed_dim: int, patch_stride: Sequence[int], spatial_dims: int) -> None:
        super().__init__()
        # Split each axis stride p into p1 * p2 with p2 = 2 when p is even and >= 4
        # (the public (2, 4, 4) gives (2, 2, 2) then (1, 2, 2)).
        second = tuple(2 if (p >= 4 and p % 2 == 0) else 1 for p in patch_stride)
        first = tuple(p // s for p, s in zip(patch_stride, second))
        self.proj1 = StemStage(in_channels, embed_dim // 2, first, spatial_dims, last=False)
        self.proj2 = StemStage(embed_dim // 2, embed_dim, second, spatial_dims, last=True)
        self.norm = ChannelLayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj2(self.proj1(x)))


class Downsample(nn.Module):
    """GELU -> LN -> conv(3, stride 2): (B, *S, C) -> (B, *S / 2, C_out), channels-last."""

    def __init__(self, dim: int, out_dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduction = _conv_cls(spatial_dims)(dim, out_dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(x))
        return _channels_last(self.reduction(_channels_first(x)))


class EncoderStage(nn.Module):
    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: Sequence[int],
        drop_paths: Sequence[float],
        out_dim: int | None,
        spatial_dims: int,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            LocalTransformerBlock(dim, num_heads, window, shifted=(i % 2 == 1), drop_path=drop_paths[i], **block_kwargs)
            for i in range(depth)
        )
        self.downsample = None if out_dim is None else Downsample(dim, out_dim, spatial_dims)


def _window_list(window_sizes: Sequence[IntOrSeq], n: int, nd: int, name: str) -> list[tuple[int, ...]]:
    if isinstance(window_sizes, int) or len(window_sizes) != n:
        raise ValueError(f"{name} must give one window per stage ({n}), got {window_sizes!r}")
    return [_as_tuple(w, nd, f"{name}[{i}]") for i, w in enumerate(window_sizes)]


class NNFormerEncoder(nn.Module):
    """Encoder half of nnFormer: stem, LV-MSA stages, strided-conv down-sampling.

    ``forward(x)`` with x (B, in_channels, *S), S divisible by ``total_stride``, returns the
    LayerNorm'd stage outputs ``[(B, embed_dim * 2**i, *S / (patch_stride * 2**i))]``.
    A bool ``mask`` on the stem-output grid, (B, *grid) or (B, L) with True = masked, replaces
    those stem outputs by the learned ``mask_token`` (shape (1, embed_dim, 1, ..., 1)).
    """

    def __init__(
        self,
        in_channels: int = 1,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_sizes: Sequence[IntOrSeq] = (4, 4, 8, 4),
        patch_stride: IntOrSeq = (4, 4, 2),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        nd = spatial_dims
        _conv_cls(nd)
        n = len(depths)
        if n < 1 or len(num_heads) != n:
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} must have the same length >= 1")
        if embed_dim % 2:
            raise ValueError(f"embed_dim must be even (the stem halves it), got {embed_dim}")
        self.spatial_dims = nd
        self.in_channels = int(in_channels)
        self.embed_dim = int(embed_dim)
        self.depths = tuple(int(d) for d in depths)
        self.num_heads = tuple(int(h) for h in num_heads)
        self.window_sizes = _window_list(window_sizes, n, nd, "window_sizes")
        self.patch_stride = _as_tuple(patch_stride, nd, "patch_stride")
        self.total_stride = tuple(p * 2 ** (n - 1) for p in self.patch_stride)
        self.mlp_ratio = float(mlp_ratio)
        self.qkv_bias = bool(qkv_bias)
        self.use_checkpoint = bool(use_checkpoint)
        self.feature_channels = [self.embed_dim * 2**i for i in range(n)]

        self.stem = PatchEmbedding(in_channels, embed_dim, self.patch_stride, nd)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim, *([1] * nd)))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = _linspace(drop_path_rate, sum(self.depths))
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate)
        self.stages = nn.ModuleList()
        for i, depth in enumerate(self.depths):
            self.stages.append(
                EncoderStage(
                    self.feature_channels[i],
                    depth,
                    self.num_heads[i],
                    self.window_sizes[i],
                    rates[sum(self.depths[:i]) : sum(self.depths[: i + 1])],
                    self.feature_channels[i + 1] if i < n - 1 else None,
                    nd,
                    **block_kwargs,
                )
            )
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.feature_channels)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def grid_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Stem-output grid for an input of spatial size ``spatial`` (checked)."""
        self._check_spatial(tuple(int(s) for s in spatial))
        return tuple(int(s) // p for s, p in zip(spatial, self.patch_stride))

    def _check_spatial(self, spatial: tuple[int, ...]) -> None:
        if len(spatial) != self.spatial_dims:
            raise ValueError(
                f"NNFormerEncoder expects {self.spatial_dims} spatial dims (B, C, *S), got spatial size {spatial}"
            )
        bad = [a for a, (s, t) in enumerate(zip(spatial, self.total_stride)) if s % t]
        if bad:
            raise ValueError(
                f"nnFormer input spatial size {spatial} is not divisible by the total stride "
                f"{self.total_stride} (patch stride {self.patch_stride} x 2**{len(self.depths) - 1}) "
                f"along axis {bad}; pad or crop each axis to a multiple of {self.total_stride} "
                f"(e.g. monai.transforms.DivisiblePad(k={self.total_stride}))"
            )

    def embed(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stem: (B, C_in, *S) -> (B, D, *grid), masked positions replaced by the mask token.

        ``mask_token`` (D values) overrides ``self.mask_token`` for this call.
        """
        shape = _static_shape(x)
        if len(shape) != self.spatial_dims + 2 or shape[1] != self.in_channels:
            raise ValueError(
                f"NNFormerEncoder expects input (B, {self.in_channels}, *S) with {self.spatial_dims} "
                f"spatial dims, got shape {shape}"
            )
        self._check_spatial(shape[2:])
        x = self.stem(x)
        if mask is None:
            return x
        b, grid = shape[0], tuple(s // p for s, p in zip(shape[2:], self.patch_stride))
        if mask.dtype != torch.bool or tuple(mask.shape) not in ((b, *grid), (b, math.prod(grid))):
            raise ValueError(
                f"mask must be bool of shape (B, *grid) = {(b, *grid)} or (B, L) = {(b, math.prod(grid))} "
                f"on the stem-output grid, got {mask.dtype} {tuple(mask.shape)}"
            )
        token = self.mask_token if mask_token is None else mask_token.reshape(1, -1, *([1] * self.spatial_dims))
        return torch.where(mask.reshape(b, 1, *grid), token.to(x.dtype), x)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """(B, C_in, *S) -> [(B, C_i, *grid_i)] for every stage i (the skips)."""
        x = self.pos_drop(_channels_last(self.embed(x, mask, mask_token)))
        skips = []
        for stage, norm in zip(self.stages, self.norms):
            x = _run_blocks(stage.blocks, x, None, self.use_checkpoint and self.training)
            skips.append(_channels_first(norm(x)))
            if stage.downsample is not None:
                x = stage.downsample(x)
        return skips

    def metadata(self) -> dict[str, Any]:
        """JSON-friendly description; its constructor keys rebuild the same encoder."""
        return {
            "kind": "nnformer",
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "embed_dim": self.embed_dim,
            "depths": list(self.depths),
            "num_heads": list(self.num_heads),
            "window_sizes": [list(w) for w in self.window_sizes],
            "patch_stride": list(self.patch_stride),
            "total_stride": list(self.total_stride),
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
            "feature_channels": list(self.feature_channels),
        }

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], **overrides: Any) -> "NNFormerEncoder":
        return cls(**_constructor_kwargs(meta, overrides))


_ENCODER_KEYS = (
    "spatial_dims", "in_channels", "embed_dim", "depths", "num_heads", "window_sizes",
    "patch_stride", "mlp_ratio", "qkv_bias",
)


def _constructor_kwargs(meta: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    if meta.get("kind") != "nnformer":
        raise ValueError(f"metadata key 'kind' must be 'nnformer', got {meta.get('kind')!r}")
    kwargs = {k: meta[k] for k in _ENCODER_KEYS if k in meta}
    kwargs.update(overrides)
    return kwargs


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


# --------------------------------------------------------------------------- decoder


class PatchExpanding(nn.Module):
    """LN -> transposed conv (2, stride 2): (B, *S, C_in) -> (B, *2S, C_out), channels-last."""

    def __init__(self, dim: int, out_dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = _conv_cls(spatial_dims, transposed=True)(dim, out_dim, 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_last(self.up(_channels_first(self.norm(x))))


class DecoderStage(nn.Module):
    """Patch expanding, a skip-attention block, then (alternately shifted) LV-MSA blocks."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window: Sequence[int],
        drop_paths: Sequence[float],
        spatial_dims: int,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        self.upsample = PatchExpanding(in_dim, dim, spatial_dims)
        self.blocks = nn.ModuleList(
            LocalTransformerBlock(
                dim, num_heads, window, shifted=(i % 2 == 1), skip_attention=(i == 0),
                drop_path=drop_paths[i], **block_kwargs,
            )
            for i in range(depth)
        )


class NNFormer(nn.Module):
    """nnFormer segmentation network: ``NNFormerEncoder`` + skip-attention decoder + heads.

    forward: (B, in_channels, *S) -> logits (B, out_channels, *S) in eval mode (or without
    deep supervision); in training mode with deep supervision a list
    ``[full, 1/2, 1/4, ...]`` of logits, one per decoder stage, highest resolution first.
    Decoder settings default to the encoder's mirrored (deepest stage left out).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_sizes: Sequence[IntOrSeq] = (4, 4, 8, 4),
        patch_stride: IntOrSeq = (4, 4, 2),
        decoder_depths: Sequence[int] | None = None,
        decoder_num_heads: Sequence[int] | None = None,
        decoder_window_sizes: Sequence[IntOrSeq] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        deep_supervision: bool = True,
        use_checkpoint: bool = False,
        spatial_dims: int = 3,
    ) -> None:
        super().__init__()
        self.encoder = NNFormerEncoder(
            in_channels, embed_dim, depths, num_heads, window_sizes, patch_stride, mlp_ratio,
            qkv_bias, qk_scale, drop_rate, attn_drop_rate, drop_path_rate, use_checkpoint, spatial_dims,
        )
        # Segmentation never masks; a frozen token keeps encoder checkpoints loading strictly
        # and keeps DDP from waiting for a gradient that never comes.
        self.encoder.mask_token.requires_grad_(False)
        enc = self.encoder
        n_dec = len(enc.depths) - 1
        if n_dec < 1:
            raise ValueError(f"NNFormer needs at least 2 encoder stages, got depths {tuple(depths)}")
        dec_depths = tuple(decoder_depths) if decoder_depths is not None else enc.depths[:-1][::-1]
        dec_heads = tuple(decoder_num_heads) if decoder_num_heads is not None else enc.num_heads[:-1][::-1]
        dec_windows = (
            _window_list(decoder_window_sizes, n_dec, spatial_dims, "decoder_window_sizes")
            if decoder_window_sizes is not None
            else enc.window_sizes[:-1][::-1]
        )
        if len(dec_depths) != n_dec or len(dec_heads) != n_dec or min(dec_depths) < 1:
            raise ValueError(
                f"decoder_depths {dec_depths} and decoder_num_heads {dec_heads} need {n_dec} entries "
                f"(encoder stages - 1), depths >= 1"
            )
        self.out_channels = int(out_channels)
        self.deep_supervision = bool(deep_supervision)
        self.use_checkpoint = bool(use_checkpoint)
        rates = _linspace(drop_path_rate, sum(dec_depths))
        block_kwargs = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate)
        chans = enc.feature_channels
        self.decoder = nn.ModuleList()
        for j in range(n_dec):  # deepest first
            self.decoder.append(
                DecoderStage(
                    chans[n_dec - j],
                    chans[n_dec - 1 - j],
                    dec_depths[j],
                    dec_heads[j],
                    dec_windows[j],
                    rates[sum(dec_depths[:j]) : sum(dec_depths[: j + 1])],
                    spatial_dims,
                    **block_kwargs,
                )
            )
        up = _conv_cls(spatial_dims, transposed=True)
        n_heads = n_dec if self.deep_supervision else 1
        # heads[k] reads the decoder output 2**k times coarser than the stem grid.
        self.heads = nn.ModuleList(up(chans[k], out_channels, enc.patch_stride, enc.patch_stride) for k in range(n_heads))
        self.decoder.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = [_channels_last(s) for s in self.encoder(x)]
        y = skips[-1]
        outs = []
        for j, stage in enumerate(self.decoder):
            skip = skips[-2 - j]
            y = _run_blocks(stage.blocks, stage.upsample(y), skip, self.use_checkpoint and self.training)
            outs.append(y)
        if self.deep_supervision and self.training:
            return [head(_channels_first(outs[-1 - k])) for k, head in enumerate(self.heads)]
        return self.heads[0](_channels_first(outs[-1]))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], out_channels: int, **overrides: Any) -> "NNFormer":
        """Network whose ``.encoder`` matches an encoder described by ``metadata()``."""
        return cls(out_channels=out_channels, **_constructor_kwargs(meta, overrides))


# --------------------------------------------------------------------------- builders


def _preset(name: str) -> dict[str, Any]:
    if name not in nnformer_configs:
        raise ValueError(f"unknown nnFormer preset {name!r}; expected one of {sorted(nnformer_configs)}")
    return dict(nnformer_configs[name])


def build_nnformer(name: str = "nnformer", in_channels: int = 1, out_channels: int = 14, **overrides: Any) -> NNFormer:
    """``NNFormer`` from a preset in ``nnformer_configs``; keyword overrides win."""
    kwargs = _preset(name)
    kwargs.update(overrides)
    return NNFormer(in_channels=in_channels, out_channels=out_channels, **kwargs)


def build_nnformer_encoder(name: str = "nnformer", in_channels: int = 1, **overrides: Any) -> NNFormerEncoder:
    """``NNFormerEncoder`` from a preset; its state dict loads strictly into the matching
    ``build_nnformer(name, ...).encoder``."""
    kwargs = _preset(name)
    kwargs.update(overrides)
    return NNFormerEncoder(in_channels=in_channels, **kwargs)
