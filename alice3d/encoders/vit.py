"""MONAI-compatible ViT encoder with a visible-token (MAE-style) forward.

The module is built from MONAI's own `PatchEmbeddingBlock` and `TransformerBlock` under the
attribute names `patch_embedding`, `blocks` and `norm`, so its state dict loads with
`strict=True` into `monai.networks.nets.ViT(..., classification=False)` and into
`monai.networks.nets.UNETR(...).vit` (UNETR fixes patch 16 and 12 layers).

The position embedding is the `patch_embedding.position_embeddings` parameter, initialised
from fixed sin-cos values and therefore always part of the state dict (trainable or frozen).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock
from torch.utils.checkpoint import checkpoint

from alice3d.core.masking import gather_tokens
from alice3d.core.patches import as_tuple, grid_size
from alice3d.core.pos_embed import sincos_pos_embed

__all__ = ["ViTEncoder", "vit_configs", "build_vit", "freeze_unused_cross_attn_norms"]

# Every preset keeps 12 layers so that it still loads into UNETR(...).vit.
vit_configs: dict[str, dict[str, int]] = {
    "vit_b": dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    "vit_s": dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    "vit_tiny": dict(hidden_size=96, mlp_dim=384, num_heads=4, num_layers=12),
}


class ViTEncoder(nn.Module):
    """ViT over `(B, C, *img_size)` inputs; tokens `(B, L, D)` with L = prod(grid).

    Args:
        img_size: spatial size the position embedding is built for (int or one per axis).
        patch_size: patch size (int or one per axis); must divide `img_size`.
        pos_embed_trainable: False freezes the sin-cos embedding (MAE); it is saved either way.
        use_flash_attention: fused `scaled_dot_product_attention` in every block (MONAI SABlock).
        grad_checkpointing: recompute block activations in the backward pass to save memory.
        cls_token: prepend a learnable `cls_token` (MONAI ViT's key name) without position.
    """

    def __init__(
        self,
        img_size: int | Sequence[int],
        patch_size: int | Sequence[int] = 16,
        in_channels: int = 1,
        spatial_dims: int = 3,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = 12,
        num_heads: int = 12,
        qkv_bias: bool = False,
        dropout_rate: float = 0.0,
        pos_embed_trainable: bool = True,
        use_flash_attention: bool = False,
        grad_checkpointing: bool = False,
        cls_token: bool = False,
        save_attn: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"ViTEncoder: spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.img_size = as_tuple(img_size, spatial_dims, "img_size")
        self.patch_size = as_tuple(patch_size, spatial_dims, "patch_size")
        self.grid = grid_size(self.img_size, self.patch_size)
        self.num_tokens = math.prod(self.grid)
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.mlp_dim = mlp_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.qkv_bias = qkv_bias
        self.grad_checkpointing = grad_checkpointing

        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=self.img_size,
            patch_size=self.patch_size,
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="none",
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        with torch.no_grad():
            self.patch_embedding.position_embeddings.copy_(sincos_pos_embed(self.grid, hidden_size)[None])
        self.patch_embedding.position_embeddings.requires_grad_(pos_embed_trainable)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                hidden_size,
                mlp_dim,
                num_heads,
                dropout_rate,
                qkv_bias=qkv_bias,
                save_attn=save_attn,
                use_flash_attention=use_flash_attention,
            )
            for _ in range(num_layers)
        )
        freeze_unused_cross_attn_norms(self.blocks)
        self.norm = nn.LayerNorm(hidden_size)
        if cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        else:
            self.cls_token = None

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, *self.img_size)
        if x.ndim != self.spatial_dims + 2 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"ViTEncoder: expected input (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}; "
                "the position embedding is built for img_size, crop or resize the input to it"
            )

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, *img_size)` -> patch projections without position `(B, L, D)`."""
        self._check_input(x)
        return self.patch_embedding.patch_embeddings(x).flatten(2).transpose(1, 2)

    def add_position(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, L, D)` grid-ordered tokens + position embedding (+ MONAI's embedding dropout)."""
        return self.patch_embedding.dropout(tokens + self.patch_embedding.position_embeddings)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, *img_size)` -> `(B, L, D)` patch tokens + position (MONAI PatchEmbeddingBlock)."""
        return self.add_position(self.patch_tokens(x))

    def forward(
        self,
        x: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode `x (B, C, *img_size)`; output after the final norm.

        ids_keep `(B, L_keep)`: encode only those tokens -> `(B, L_keep, D)` (MAE style).
        mask `(B, L)` bool + mask_token `(1, 1, D)`: masked patch projections are replaced by the
        mask token before the position embedding is added -> `(B, L, D)` (dense, SimMIM style).
        Neither: full forward `(B, L, D)`. With a cls token the outputs are `(B, 1 + ..., D)`.
        return_hidden: also return the per-block outputs (before the final norm), as MONAI ViT.
        """
        if ids_keep is not None and mask is not None:
            raise ValueError("ViTEncoder.forward: pass either ids_keep (visible-only) or mask (dense), not both")
        tokens = self.patch_tokens(x)
        if mask is not None:
            if mask_token is None:
                raise ValueError("ViTEncoder.forward: mask given without mask_token (expected (1, 1, D))")
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"ViTEncoder.forward: mask {tuple(mask.shape)} must be (B, L) = {tuple(tokens.shape[:2])}")
            tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype).expand_as(tokens), tokens)
        tokens = self.add_position(tokens)
        if ids_keep is not None:
            tokens = gather_tokens(tokens, ids_keep)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        hidden = []
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            tokens = checkpoint(blk, tokens, use_reentrant=False) if use_ckpt else blk(tokens)
            if return_hidden:
                hidden.append(tokens)
        out = self.norm(tokens)
        return (out, hidden) if return_hidden else out

    def metadata(self) -> dict[str, Any]:
        """What fine-tuning needs to rebuild a matching network (saved in encoder.pt)."""
        return {
            "kind": "vit",
            "spatial_dims": self.spatial_dims,
            "img_size": list(self.img_size),
            "patch_size": list(self.patch_size),
            "grid": list(self.grid),
            "in_channels": self.in_channels,
            "hidden_size": self.hidden_size,
            "mlp_dim": self.mlp_dim,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "qkv_bias": self.qkv_bias,
            "cls_token": self.cls_token is not None,
        }


def freeze_unused_cross_attn_norms(blocks: nn.ModuleList) -> None:
    """MONAI's TransformerBlock always builds `norm_cross_attn`, used only with cross-attention.

    Its parameters stay in the state dict (UNETR expects the keys) but never get a gradient;
    freezing them keeps them out of the optimizer and keeps DDP from waiting for them.
    """
    for blk in blocks:
        if not blk.with_cross_attention:
            blk.norm_cross_attn.requires_grad_(False)


def build_vit(
    name: str,
    img_size: int | Sequence[int],
    spatial_dims: int = 3,
    in_channels: int = 1,
    **overrides: Any,
) -> ViTEncoder:
    """Preset from `vit_configs` (`vit_b`, `vit_s`, `vit_tiny`) with keyword overrides."""
    if name not in vit_configs:
        raise ValueError(f"unknown ViT preset '{name}'; expected one of {sorted(vit_configs)}")
    kwargs: dict[str, Any] = dict(vit_configs[name])
    kwargs.update(overrides)
    return ViTEncoder(img_size=img_size, spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
