"""Points through affines: the one helper every package uses, for numpy arrays and torch tensors."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def apply_affine(affine: Any, points: Any) -> Any:
    """Homogeneous ``affine (n+1, n+1)`` applied to ``points (..., n)`` -> ``(..., n)``.

    numpy (or lists) in: float64 numpy out, so integer voxel indices work as given. torch in:
    the affine is taken in the points' dtype and device and gradients flow through both.
    """
    # A tensor can only come from a caller that imported torch; numpy-only users (phantom
    # rendering, its worker processes) do not pay for importing it here.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(points, torch.Tensor):
        affine = torch.as_tensor(affine, dtype=points.dtype, device=points.device)
    else:
        points = np.asarray(points, dtype=np.float64)
        affine = np.asarray(affine, dtype=np.float64)
    n = points.shape[-1]
    if tuple(affine.shape) != (n + 1, n + 1):
        raise ValueError(f"apply_affine: points with {n} coordinates need a ({n + 1}, {n + 1}) affine, "
                         f"got shape {tuple(affine.shape)}")
    return points @ affine[:n, :n].T + affine[:n, n]
