"""MAE baseline (He et al.) in 2D and 3D.

Random masking (argsort of noise), encoder on the visible tokens only, lightweight
transformer decoder with mask tokens, MSE on the masked patches against per-patch
normalised pixels (norm-pix). Any encoder with a visible-only forward works (ViT patches,
Swin / nnFormer mask units; see `encoders.registry`). Batch: `{"image": (B, C, *img_size)}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alice3d.config import ConfigError, check_ratio
from alice3d.core.losses import masked_mse
from alice3d.core.masking import MaskInfo, random_masking
from alice3d.core.patches import patchify
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.common import CPU_DECODER, CPU_VIT, TINY_DECODER, TINY_VIT, reconstruction_panels
from alice3d.methods.decoder import MAEDecoder, check_decoder
from alice3d.methods.views import OnlineAugConfig, random_resized_crop

__all__ = ["MAEConfig", "MAE", "cpu_config", "TINY"]


@dataclass
class MAEConfig(BackboneConfig):
    """MAE pretraining model. `encoder_kwargs` override the preset (e.g. `{num_layers: 2}`)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 384  # divisible by 2 * spatial_dims (sin-cos) and by decoder_heads
    decoder_depth: int = 8
    decoder_heads: int = 12
    norm_pix: bool = True
    # Off by default. On: the crop is randomly resized-cropped and flipped before masking (MAE's
    # own recipe), exactly as Alice's online view, so the two can be compared on equal views.
    online_aug: OnlineAugConfig = field(default_factory=lambda: OnlineAugConfig(enabled=False))

    def validate(self, prefix: str = "mae") -> None:
        self.validate_backbone(prefix, needs={"visible"}, method="MAE")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        check_decoder(self, prefix)
        try:
            self.online_aug.validate(prefix + ".online_aug")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def cpu_config() -> MAEConfig:
    return MAEConfig(**CPU_VIT, **CPU_DECODER)


TINY = {**TINY_VIT, **TINY_DECODER}


class MAE(PretrainMethod):
    """Masked autoencoder; `forward(batch)` -> `{"loss", "loss_rec"}`."""

    def __init__(self, cfg: MAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MAEConfig()
        cfg.validate()
        self.encoder = build_backbone(cfg)
        self.decoder = MAEDecoder.for_encoder(self.encoder, cfg)

    def reconstruct(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        """`(B, C, *img_size)` -> predicted patches `(B, L, P)` from the visible tokens."""
        return self.decoder(self.encoder.encode_visible(x, masking), masking.ids_restore)[1]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = check_images(batch, "image", self.encoder)
        if self.training and self.cfg.online_aug.enabled:
            x = random_resized_crop(x, self.cfg.online_aug)  # the target is the augmented crop too
        masking = random_masking(x.shape[0], self.encoder.num_tokens, self.cfg.mask_ratio, device=x.device)
        pred = self.reconstruct(x, masking)
        loss = masked_mse(pred, patchify(x, self.encoder.patch_size), masking.mask, norm_pix=self.cfg.norm_pix)
        return {"loss": loss, "loss_rec": loss.detach()}

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return encoder_export(self.encoder.net, "mae")

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        x = check_images(batch, "image", self.encoder)[:1]
        masking = random_masking(1, self.encoder.num_tokens, self.cfg.mask_ratio, device=x.device)
        return reconstruction_panels(x, masking, self.reconstruct(x, masking), self.encoder.patch_size, self.cfg.norm_pix)
