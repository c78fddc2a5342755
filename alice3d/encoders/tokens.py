"""Token encoders: ViT, Swin and nnFormer behind the one interface the pretraining methods use.

    num_tokens, grid        L mask units and their grid (row-major token order)
    patch_size              voxels per axis of one mask / reconstruction unit (tuple)
    patch_dim               values per unit of `patchify(x, patch_size)`: prod(patch_size) * in_channels,
                            the width of a pixel head (nnFormer's unit is anisotropic, e.g. 32x32x16)
    hidden_size             C of the output tokens
    embed_dim               width of the stem output, where a dense mask token is inserted
    has_mask_token          the encoder owns a learned mask token (nnFormer): encode_dense
                            may then be given `token=None`
    img_size, in_channels   the crop the encoder is built for
    encode_visible(x, m)    (B, C_in, *img_size), MaskInfo -> (B, L_keep, C) in ids_keep order
    encode_dense(x, mask, token)  masked units replaced by `token (1, 1, embed_dim)` at the stem,
                            every unit encoded -> (B, L, C) (SimMIM / C-MAE style)
    encode_full(x)          (B, C_in, *img_size) -> (B, L, C)
    net                     the raw encoder; its state dict is what goes into encoder.pt
    metadata()              the raw encoder's metadata ("kind": "vit" / "swin" / "nnformer")

Unit per encoder: ViT one patch (`patch_size`), Swin one coarsest-stage token (`unit_size`,
32 voxels per axis by default), nnFormer one last-stage token (`total_stride`). The mask
token of `encode_dense` belongs to the method, not the encoder (except nnFormer's, which
is part of its own state dict), so exported weights keep exactly the MONAI layout.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn as nn

from alice3d.core.masking import MaskInfo, gather_tokens
from alice3d.encoders.nnformer import NNFormerEncoder
from alice3d.encoders.swin import NUM_STAGES, SwinEncoder
from alice3d.encoders.vit import ViTEncoder

__all__ = ["TokenEncoder", "ViTTokens", "SwinTokens", "NNFormerTokens", "to_tokens"]


class TokenEncoder(Protocol):
    """What every pretraining method may use of its encoder (see the module docstring)."""

    img_size: tuple[int, ...]
    in_channels: int
    patch_size: tuple[int, ...]
    grid: tuple[int, ...]
    num_tokens: int
    hidden_size: int
    embed_dim: int
    has_mask_token: bool
    patch_dim: int

    @property
    def net(self) -> nn.Module: ...

    def encode_visible(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor: ...

    def encode_dense(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None) -> torch.Tensor: ...

    def encode_full(self, x: torch.Tensor) -> torch.Tensor: ...

    def metadata(self) -> dict[str, Any]: ...


def to_tokens(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, L, C), row-major."""
    return feature.flatten(2).transpose(1, 2)


def _upsample_mask(mask: torch.Tensor, grid: tuple[int, ...], fine_grid: tuple[int, ...]) -> torch.Tensor:
    """(B, L) unit mask on `grid` -> (B, *fine_grid) bool, each unit covering fine/grid cells per axis."""
    m = mask.reshape(mask.shape[0], *grid)
    for axis, (f, g) in enumerate(zip(fine_grid, grid)):
        m = m.repeat_interleave(f // g, dim=axis + 1)
    return m


class _PatchDim:
    @property
    def patch_dim(self) -> int:
        return math.prod(self.patch_size) * self.in_channels


class ViTTokens(_PatchDim, ViTEncoder):
    """The ViT itself plus the token interface: no wrapper, so parameter names, checkpoints
    and forward calls stay exactly those of `ViTEncoder`."""

    has_mask_token = False

    @property
    def net(self) -> ViTEncoder:
        return self

    @property
    def embed_dim(self) -> int:
        return self.hidden_size

    def encode_visible(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        return self(x, ids_keep=masking.ids_keep)

    def encode_dense(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None) -> torch.Tensor:
        return self(x, mask=mask, mask_token=mask_token)

    def encode_full(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


class SwinTokens(_PatchDim, nn.Module):
    """`SwinEncoder` (as `net`) on mask units of `unit_size` voxels; tokens are its last stage."""

    has_mask_token = False

    def __init__(self, net: SwinEncoder, img_size: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.img_size = tuple(int(s) for s in img_size)
        self.in_channels = int(net.config["in_channels"])
        self.patch_size = tuple(net.unit_size)
        self.grid = net.unit_grid(self.img_size)
        self.num_tokens = math.prod(self.grid)
        self.hidden_size = int(net.embed_dim * 2**NUM_STAGES)
        self.embed_dim = int(net.embed_dim)

    def encode_visible(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        # forward_masked returns the visible units in ascending row-major order, as MaskInfo.ids_keep.
        unit_mask = masking.mask.reshape(x.shape[0], *self.grid)
        return self.net.forward_masked(x, unit_mask).last

    def encode_dense(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None) -> torch.Tensor:
        if mask_token is None:
            raise ValueError("SwinTokens.encode_dense: Swin has no mask token of its own; pass one (1, 1, embed_dim)")
        return to_tokens(self.net.forward_dense_masked(x, mask.reshape(x.shape[0], *self.grid), mask_token)[-1])

    def encode_full(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.net(x, normalize=True)[-1])

    def metadata(self) -> dict[str, Any]:
        return self.net.metadata()


class NNFormerTokens(_PatchDim, nn.Module):
    """`NNFormerEncoder` (as `net`) on mask units of `total_stride` voxels (one last-stage token).

    The masked view runs densely with masked units replaced by a mask token on the stem grid
    (shifted windows and strided convs need the full grid); `encode_visible` uses the encoder's
    own learned mask token and then gathers the visible last-stage tokens.
    """

    has_mask_token = True

    def __init__(self, net: NNFormerEncoder, img_size: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.img_size = tuple(int(s) for s in img_size)
        self.in_channels = net.in_channels
        self.patch_size = tuple(net.total_stride)
        self.stem_grid = net.grid_size(self.img_size)
        self.grid = tuple(s // u for s, u in zip(self.img_size, self.patch_size))
        self.num_tokens = math.prod(self.grid)
        self.hidden_size = net.feature_channels[-1]
        self.embed_dim = net.embed_dim
        # Only the last stage's output is used; the LayerNorms of the earlier skips would never
        # get a gradient (DDP waits for one), so they stay at their initial values.
        for norm in net.norms[:-1]:
            norm.requires_grad_(False)

    def stem_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) unit mask -> (B, *stem_grid) bool, each unit covering total_stride / patch_stride cells."""
        return _upsample_mask(mask, self.grid, self.stem_grid)

    def encode_visible(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        tokens = to_tokens(self.net(x, mask=self.stem_mask(masking.mask))[-1])
        return gather_tokens(tokens, masking.ids_keep)

    def encode_dense(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None) -> torch.Tensor:
        """`mask_token=None`: the encoder's own learned token."""
        return to_tokens(self.net(x, mask=self.stem_mask(mask), mask_token=mask_token)[-1])

    def encode_full(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.net(x)[-1])

    def metadata(self) -> dict[str, Any]:
        return self.net.metadata()
