"""CAE, context autoencoder (Chen et al., IJCV), in 2D and 3D.

Block-wise masking (50%); the ViT encoder sees the visible patches only; a latent
contextual regressor of cross-attention blocks predicts the masked patches'
representations from mask queries (+ masked positions) that attend to the visible
representations and to the current query states. The visible representations are keys
and values only, so the regressor never updates them. A decoder sees the regressor outputs
of the masked patches only (+ their positions) and predicts norm-pix targets. Alignment:
MSE between the regressed masked representations and the stop-gradient encoder run on the
masked patches (the same weights by default; an EMA copy when `target_momentum > 0`).
Loss = loss_rec + align_weight * loss_align. Batch: `{"image": (B, C, *img_size)}`.
`online_std` / `target_std`: spread over the batch of the regressed / target masked-patch
representations, one row per token (`alice3d.core.diagnostics`; 0 = collapse).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock, TransformerBlock

from alice3d.config import ConfigError, check_ratio
from alice3d.core.diagnostics import spread_diagnostics
from alice3d.core.ema import ema_update, make_target
from alice3d.core.losses import masked_mse
from alice3d.core.masking import MaskInfo, block_masking, gather_tokens, merge_tokens
from alice3d.core.patches import patchify
from alice3d.core.pos_embed import sincos_pos_embed
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.encoders.vit import freeze_unused_cross_attn_norms
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.common import CPU_DECODER, CPU_VIT, TINY_DECODER, TINY_VIT, reconstruction_panels
from alice3d.methods.decoder import check_decoder

__all__ = ["CAEConfig", "CAE", "CrossAttentionBlock", "LatentRegressor", "MaskedDecoder", "cpu_config", "TINY"]


@dataclass
class CAEConfig(BackboneConfig):
    """CAE pretraining model (ViT: the regressor's queries use its absolute position table).
    The regressor works at the encoder width with `regressor_heads` heads."""

    mask_ratio: float = 0.5
    min_block: int = 16  # BEiT block masking: at least this many patches per block
    regressor_depth: int = 4
    regressor_heads: int = 0  # 0: the encoder's number of heads
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 12
    align_weight: float = 2.0  # lambda
    target_momentum: float = 0.0  # 0: the current encoder under stop-gradient (the public code)
    norm_pix: bool = True

    def validate(self, prefix: str = "cae") -> None:
        # The mask queries carry the masked patches' absolute positions (the ViT's table).
        self.validate_backbone(prefix, needs={"visible", "abs_pos"}, method="CAE")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        check_decoder(self, prefix)
        if self.regressor_depth < 1:
            raise ConfigError(f"{prefix}.regressor_depth: expected >= 1, got {self.regressor_depth}")
        if self.align_weight < 0:
            raise ConfigError(f"{prefix}.align_weight: expected >= 0, got {self.align_weight}")
        if not 0.0 <= self.target_momentum < 1.0:
            raise ConfigError(f"{prefix}.target_momentum: expected a value in [0, 1), got {self.target_momentum}")
        if self.min_block < 1:
            raise ConfigError(f"{prefix}.min_block: expected >= 1, got {self.min_block}")


def cpu_config() -> CAEConfig:
    return CAEConfig(**CPU_VIT, **CPU_DECODER)


TINY = {**TINY_VIT, **TINY_DECODER, "min_block": 2, "regressor_depth": 1}


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention + MLP that updates the queries only.

    `q (B, Nq, D)` attends to `kv (B, Nk, D)`; positions are added to queries and keys (not
    values), as in CAE's regressor. Returns the updated queries `(B, Nq, D)`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttentionBlock: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), 0.0)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        pos_q: torch.Tensor | None = None,
        pos_k: torch.Tensor | None = None,
    ) -> torch.Tensor:
        qin = q if pos_q is None else q + pos_q
        kin = kv if pos_k is None else kv + pos_k
        att = F.scaled_dot_product_attention(
            self._heads(self.to_q(self.norm_q(qin))),
            self._heads(self.to_k(self.norm_k(kin))),
            self._heads(self.to_v(self.norm_v(kv))),
        )
        q = q + self.proj(att.transpose(1, 2).reshape(q.shape))
        return q + self.mlp(self.norm2(q))


class LatentRegressor(nn.Module):
    """Mask queries + masked positions -> predicted masked representations `(B, L_mask, D)`.

    Keys/values of every block are `[visible; current queries]`; the visible tokens pass
    through untouched (they are never written), only the query states are updated.
    """

    def __init__(self, dim: int, depth: int, num_heads: int) -> None:
        super().__init__()
        self.mask_query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_query, std=0.02)
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, visible: torch.Tensor, pos_visible: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        """visible `(B, L_keep, D)`, pos_visible `(B, L_keep, D)`, pos_masked `(B, L_mask, D)`."""
        q = self.mask_query.to(visible.dtype).expand(pos_masked.shape[0], pos_masked.shape[1], -1)
        pos_k = torch.cat([pos_visible, pos_masked], dim=1)
        for blk in self.blocks:
            q = blk(q, torch.cat([visible, q], dim=1), pos_q=pos_masked, pos_k=pos_k)
        return self.norm(q)


class MaskedDecoder(nn.Module):
    """Self-attention decoder over masked-patch tokens only: `(B, L_mask, De)` -> pixels `(B, L_mask, P)`."""

    def __init__(
        self, grid: tuple[int, ...], encoder_dim: int, decoder_dim: int, depth: int, num_heads: int, out_dim: int
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, decoder_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(grid, decoder_dim)[None], persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(decoder_dim, 4 * decoder_dim, num_heads, qkv_bias=True) for _ in range(depth)
        )
        freeze_unused_cross_attn_norms(self.blocks)  # else DDP waits for their gradients forever
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, out_dim)

    def forward(self, x: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        pos = gather_tokens(self.pos_embed.expand(x.shape[0], -1, -1), ids_masked)
        x = self.embed(x) + pos.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class CAE(PretrainMethod):
    """Context autoencoder; `forward(batch)` -> `{"loss", "loss_rec", "loss_align", "online_std", "target_std"}`."""

    def __init__(self, cfg: CAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CAEConfig()
        cfg.validate()
        self.encoder = build_backbone(cfg)
        dim = self.encoder.hidden_size
        heads = cfg.regressor_heads or self.encoder.num_heads
        self.regressor = LatentRegressor(dim, cfg.regressor_depth, heads)
        self.decoder = MaskedDecoder(
            self.encoder.grid,
            dim,
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_heads,
            self.encoder.patch_dim,
        )
        # A separate target only when it can differ from the encoder (EMA); momentum 0 = weight copy.
        self.target = make_target(self.encoder) if cfg.target_momentum > 0 else None

    def positions(self, batch: int) -> torch.Tensor:
        """`(B, L, D)` position embeddings of the encoder's grid (the encoder's own table)."""
        return self.encoder.patch_embedding.position_embeddings.expand(batch, -1, -1)

    def masking(self, batch: int, device: torch.device) -> MaskInfo:
        return block_masking(batch, self.encoder.grid, self.cfg.mask_ratio, min_block=self.cfg.min_block, device=device)

    def regress(self, x: torch.Tensor, masking: MaskInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (visible representations `(B, L_keep, D)`, regressed masked representations `(B, L_mask, D)`)."""
        visible = self.encoder(x, ids_keep=masking.ids_keep)
        pos = self.positions(x.shape[0]).to(visible.dtype)
        regressed = self.regressor(visible, gather_tokens(pos, masking.ids_keep), gather_tokens(pos, masking.ids_masked))
        return visible, regressed

    @torch.no_grad()
    def alignment_target(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        """Stop-gradient encoder on the masked patches `(B, L_mask, D)`."""
        net = self.target if self.target is not None else self.encoder
        return net(x, ids_keep=masking.ids_masked).detach()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = check_images(batch, "image", self.encoder)
        masking = self.masking(x.shape[0], x.device)
        _, regressed = self.regress(x, masking)
        pred = self.decoder(regressed, masking.ids_masked)
        target_pix = gather_tokens(patchify(x, self.encoder.patch_size), masking.ids_masked)
        ones = torch.ones(pred.shape[:2], dtype=torch.bool, device=pred.device)
        loss_rec = masked_mse(pred, target_pix, ones, norm_pix=self.cfg.norm_pix)
        target = self.alignment_target(x, masking)
        loss_align = F.mse_loss(regressed.float(), target.float())
        loss = loss_rec + self.cfg.align_weight * loss_align
        return {"loss": loss, "loss_rec": loss_rec.detach(), "loss_align": loss_align.detach(),
                **spread_diagnostics(regressed, target)}

    @torch.no_grad()
    def update_target(self, step: int, max_steps: int) -> None:
        if self.target is not None:
            ema_update(self.target, self.encoder, self.cfg.target_momentum)

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return encoder_export(self.encoder.net, "cae")

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        x = check_images(batch, "image", self.encoder)[:1]
        masking = self.masking(1, x.device)
        _, regressed = self.regress(x, masking)
        pred_masked = self.decoder(regressed, masking.ids_masked)
        filler = pred_masked.new_zeros(1, masking.num_keep, pred_masked.shape[-1])
        pred = merge_tokens(filler, pred_masked, masking.ids_restore)
        return reconstruction_panels(x, masking, pred, self.encoder.patch_size, self.cfg.norm_pix)
