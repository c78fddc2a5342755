"""Training diagnostics that need no labels: how spread out a batch of embeddings is.

A siamese branch that collapses maps every input to (nearly) the same vector, while its
alignment loss reaches its minimum. The loss cannot tell the two apart; the spread of the
l2-normalised outputs over the batch can (SimSiam, Chen & He 2021, Sec. 4.1). The spread misses
*dimensional* collapse, though: embeddings that all lie on one line (+v or -v) spread like
random directions. The effective rank (RankMe, Garrido et al. 2023: exp of the entropy of the
normalised singular values) counts the directions the batch spans and catches both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["effective_rank", "feature_spread", "spread_diagnostics"]


@torch.no_grad()
def feature_spread(z: torch.Tensor) -> torch.Tensor:
    """Std over the rows of l2-normalised `z`, averaged over dimensions, times sqrt(dim): a detached scalar.

    `z (..., D)`: all leading axes are rows (`(B, D)` = one vector per sample, `(B, N, D)` = one
    per token). Random directions and orthonormal rows give about 1 (each coordinate of a unit
    vector then has std ~1/sqrt(D)); identical rows give 0. Fewer than 2 rows give 0 (no spread
    can be measured).
    """
    rows = z.detach().float().reshape(-1, z.shape[-1])
    if rows.shape[0] < 2:
        return rows.new_zeros(())
    unit = F.normalize(rows, dim=-1)
    return unit.std(dim=0).mean() * math.sqrt(rows.shape[-1])


@torch.no_grad()
def effective_rank(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """exp(entropy of the normalised singular values) of the l2-normalised rows of `z (..., D)`: a detached scalar.

    1 when every row lies on one line (identical rows, or +v / -v), min(rows, D) for orthonormal
    rows; fewer than 2 rows give 1. Rows are not centred, so a common offset reads as one more
    direction rather than hiding the others.
    """
    rows = F.normalize(z.detach().float().reshape(-1, z.shape[-1]), dim=-1)
    if rows.shape[0] < 2:
        return rows.new_ones(())
    sv = torch.linalg.svdvals(rows)
    p = sv / sv.sum().clamp_min(eps) + eps
    return torch.exp(-(p * p.log()).sum())


def spread_diagnostics(online: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{"online_std", "target_std", "online_erank", "target_erank"}` of two branches' embeddings."""
    return {"online_std": feature_spread(online), "target_std": feature_spread(target),
            "online_erank": effective_rank(online), "target_erank": effective_rank(target)}
