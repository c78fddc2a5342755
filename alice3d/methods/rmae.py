"""R-MAE, relaxed MAE (Kong & Zhang, CVPR 2023): a siamese form of MAE, in 2D and 3D.

MIM as contrastive learning with occlusion as the transformation. The masked view (visible
set V) and the complementary view (visible set = the masked set M of the first) are encoded
by the one encoder and decoded to all patches, the masked view by decoder phi, the
complementary view by its own decoder phi' (Eq. 8). On M the masked view's reconstruction is
matched to the complementary view's (the pixel target of MAE is replaced by the other
branch), and an autoencoding constraint ties phi''s reconstruction of the complementary
view's own visible patches (M) to the norm-pix pixels. Loss = loss_match + ae_weight *
loss_ae, both decoders optimised jointly (the match term trains both branches).
`decoders="shared"` with `stop_grad_target=True` is the earlier form: one decoder for both
views and a stop-gradient complementary branch that learns from the autoencoding term only.
Batch: `{"image": (B, C, *img_size)}`. C-MAE, the contrastive form, is `methods.cmae`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alice3d.config import ConfigError, check_choice, check_ratio
from alice3d.core.losses import masked_mse
from alice3d.core.masking import MaskInfo, masking_from_mask, random_masking
from alice3d.core.patches import patchify
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.common import CPU_DECODER, CPU_VIT, TINY_DECODER, TINY_VIT, reconstruction_panels
from alice3d.methods.decoder import MAEDecoder, check_decoder

__all__ = ["RMAEConfig", "RMAE", "complement", "cpu_config", "TINY"]


def complement(masking: MaskInfo) -> MaskInfo:
    """The complementary view: its visible set is `masking`'s masked set and vice versa."""
    return masking_from_mask(~masking.mask)


@dataclass
class RMAEConfig(BackboneConfig):
    """R-MAE pretraining model (MAE's fields plus the siamese loss weights)."""

    mask_ratio: float = 0.75
    decoder_dim: int = 384
    decoder_depth: int = 8
    decoder_heads: int = 12
    ae_weight: float = 1.0  # lambda of the autoencoding constraint
    decoders: str = "two"  # two: phi and phi' (Eq. 8) | shared: one decoder for both views
    stop_grad_target: bool = False  # True: the complementary branch learns from the AE term only
    norm_pix: bool = True

    def validate(self, prefix: str = "rmae") -> None:
        self.validate_backbone(prefix, needs={"visible"}, method="R-MAE")
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        check_decoder(self, prefix)
        check_choice(f"{prefix}.decoders", self.decoders, ["two", "shared"])
        if self.ae_weight < 0:
            raise ConfigError(f"{prefix}.ae_weight: expected >= 0, got {self.ae_weight}")


def cpu_config() -> RMAEConfig:
    return RMAEConfig(**CPU_VIT, **CPU_DECODER)


TINY = {**TINY_VIT, **TINY_DECODER}


class RMAE(PretrainMethod):
    """`forward(batch)` -> `{"loss", "loss_match", "loss_ae", "loss_rec"}` (loss_rec: MAE's loss, a diagnostic)."""

    def __init__(self, cfg: RMAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or RMAEConfig()
        cfg.validate()
        self.encoder = build_backbone(cfg)
        self.decoder = MAEDecoder.for_encoder(self.encoder, cfg)  # phi: the masked view
        # phi': the complementary view (Eq. 8); None = it shares phi.
        self.decoder_comp = MAEDecoder.for_encoder(self.encoder, cfg) if cfg.decoders == "two" else None

    def reconstruct(self, x: torch.Tensor, masking: MaskInfo, complementary: bool = False) -> torch.Tensor:
        """`(B, C, *img_size)` -> predicted patches `(B, L, P)` from the visible units of `masking`,
        decoded by phi, or by phi' with `complementary` (phi when the decoders are shared)."""
        decoder = self.decoder_comp if complementary and self.decoder_comp is not None else self.decoder
        return decoder(self.encoder.encode_visible(x, masking), masking.ids_restore)[1]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = check_images(batch, "image", self.encoder)
        masking = random_masking(x.shape[0], self.encoder.num_tokens, self.cfg.mask_ratio, device=x.device)
        pred = self.reconstruct(x, masking)
        pred_comp = self.reconstruct(x, complement(masking), complementary=True)
        target = pred_comp.detach() if self.cfg.stop_grad_target else pred_comp
        loss_match = masked_mse(pred, target, masking.mask, norm_pix=False)
        pixels = patchify(x, self.encoder.patch_size)
        # The complementary view sees exactly the patches `masking` hides: autoencode those.
        loss_ae = masked_mse(pred_comp, pixels, masking.mask, norm_pix=self.cfg.norm_pix)
        with torch.no_grad():
            loss_rec = masked_mse(pred, pixels, masking.mask, norm_pix=self.cfg.norm_pix)
        return {
            "loss": loss_match + self.cfg.ae_weight * loss_ae,
            "loss_match": loss_match.detach(),
            "loss_ae": loss_ae.detach(),
            "loss_rec": loss_rec.detach(),
        }

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return encoder_export(self.encoder.net, "rmae")

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        x = check_images(batch, "image", self.encoder)[:1]
        masking = random_masking(1, self.encoder.num_tokens, self.cfg.mask_ratio, device=x.device)
        panels = reconstruction_panels(x, masking, self.reconstruct(x, masking), self.encoder.patch_size, self.cfg.norm_pix)
        comp = complement(masking)
        other = reconstruction_panels(x, comp, self.reconstruct(x, comp, complementary=True), self.encoder.patch_size,
                                      self.cfg.norm_pix)
        panels["complement_masked"] = other["masked"]
        panels["complement_reconstruction"] = other["reconstruction"]
        return panels
