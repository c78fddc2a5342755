"""Optimizer and learning-rate schedule shared by every training command."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from alice3d.config import TrainConfig
from alice3d.core.schedules import cosine_warmup_factor

# Parameters that should not be shrunk towards zero: norms, biases, embeddings, tokens.
_NO_DECAY_HINTS = ("position_embeddings", "pos_embed", "cls_token", "mask_token", "relative_position_bias_table")


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """AdamW groups: decay on weight matrices/kernels, none on norms, biases and tokens.

    With ``lr_scale`` (parameter name -> factor) parameters are further grouped by factor and
    each group carries its own ``"lr"`` = ``lr * factor``; the full-rate group comes first, so
    the trainer's logged ``lr`` stays the base rate.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or any(h in name for h in _NO_DECAY_HINTS))
        scale = 1.0 if lr_scale is None else float(lr_scale(name))
        groups.setdefault((decay, scale), []).append(p)
    out = []
    for (decay, scale), params in sorted(groups.items(), key=lambda kv: (-kv[0][1], not kv[0][0])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if lr_scale is not None:
            if lr is None:
                raise ValueError("param_groups: lr_scale needs the base lr")
            group["lr"] = lr * scale
        out.append(group)
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = model.param_groups(cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"train.optimizer: expected 'adamw' or 'sgd', got {cfg.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to ``min_lr`` over ``max_steps`` optimizer steps."""
    min_ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(step: int) -> float:
        return cosine_warmup_factor(step, cfg.warmup_steps, cfg.max_steps, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
