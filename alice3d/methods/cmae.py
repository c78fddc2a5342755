"""C-MAE, contrastive MAE (Kong & Zhang, CVPR 2023): a siamese form of MIM, in 2D and 3D.

Two intensity-jittered views with independent masks; the encoder replaces masked patches by
a learnable mask token and keeps every token; token-wise InfoNCE between the online
projector+predictor output of one view and the EMA teacher's projector output of the other
(same patch = positive, all other tokens = negatives), symmetrised; `online_std` /
`target_std` are the spread of the predictor / teacher outputs over all tokens of the batch
(`alice3d.core.diagnostics`; 0 = collapse). Batch: `{"image": (B, C, *img_size)}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from alice3d.config import ConfigError, check_ratio
from alice3d.core.diagnostics import spread_diagnostics
from alice3d.core.ema import cosine_momentum, ema_update, make_target
from alice3d.core.heads import PredictorMLP
from alice3d.core.losses import info_nce
from alice3d.core.masking import MaskInfo, gather_tokens, mask_to_image, random_masking
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.common import CPU_PROJ, CPU_VIT, TINY_PROJ, TINY_VIT, intensity_jitter

__all__ = ["CMAEConfig", "CMAE", "cpu_config", "TINY"]


@dataclass
class CMAEConfig(BackboneConfig):
    """C-MAE pretraining model (any encoder with a dense mask-token forward)."""

    mask_ratio: float = 0.75
    proj_hidden_dim: int = 1024
    proj_dim: int = 256
    temperature: float = 0.2
    momentum: float = 0.996  # EMA teacher, cosine schedule to 1
    jitter_scale: float = 0.2  # intensity jitter per view (the colour jitter of 2D images)
    jitter_shift: float = 0.1
    loss_tokens: int = 0  # token positions per image entering the loss; 0 = all
    gather_negatives: bool = False  # also take negatives from other ranks

    def validate(self, prefix: str = "cmae") -> None:
        # Both views keep every token (mask tokens at the stem), so the encoder needs a dense forward.
        self.validate_backbone(prefix, needs={"dense"}, method="C-MAE")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: expected > 0, got {self.temperature}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ConfigError(f"{prefix}.momentum: expected a value in [0, 1], got {self.momentum}")
        if self.jitter_scale < 0 or self.jitter_shift < 0:
            raise ConfigError(f"{prefix}.jitter_scale / jitter_shift: expected >= 0")
        if self.loss_tokens < 0:
            raise ConfigError(f"{prefix}.loss_tokens: expected >= 0, got {self.loss_tokens}")


def cpu_config() -> CMAEConfig:
    return CMAEConfig(**CPU_VIT, **CPU_PROJ)


TINY = {**TINY_VIT, **TINY_PROJ}


class _TokenBranch(nn.Module):
    """Encoder with a learnable mask token (dense forward) + projector: `(B, C, *S)`, mask `(B, L)` -> `(B, L, P)`."""

    def __init__(self, cfg: CMAEConfig) -> None:
        super().__init__()
        self.encoder = build_backbone(cfg)
        # nnFormer's encoder owns its mask token (it is part of its weights); the others get one here.
        self.mask_token: nn.Parameter | None = None
        if not self.encoder.has_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
            nn.init.normal_(self.mask_token, std=0.02)
        self.projector = PredictorMLP(self.encoder.hidden_size, cfg.proj_hidden_dim, cfg.proj_dim, norm="bn")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder.encode_dense(x, mask, self.mask_token))


class CMAE(PretrainMethod):
    """`forward(batch)` -> `{"loss", "loss_con", "token_acc", "online_std", "target_std"}` (token_acc: top-1 of
    the positive among all keys)."""

    def __init__(self, cfg: CMAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CMAEConfig()
        cfg.validate()
        self.online = _TokenBranch(cfg)
        self.predictor = PredictorMLP(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim, norm="bn")
        self.target = make_target(self.online)
        self.momentum = cfg.momentum

    @property
    def encoder(self) -> nn.Module:
        return self.online.encoder

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, MaskInfo, MaskInfo]:
        """Two jittered copies of `x` and two independent masks."""
        b, n = x.shape[0], self.encoder.num_tokens
        v1 = intensity_jitter(x, self.cfg.jitter_scale, self.cfg.jitter_shift)
        v2 = intensity_jitter(x, self.cfg.jitter_scale, self.cfg.jitter_shift)
        m1 = random_masking(b, n, self.cfg.mask_ratio, device=x.device)
        m2 = random_masking(b, n, self.cfg.mask_ratio, device=x.device)
        return v1, v2, m1, m2

    def _loss(self, p: torch.Tensor, z: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if ids is not None:
            p, z = gather_tokens(p, ids), gather_tokens(z, ids)
        loss = info_nce(p, z.detach(), self.cfg.temperature, gather=self.cfg.gather_negatives)
        with torch.no_grad():
            q = F.normalize(p.reshape(-1, p.shape[-1]).float(), dim=-1)
            k = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1)
            acc = ((q @ k.t()).argmax(1) == torch.arange(q.shape[0], device=q.device)).float().mean()
        return loss, acc

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = check_images(batch, "image", self.encoder)
        v1, v2, m1, m2 = self.views(x)
        p1 = self.predictor(self.online(v1, m1.mask))
        p2 = self.predictor(self.online(v2, m2.mask))
        with torch.no_grad():
            z1 = self.target(v1, m1.mask)
            z2 = self.target(v2, m2.mask)
        ids = None
        n = self.encoder.num_tokens
        if 0 < self.cfg.loss_tokens < n:
            ids = torch.rand(x.shape[0], n, device=x.device).argsort(1)[:, : self.cfg.loss_tokens]
        l12, a12 = self._loss(p1, z2, ids)
        l21, a21 = self._loss(p2, z1, ids)
        loss = 0.5 * (l12 + l21)
        return {"loss": loss, "loss_con": loss.detach(), "token_acc": 0.5 * (a12 + a21),
                **spread_diagnostics(torch.cat([p1, p2]), torch.cat([z1, z2]))}

    @torch.no_grad()
    def update_target(self, step: int, max_steps: int) -> None:
        self.momentum = cosine_momentum(step, max(max_steps, 1), base=self.cfg.momentum, final=1.0)
        ema_update(self.target, self.online, self.momentum)

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return encoder_export(self.online.encoder.net, "cmae")

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        """Both masked views and the per-patch cosine between view 1's prediction and view 2's target."""
        x = check_images(batch, "image", self.encoder)[:2]
        v1, v2, m1, m2 = self.views(x)
        p1 = F.normalize(self.predictor(self.online(v1, m1.mask)).float(), dim=-1)
        z2 = F.normalize(self.target(v2, m2.mask).float(), dim=-1)
        grid, patch = self.encoder.grid, self.encoder.patch_size
        cos = (p1 * z2).sum(-1)[:1]  # (1, L)
        cos_img = cos.reshape(1, *grid)
        for axis, p in enumerate(patch):
            cos_img = cos_img.repeat_interleave(p, dim=1 + axis)
        panels = {
            "input": x[:1, 0],
            "view1_masked": (v1 * (1 - mask_to_image(m1.mask, grid, patch).to(x.dtype)))[:1, 0],
            "view2_masked": (v2 * (1 - mask_to_image(m2.mask, grid, patch).to(x.dtype)))[:1, 0],
            "token_cosine": cos_img,
        }
        return {k: v[0].float().cpu().numpy().astype(np.float32) for k, v in panels.items()}
