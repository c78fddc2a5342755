"""EMA target networks (BYOL / DINO / Alice teacher)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .schedules import cosine_schedule

__all__ = ["make_target", "ema_update", "cosine_momentum", "scaled_momentum_base"]

_BUFFER_MODES = ("copy", "ema", "none")


def make_target(online: nn.Module) -> nn.Module:
    """Deep copy of `online` with `requires_grad=False` everywhere.

    The copy has its own train/eval flag (initially the online's); the caller sets it.
    """
    target = copy.deepcopy(online)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float, buffers: str = "copy") -> None:
    """`t = m * t + (1 - m) * o` for every floating parameter (others are copied).

    Buffers: `"copy"` (default) copies the online buffers (e.g. BatchNorm running stats, fixed
    embeddings kept as buffers) so the target never runs on stale statistics; `"ema"` averages
    floating buffers like parameters (integer buffers are copied); `"none"` leaves the target's
    buffers alone (DINO/MoCo style, where the target keeps its own running stats).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum}")
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"ema_update: buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
    t_float, o_float = [], []
    for (t_name, t), (o_name, o) in zip(target.named_parameters(), online.named_parameters(), strict=True):
        if t_name != o_name:
            raise ValueError(f"ema_update: parameter mismatch between target ({t_name}) and online ({o_name})")
        if t.is_floating_point():
            t_float.append(t)
            o_float.append(o.detach())
        else:
            t.copy_(o)
    if t_float:
        torch._foreach_lerp_(t_float, o_float, 1.0 - momentum)
    if buffers == "none":
        return
    for (t_name, t), (o_name, o) in zip(target.named_buffers(), online.named_buffers(), strict=True):
        if t_name != o_name:
            raise ValueError(f"ema_update: buffer mismatch between target ({t_name}) and online ({o_name})")
        if buffers == "ema" and t.is_floating_point():
            t.lerp_(o, 1.0 - momentum)
        else:
            t.copy_(o)


def cosine_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """BYOL/DINO momentum: half-cosine from `base` at step 0 to `final` at `total_steps`."""
    return cosine_schedule(step, total_steps, base, final)


def scaled_momentum_base(base: float, steps: int, reference_steps: int) -> float:
    """EMA start momentum for a `steps`-long run that moves the target as far as `base` does in `reference_steps`.

    The target's summed step size is ~ sum(1 - m_t), proportional to (1 - base) * steps under the
    cosine schedule, so `1 - (1 - base) * reference_steps / steps` keeps it fixed; clipped to [0, 1].
    """
    if steps < 1 or reference_steps < 1:
        raise ValueError(f"scaled_momentum_base: steps and reference_steps must be >= 1, got {steps}, {reference_steps}")
    return min(1.0, max(0.0, 1.0 - (1.0 - base) * reference_steps / steps))
