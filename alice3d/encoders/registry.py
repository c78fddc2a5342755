"""The one encoder registry: family (the "kind" saved in encoder.pt) -> class, presets and what it offers.

    kind      presets                       tokens / unit                    weights load strict into
    vit       vit_b, vit_s, vit_tiny        one per patch (patch_size)       UNETR(...).vit
    swin      swin_tiny ... swin_b          last stage (patch_size * 16)     SwinUNETR(...).swinViT
    nnformer  nnformer, _small, _tiny       last stage (total stride)        NNFormer(...).encoder
    resnet    resnet18, resnet10, _tiny     dense feature maps, no tokens    monai ResNet(feed_forward=False)

`forwards` says which encoder forwards a family offers, so a method can state what it needs
and get a clear error for a pair that cannot work:

    visible   encode only the visible mask units (MAE-style; Swin "green" windows)
    dense     every unit encoded, masked ones replaced by a mask token at the stem
    cls       a CLS token whose attention scores the patches (ccMIM)
    abs_pos   an absolute position-embedding table that mask queries can use (CAE)
    conv      a convolutional multi-stage feature pyramid (ConvMIM)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import torch.nn as nn

from alice3d.encoders.nnformer import NNFormerEncoder, nnformer_configs
from alice3d.encoders.resnet import ResNetEncoder, resnet_configs
from alice3d.encoders.swin import NUM_STAGES, SwinEncoder, swin_configs
from alice3d.encoders.vit import ViTEncoder, vit_configs

__all__ = ["EncoderFamily", "ENCODERS", "family_of", "family_of_kind", "preset_names", "encoder_from_args", "feature_dim"]


@dataclass(frozen=True)
class EncoderFamily:
    kind: str
    cls: type[nn.Module]  # the raw encoder: its state dict is encoder.pt's
    presets: Mapping[str, Mapping[str, Any]]
    forwards: frozenset[str]
    loads_into: str
    # Constructor arguments that BackboneConfig fields set; the others may come from encoder_kwargs.
    config_args: frozenset[str]

    def kwargs(self) -> set[str]:
        """Constructor arguments a config may set through `encoder_kwargs`."""
        return set(inspect.signature(self.cls.__init__).parameters) - {"self"} - self.config_args


ENCODERS: dict[str, EncoderFamily] = {
    "vit": EncoderFamily(
        "vit", ViTEncoder, vit_configs, frozenset({"visible", "dense", "cls", "abs_pos"}), "monai UNETR(...).vit",
        frozenset({"img_size", "patch_size", "in_channels", "spatial_dims", "pos_embed_trainable",
                   "use_flash_attention", "grad_checkpointing"}),
    ),
    "swin": EncoderFamily(
        "swin", SwinEncoder, swin_configs, frozenset({"visible", "dense"}), "monai SwinUNETR(...).swinViT",
        frozenset({"in_channels", "spatial_dims"}),
    ),
    "nnformer": EncoderFamily(
        "nnformer", NNFormerEncoder, nnformer_configs, frozenset({"visible", "dense"}),
        "alice3d NNFormer(...).encoder", frozenset({"in_channels", "spatial_dims"}),
    ),
    "resnet": EncoderFamily(
        "resnet", ResNetEncoder, resnet_configs, frozenset({"conv"}), "monai ResNet(..., feed_forward=False)",
        frozenset({"in_channels", "spatial_dims"}),
    ),
}


def family_of(preset: str) -> EncoderFamily | None:
    """The family whose presets include `preset`, or None."""
    for family in ENCODERS.values():
        if preset in family.presets:
            return family
    return None


def family_of_kind(kind: str) -> EncoderFamily:
    """The family of an encoder.pt "arch" / an encoder's metadata "kind"; ValueError naming the choices."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; expected one of {sorted(ENCODERS)}")
    return ENCODERS[kind]


def preset_names(forwards: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Every preset name (of the families that offer all of `forwards`), sorted."""
    return sorted(p for f in ENCODERS.values() if set(forwards) <= f.forwards for p in f.presets)


def encoder_from_args(kind: str, args: Mapping[str, Any]) -> nn.Module:
    """The raw encoder from its saved constructor arguments (encoder.pt "arch_args")."""
    family = family_of_kind(kind)
    if kind == "resnet":
        return ResNetEncoder.from_metadata(dict(args))
    accepted = set(inspect.signature(family.cls.__init__).parameters) - {"self"}
    return family.cls(**{k: v for k, v in args.items() if k in accepted})


def feature_dim(kind: str, args: Mapping[str, Any]) -> int:
    """Channels of the deepest features of an encoder built from `args` (metadata / arch_args)."""
    if kind == "vit":
        return int(args["hidden_size"])
    if kind == "swin":
        return int(args["feature_size"]) * 2**NUM_STAGES
    if kind == "nnformer":
        return int(args["embed_dim"]) * 2 ** (len(args["depths"]) - 1)
    if kind == "resnet":
        return int(args["widths"][-1])
    raise ValueError(f"unknown encoder kind {kind!r}; expected one of {sorted(ENCODERS)}")
