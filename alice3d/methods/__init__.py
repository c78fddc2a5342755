"""Pretraining methods (one file each) and the registry: name -> method class, config class, dataset kind.

Dataset kinds (built by `alice3d.pretrain.run`):
    "images"  {"image": (B, C, *img_size)}: 2D slices / images or 3D random body crops
    "pairs"   {"q", "k": (B, C, *crop), "view_seed": (B,)}: landmark-matched crops of two volumes

Adding a method: write `methods/<name>.py` (a `PretrainMethod` and its `BackboneConfig`-based
config), add its line here, its section to `alice3d.pretrain.config.PretrainConfig`, and a
YAML recipe in configs/pretrain/.
"""

from __future__ import annotations

from dataclasses import dataclass

from alice3d.methods.alice import Alice, AliceConfig
from alice3d.methods.base import PretrainMethod
from alice3d.methods.cae import CAE, CAEConfig
from alice3d.methods.ccmim import CCMIM, CCMIMConfig
from alice3d.methods.convmim import ConvMIM, ConvMIMConfig
from alice3d.methods.mae import MAE, MAEConfig
from alice3d.methods.rmae import CMAE, RMAE, CMAEConfig, RMAEConfig

__all__ = ["MethodEntry", "METHODS", "PretrainMethod"]

DATASET_KINDS = ("images", "pairs")


@dataclass(frozen=True)
class MethodEntry:
    method: type[PretrainMethod]
    config: type
    dataset: str  # one of DATASET_KINDS


METHODS: dict[str, MethodEntry] = {
    "alice": MethodEntry(Alice, AliceConfig, "pairs"),
    "mae": MethodEntry(MAE, MAEConfig, "images"),
    "cae": MethodEntry(CAE, CAEConfig, "images"),
    "ccmim": MethodEntry(CCMIM, CCMIMConfig, "images"),
    "convmim": MethodEntry(ConvMIM, ConvMIMConfig, "images"),
    "rmae": MethodEntry(RMAE, RMAEConfig, "images"),
    "cmae": MethodEntry(CMAE, CMAEConfig, "images"),
}
