"""Step-based scalar schedules (learning-rate factors, momentum, temperatures)."""

from __future__ import annotations

import math

__all__ = ["cosine_schedule", "cosine_warmup_factor"]


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps`; `end` afterwards."""
    if total_steps < 1:
        raise ValueError(f"cosine_schedule: total_steps must be >= 1, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_warmup_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate.

    Linear warmup `(step + 1) / warmup_steps` for `step < warmup_steps` (reaches 1 on the last
    warmup step), then a half-cosine from 1 at `warmup_steps` to `min_ratio` at `total_steps`,
    and `min_ratio` from then on.
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            f"cosine_warmup_factor: need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}"
        )
    if step < warmup_steps:
        return (max(step, 0) + 1) / warmup_steps
    if step >= total_steps:
        return min_ratio
    return cosine_schedule(step - warmup_steps, total_steps - warmup_steps, 1.0, min_ratio)
