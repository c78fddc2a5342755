"""Paired comparisons of two arms measured on the same seeds and the same test cases.

A transfer experiment gives, per arm, a matrix of scores `(seeds, cases)`: seed s pretrains and
fine-tunes (or probes) once, case c is one held-out patient, and every arm sees the same seeds
and the same cases. The difference of two arms is judged with a crossed two-level bootstrap:
each replicate draws seeds and cases with replacement, independently, and averages the paired
differences over the drawn cells, so the interval covers both the run-to-run spread (seeds) and
the patient-to-patient spread (cases). NaN cells (a case without the structure) are left out of
the mean, in the estimate and in every replicate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PairedDifference", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over the cells both arms scored, its bootstrap `level` interval, and the fraction
    of replicates at or below 0 (a one-sided bootstrap p-value for "a beats b")."""

    diff: float
    low: float
    high: float
    p_le_0: float
    n_seeds: int
    n_cases: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def paired_bootstrap(a, b, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> PairedDifference:
    """Crossed seeds x cases bootstrap of mean(a - b).

    a, b: `(seeds, cases)` scores of two arms, row s and column c the same seed and case in both
    (a 1-D input is one seed). Cells where either is NaN do not count. Raises ValueError when the
    shapes differ or no cell is scored by both.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired_bootstrap: expected two (seeds, cases) arrays of one shape, got {a.shape} and {b.shape}")
    d = a - b
    valid = ~np.isnan(d)
    if not valid.any():
        raise ValueError("paired_bootstrap: no cell scored by both arms")
    d0 = np.where(valid, d, 0.0)
    n_s, n_c = d.shape
    rng = np.random.default_rng(seed)
    # Drawing seeds and cases independently, the sum over the drawn cells is w_s^T D w_c with
    # w the draw counts: one matrix product per replicate instead of fancy indexing.
    ws = rng.multinomial(n_s, np.full(n_s, 1.0 / n_s), size=n_boot).astype(np.float64)  # (B, S)
    wc = rng.multinomial(n_c, np.full(n_c, 1.0 / n_c), size=n_boot).astype(np.float64)  # (B, C)
    sums = np.einsum("bs,sc,bc->b", ws, d0, wc)
    counts = np.einsum("bs,sc,bc->b", ws, valid.astype(np.float64), wc)
    ok = counts > 0
    reps = sums[ok] / counts[ok]
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(reps, [alpha, 1.0 - alpha])
    return PairedDifference(diff=float(d0.sum() / valid.sum()), low=float(low), high=float(high),
                            p_le_0=float(np.mean(reps <= 0)), n_seeds=n_s, n_cases=n_c, level=level)
