"""Warn when a siamese method's target embeddings collapse (the loss alone does not show it).

Methods with a siamese or contrastive branch log `target_std` (and `online_std`), the
spread of their l2-normalised projections over the batch (`alice3d.core.diagnostics`):
about 1 for spread-out features, 0 when every input gets the same vector. The monitor reads
the logged records and warns once `target_std` has stayed below a threshold for a number of
consecutive logged steps, then again every `repeat_every` logged steps while it stays there.
"""

from __future__ import annotations

import logging

__all__ = ["CollapseMonitor", "COLLAPSE_HINT"]

log = logging.getLogger("alice3d.train")

COLLAPSE_HINT = (
    "the target branch maps every input to nearly the same vector, so the alignment losses are "
    "minimised without learning anything. Likely fixes (Alice keys; other methods have their own): "
    "BatchNorm in the head (alice.head_bn=true) with a BN predictor (alice.predictor_hidden_dim > 0, "
    "alice.predictor_norm=bn), the shipped default; a faster EMA target for short runs "
    "(alice.ema_reference_steps, or a lower alice.ema_base); negatives (alice.similarity=infonce); "
    "see README, Pretraining"
)


class CollapseMonitor:
    """`observe(record)` with each logged metrics record; returns the warning text when it warns.

    threshold: `target_std` below this counts as collapsed (0.2: a fifth of the spread of
        random directions).
    patience: consecutive logged records below the threshold before the first warning.
    repeat_every: logged records between repeated warnings while the collapse lasts.
    Records without `target_std` are ignored (methods without a target branch).
    """

    def __init__(self, threshold: float = 0.2, patience: int = 100, repeat_every: int = 500,
                 key: str = "target_std") -> None:
        if patience < 1 or repeat_every < 1:
            raise ValueError(f"CollapseMonitor: patience and repeat_every must be >= 1, got {patience}, {repeat_every}")
        self.threshold, self.patience, self.repeat_every, self.key = threshold, patience, repeat_every, key
        self.low = 0  # consecutive logged records below the threshold
        self.warnings = 0

    def observe(self, record: dict) -> str | None:
        value = record.get(self.key)
        if value is None:
            return None
        self.low = self.low + 1 if float(value) < self.threshold else 0
        if self.low < self.patience or (self.low - self.patience) % self.repeat_every:
            return None
        self.warnings += 1
        message = (f"step {record.get('step', '?')}: {self.key}={float(value):.3f} has stayed below "
                   f"{self.threshold:g} for {self.low} logged steps (collapse): {COLLAPSE_HINT}")
        log.warning("%s", message)
        return message
