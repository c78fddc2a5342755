"""`BackboneConfig`: the encoder fields every method config shares, their one validation, and the builder.

A method config is a `BackboneConfig` plus the method's own fields, so the keys stay flat
(`mae.encoder=swin_tiny`, `alice.img_size=[96,96,64]`) and every method validates its
encoder the same way. `build_backbone(cfg)` returns a token encoder (`encoders.tokens`) for
vit/swin/nnformer presets and a `ResNetEncoder` for resnet presets; what differs between the
families (building, mask unit) is the registry's `EncoderFamily`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from alice3d.config import ConfigError
from alice3d.encoders.registry import EncoderFamily, family_of, preset_names

__all__ = ["BackboneConfig", "build_backbone", "unit_size", "with_cls_token"]


@dataclass
class BackboneConfig:
    """Which encoder, at which size, for which input. `encoder_kwargs` override the preset."""

    encoder: str = "vit_b"  # a preset name of alice3d.encoders.registry (vit_*, swin_*, nnformer*, resnet*)
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    img_size: tuple[int, ...] = (96, 96, 96)  # the crop (3D) or image (2D) size
    patch_size: int = 16  # ViT only; Swin / nnFormer units follow from the encoder (encoder_kwargs)
    spatial_dims: int = 3
    in_channels: int = 1
    pos_embed_trainable: bool = False  # ViT: False keeps MAE's fixed sin-cos table (still saved)
    use_flash_attention: bool = False  # ViT: fused scaled_dot_product_attention in every block
    grad_checkpointing: bool = False  # recompute block activations in the backward pass

    def family(self) -> EncoderFamily | None:
        return family_of(self.encoder)

    def validate_backbone(self, prefix: str, needs: frozenset[str] | set[str] = frozenset({"visible"}),
                          method: str = "") -> None:
        """ConfigError naming the key for an unknown encoder, bad kwargs or sizes, or an encoder
        that lacks a forward the method needs (`needs`: see the registry's `forwards`)."""
        family = self.family()
        if family is None:
            raise ConfigError(f"{prefix}.encoder: expected one of {preset_names(needs)}, got {self.encoder!r}")
        missing = set(needs) - family.forwards
        if missing:
            who = method or prefix
            raise ConfigError(
                f"{prefix}.encoder: {who} needs the {'/'.join(sorted(missing))} forward, which {family.kind} encoders "
                f"({self.encoder}) do not offer; use one of {preset_names(needs)}"
            )
        unknown = set(self.encoder_kwargs) - family.kwargs()
        if unknown:
            raise ConfigError(
                f"{prefix}.encoder_kwargs: unknown keys {sorted(unknown)} for {family.kind}; "
                f"expected some of {sorted(family.kwargs())}"
            )
        if self.spatial_dims not in (2, 3):
            raise ConfigError(f"{prefix}.spatial_dims: expected 2 or 3, got {self.spatial_dims}")
        if len(self.img_size) != self.spatial_dims:
            raise ConfigError(
                f"{prefix}.img_size: expected {self.spatial_dims} sizes (spatial_dims={self.spatial_dims}), "
                f"got {list(self.img_size)}"
            )
        if self.in_channels < 1:
            raise ConfigError(f"{prefix}.in_channels: expected >= 1, got {self.in_channels}")
        unit = unit_size(self, prefix)
        if any(s % u or s < u for s, u in zip(self.img_size, unit)):
            raise ConfigError(
                f"{prefix}.img_size: {list(self.img_size)} must be positive multiples of {family.unit_name(unit)}"
            )
        if family.has_tokens and math.prod(s // u for s, u in zip(self.img_size, unit)) < 2:
            raise ConfigError(
                f"{prefix}.img_size: {list(self.img_size)} holds a single mask unit {list(unit)}; masking needs at least 2"
            )


def unit_size(cfg: BackboneConfig, prefix: str = "model") -> tuple[int, ...]:
    """Voxels per axis of one token / mask unit (ResNet: its total stride 32)."""
    family = cfg.family()
    if family is None:
        raise ConfigError(f"{prefix}.encoder: expected one of {preset_names()}, got {cfg.encoder!r}")
    return tuple(family.unit(cfg, {**family.presets[cfg.encoder], **cfg.encoder_kwargs}, prefix))


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The encoder of `cfg` (validated by the method's config): a token encoder, or a ResNet."""
    family = cfg.family()
    if family is None:
        raise ConfigError(f"model.encoder: expected one of {preset_names()}, got {cfg.encoder!r}")
    return family.build(cfg)


def with_cls_token(cfg: BackboneConfig) -> BackboneConfig:
    """A copy of a ViT config whose encoder gets a CLS token (ccMIM)."""
    return replace(cfg, encoder_kwargs={**cfg.encoder_kwargs, "cls_token": True})

