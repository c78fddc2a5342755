"""MAE baseline (He et al.) in 2D and 3D, plus the pieces the other MIM methods reuse.

Random masking (argsort of noise), ViT encoder on the visible tokens only, lightweight
transformer decoder with mask tokens, MSE on the masked patches against per-patch
normalised pixels (norm-pix). Batch: `{"image": (B, C, *img_size)}` floats.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from alice3d.config import ConfigError
from alice3d.core.losses import masked_mse
from alice3d.core.masking import MaskInfo, mask_to_image, random_masking
from alice3d.core.patches import as_tuple, patchify, unpatchify
from alice3d.encoders.vit import ViTEncoder, build_vit, vit_configs
from alice3d.methods.decoder import MAEDecoder

__all__ = [
    "MAEConfig",
    "MAE",
    "build_encoder",
    "check_images",
    "validate_backbone",
    "reconstruction_panels",
    "encoder_export",
]

# ViTEncoder arguments a config may set through `encoder_kwargs`; the rest come from the config.
_ENCODER_KWARGS = set(inspect.signature(ViTEncoder.__init__).parameters) - {
    "self", "img_size", "patch_size", "in_channels", "spatial_dims",
}


@dataclass
class MAEConfig:
    """MAE pretraining model. `encoder_kwargs` override the preset (e.g. `{num_layers: 2}`)."""

    encoder: str = "vit_b"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: tuple[int, ...] = (96, 96, 96)
    patch_size: int = 16
    spatial_dims: int = 3
    in_channels: int = 1
    mask_ratio: float = 0.75
    decoder_dim: int = 384  # divisible by 2 * spatial_dims (sin-cos) and by decoder_heads
    decoder_depth: int = 8
    decoder_heads: int = 12
    norm_pix: bool = True
    pos_embed_trainable: bool = False  # MAE keeps the sin-cos embedding fixed (still saved)
    use_flash_attention: bool = False
    grad_checkpointing: bool = False

    def validate(self, prefix: str = "model") -> None:
        validate_backbone(self, prefix)


def validate_backbone(cfg: Any, prefix: str = "model") -> None:
    """Checks shared by the ViT-based MIM configs; raises ConfigError naming the key."""
    if cfg.encoder not in vit_configs:
        raise ConfigError(f"{prefix}.encoder: expected one of {sorted(vit_configs)}, got {cfg.encoder!r}")
    unknown = set(cfg.encoder_kwargs) - _ENCODER_KWARGS
    if unknown:
        raise ConfigError(
            f"{prefix}.encoder_kwargs: unknown keys {sorted(unknown)}; expected some of {sorted(_ENCODER_KWARGS)}"
        )
    if cfg.spatial_dims not in (2, 3):
        raise ConfigError(f"{prefix}.spatial_dims: expected 2 or 3, got {cfg.spatial_dims}")
    if len(cfg.img_size) != cfg.spatial_dims:
        raise ConfigError(
            f"{prefix}.img_size: expected {cfg.spatial_dims} sizes (spatial_dims={cfg.spatial_dims}), got {list(cfg.img_size)}"
        )
    if any(s % cfg.patch_size or s < cfg.patch_size for s in cfg.img_size):
        raise ConfigError(
            f"{prefix}.img_size: {list(cfg.img_size)} must be positive multiples of patch_size={cfg.patch_size}"
        )
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"{prefix}.mask_ratio: expected a value in (0, 1), got {cfg.mask_ratio}")
    if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % (2 * cfg.spatial_dims):
        raise ConfigError(
            f"{prefix}.decoder_dim: {cfg.decoder_dim} must be divisible by decoder_heads={cfg.decoder_heads} "
            f"and by 2 * spatial_dims = {2 * cfg.spatial_dims} (sin-cos position embedding)"
        )


def build_encoder(cfg: Any) -> ViTEncoder:
    """ViT from a MIM config (`encoder`, `encoder_kwargs`, sizes and the attention/memory flags)."""
    kwargs = dict(
        pos_embed_trainable=cfg.pos_embed_trainable,
        use_flash_attention=cfg.use_flash_attention,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    kwargs.update(cfg.encoder_kwargs)
    return build_vit(
        cfg.encoder,
        tuple(cfg.img_size),
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        patch_size=cfg.patch_size,
        **kwargs,
    )


def check_images(batch: Any, key: str, encoder: ViTEncoder) -> torch.Tensor:
    """`batch[key]` as a float tensor `(B, C, *img_size)`, or a ValueError naming the key."""
    if not isinstance(batch, dict) or key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch: expected a dict with key '{key}', got {found}")
    x = batch[key]
    expected = (encoder.in_channels, *encoder.img_size)
    if not torch.is_tensor(x) or x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"batch['{key}']: expected a tensor (B, {', '.join(map(str, expected))}), got {shape}")
    return x if x.is_floating_point() else x.float()


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


def encoder_export(encoder: ViTEncoder, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict loadable into UNETR(...).vit, metadata) for encoder.pt."""
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    return state, {**encoder.metadata(), "method": method}


class MAE(nn.Module):
    """Masked autoencoder; `forward(batch)` -> `{"loss", "loss_rec"}`."""

    def __init__(self, cfg: MAEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or MAEConfig()
        cfg.validate()
        self.encoder = build_encoder(cfg)
        self.decoder = MAEDecoder.for_encoder(self.encoder, cfg)

    def reconstruct(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        """`(B, C, *img_size)` -> predicted patches `(B, L, P)` from the visible tokens."""
        latent = self.encoder(x, ids_keep=masking.ids_keep)
        return self.decoder(latent, masking.ids_restore)[1]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = check_images(batch, "image", self.encoder)
        masking = random_masking(x.shape[0], self.encoder.num_tokens, self.cfg.mask_ratio, device=x.device)
        pred = self.reconstruct(x, masking)
        loss = masked_mse(pred, patchify(x, self.encoder.patch_size), masking.mask, norm_pix=self.cfg.norm_pix)
        return {"loss": loss, "loss_rec": loss.detach()}

    def update_target(self, step: int, max_steps: int) -> None:
        """MAE has no target network."""
        return None

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return encoder_export(self.encoder, "mae")

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        x = check_images(batch, "image", self.encoder)[:1]
        masking = random_masking(1, self.encoder.num_tokens, self.cfg.mask_ratio, device=x.device)
        return reconstruction_panels(x, masking, self.reconstruct(x, masking), self.encoder.patch_size, self.cfg.norm_pix)
