"""ResNet-18-style convolutional backbone for any spatial rank (ConvMIM), built from MONAI's ResNet.

The stem (`conv1` 7^n stride 2, `bn1`, `act`, `maxpool` stride 2) and the four stages
`layer1..layer4` are MONAI's own modules under MONAI's attribute names, so the state dict
loads with `strict=True` into `monai.networks.nets.ResNet(..., feed_forward=False)` built
with the same arguments (see `ResNetEncoder.monai_kwargs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import ResNet

__all__ = ["ResNetEncoder", "resnet_configs", "build_resnet", "insert_stem_mask_token"]

resnet_configs: dict[str, dict[str, Any]] = {
    "resnet18": dict(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)),
    "resnet10": dict(layers=(1, 1, 1, 1), widths=(64, 128, 256, 512)),
    "resnet18_tiny": dict(layers=(2, 2, 2, 2), widths=(16, 32, 64, 128)),
}


class ResNetEncoder(nn.Module):
    """`(B, C, *spatial)` -> one feature map per stage, strides `(4, 8, 16, 32)`.

    Basic blocks (expansion 1), so stage i has `widths[i]` channels. Spatial sizes that are
    multiples of 32 give exact strides.
    """

    stem_stride = 4
    stage_strides = (4, 8, 16, 32)

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"ResNetEncoder: spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"ResNetEncoder: layers {tuple(layers)} and widths {tuple(widths)} need 4 entries each")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.layers = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        net = ResNet(**self.monai_kwargs())
        self.conv1, self.bn1, self.act, self.maxpool = net.conv1, net.bn1, net.act, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def monai_kwargs(self) -> dict[str, Any]:
        """Arguments of the `monai.networks.nets.ResNet` whose state dict this one matches."""
        return dict(
            block="basic",
            layers=list(self.layers),
            block_inplanes=list(self.widths),
            spatial_dims=self.spatial_dims,
            n_input_channels=self.in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
        )

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, C, *S)` -> `(B, widths[0], *S/4)`."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ResNetEncoder: expected input (B, {self.in_channels}, {self.spatial_dims} spatial axes), got {tuple(x.shape)}"
            )
        return self.maxpool(self.act(self.bn1(self.conv1(x))))

    def forward_stages(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Stem output -> the four stage outputs."""
        feats = []
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(
        self,
        x: torch.Tensor,
        stem_mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Stage features `[(B, widths[i], *S/stride_i)]`.

        stem_mask `(B, 1, *S/4)` bool + mask_token `(1, widths[0], 1, ...)`: the stem output is
        replaced by the token where the mask is True (ConvMIM's [MASK] insertion).
        """
        h = self.stem(x)
        if stem_mask is not None:
            h = insert_stem_mask_token(h, stem_mask, mask_token)
        return self.forward_stages(h)

    def metadata(self) -> dict[str, Any]:
        """What rebuilds this encoder (`from_metadata`); "kind" is the arch name, as for the ViT."""
        return {
            "kind": "resnet",
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "layers": list(self.layers),
            "widths": list(self.widths),
            "monai_resnet": self.monai_kwargs(),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "ResNetEncoder":
        """Rebuild from `metadata()` (or an encoder.pt `arch_args` holding the same keys)."""
        try:
            return cls(**{k: meta[k] for k in ("spatial_dims", "in_channels", "layers", "widths")})
        except KeyError as e:
            raise ValueError(f"ResNet metadata lacks key {e}; expected spatial_dims, in_channels, layers, widths") from None


def insert_stem_mask_token(h: torch.Tensor, stem_mask: torch.Tensor, mask_token: torch.Tensor | None) -> torch.Tensor:
    """`h (B, C, *s)`, `stem_mask (B, 1, *s)` bool, `mask_token (1, C, 1, ...)` -> h with tokens at masked cells."""
    if mask_token is None:
        raise ValueError("insert_stem_mask_token: stem_mask given without mask_token (expected (1, C, 1, ...))")
    if stem_mask.shape[0] != h.shape[0] or stem_mask.shape[2:] != h.shape[2:]:
        raise ValueError(
            f"insert_stem_mask_token: stem_mask {tuple(stem_mask.shape)} must be (B, 1, *{tuple(h.shape[2:])})"
        )
    return torch.where(stem_mask.bool(), mask_token.to(h.dtype).expand_as(h), h)


def build_resnet(name: str, spatial_dims: int = 3, in_channels: int = 1, **overrides: Any) -> ResNetEncoder:
    """Preset from `resnet_configs` with keyword overrides (`layers`, `widths`)."""
    if name not in resnet_configs:
        raise ValueError(f"unknown ResNet preset '{name}'; expected one of {sorted(resnet_configs)}")
    kwargs = dict(resnet_configs[name])
    kwargs.update(overrides)
    return ResNetEncoder(spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
