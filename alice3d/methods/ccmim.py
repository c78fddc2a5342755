"""ccMIM, contextual contrastive MIM (ICLR 2023), in 2D and 3D.

Importance masking: the current encoder runs on the full input without gradients; the
head-averaged attention of the CLS query to every patch, summed over layers, scores the
patches; the top `mask_ratio` of the scores perturbed by `noise_scale * U[0, 1)` are masked
(scores are min-max normalised first, see `core.masking.importance_masking`). The visible
and the masked set are encoded separately, each behind its own CLS token. A MAE decoder
reconstructs the masked set from the visible set (norm-pix MSE), and the visible CLS is
contrasted with the stop-gradient masked CLS: InfoNCE (Eq. 7) whose denominator holds the
other images' masked CLS and the other images' visible CLS, gathered across ranks
(`contrast="infonce"`; `visible_negatives=False` drops the visible-visible terms), or
SimSiam-style negative cosine through a predictor (`contrast="simsiam"`).
Loss = loss_rec + contrast_weight * loss_con. `online_std` / `target_std`: spread of the
visible / masked CLS projections over the batch (`alice3d.core.diagnostics`; 0 = collapse).
Batch: `{"image": (B, C, *img_size)}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alice3d.config import ConfigError, check_choice, check_ratio
from alice3d.core.diagnostics import feature_spread
from alice3d.core.heads import PredictorMLP
from alice3d.core.losses import info_nce, masked_mse, negative_cosine
from alice3d.core.masking import MaskInfo, importance_masking
from alice3d.core.patches import patchify
from alice3d.encoders.backbone import BackboneConfig, build_backbone, with_cls_token
from alice3d.encoders.vit import ViTEncoder
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.decoder import MAEDecoder, check_decoder
from alice3d.methods.mae import reconstruction_panels

__all__ = ["CCMIMConfig", "CCMIM", "cls_attention_scores"]


@dataclass
class CCMIMConfig(BackboneConfig):
    """ccMIM pretraining model (ViT only: the masking reads the CLS token's attention)."""

    mask_ratio: float = 0.75
    noise_scale: float = 0.5  # relative to the score range; large = random masking
    decoder_dim: int = 384
    decoder_depth: int = 8
    decoder_heads: int = 12
    contrast: str = "infonce"  # infonce | simsiam
    contrast_weight: float = 0.2  # lambda (paper; the public code uses 0.1)
    temperature: float = 0.2  # text; the public code uses 0.5
    proj_hidden_dim: int = 1024
    proj_dim: int = 256
    gather_negatives: bool = True  # all-gather the masked CLS keys across ranks
    visible_negatives: bool = True  # Eq. 7: the other images' visible CLS are negatives too
    norm_pix: bool = True

    def validate(self, prefix: str = "ccmim") -> None:
        # Importance masking ranks patches by the CLS token's attention: Swin / nnFormer have neither.
        self.validate_backbone(prefix, needs={"visible", "cls"}, method="ccMIM")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        check_decoder(self, prefix)
        check_choice(f"{prefix}.contrast", self.contrast, ["infonce", "simsiam"])
        if self.noise_scale < 0:
            raise ConfigError(f"{prefix}.noise_scale: expected >= 0, got {self.noise_scale}")
        if self.contrast_weight < 0:
            raise ConfigError(f"{prefix}.contrast_weight: expected >= 0, got {self.contrast_weight}")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: expected > 0, got {self.temperature}")


@torch.no_grad()
def cls_attention_scores(encoder: ViTEncoder, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged CLS -> patch attention summed over layers, `(B, L)`, without gradients.

    Re-runs each MONAI block's own `norm1` and `qkv` projection on the full input, so it works
    whatever attention kernel the blocks use for their forward (flash or not).
    """
    if encoder.cls_token is None:
        raise ValueError("cls_attention_scores: the encoder has no CLS token (build it with cls_token=True)")
    tokens = encoder.add_position(encoder.patch_tokens(x))
    tokens = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    scores = tokens.new_zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float32)
    for blk in encoder.blocks:
        attn = blk.attn
        h = blk.norm1(tokens)
        if attn.use_combined_linear:
            q, k, _ = attn.input_rearrange(attn.qkv(h))
        else:
            q, k = attn.input_rearrange(attn.to_q(h)), attn.input_rearrange(attn.to_k(h))
        # q, k: (B, heads, N, head_dim); only the CLS query row is needed.
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * attn.scale
        scores += logits.softmax(dim=-1)[:, :, 1:].mean(dim=1)
        tokens = blk(tokens)
    return scores


class CCMIM(PretrainMethod):
    """`forward(batch)` -> `{"loss", "loss_rec", "loss_con", "masked_score_gap", "online_std", "target_std"}`.

    `masked_score_gap` is the mean normalised score of masked minus visible patches (a
    diagnostic of how much the attention actually steers the masking).
    """

    def __init__(self, cfg: CCMIMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CCMIMConfig()
        cfg.validate()
        self.encoder = build_backbone(with_cls_token(cfg))
        dim = self.encoder.hidden_size
        self.decoder = MAEDecoder.for_encoder(self.encoder, cfg, encoder_dim=dim)
        # BN projector as in the public code; the predictor only exists for SimSiam.
        self.projector = PredictorMLP(dim, cfg.proj_hidden_dim, cfg.proj_dim, norm="bn")
        self.predictor = (
            PredictorMLP(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim, norm="bn") if cfg.contrast == "simsiam" else None
        )

    def masking(self, x: torch.Tensor) -> tuple[MaskInfo, torch.Tensor]:
        """Importance masking from the current encoder -> (MaskInfo, raw scores `(B, L)`)."""
        was_training = self.encoder.training
        self.encoder.eval()
        scores = cls_attention_scores(self.encoder, x)
        self.encoder.train(was_training)
        return importance_masking(scores, self.cfg.mask_ratio, self.cfg.noise_scale), scores

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = check_images(batch, "image", self.encoder)
        masking, scores = self.masking(x)
        visible = self.encoder(x, ids_keep=masking.ids_keep)  # (B, 1 + L_keep, D)
        pred = self.decoder(visible[:, 1:], masking.ids_restore)[1]
        loss_rec = masked_mse(pred, patchify(x, self.encoder.patch_size), masking.mask, norm_pix=self.cfg.norm_pix)
        q = self.projector(visible[:, 0])
        with torch.no_grad():
            k = self.projector(self.encoder(x, ids_keep=masking.ids_masked)[:, 0]).detach()
        if self.predictor is not None:
            loss_con = negative_cosine(self.predictor(q), k)
        else:
            loss_con = info_nce(q, k, self.cfg.temperature, gather=self.cfg.gather_negatives,
                                self_negatives=self.cfg.visible_negatives)
        loss = loss_rec + self.cfg.contrast_weight * loss_con
        return {
            "loss": loss,
            "loss_rec": loss_rec.detach(),
            "loss_con": loss_con.detach(),
            "masked_score_gap": _score_gap(scores, masking.mask),
            "online_std": feature_spread(q),
            "target_std": feature_spread(k),
        }

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The CLS token only serves the contrastive head: it is left out so the weights load into UNETR.vit."""
        state, meta = encoder_export(self.encoder, "ccmim")
        state.pop("cls_token", None)
        return state, {**meta, "cls_token": False}

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        x = check_images(batch, "image", self.encoder)[:1]
        masking, scores = self.masking(x)
        visible = self.encoder(x, ids_keep=masking.ids_keep)
        pred = self.decoder(visible[:, 1:], masking.ids_restore)[1]
        panels = reconstruction_panels(x, masking, pred, self.encoder.patch_size, self.cfg.norm_pix)
        panels["attention"] = _score_image(scores[:1], self.encoder.grid, self.encoder.patch_size)
        return panels


def _score_gap(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s = scores.float()
    s = (s - s.amin(1, keepdim=True)) / (s.amax(1, keepdim=True) - s.amin(1, keepdim=True)).clamp_min(1e-12)
    m = mask.float()
    gap = (s * m).sum(1) / m.sum(1).clamp_min(1) - (s * (1 - m)).sum(1) / (1 - m).sum(1).clamp_min(1)
    return gap.mean().detach()


def _score_image(scores: torch.Tensor, grid: tuple[int, ...], patch: tuple[int, ...]) -> np.ndarray:
    """`(1, L)` -> the score map at pixel resolution `(*img_size)`, for previews."""
    img = scores.reshape(1, *grid).float()
    for axis, p in enumerate(patch):
        img = img.repeat_interleave(p, dim=1 + axis)
    return img[0].cpu().numpy().astype(np.float32)
