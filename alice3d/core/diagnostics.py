"""Training diagnostics that need no labels: how spread out a batch of embeddings is.

A siamese branch that collapses maps every input to (nearly) the same vector, while its
alignment loss reaches its minimum. The loss cannot tell the two apart; the spread of the
l2-normalised outputs over the batch can (SimSiam, Chen & He 2021, Sec. 4.1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["feature_spread"]


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
