"""ConvMIM (Yang et al., WACV 2024): masked modelling with a conv backbone, in 2D and 3D.

Two affine views of one image: x_q = c(t1(x)) (c = intensity transform) and x_k = t2(x).
The masked cells of x_q (`mask_patch`-sized, ratio 0.7) are zeroed, the ResNet stem runs,
a learned [MASK] token replaces the stem output at the downsampled masked cells, and the
remaining stages run densely. Every stage's feature map is warped from the t1 frame to the
t2 frame (t2 o t1^-1, one affine grid sample per map), projected by a 1x1 conv to a common
width, upsampled to stride 4 and summed; a light conv decoder predicts x_k at full
resolution. Loss: MSE on the warped masked region (where both views have content).
Batch: `{"image": (B, C, *img_size)}`.

Affine matrices follow `methods.views.affine_warp`: a view samples its source at `A p`
(centred coordinates), so a feature map `f_q` of x_q is brought to x_k's frame by sampling
it at `inv(A1) A2 p`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Norm

from alice3d.config import ConfigError, check_ratio
from alice3d.core.masking import MaskInfo, mask_to_image, random_masking
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.encoders.resnet import ResNetEncoder, insert_stem_mask_token
from alice3d.methods.base import PretrainMethod, encoder_export
from alice3d.methods.common import intensity_jitter
from alice3d.methods.views import StrongAugConfig, affine_warp, random_affine

__all__ = [
    "ConvMIMConfig",
    "ConvMIM",
    "relative_transform",
    "intensity_jitter",
    "default_mask_patch",
    "cpu_config",
    "TINY",
]

_DEFAULT_MASK_PATCH = {2: 32, 3: 16}


def default_mask_patch(spatial_dims: int) -> int:
    """32 in 2D (the paper, 1/7 of a 224 side); 16 in 3D (1/6 of a 96 side: the same share of the crop)."""
    return _DEFAULT_MASK_PATCH.get(spatial_dims, 16)


def _convmim_aug() -> StrongAugConfig:
    return StrongAugConfig(rotate_deg=15.0, zoom=(0.85, 1.15), flip_prob=0.0, intensity_scale=0.2, intensity_shift=0.1)


@dataclass
class ConvMIMConfig(BackboneConfig):
    """ConvMIM pretraining model (a resnet* encoder). `aug` draws t1 and t2 (rotation, zoom,
    flips) and c (intensity). `encoder_kwargs` e.g. `{widths: [16, 32, 64, 128]}`."""

    encoder: str = "resnet18"
    mask_ratio: float = 0.7
    mask_patch: int = 0  # 0: default_mask_patch(spatial_dims); a multiple of the stem stride 4
    feature_dim: int = 128  # width of the summed multi-scale feature
    decoder_dim: int = 64
    aug: StrongAugConfig = field(default_factory=_convmim_aug)

    def resolved_mask_patch(self) -> int:
        return self.mask_patch or default_mask_patch(self.spatial_dims)

    def validate(self, prefix: str = "convmim") -> None:
        # The [MASK] token goes into a conv stem and information flows densely through it.
        self.validate_backbone(prefix, needs={"conv"}, method="ConvMIM")
        patch = self.resolved_mask_patch()
        if patch % ResNetEncoder.stem_stride:
            raise ConfigError(f"{prefix}.mask_patch: {patch} must be a multiple of the stem stride 4")
        stride = max(ResNetEncoder.stage_strides)
        if any(s % stride or s % patch for s in self.img_size):
            raise ConfigError(
                f"{prefix}.img_size: {list(self.img_size)} must be multiples of the backbone stride {stride} "
                f"and of mask_patch={patch}"
            )
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)
        if self.feature_dim < 1 or self.decoder_dim < 1:
            raise ConfigError(f"{prefix}.feature_dim / decoder_dim: expected >= 1, got {self.feature_dim} / {self.decoder_dim}")
        try:
            self.aug.validate(f"{prefix}.aug")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def cpu_config() -> ConvMIMConfig:
    return ConvMIMConfig(encoder="resnet18_tiny", img_size=(64, 64, 32))


TINY = {"img_size": (32, 32, 32), "encoder_kwargs": {"widths": [8, 8, 16, 16]}, "feature_dim": 8, "decoder_dim": 8}


def relative_transform(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """t2 o t1^-1 as an `affine_warp` matrix: warping `affine_warp(x, a1)` with it gives `affine_warp(x, a2)`."""
    return torch.linalg.inv(a1.float()) @ a2.float()


def _pixel_shuffle(x: torch.Tensor, factor: int, channels: int) -> torch.Tensor:
    """N-D pixel shuffle: `(B, C * f^n, *s)` with channels ordered `(*f, C)` -> `(B, C, *(s * f))`."""
    b, nd = x.shape[0], x.ndim - 2
    grid = x.shape[2:]
    x = x.reshape(b, *([factor] * nd), channels, *grid)
    order = [0, nd + 1]
    for i in range(nd):
        order += [nd + 2 + i, 1 + i]
    return x.permute(*order).reshape(b, channels, *(g * factor for g in grid))


class ConvMIM(PretrainMethod):
    """`forward(batch)` -> `{"loss", "loss_rec"}`."""

    def __init__(self, cfg: ConvMIMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ConvMIMConfig()
        cfg.validate()
        nd = cfg.spatial_dims
        self.mask_patch = cfg.resolved_mask_patch()
        self.encoder: ResNetEncoder = build_backbone(cfg)
        widths = self.encoder.widths
        self.mask_token = nn.Parameter(torch.zeros(1, widths[0], *([1] * nd)))
        nn.init.normal_(self.mask_token, std=0.02)
        conv = Conv[Conv.CONV, nd]
        self.proj = nn.ModuleList(conv(w, cfg.feature_dim, kernel_size=1) for w in widths)
        out_stride = self.encoder.stage_strides[0]
        self.decoder = nn.Sequential(
            conv(cfg.feature_dim, cfg.decoder_dim, kernel_size=3, padding=1),
            Norm[Norm.BATCH, nd](cfg.decoder_dim),
            nn.ReLU(inplace=True),
            conv(cfg.decoder_dim, cfg.in_channels * out_stride**nd, kernel_size=1),
        )
        self.out_stride = out_stride

    # ------------------------------------------------------------------ views

    def make_views(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x `(B, C, *S)` -> x_q (intensity-jittered t1 view), x_k (t2 view), `rel` = t2 o t1^-1 and validity maps."""
        b, nd = x.shape[0], x.ndim - 2
        a1 = random_affine(b, nd, self.cfg.aug, x.device)
        a2 = random_affine(b, nd, self.cfg.aug, x.device)
        ones = torch.ones_like(x[:, :1])
        xq = intensity_jitter(affine_warp(x, a1), self.cfg.aug.intensity_scale, self.cfg.aug.intensity_shift)
        return {
            "xq": xq,
            "xk": affine_warp(x, a2),
            "rel": relative_transform(a1, a2),
            "valid_q": affine_warp(ones, a1),  # (B, 1, *S) ~1 where t1 saw the image
            "valid_k": affine_warp(ones, a2),
        }

    def masking(self, x: torch.Tensor) -> tuple[MaskInfo, tuple[int, ...]]:
        grid = tuple(s // self.mask_patch for s in x.shape[2:])
        return random_masking(x.shape[0], math.prod(grid), self.cfg.mask_ratio, device=x.device), grid

    # ------------------------------------------------------------------ network

    def stem_with_mask(self, xq: torch.Tensor, mask: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Zero the masked pixels, run the stem, put the [MASK] token at the masked stem cells."""
        hidden = mask_to_image(mask, grid, self.mask_patch).to(xq.dtype)
        h = self.encoder.stem(xq * (1 - hidden))
        stem_mask = mask_to_image(mask, grid, self.mask_patch // self.encoder.stem_stride).bool()
        return insert_stem_mask_token(h, stem_mask, self.mask_token)

    def predict(self, h: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
        """Stem output (t1 frame) -> reconstruction of x_k `(B, C, *S)` in the t2 frame."""
        feats = self.encoder.forward_stages(h)
        size = feats[0].shape[2:]
        fused = 0
        for f, proj in zip(feats, self.proj):
            g = proj(affine_warp(f, rel))
            if g.shape[2:] != size:
                g = F.interpolate(g, size=size, mode="bilinear" if g.ndim == 4 else "trilinear", align_corners=False)
            fused = fused + g
        return _pixel_shuffle(self.decoder(fused), self.out_stride, self.cfg.in_channels)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        x = self._images(batch)
        views = self.make_views(x)
        masking, grid = self.masking(x)
        pred = self.predict(self.stem_with_mask(views["xq"], masking.mask, grid), views["rel"])
        region = self.loss_region(masking.mask, grid, views)
        per_pixel = (pred.float() - views["xk"].float()).pow(2).mean(dim=1, keepdim=True)
        loss = (per_pixel * region).sum() / region.sum().clamp_min(1.0)
        return {"loss": loss, "loss_rec": loss.detach(), "region_fraction": region.mean().detach()}

    def loss_region(self, mask: torch.Tensor, grid: tuple[int, ...], views: dict[str, torch.Tensor]) -> torch.Tensor:
        """Masked cells of x_q that hold image content, warped to the t2 frame, where x_k has content too."""
        hidden = mask_to_image(mask, grid, self.mask_patch).to(views["valid_q"].dtype) * views["valid_q"]
        return (affine_warp(hidden, views["rel"]) > 0.5).float() * (views["valid_k"] > 0.999).float()

    def _images(self, batch: Any) -> torch.Tensor:
        if not isinstance(batch, dict) or "image" not in batch:
            found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise ValueError(f"batch: expected a dict with key 'image', got {found}")
        x = batch["image"]
        expected = (self.cfg.in_channels, *self.cfg.img_size)
        if not torch.is_tensor(x) or tuple(x.shape[1:]) != expected:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"batch['image']: expected a tensor (B, {', '.join(map(str, expected))}), got {shape}")
        return x if x.is_floating_point() else x.float()

    # ------------------------------------------------------------------ contract

    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Encoder weights (load strict into `monai.networks.nets.ResNet(**metadata['monai_resnet'])`)."""
        return encoder_export(self.encoder, "convmim")

    @torch.no_grad()
    def preview(self, batch: dict) -> dict[str, np.ndarray]:
        x = self._images(batch)[:2]  # BatchNorm in train mode needs more than one value per channel
        views = self.make_views(x)
        masking, grid = self.masking(x)
        pred = self.predict(self.stem_with_mask(views["xq"], masking.mask, grid), views["rel"])
        hidden = mask_to_image(masking.mask, grid, self.mask_patch).to(x.dtype)
        region = self.loss_region(masking.mask, grid, views)
        panels = {
            "input": x,
            "view_q_masked": views["xq"] * (1 - hidden),
            "target_view_k": views["xk"],
            "reconstruction": pred,
            "loss_region": region,
        }
        return {k: v[0, 0].float().cpu().numpy().astype(np.float32) for k, v in panels.items()}

