"""`TrainModule`: what the one trainer runs (pretraining methods, landmark training, fine-tuning).

    forward(batch) -> {"loss": scalar with grad, name: detached scalar, ...}
        every other scalar entry is logged to metrics.jsonl as it is
    update_target(step, max_steps)   after each applied optimizer step (EMA teachers)
    param_groups(weight_decay)       optimizer groups (default: decay on weights only)
    preview(batch) -> {name: array}  pictures for RUN/previews (default: none)
    metadata() -> dict               saved with best.pt (default: empty)
    has_unused_parameters            tells DDP that some parameters get no gradient in a step

The trainer calls exactly these; a subclass overrides what it needs. Nothing is probed
with hasattr. Datasets are map-style, indexed by sample, unless they are `BatchDataset`s.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from alice3d.train.optim import param_groups

__all__ = ["TrainModule", "BatchDataset"]


class TrainModule(nn.Module, metaclass=ABCMeta):
    """Base class of everything the trainer trains (see the module docstring)."""

    has_unused_parameters: bool = False

    @abstractmethod
    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one (micro-)batch: "loss" with gradient, the rest detached scalars."""

    def update_target(self, step: int, max_steps: int) -> None:
        """EMA / target update after optimizer step `step` (1-based) of `max_steps`; default: none."""

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay)

    def preview(self, batch: Any) -> dict[str, np.ndarray]:
        """Named 2D/3D float arrays to picture after training (and every `train.preview_every`)."""
        return {}

    def metadata(self) -> dict[str, Any]:
        """Plain data saved next to the weights in best.pt."""
        return {}


class BatchDataset(Dataset):
    """A dataset that builds whole micro-batches itself: item ``k = micro_step * world_size + rank``
    is one batch of this process (the trainer does not collate). Plain map-style datasets are
    indexed by sample instead (see `train.trainer`)."""
