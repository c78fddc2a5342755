"""ccMIM, contextual contrastive MIM (ICLR 2023), in 2D and 3D.

Importance masking: the current encoder runs on the full input without gradients and the
head-averaged attention of the CLS query scores the patches, s = softmax(q_0 K_1:^T / sqrt(D))
at the last block (`score="last_layer"`, the paper); the masked set is then sampled without
replacement with probabilities s (`mask_selection="sample"`, the paper). The visible and the
masked set are encoded separately, each behind its own CLS token. A MAE decoder reconstructs
the masked set from the visible set (norm-pix MSE), and the CLS tokens are contrasted with
InfoNCE (Eq. 7, `contrast="infonce"`): the anchor is the stop-gradient masked CLS h^M_i, the
positive its own visible CLS h^V_i, the negatives the other images' visible CLS h^V_j, plus
(`visible_negatives`) the visible-visible terms sim(h^V_i, h^V_j), j != i; everything is
gathered across ranks. `contrast="simsiam"` is the SimSiam-style alternative through a
predictor. Loss = loss_rec + contrast_weight * loss_con. `online_std` / `target_std`: spread
of the visible / masked CLS projections over the batch (`alice3d.core.diagnostics`).
Batch: `{"image": (B, C, *img_size)}`.

Switchable deviations (earlier releases of alice3d, kept for comparison):
- `score="all_layers"`: the CLS attention summed over every block, the softmax taken over all
  keys including the CLS key (the CLS column then dropped).
- `mask_selection="topk_noise"`: mask the top `mask_ratio` of the min-max normalised scores
  perturbed by `noise_scale * U[0, 1)` (`core.masking.importance_masking`) instead of sampling.
- `eq7_anchor="visible"`: the cross term anchored on the visible CLS, sim(h^V_i, SG(h^M_j)),
  i.e. the transpose of Eq. 7's sim(SG(h^M_i), h^V_j).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alice3d.config import ConfigError, check_choice, check_ratio
from alice3d.core.diagnostics import spread_diagnostics
from alice3d.core.heads import PredictorMLP
from alice3d.core.dist import all_gather_with_grad, rank, world_size
from alice3d.core.losses import info_nce, masked_mse, negative_cosine
from alice3d.core.masking import MaskInfo, importance_masking, sampled_masking
from alice3d.core.patches import patchify
from alice3d.encoders.backbone import BackboneConfig, build_backbone, with_cls_token
from alice3d.encoders.vit import ViTEncoder
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.common import CPU_DECODER, CPU_PROJ, CPU_VIT, TINY_DECODER, TINY_PROJ, TINY_VIT, reconstruction_panels
from alice3d.methods.decoder import MAEDecoder, check_decoder

__all__ = ["CCMIMConfig", "CCMIM", "cls_attention_scores", "eq7_info_nce", "cpu_config", "TINY"]


@dataclass
class CCMIMConfig(BackboneConfig):
    """ccMIM pretraining model (ViT only: the masking reads the CLS token's attention)."""

    mask_ratio: float = 0.75
    score: str = "last_layer"  # last_layer (paper) | all_layers (earlier alice3d)
    mask_selection: str = "sample"  # sample (paper) | topk_noise (earlier alice3d)
    noise_scale: float = 0.5  # topk_noise only: relative to the score range; large = random masking
    decoder_dim: int = 384
    decoder_depth: int = 8
    decoder_heads: int = 12
    contrast: str = "infonce"  # infonce | simsiam
    contrast_weight: float = 0.2  # lambda (paper; the public code uses 0.1)
    temperature: float = 0.2  # text; the public code uses 0.5
    proj_hidden_dim: int = 1024
    proj_dim: int = 256
    gather_negatives: bool = True  # all-gather the masked CLS keys across ranks
    visible_negatives: bool = True  # Eq. 7: the visible-visible terms sim(h^V_i, h^V_j) in the denominator
    eq7_anchor: str = "masked"  # masked (paper: sim(SG(h^M_i), h^V_j)) | visible (earlier alice3d, transposed)
    norm_pix: bool = True

    def validate(self, prefix: str = "ccmim") -> None:
        # Importance masking ranks patches by the CLS token's attention: Swin / nnFormer have neither.
        self.validate_backbone(prefix, needs={"visible", "cls"}, method="ccMIM")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        check_decoder(self, prefix)
        check_choice(f"{prefix}.contrast", self.contrast, ["infonce", "simsiam"])
        check_choice(f"{prefix}.score", self.score, ["last_layer", "all_layers"])
        check_choice(f"{prefix}.mask_selection", self.mask_selection, ["sample", "topk_noise"])
        check_choice(f"{prefix}.eq7_anchor", self.eq7_anchor, ["masked", "visible"])
        if self.noise_scale < 0:
            raise ConfigError(f"{prefix}.noise_scale: expected >= 0, got {self.noise_scale}")
        if self.contrast_weight < 0:
            raise ConfigError(f"{prefix}.contrast_weight: expected >= 0, got {self.contrast_weight}")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: expected > 0, got {self.temperature}")


def cpu_config() -> CCMIMConfig:
    return CCMIMConfig(**CPU_VIT, **CPU_DECODER, **CPU_PROJ)


TINY = {**TINY_VIT, **TINY_DECODER, **TINY_PROJ}


@torch.no_grad()
def cls_attention_scores(encoder: ViTEncoder, x: torch.Tensor, mode: str = "all_layers") -> torch.Tensor:
    """Head-averaged CLS -> patch attention, `(B, L)`, without gradients.

    ``mode="last_layer"``: softmax(q_0 K_1:^T / sqrt(D)) of the last block, the softmax over the
    patch keys only (ccMIM's score; each row sums to 1). ``"all_layers"``: the CLS row of every
    block's attention (softmax over all keys, CLS included), CLS column dropped, summed over blocks.
    Re-runs each MONAI block's own `norm1` and `qkv` projection on the full input, so it works
    whatever attention kernel the blocks use for their forward (flash or not).
    """
    if encoder.cls_token is None:
        raise ValueError("cls_attention_scores: the encoder has no CLS token (build it with cls_token=True)")
    if mode not in ("last_layer", "all_layers"):
        raise ValueError(f"cls_attention_scores: mode must be 'last_layer' or 'all_layers', got {mode!r}")
    tokens = encoder.add_position(encoder.patch_tokens(x))
    tokens = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    scores = tokens.new_zeros(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.float32)
    last = len(encoder.blocks) - 1
    for i, blk in enumerate(encoder.blocks):
        if mode == "last_layer" and i < last:
            tokens = blk(tokens)
            continue
        attn = blk.attn
        h = blk.norm1(tokens)
        if attn.use_combined_linear:
            q, k, _ = attn.input_rearrange(attn.qkv(h))
        else:
            q, k = attn.input_rearrange(attn.to_q(h)), attn.input_rearrange(attn.to_k(h))
        # q, k: (B, heads, N, head_dim); only the CLS query row is needed.
        logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0].float(), k.float()) * attn.scale
        if mode == "last_layer":
            scores += logits[:, :, 1:].softmax(dim=-1).mean(dim=1)
        else:
            scores += logits.softmax(dim=-1)[:, :, 1:].mean(dim=1)
        tokens = blk(tokens)
    return scores


def eq7_info_nce(visible: torch.Tensor, masked: torch.Tensor, temperature: float, gather: bool = False,
                 visible_negatives: bool = True) -> torch.Tensor:
    """ccMIM Eq. 7 with the stop-gradient masked CLS as anchor; `visible`, `masked` `(N, D)`.

    Row i: -log exp(m_i.v_i/t) / (sum_j exp(m_i.v_j/t) + sum_{j != i} exp(v_i.v_j/t)), rows
    l2-normalised, `masked` detached, the visible rows gathered across ranks when ``gather``
    (gradient through every visible term); the visible-visible sum only with ``visible_negatives``.
    """
    if visible.shape != masked.shape or visible.ndim != 2:
        raise ValueError(f"eq7_info_nce: expected two (N, D) tensors, got {tuple(visible.shape)} and "
                         f"{tuple(masked.shape)}")
    v = torch.nn.functional.normalize(visible.float(), dim=-1)
    m = torch.nn.functional.normalize(masked.detach().float(), dim=-1)
    n, offset, v_all = v.shape[0], 0, v
    if gather and world_size() > 1:
        v_all, offset = all_gather_with_grad(v), rank() * n
    labels = torch.arange(n, device=v.device) + offset
    logits = m @ v_all.t() / temperature
    if visible_negatives:
        vv = v @ v_all.t() / temperature
        own = torch.zeros_like(vv, dtype=torch.bool)
        own[torch.arange(n, device=v.device), labels] = True
        logits = torch.cat([logits, vv.masked_fill(own, float("-inf"))], dim=1)
    return torch.nn.functional.cross_entropy(logits, labels)


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
        scores = cls_attention_scores(self.encoder, x, self.cfg.score)
        self.encoder.train(was_training)
        if self.cfg.mask_selection == "sample":
            return sampled_masking(scores, self.cfg.mask_ratio), scores
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
        elif self.cfg.eq7_anchor == "masked":
            loss_con = eq7_info_nce(q, k, self.cfg.temperature, gather=self.cfg.gather_negatives,
                                    visible_negatives=self.cfg.visible_negatives)
        else:
            loss_con = info_nce(q, k, self.cfg.temperature, gather=self.cfg.gather_negatives,
                                self_negatives=self.cfg.visible_negatives)
        loss = loss_rec + self.cfg.contrast_weight * loss_con
        return {
            "loss": loss,
            "loss_rec": loss_rec.detach(),
            "loss_con": loss_con.detach(),
            "masked_score_gap": _score_gap(scores, masking.mask),
            **spread_diagnostics(q, k),
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
