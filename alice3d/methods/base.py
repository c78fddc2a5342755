"""The pretraining method contract: what every file in `alice3d/methods/` fills in.

A method is a `PretrainMethod` (a `train.module.TrainModule`) built from its config:

    __init__(cfg)                     cfg: the method's config dataclass, a BackboneConfig plus
                                      the method's own fields, validated with cfg.validate(prefix)
    forward(batch) -> dict            {"loss": scalar with grad, name: detached scalar, ...};
                                      batch is what the method's dataset kind yields:
                                        "images": {"image": (B, C, *img_size)}
                                        "pairs":  {"q": (B, C, *crop), "k": (B, C, *crop), "view_seed": (B,)}
    encoder_state() -> (state, meta)  the encoder kept after pretraining: a state dict that loads
                                      strict into the MONAI network of its family (the registry's
                                      `loads_into`) and its metadata() plus "method"
    update_target(step, max_steps)    optional: EMA / target update after each optimizer step
    preview(batch) -> {name: array}   optional: arrays for RUN/previews/step_*.png
    has_unused_parameters             optional: True if some parameters get no gradient in a step

A `MethodEntry` is what the registry (`alice3d.methods.METHODS`) holds per method name:
the method class, its config class, its dataset kind, the factory of its CPU-sized default
config (the `PretrainConfig` section of that name) and the overrides that shrink it to one
~0.1 s step (the contract tests' sizes).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from alice3d.train.module import TrainModule

__all__ = ["DATASET_KINDS", "MethodEntry", "PretrainMethod", "check_images", "encoder_export"]

# What `alice3d.pretrain.run` builds for a method (see the module docstring for the batches).
DATASET_KINDS = ("images", "pairs")


class PretrainMethod(TrainModule):
    """Base class of the pretraining methods (see the module docstring)."""

    @abstractmethod
    def encoder_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(state dict of the encoder to export, its metadata with "kind" and "method")."""


@dataclass(frozen=True)
class MethodEntry:
    """One registry line: `MethodEntry(MAE, MAEConfig, "images", mae.cpu_config, mae.TINY)`."""

    method: type[PretrainMethod]
    config: type  # a BackboneConfig dataclass
    dataset: str  # one of DATASET_KINDS
    defaults: Callable[[], Any] | None = None  # CPU-sized default config; None: config() itself
    tiny: Mapping[str, Any] = field(default_factory=dict)  # overrides of the defaults for a ~0.1 s step

    def __post_init__(self) -> None:
        if not (isinstance(self.method, type) and issubclass(self.method, PretrainMethod)):
            raise TypeError(f"MethodEntry.method: expected a PretrainMethod subclass, got {self.method!r}")
        if not (isinstance(self.config, type) and dataclasses.is_dataclass(self.config)):
            raise TypeError(f"MethodEntry.config: expected a config dataclass, got {self.config!r}")
        if self.dataset not in DATASET_KINDS:
            raise ValueError(f"MethodEntry.dataset: expected one of {list(DATASET_KINDS)}, got {self.dataset!r}")

    def default_config(self) -> Any:
        """A fresh CPU-sized config (what `alice3d-pretrain method=<name>` trains without a recipe)."""
        cfg = self.defaults() if self.defaults is not None else self.config()
        if not isinstance(cfg, self.config):
            raise TypeError(f"MethodEntry.defaults: returned a {type(cfg).__name__}, expected a {self.config.__name__}")
        return cfg

    def tiny_config(self, **overrides: Any) -> Any:
        """The default config shrunk by `tiny` (then `overrides`): one training step in ~0.1 s on a CPU."""
        return dataclasses.replace(self.default_config(), **{**self.tiny, **overrides})


def check_images(batch: Any, key: str, encoder: nn.Module) -> torch.Tensor:
    """`batch[key]` as a float tensor `(B, C, *img_size)` of `encoder`, or a ValueError naming the key."""
    if not isinstance(batch, dict) or key not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"batch: expected a dict with key '{key}', got {found}")
    x = batch[key]
    expected = (encoder.in_channels, *encoder.img_size)
    if not torch.is_tensor(x) or x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"batch['{key}']: expected a tensor (B, {', '.join(map(str, expected))}), got {shape}")
    return x if x.is_floating_point() else x.float()


def encoder_export(encoder: nn.Module, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(CPU copy of `encoder`'s state dict, its metadata() + "method") for encoder.pt."""
    state = {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}
    return state, {**encoder.metadata(), "method": method}
