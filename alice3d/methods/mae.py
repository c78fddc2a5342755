"""MAE baseline (He et al.) in 2D and 3D, plus the reconstruction panels the other MIM methods reuse.

Random masking (argsort of noise), encoder on the visible tokens only, lightweight
transformer decoder with mask tokens, MSE on the masked patches against per-patch
normalised pixels (norm-pix). Any encoder with a visible-only forward works (ViT patches,
Swin / nnFormer mask units; see `encoders.registry`). Batch: `{"image": (B, C, *img_size)}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alice3d.config import check_ratio
from alice3d.core.losses import masked_mse
from alice3d.core.masking import MaskInfo, mask_to_image, random_masking
from alice3d.core.patches import as_tuple, patchify, unpatchify
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.decoder import MAEDecoder, check_decoder

__all__ = ["MAEConfig", "MAE", "reconstruction_panels"]


@dataclass
class MAEConfig(BackboneConfig):
    """MAE pretraining model. `encoder_kwargs` override the preset (e.g. `{num_layers: 2}`)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 384  # divisible by 2 * spatial_dims (sin-cos) and by decoder_heads
    decoder_depth: int = 8
    decoder_heads: int = 12
    norm_pix: bool = True

    def validate(self, prefix: str = "mae") -> None:
        self.validate_backbone(prefix, needs={"visible"}, method="MAE")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        check_decoder(self, prefix)


def reconstruction_panels(
    x: torch.Tensor,
    masking: MaskInfo,
    pred: torch.Tensor | None,
    patch_size: int | tuple[int, ...],
    norm_pix: bool,
) -> dict[str, np.ndarray]:
    """Channel 0 of the first sample: input, masked input and (if `pred`) the reconstruction.

    x `(B, C, *spatial)`, pred `(B, L, P)`. With norm-pix the prediction is mapped back to pixels
    with the target patch's own mean and (unbiased) variance; visible patches show the input.
    """
    x = x[:1].float()
    nd = x.ndim - 2
    patch = as_tuple(patch_size, nd)
    grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
    hidden = mask_to_image(masking.mask[:1], grid, patch).to(x.device)
    panels = {"input": x, "masked": x * (1 - hidden)}
    if pred is not None:
        pred = pred[:1].float()
        if norm_pix:
            target = patchify(x, patch)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        recon = unpatchify(pred, patch, grid, x.shape[1])
        panels["reconstruction"] = x * (1 - hidden) + recon * hidden
    return {name: t[0, 0].detach().cpu().numpy().astype(np.float32) for name, t in panels.items()}


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
