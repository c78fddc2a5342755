"""MAE-style lightweight transformer decoder shared by the masked-image-modeling methods."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock

from alice3d.config import ConfigError
from alice3d.core.masking import insert_mask_tokens
from alice3d.core.pos_embed import sincos_pos_embed
from alice3d.encoders.vit import freeze_unused_cross_attn_norms

__all__ = ["MAEDecoder", "check_decoder"]


def check_decoder(cfg, prefix: str) -> None:
    """ConfigError unless `cfg.decoder_dim` suits the sin-cos embedding and `cfg.decoder_heads`."""
    if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % (2 * cfg.spatial_dims):
        raise ConfigError(
            f"{prefix}.decoder_dim: {cfg.decoder_dim} must be divisible by decoder_heads={cfg.decoder_heads} "
            f"and by 2 * spatial_dims = {2 * cfg.spatial_dims} (sin-cos position embedding)"
        )


class MAEDecoder(nn.Module):
    """Visible encoder tokens `(B, L_keep, De)` + mask tokens -> all-token features and pixels.

    Linear embed to `decoder_dim`, a learnable mask token in every masked slot, a fixed sin-cos
    position embedding on all `num_tokens` tokens (a saved buffer), `depth` MONAI transformer
    blocks, LayerNorm, and a linear head to `out_dim` values per patch (`prod(patch) * C`).
    `out_dim=0` builds no pixel head (features only; `pred` is None), for methods that use the
    decoder features without a reconstruction loss, so no parameter is left without a gradient.
    """

    @classmethod
    def for_encoder(cls, encoder, cfg, encoder_dim: int | None = None, pixels: bool = True) -> "MAEDecoder":
        """The decoder of a method config (``decoder_dim``, ``decoder_depth``, ``decoder_heads``,
        ``in_channels``, ``use_flash_attention``) on top of ``encoder`` (its token grid and patch).
        ``pixels=False``: features only, no pixel head."""
        return cls(
            num_tokens=encoder.num_tokens,
            grid=encoder.grid,
            encoder_dim=encoder_dim or encoder.hidden_size,
            decoder_dim=cfg.decoder_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_heads,
            out_dim=encoder.patch_dim if pixels else 0,
            use_flash_attention=cfg.use_flash_attention,
        )

    def __init__(
        self,
        num_tokens: int,
        grid: Sequence[int],
        encoder_dim: int,
        decoder_dim: int = 384,
        depth: int = 4,
        num_heads: int = 6,
        out_dim: int = 16**3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        self.grid = tuple(int(g) for g in grid)
        if math.prod(self.grid) != num_tokens:
            raise ValueError(f"MAEDecoder: num_tokens={num_tokens} does not match grid {self.grid}")
        if decoder_dim % num_heads:
            raise ValueError(f"MAEDecoder: decoder_dim={decoder_dim} must be divisible by num_heads={num_heads}")
        self.num_tokens = num_tokens
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, decoder_dim)[None])
        self.blocks = nn.ModuleList(
            TransformerBlock(
                decoder_dim,
                int(decoder_dim * mlp_ratio),
                num_heads,
                qkv_bias=qkv_bias,
                use_flash_attention=use_flash_attention,
            )
            for _ in range(depth)
        )
        freeze_unused_cross_attn_norms(self.blocks)
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, out_dim) if out_dim > 0 else None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self, x_visible: torch.Tensor, ids_restore: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x_visible (B, L_keep, De)`, `ids_restore (B, L)` -> `(features (B, L, Dd), pred (B, L, P))`."""
        if ids_restore.shape[1] != self.num_tokens:
            raise ValueError(
                f"MAEDecoder: ids_restore has {ids_restore.shape[1]} tokens, expected {self.num_tokens} (grid {self.grid})"
            )
        x = insert_mask_tokens(self.embed(x_visible), self.mask_token, ids_restore)
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        features = self.norm(x)
        return features, (self.pred(features) if self.pred is not None else None)
