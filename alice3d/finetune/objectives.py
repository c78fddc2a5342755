"""The modules the trainer drives: a network plus its loss, returning named loss terms.

``SegmentationTask.forward(batch)`` takes ``{"image": (B, C, *S), "label": (B, 1, *S)}``
(plus, optionally, ``"known": (B, K) bool``, the classes each sample contours) and returns
``{"loss", ...}``; with nnFormer's deep supervision the loss is the weighted sum of DiceCE at
every output scale, the label resampled (nearest) to it. A sample that leaves some classes
unknown (partial labels) is scored by :func:`marginal_dice_ce` instead.
``metadata()`` is what ``best.pt`` stores to rebuild the network for ``predict``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from alice3d.finetune.models import guard_cpu_bf16_convs
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


def marginal_dice_ce(logits: torch.Tensor, label: torch.Tensor, known: torch.Tensor,
                     smooth_nr: float = 1e-5, smooth_dr: float = 1e-5) -> torch.Tensor:
    """Marginal DiceCE for partial labels (Fang & Yan 2020; Shi et al. 2021).

    logits ``(B, K, *S)``, label ``(B, 1, *S)`` class ids, known ``(B, K)`` bool (True = the
    sample contours the class; column 0, background, is always treated as known) -> scalar.

    A sample's label 0 means "background or one of the classes it does not contour", so the
    probabilities of its unknown classes are merged into background (softmax, then
    ``p_bg + sum(p_unknown)``) and CE and soft Dice are taken over the merged classes. Why
    marginal rather than masked: a masked loss that only drops the unknown channels still
    trains background on the unknown organ's voxels (teaching the network to erase that
    organ wherever it is not contoured), and masking the background voxels out too throws away
    all background supervision; merging keeps every voxel's true information (a known organ
    here / no known organ here) and nothing else.

    Guarantee: per voxel the loss depends on the background and unknown logits only through
    ``log(exp z_bg + sum exp z_unknown)``, so moving probability between background and an
    unknown class costs nothing: ``dL/dz_u * p_bg == dL/dz_bg * p_u`` everywhere, and with
    only background known (a 2-class toy whose organ is unknown) the loss and its gradient
    are exactly 0. With every class known it is MONAI's ``DiceCELoss(to_onehot_y=True,
    softmax=True)`` (same smoothing, Dice averaged over samples and classes, CE over voxels).
    """
    if logits.ndim < 3 or label.shape[1] != 1 or label.shape[0] != logits.shape[0] \
            or tuple(label.shape[2:]) != tuple(logits.shape[2:]):
        raise ValueError(f"marginal_dice_ce: logits {tuple(logits.shape)} and label {tuple(label.shape)} "
                         "must be (B, K, *S) and (B, 1, *S)")
    b, k = logits.shape[:2]
    known = known.to(device=logits.device, dtype=torch.bool).reshape(b, k).clone()
    known[:, 0] = True
    unknown = ~known
    view = (b, k) + (1,) * (logits.ndim - 2)
    target = label[:, 0].long()
    # Merged log-probabilities: background's channel takes the log-sum-exp of its own and the
    # unknown classes' logits; unknown channels get -inf (probability 0, zero gradient).
    z = logits.float()
    in_bg = unknown.clone()
    in_bg[:, 0] = True
    bg = torch.logsumexp(z.masked_fill(~in_bg.view(view), float("-inf")), dim=1, keepdim=True)
    merged_logits = torch.cat([bg, z[:, 1:].masked_fill(unknown[:, 1:].view((b, k - 1) + view[2:]), float("-inf"))], 1)
    log_p = merged_logits - torch.logsumexp(z, dim=1, keepdim=True)
    if bool(unknown.gather(1, target.reshape(b, -1)).any()):
        raise ValueError("marginal_dice_ce: a voxel is labelled with a class its sample does not contour")
    ce = -log_p.gather(1, target[:, None]).mean()
    p = log_p.exp()
    onehot = F.one_hot(target, k).movedim(-1, 1).to(p.dtype)
    axes = tuple(range(2, p.ndim))
    tp = (p * onehot).sum(axes)
    denom = p.sum(axes) + onehot.sum(axes)
    dice = 1.0 - (2.0 * tp + smooth_nr) / (denom + smooth_dr)  # (B, K)
    w = known.to(dice.dtype)
    return (dice * w).sum() / w.sum() + ce


def _has_plain_vit(spec: dict[str, Any]) -> bool:
    """MONAI's TransformerBlock owns a cross-attention norm that plain ViTs never use; DDP must know."""
    return spec["name"] == "unetr" or (spec["name"] == "classifier" and spec["args"].get("encoder") == "vit")


class SegmentationTask(TrainModule):
    """Segmentation network + DiceCE (softmax, one-hot targets), deep supervision aware.

    A batch whose ``"known"`` ``(B, K)`` leaves a class unknown for some sample is scored by
    :func:`marginal_dice_ce`; a batch without it, or where every class is known, by MONAI's
    DiceCE itself, so full-label runs compute exactly what they did before partial labels.
    """

    def __init__(self, network: nn.Module, spec: dict[str, Any], task: TaskSpec,
                 ds_weights: Sequence[float] = (), extra_metadata: dict | None = None) -> None:
        super().__init__()
        guard_cpu_bf16_convs(network)  # train.cpu_amp: oneDNN's bf16 Conv3d weight gradient fails on thin inputs
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

    def _term(self, logits: torch.Tensor, label: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
        if known is None or bool(known.all()):
            return self.loss_fn(logits.float(), label)
        return marginal_dice_ce(logits.float(), label, known)

    def loss(self, outputs: torch.Tensor | list[torch.Tensor], label: torch.Tensor,
             known: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """DiceCE of one logits tensor ``(B, K, *S)`` or a deep-supervision list of them;
        ``known`` ``(B, K)`` bool: the classes each sample contours (None = all)."""
        if torch.is_tensor(outputs):
            return {"loss": self._term(outputs, label, known)}
        weights = deep_supervision_weights(len(outputs), self.ds_weights)
        terms = {}
        total = outputs[0].new_zeros((), dtype=torch.float32)
        for k, (out, w) in enumerate(zip(outputs, weights)):
            term = self._term(out, resize_label(label, out.shape[2:]), known)
            terms[f"loss_ds{k}"] = term.detach()
            total = total + w * term
        return {"loss": total, **terms}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.loss(self.network(self._input(batch["image"])), batch["label"], batch.get("known"))

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
        guard_cpu_bf16_convs(network)  # see SegmentationTask
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
