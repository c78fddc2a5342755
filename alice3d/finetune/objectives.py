"""The modules the trainer drives: a network plus its loss, returning named loss terms.

``SegmentationTask.forward(batch)`` takes ``{"image": (B, C, *S), "label": (B, 1, *S)}``
and returns ``{"loss", "loss_dice_ce", ...}``; with nnFormer's deep supervision the loss is
the weighted sum of DiceCE at every output scale, the label resampled (nearest) to it.
``metadata()`` is what ``best.pt`` stores to rebuild the network for ``predict``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from alice3d.finetune.tasks import TaskSpec
from alice3d.train.module import TrainModule


def deep_supervision_weights(n: int, weights: Sequence[float] = ()) -> list[float]:
    """``n`` output weights, highest resolution first, summing to 1 (default 1, 1/2, 1/4, ...)."""
    w = [float(x) for x in weights] if weights else [0.5**k for k in range(n)]
    if len(w) != n:
        raise ValueError(f"model.ds_weights has {len(w)} values but the network has {n} deep-supervision outputs")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"model.ds_weights must be non-negative with a positive sum, got {w}")
    total = sum(w)
    return [x / total for x in w]


def resize_label(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of a label map ``(B, 1, *S)`` to ``(B, 1, *size)``."""
    if tuple(label.shape[2:]) == tuple(size):
        return label
    return F.interpolate(label.float(), size=tuple(int(s) for s in size), mode="nearest-exact").to(label.dtype)


def _has_plain_vit(spec: dict[str, Any]) -> bool:
    """MONAI's TransformerBlock owns a cross-attention norm that plain ViTs never use; DDP must know."""
    return spec["name"] == "unetr" or (spec["name"] == "classifier" and spec["args"].get("encoder") == "vit")


class SegmentationTask(TrainModule):
    """Segmentation network + DiceCE (softmax, one-hot targets), deep supervision aware."""

    def __init__(self, network: nn.Module, spec: dict[str, Any], task: TaskSpec,
                 ds_weights: Sequence[float] = (), extra_metadata: dict | None = None) -> None:
        super().__init__()
        self.network = network
        self.spec = spec
        self.task = task
        self.has_unused_parameters = _has_plain_vit(spec)
        self.ds_weights = tuple(ds_weights)
        self.extra_metadata = dict(extra_metadata or {})
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.memory_format = torch.contiguous_format

    def use_channels_last(self) -> "SegmentationTask":
        """Channels-last-3d weights and inputs (3-D networks only); numerics unchanged up to rounding."""
        if self.task.spatial_dims == 3:
            self.memory_format = torch.channels_last_3d
            self.to(memory_format=torch.channels_last_3d)
        return self

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format) if x.ndim == 5 else x

    def loss(self, outputs: torch.Tensor | list[torch.Tensor], label: torch.Tensor) -> dict[str, torch.Tensor]:
        """DiceCE of one logits tensor ``(B, K, *S)`` or a deep-supervision list of them."""
        if torch.is_tensor(outputs):
            loss = self.loss_fn(outputs.float(), label)
            return {"loss": loss}
        weights = deep_supervision_weights(len(outputs), self.ds_weights)
        terms = {}
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for k, (out, w) in enumerate(zip(outputs, weights)):
            term = self.loss_fn(out.float(), resize_label(label, out.shape[2:]))
            terms[f"loss_ds{k}"] = term.detach()
            total = total + w * term
        return {"loss": total, **terms}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss(self.network(self._input(batch["image"])), batch["label"])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution logits ``(B, K, *S)`` (eval-mode output of the network)."""
        out = self.network(self._input(x))
        return out[0] if isinstance(out, (list, tuple)) else out

    def metadata(self) -> dict[str, Any]:
        return {"task": self.task.to_dict(), "network": self.spec, **self.extra_metadata}


class ClassificationTask(TrainModule):
    """Classifier + cross entropy over ``{"image": (B, C, *S), "label": (B,) int}``."""

    def __init__(self, network: nn.Module, spec: dict[str, Any], task: TaskSpec,
                 extra_metadata: dict | None = None) -> None:
        super().__init__()
        self.network = network
        self.spec = spec
        self.task = task
        self.has_unused_parameters = _has_plain_vit(spec)
        self.extra_metadata = dict(extra_metadata or {})

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.network(batch["image"]).float()
        target = batch["label"].reshape(-1).long()
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(1) == target).float().mean()
        return {"loss": loss, "accuracy": acc.detach()}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def metadata(self) -> dict[str, Any]:
        return {"task": self.task.to_dict(), "network": self.spec, **self.extra_metadata}
