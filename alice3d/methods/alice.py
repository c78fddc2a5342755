"""Alice: anatomical invariance modeling and semantic alignment (Jiang et al., ICCV 2023).

Batch: `{"q": (B, C, *crop), "k": (B, C, *crop)}`, crops of the same body part in two volumes.

    views    X_u^Q, X_r^K = random masking of Q, K (online branch sees visible tokens only)
             X_w^Q, X_v^K = independent strong augmentations of Q, K, intact (target branch)
    online   V = E_s(visible tokens); decoder(V + mask tokens) -> features F, pixels
             H = phi(F) (all tokens); [cls] = mean over tokens of H
    target   Y = psi(E_t(intact augmented view)), no gradient; [cls] = mean over tokens of Y
    l_r  = masked_mse(Q) + masked_mse(K)                                     (Eq. 1)
    l_dv = l_s([cls]_u^Q, [cls]_v^K) + l_s([cls]_r^K, [cls]_w^Q)              (Eq. 2)
    S = CASA(V, H), T = CASA(V, Y) with the same q                          (Eq. 3-4)
    l_st = l_s(S_u^Q, T_w^Q) + l_s(S_r^K, T_v^K)                             (Eq. 5)
    loss = w_rec * l_r + w_inter * l_dv + w_intra * l_st

Choices where the paper leaves room (one line each):
- psi is the EMA of phi (as in DINO/iBOT and the public Alice code, where the teacher is the
  EMA of every student parameter it shares); so that one head fits both the decoder output
  (decoder_dim) and the encoder output (hidden_size), phi = head(Linear(decoder_dim -> hidden_size))
  and psi = EMA(head); the Linear is the identity when the two widths agree.
- The online views are MAE-style augmented (random resized crop + flips, `online_aug`) before
  masking, as the paper states; the reconstruction target is the augmented view.
- The teacher side of CASA (T) uses the same q and, by default, the live CASA weights without
  gradient (`casa_target="live"`); `casa_target="ema"` uses an EMA copy updated like psi.
- Each of the two terms of l_dv and l_st is one call of l_s; with "dino" each term has its own
  DINOLoss (own centre), as iBOT does for its cls and patch losses.
- use_casa=False (ablation) pairs the raw token features: H at token i of the masked view with
  Y at token i of the augmented view, over all N tokens, i.e. exactly the misalignment that
  CASA is meant to remove; with intra_without_casa="pooled" it compares the token means of H
  and Y in each volume instead (a fair "without CASA": alignment without token correspondence).
- Collapse: `online_std` / `target_std` are the spread of the student / teacher [cls] over the
  batch (`alice3d.core.diagnostics.feature_spread`: ~1 spread out, 0 collapsed). With only what
  the paper states (negative cosine, no predictor, EMA 0.996 -> 1) every small run collapses at
  once (target_std ~0.08: a random head's pooled output is nearly the same vector for every
  input). The shipped configs add, where the paper is silent: BatchNorm in the head MLP
  (`head_bn`; the teacher's head then normalises with its own batch statistics, as in BYOL /
  MoCo v3), a predictor on the student side (`predictor_hidden_dim`, `predictor_norm`), and an
  EMA start rescaled to the run length (`ema_reference_steps`). `align_warmup_steps` (a linear
  ramp of w_inter / w_intra) is available; the dataclass defaults are the paper's values.
- Backbones (`encoder`): vit_* (tokens = patches), swin_* (tokens = the last stage, one per
  32^3-voxel unit) and nnformer* (tokens = the last stage, one per total-stride unit), behind
  the token interface of `alice3d.encoders.tokens`; the masking and norm-pix reconstruction unit is
  the token's footprint, so the pixel head predicts prod(unit) * in_channels values per token.
- A loss weight of 0 removes the term and the modules only it needs (no target network when
  w_inter = w_intra = 0, no CASA when w_intra = 0, no pixel head when w_rec = 0), so every
  trainable parameter gets a gradient (DDP-safe); a removed term is reported as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from alice3d.config import ConfigError, check_choice, check_ratio
from alice3d.core.diagnostics import spread_diagnostics
from alice3d.core.ema import cosine_momentum, ema_update, make_target, scaled_momentum_base
from alice3d.core.heads import PredictorMLP, ProjectionHead
from alice3d.core.losses import DINOLoss, info_nce, masked_mse, negative_cosine
from alice3d.core.masking import random_masking
from alice3d.core.patches import patchify
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.casa import CASA
from alice3d.methods.common import CPU_DECODER, CPU_VIT, TINY_DECODER, TINY_VIT, reconstruction_panels
from alice3d.methods.decoder import MAEDecoder, check_decoder
from alice3d.methods.views import (
    AliceViews,
    OnlineAugConfig,
    StrongAugConfig,
    make_alice_views,
    make_seeded_alice_views,
    strong_augment,
)

__all__ = ["AliceConfig", "Alice", "cpu_config", "TINY"]

SIMILARITIES = ("cosine", "infonce", "dino")
CASA_TARGETS = ("live", "ema")


@dataclass
class AliceConfig(BackboneConfig):
    """Alice model. Defaults follow the paper (ViT-B, crop 192x192x64, mask 0.75, negative cosine)."""

    img_size: tuple[int, ...] = (192, 192, 64)  # crop size of Q and K
    pos_embed_trainable: bool = True
    mask_ratio: float = 0.75
    decoder_dim: int = 384  # divisible by 2 * spatial_dims (sin-cos) and by decoder_heads
    decoder_depth: int = 8
    decoder_heads: int = 12
    head_out_dim: int = 256
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_layers: int = 3
    head_bn: bool = False  # BatchNorm in the head's MLP (the teacher's head then uses batch statistics)
    casa_heads: int = 1
    predictor_hidden_dim: int = 0  # > 0: BYOL predictor on the student side (not in the paper)
    predictor_norm: Literal["ln", "bn"] = "ln"
    similarity: Literal["cosine", "infonce", "dino"] = "cosine"
    temperature: float = 0.2  # InfoNCE
    dino_student_temp: float = 0.1
    dino_teacher_temp: float = 0.04
    w_rec: float = 1.0
    w_inter: float = 1.0
    w_intra: float = 1.0
    use_casa: bool = True
    # Without CASA, what l_st compares: "tokens" (H and Y token by token across the independently
    # augmented views: the misalignment CASA removes) or "pooled" (the mean of H against the mean
    # of Y in each volume: a within-volume view-invariance term that needs no token alignment).
    intra_without_casa: Literal["tokens", "pooled"] = "tokens"
    norm_pix: bool = True
    ema_base: float = 0.996
    ema_final: float = 1.0
    # > 0: the EMA start value is rescaled to the run length, 1 - (1 - ema_base) * ref / max_steps,
    # so the target moves as far in a short run as ema_base lets it move in `ref` steps.
    ema_reference_steps: int = 0
    align_warmup_steps: int = 0  # w_inter and w_intra ramp linearly from 0 over this many steps
    casa_target: Literal["live", "ema"] = "live"  # teacher side of CASA: live weights (no grad) or an EMA copy
    aug: StrongAugConfig = field(default_factory=StrongAugConfig)
    online_aug: OnlineAugConfig = field(default_factory=OnlineAugConfig)

    def validate(self, prefix: str = "alice") -> None:
        self.validate_backbone(prefix, needs={"visible"}, method="Alice")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        check_decoder(self, prefix)
        check_choice(f"{prefix}.similarity", self.similarity, SIMILARITIES)
        weights = {"w_rec": self.w_rec, "w_inter": self.w_inter, "w_intra": self.w_intra}
        for name, w in weights.items():
            if w < 0 or not math.isfinite(w):
                raise ConfigError(f"{prefix}.{name}: expected a finite weight >= 0, got {w}")
        if not any(weights.values()):
            raise ConfigError(f"{prefix}: w_rec, w_inter and w_intra are all 0; at least one loss term must be on")
        if not 0.0 <= self.ema_base <= self.ema_final <= 1.0:
            raise ConfigError(
                f"{prefix}.ema_base / ema_final: expected 0 <= base <= final <= 1, got {self.ema_base}, {self.ema_final}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: expected > 0, got {self.temperature}")
        if self.ema_reference_steps < 0 or self.align_warmup_steps < 0:
            raise ConfigError(
                f"{prefix}.ema_reference_steps / align_warmup_steps: expected >= 0 (0 = off), got "
                f"{self.ema_reference_steps} / {self.align_warmup_steps}"
            )
        check_choice(f"{prefix}.predictor_norm", self.predictor_norm, ["ln", "bn"])
        check_choice(f"{prefix}.casa_target", self.casa_target, CASA_TARGETS)
        check_choice(f"{prefix}.intra_without_casa", self.intra_without_casa, ["tokens", "pooled"])
        if self.predictor_hidden_dim < 0:
            raise ConfigError(f"{prefix}.predictor_hidden_dim: expected >= 0 (0 = none), got {self.predictor_hidden_dim}")
        if self.head_out_dim % self.casa_heads:
            raise ConfigError(
                f"{prefix}.casa_heads: head_out_dim={self.head_out_dim} must be divisible by casa_heads={self.casa_heads}"
            )
        try:
            self.aug.validate(prefix + ".aug")
            self.online_aug.validate(prefix + ".online_aug")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def cpu_config() -> AliceConfig:
    # Without BatchNorm in the head, a predictor and an EMA scaled to the run length, the
    # paper's negative cosine collapses here within ~10 steps (target_std ~0.08); with them
    # target_std stays ~0.8 (scripts/experiments/collapse_sweep.py, README "Pretraining").
    return AliceConfig(**CPU_VIT, **CPU_DECODER, head_out_dim=128, head_hidden_dim=256, head_bottleneck_dim=64,
                       head_bn=True, predictor_hidden_dim=256, predictor_norm="bn", ema_reference_steps=1500)


TINY = {**TINY_VIT, **TINY_DECODER, "head_out_dim": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16}


class Alice(PretrainMethod):
    """Online encoder + decoder + phi (+ CASA), EMA target encoder + psi; see the module docstring."""

    def __init__(self, cfg: AliceConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AliceConfig()
        cfg.validate()
        encoder = build_backbone(cfg)
        dim = encoder.hidden_size
        self.use_target = cfg.w_inter > 0 or cfg.w_intra > 0
        online: dict[str, nn.Module] = {"encoder": encoder}
        if self.use_target:
            online["head"] = ProjectionHead(
                dim, cfg.head_out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_layers, use_bn=cfg.head_bn
            )
        # Everything in `online` has a twin in `target` updated by EMA; nothing else does.
        self.online = nn.ModuleDict(online)
        self.decoder = MAEDecoder.for_encoder(encoder, cfg, encoder_dim=dim, pixels=cfg.w_rec > 0)
        self.dec_proj: nn.Module | None = None
        self.casa: CASA | None = None
        self.casa_target: CASA | None = None
        self.target: nn.ModuleDict | None = None
        self.dino: nn.ModuleDict | None = None
        self.predictors: nn.ModuleDict | None = None
        if self.use_target:
            self.dec_proj = nn.Identity() if cfg.decoder_dim == dim else nn.Linear(cfg.decoder_dim, dim)
            if cfg.w_intra > 0 and cfg.use_casa:
                self.casa = CASA(query_dim=dim, kv_dim=cfg.head_out_dim, num_heads=cfg.casa_heads)
                if cfg.casa_target == "ema":
                    self.casa_target = make_target(self.casa).eval()
            self.target = make_target(self.online)
            self.target.eval()
            terms = [t for t, w in (("inter", cfg.w_inter), ("intra", cfg.w_intra)) if w > 0]
            if cfg.predictor_hidden_dim > 0:
                out_dim = cfg.head_out_dim
                self.predictors = nn.ModuleDict(
                    {t: PredictorMLP(out_dim, cfg.predictor_hidden_dim, out_dim, norm=cfg.predictor_norm) for t in terms}
                )
            if cfg.similarity == "dino":
                self.dino = nn.ModuleDict(
                    {
                        t: DINOLoss(
                            cfg.head_out_dim,
                            student_temp=cfg.dino_student_temp,
                            teacher_temp=cfg.dino_teacher_temp,
                            warmup_teacher_temp=cfg.dino_teacher_temp,
                        )
                        for t in terms
                    }
                )
        self.last_momentum = cfg.ema_base
        # Optimizer steps done, saved with the model so a resumed run continues the warm-up.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @property
    def encoder(self) -> nn.Module:
        """The online encoder E_s (the one that is kept after pretraining), a token encoder."""
        return self.online["encoder"]

    def train(self, mode: bool = True) -> Alice:
        super().train(mode)
        for teacher in (self.target, self.casa_target):
            if teacher is not None:
                teacher.eval()  # the teacher never runs in training mode ...
        if mode and self.target is not None and self.cfg.head_bn:
            # ... except its head's BatchNorm, which normalises with the teacher's own batch
            # statistics (BYOL, MoCo v3): the running statistics are the student's, taken on
            # decoder features, not on the teacher's encoder features.
            self.target["head"].train()
        return self

    # ------------------------------------------------------------------ views and losses

    def crops(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch["q"]`, `batch["k"]` checked to be `(B, C, *img_size)` floats of equal shape."""
        q = check_images(batch, "q", self.encoder)
        k = check_images(batch, "k", self.encoder)
        if q.shape != k.shape:
            raise ValueError(f"batch: 'q' {tuple(q.shape)} and 'k' {tuple(k.shape)} must have the same shape")
        return q, k

    def make_views(self, batch: dict) -> AliceViews:
        """Views of `batch`; with `batch["view_seed"]` (B,) each pair's views come from its own seed."""
        q, k = self.crops(batch)
        cfg = self.cfg
        if "view_seed" in batch:
            return make_seeded_alice_views(q, k, batch["view_seed"], self.encoder.num_tokens, cfg.mask_ratio,
                                           cfg.aug, cfg.online_aug)
        return make_alice_views(q, k, self.encoder.num_tokens, cfg.mask_ratio, cfg.aug, online_aug=cfg.online_aug)

    def align_scale(self) -> float:
        """Factor of w_inter and w_intra now: linear from 0 to 1 over `align_warmup_steps` optimizer steps."""
        if self.cfg.align_warmup_steps <= 0:
            return 1.0
        return min(1.0, int(self.steps_done) / self.cfg.align_warmup_steps)

    def similarity(self, student: torch.Tensor, teacher: torch.Tensor, term: str) -> torch.Tensor:
        """l_s between student `(B, D)` / `(B, N, D)` and teacher of the same shape (teacher: no grad)."""
        if self.predictors is not None:
            student = self.predictors[term](student)
        kind = self.cfg.similarity
        if kind == "cosine":
            return negative_cosine(student, teacher)
        if kind == "infonce":
            # Negatives: the other crops of the batch (gathered over ranks for the global term).
            return info_nce(student, teacher.detach(), self.cfg.temperature, gather=term == "inter")
        return self.dino[term](student, teacher)  # constant teacher temperature

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.forward_views(self.make_views(batch))

    def forward_views(self, views: AliceViews) -> dict[str, torch.Tensor]:
        """Losses for prepared views; `forward(batch)` = `forward_views(make_views(batch))`."""
        cfg = self.cfg
        b = views.batch
        masking = views.masking
        latent = self.encoder.encode_visible(views.images, masking)  # V: (2B, N_m, D)
        features, pred = self.decoder(latent, masking.ids_restore)  # (2B, N, Dd), (2B, N, P)
        zero = latent.new_zeros((), dtype=torch.float32)
        out: dict[str, torch.Tensor] = {}
        loss_rec = loss_inter = loss_intra = zero

        if pred is not None:
            target_pix = patchify(views.images, self.encoder.patch_size)
            rec_q = masked_mse(pred[:b], target_pix[:b], masking.mask[:b], norm_pix=cfg.norm_pix)
            rec_k = masked_mse(pred[b:], target_pix[b:], masking.mask[b:], norm_pix=cfg.norm_pix)
            loss_rec = rec_q + rec_k
            out.update(rec_q=rec_q.detach(), rec_k=rec_k.detach())

        if self.target is not None:
            with torch.no_grad():
                y = self.target["head"](self.target["encoder"].encode_full(views.augmented))  # Y: (2B, N, Dh)
            h = self.online["head"](self.dec_proj(features))  # H: (2B, N, Dh)
            if cfg.w_inter > 0:
                cls_s, cls_t = h.mean(dim=1), y.mean(dim=1)
                # Cross-volume pairing: masked Q vs intact K, masked K vs intact Q.
                loss_inter = self.similarity(cls_s[:b], cls_t[b:], "inter") + self.similarity(
                    cls_s[b:], cls_t[:b], "inter"
                )
                paired_t = torch.cat([cls_t[b:], cls_t[:b]])
                out["inter_cos"] = F.cosine_similarity(cls_s.detach().float(), paired_t.float(), dim=-1).mean()
                out.update(spread_diagnostics(cls_s, cls_t))
            if cfg.w_intra > 0:
                if self.casa is not None:
                    query = self.casa.query(latent)
                    s = self.casa.attend(query, h)  # S: (2B, N_m, Dh)
                    with torch.no_grad():
                        teacher_casa = self.casa_target if self.casa_target is not None else self.casa
                        t = teacher_casa.attend(query, y)  # T: same q, teacher keys/values
                elif cfg.intra_without_casa == "pooled":
                    s, t = h.mean(dim=1), y.mean(dim=1)  # (2B, Dh): no token pairing needed
                else:
                    s, t = h, y
                # Within each volume only: S_u^Q with T_w^Q, S_r^K with T_v^K.
                loss_intra = self.similarity(s[:b], t[:b], "intra") + self.similarity(s[b:], t[b:], "intra")
                out["intra_cos"] = F.cosine_similarity(s.detach().float(), t.float(), dim=-1).mean()
                if cfg.w_inter == 0:  # no [cls]: the spread of the token features shows collapse
                    out.update(spread_diagnostics(s, t))

        scale = self.align_scale()
        loss = cfg.w_rec * loss_rec + scale * (cfg.w_inter * loss_inter + cfg.w_intra * loss_intra)
        out.update(
            loss=loss,
            loss_rec=loss_rec.detach(),
            loss_inter=loss_inter.detach(),
            loss_intra=loss_intra.detach(),
            ema_momentum=zero.new_tensor(self.last_momentum),
        )
        if cfg.align_warmup_steps > 0:
            out["align_scale"] = zero.new_tensor(scale)
        return out

    # ------------------------------------------------------------------ trainer hooks

    def ema_start(self, max_steps: int) -> float:
        """The EMA momentum at step 0 of a `max_steps` run (`ema_base`, or rescaled to the run length)."""
        cfg = self.cfg
        if cfg.ema_reference_steps <= 0:
            return cfg.ema_base
        return min(scaled_momentum_base(cfg.ema_base, max_steps, cfg.ema_reference_steps), cfg.ema_final)

    @torch.no_grad()
    def update_target(self, step: int, max_steps: int) -> float | None:
        """EMA step after an optimizer step: target <- m * target + (1 - m) * online, cosine m."""
        self.steps_done.fill_(step)
        if self.target is None:
            return None
        m = cosine_momentum(step, max_steps, self.ema_start(max_steps), self.cfg.ema_final)
        ema_update(self.target, self.online, m)
        if self.casa_target is not None:
            ema_update(self.casa_target, self.casa, m)
        self.last_momentum = m
        return m

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Online encoder weights and metadata; the keys load strict into UNETR(...).vit,
        SwinUNETR(...).swinViT or NNFormer(...).encoder ("kind": vit / swin / nnformer)."""
        return encoder_export(self.encoder.net, "alice")

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        """First sample, channel 0: query input / masked / reconstruction, its augmented view, key."""
        q, k = self.crops(batch)
        q, k = q[:1], k[:1]
        masking = random_masking(1, self.encoder.num_tokens, self.cfg.mask_ratio, device=q.device)
        latent = self.encoder.encode_visible(q, masking)
        pred = self.decoder(latent, masking.ids_restore)[1]
        panels = reconstruction_panels(q, masking, pred, self.encoder.patch_size, self.cfg.norm_pix)
        panels["augmented"] = strong_augment(q, self.cfg.aug)[0, 0].float().cpu().numpy()
        panels["key"] = k[0, 0].float().cpu().numpy()
        return panels
