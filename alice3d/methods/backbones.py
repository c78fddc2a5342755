"""Online-encoder adapters for Alice: ViT, Swin and nnFormer behind one token interface.

Every adapter exposes what Alice needs from its encoder:

    num_tokens, grid        L mask units and their grid (the last stage's token grid)
    patch_size              voxels per axis of one mask / reconstruction unit (tuple)
    hidden_size             C of the token features
    img_size, in_channels   the crop it is built for
    encode_visible(x, m)    (B, C_in, *img_size), MaskInfo -> (B, L_keep, C), ids_keep order
    encode_full(x)          (B, C_in, *img_size) -> (B, L, C), row-major over `grid`
    net                     the raw encoder (its state dict is what goes into encoder.pt)
    metadata()              the raw encoder's metadata ("kind": "vit" / "swin" / "nnformer")

Unit per backbone: ViT patch (`patch_size`), Swin one coarsest-stage token (`unit_size`,
32 voxels per axis by default), nnFormer one last-stage token (`total_stride`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn as nn

from alice3d.config import ConfigError
from alice3d.core.masking import MaskInfo
from alice3d.encoders.nnformer import NNFormerEncoder, build_nnformer_encoder, nnformer_configs
from alice3d.encoders.swin import NUM_STAGES, SwinEncoder, build_swin, swin_configs
from alice3d.encoders.vit import ViTEncoder, vit_configs
from alice3d.methods.mae import validate_backbone

__all__ = [
    "ViTBackbone",
    "SwinBackbone",
    "NNFormerBackbone",
    "backbone_kind",
    "build_backbone",
    "validate_backbone_config",
]


def backbone_kind(name: str) -> str:
    """"vit" / "swin" / "nnformer" for a preset name, or "" when it is none of them."""
    if name in vit_configs:
        return "vit"
    if name in swin_configs:
        return "swin"
    if name in nnformer_configs:
        return "nnformer"
    return ""


def _constructor_keys(cls: type) -> set[str]:
    params = inspect.signature(cls.__init__).parameters
    return {k for k in params if k not in ("self", "in_channels", "spatial_dims")}


def _unit_size(cfg: Any) -> tuple[int, ...]:
    """Mask unit in voxels of a Swin / nnFormer config (checked: ConfigError names the key)."""
    nd = cfg.spatial_dims
    kind = backbone_kind(cfg.encoder)
    if kind == "swin":
        patch = {**swin_configs[cfg.encoder], **cfg.encoder_kwargs}.get("patch_size", 2)
        if not isinstance(patch, int) or patch < 1:
            raise ConfigError(f"model.encoder_kwargs.patch_size: expected a positive int (Swin), got {patch!r}")
        return (patch * 2**NUM_STAGES,) * nd
    merged = {**nnformer_configs[cfg.encoder], **cfg.encoder_kwargs}
    stride = merged.get("patch_stride", (4, 4, 2))
    stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    if len(stride) != nd:
        raise ConfigError(
            f"model.encoder_kwargs.patch_stride: expected {nd} values (spatial_dims={nd}), got {list(stride)}"
        )
    depth = len(merged.get("depths", (2, 2, 2, 2)))
    return tuple(int(s) * 2 ** (depth - 1) for s in stride)


def validate_backbone_config(cfg: Any, prefix: str = "model") -> None:
    """Backbone checks of an Alice-style config; ViT presets go through `validate_backbone` unchanged."""
    kind = backbone_kind(cfg.encoder)
    if kind == "vit":
        validate_backbone(cfg, prefix)
        return
    if not kind:
        names = sorted(vit_configs) + sorted(swin_configs) + sorted(nnformer_configs)
        raise ConfigError(f"{prefix}.encoder: expected one of {names}, got {cfg.encoder!r}")
    allowed = _constructor_keys(SwinEncoder if kind == "swin" else NNFormerEncoder)
    unknown = set(cfg.encoder_kwargs) - allowed
    if unknown:
        raise ConfigError(
            f"{prefix}.encoder_kwargs: unknown keys {sorted(unknown)} for {kind}; expected some of {sorted(allowed)}"
        )
    if cfg.spatial_dims not in (2, 3):
        raise ConfigError(f"{prefix}.spatial_dims: expected 2 or 3, got {cfg.spatial_dims}")
    if len(cfg.img_size) != cfg.spatial_dims:
        raise ConfigError(
            f"{prefix}.img_size: expected {cfg.spatial_dims} sizes (spatial_dims={cfg.spatial_dims}), got {list(cfg.img_size)}"
        )
    unit = _unit_size(cfg)
    if any(s % u or s < u for s, u in zip(cfg.img_size, unit)):
        what = "Swin mask unit (patch_size * 16)" if kind == "swin" else "nnFormer total stride"
        raise ConfigError(f"{prefix}.img_size: {list(cfg.img_size)} must be positive multiples of the {what} {list(unit)}")
    if math.prod(s // u for s, u in zip(cfg.img_size, unit)) < 2:
        raise ConfigError(
            f"{prefix}.img_size: {list(cfg.img_size)} holds a single mask unit {list(unit)}; masking needs at least 2"
        )
    if not 0.0 < cfg.mask_ratio < 1.0:
        raise ConfigError(f"{prefix}.mask_ratio: expected a value in (0, 1), got {cfg.mask_ratio}")
    if cfg.decoder_dim % cfg.decoder_heads or cfg.decoder_dim % (2 * cfg.spatial_dims):
        raise ConfigError(
            f"{prefix}.decoder_dim: {cfg.decoder_dim} must be divisible by decoder_heads={cfg.decoder_heads} "
            f"and by 2 * spatial_dims = {2 * cfg.spatial_dims} (sin-cos position embedding)"
        )


class ViTBackbone(ViTEncoder):
    """The ViT itself plus the adapter methods: no wrapper, so parameter names, checkpoints
    and forward calls stay exactly those of `ViTEncoder`."""

    @property
    def net(self) -> ViTEncoder:
        return self

    def encode_visible(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        return self(x, ids_keep=masking.ids_keep)

    def encode_full(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)


def _tokens(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, *grid) -> (B, L, C), row-major."""
    return feature.flatten(2).transpose(1, 2)


class SwinBackbone(nn.Module):
    """`SwinEncoder` (as `net`) on mask units of `unit_size` voxels; tokens are its last stage."""

    def __init__(self, net: SwinEncoder, img_size: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.img_size = tuple(int(s) for s in img_size)
        self.in_channels = int(net.config["in_channels"])
        self.patch_size = tuple(net.unit_size)
        self.grid = net.unit_grid(self.img_size)
        self.num_tokens = math.prod(self.grid)
        self.hidden_size = int(net.embed_dim * 2**NUM_STAGES)

    def encode_visible(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        # forward_masked returns the visible units in ascending row-major order, as MaskInfo.ids_keep.
        unit_mask = masking.mask.reshape(x.shape[0], *self.grid)
        return self.net.forward_masked(x, unit_mask).last

    def encode_full(self, x: torch.Tensor) -> torch.Tensor:
        return _tokens(self.net(x, normalize=True)[-1])

    def metadata(self) -> dict[str, Any]:
        return self.net.metadata()


class NNFormerBackbone(nn.Module):
    """`NNFormerEncoder` (as `net`) on mask units of `total_stride` voxels (one last-stage token).

    The masked view runs densely with masked units replaced by the learned mask token on the
    stem grid (shifted windows and strided convs need the full grid); the visible last-stage
    tokens are then gathered.
    """

    def __init__(self, net: NNFormerEncoder, img_size: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.img_size = tuple(int(s) for s in img_size)
        self.in_channels = net.in_channels
        self.patch_size = tuple(net.total_stride)
        self.stem_grid = net.grid_size(self.img_size)
        self.grid = tuple(s // u for s, u in zip(self.img_size, self.patch_size))
        self.num_tokens = math.prod(self.grid)
        self.hidden_size = net.feature_channels[-1]
        # Only the last stage's output is used; the LayerNorms of the earlier skips would never
        # get a gradient (DDP waits for one), so they stay at their initial values.
        for norm in net.norms[:-1]:
            norm.requires_grad_(False)

    def stem_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) unit mask -> (B, *stem_grid) bool, each unit covering total_stride / patch_stride cells."""
        m = mask.reshape(mask.shape[0], *self.grid)
        for axis, (s, g) in enumerate(zip(self.stem_grid, self.grid)):
            m = m.repeat_interleave(s // g, dim=axis + 1)
        return m

    def encode_visible(self, x: torch.Tensor, masking: MaskInfo) -> torch.Tensor:
        tokens = _tokens(self.net(x, mask=self.stem_mask(masking.mask))[-1])
        index = masking.ids_keep[..., None].expand(-1, -1, tokens.shape[-1])
        return tokens.gather(1, index)

    def encode_full(self, x: torch.Tensor) -> torch.Tensor:
        return _tokens(self.net(x)[-1])

    def metadata(self) -> dict[str, Any]:
        return self.net.metadata()


def build_backbone(cfg: Any) -> nn.Module:
    """Adapter for `cfg.encoder` (a vit_*, swin_* or nnformer* preset) built for `cfg.img_size`."""
    kind = backbone_kind(cfg.encoder)
    img_size = tuple(cfg.img_size)
    if kind == "vit":
        kwargs: dict[str, Any] = dict(vit_configs[cfg.encoder])
        kwargs.update(
            pos_embed_trainable=cfg.pos_embed_trainable,
            use_flash_attention=cfg.use_flash_attention,
            grad_checkpointing=cfg.grad_checkpointing,
        )
        kwargs.update(cfg.encoder_kwargs)
        return ViTBackbone(
            img_size=img_size,
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            patch_size=cfg.patch_size,
            **kwargs,
        )
    overrides = {"use_checkpoint": cfg.grad_checkpointing, **cfg.encoder_kwargs}
    if kind == "swin":
        return SwinBackbone(build_swin(cfg.encoder, cfg.spatial_dims, cfg.in_channels, **overrides), img_size)
    if kind == "nnformer":
        net = build_nnformer_encoder(cfg.encoder, cfg.in_channels, spatial_dims=cfg.spatial_dims, **overrides)
        return NNFormerBackbone(net, img_size)
    raise ConfigError(f"model.encoder: {cfg.encoder!r} is not a vit_*, swin_* or nnformer* preset")
