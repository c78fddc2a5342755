"""Warn when a siamese method's target embeddings collapse (the loss alone does not show it).

Methods with a siamese or contrastive branch log `target_std` (and `online_std`), the
spread of their l2-normalised projections over the batch, and `target_erank` (`online_erank`),
their effective rank (`alice3d.core.diagnostics`): the spread is about 1 for spread-out
features and 0 when every input gets the same vector; the effective rank is about 1 when every
input lies on one line (+v or -v: dimensional collapse, which the spread does not see). The
monitor reads the logged records and warns once either has stayed below its threshold for a
number of consecutive logged steps, then again every `repeat_every` logged steps while it stays.
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
    erank_threshold: `target_erank` below this counts as dimensional collapse (1.5: the batch's
        embeddings hardly leave one line; a healthy batch of B embeddings spans several directions).
    patience: consecutive logged records below a threshold before the first warning.
    repeat_every: logged records between repeated warnings while the collapse lasts.
    Records without the keys are ignored (methods without a target branch).
    """

    def __init__(self, threshold: float = 0.2, patience: int = 100, repeat_every: int = 500,
                 key: str = "target_std", erank_threshold: float = 1.5, erank_key: str = "target_erank") -> None:
        if patience < 1 or repeat_every < 1:
            raise ValueError(f"CollapseMonitor: patience and repeat_every must be >= 1, got {patience}, {repeat_every}")
        self.patience, self.repeat_every = patience, repeat_every
        self.threshold, self.key = threshold, key
        self.rules = {key: (threshold, "collapse"), erank_key: (erank_threshold, "dimensional collapse")}
        self.lows = {k: 0 for k in self.rules}  # consecutive logged records below each threshold
        self.warnings = 0

    @property
    def low(self) -> int:
        return self.lows[self.key]

    def observe(self, record: dict) -> str | None:
        messages = []
        for key, (threshold, what) in self.rules.items():
            value = record.get(key)
            if value is None:
                continue
            low = self.lows[key] = self.lows[key] + 1 if float(value) < threshold else 0
            if low < self.patience or (low - self.patience) % self.repeat_every:
                continue
            messages.append(f"step {record.get('step', '?')}: {key}={float(value):.3f} has stayed below "
                            f"{threshold:g} for {low} logged steps ({what}): {COLLAPSE_HINT}")
        if not messages:
            return None
        self.warnings += 1
        message = "\n".join(messages)
        log.warning("%s", message)
        return message
