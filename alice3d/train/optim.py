"""Optimizer and learning-rate schedule shared by every training command."""

from __future__ import annotations

import torch
from torch import nn

from alice3d.config import TrainConfig
from alice3d.core.schedules import cosine_warmup_factor

# Parameters that should not be shrunk towards zero: norms, biases, embeddings, tokens.
_NO_DECAY_HINTS = ("position_embeddings", "pos_embed", "cls_token", "mask_token", "relative_position_bias_table")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices/kernels, none on norms, biases and tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(h in name for h in _NO_DECAY_HINTS):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


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
