"""Points through affines (the one helper every package uses, for numpy arrays and torch tensors) and the
conversion between SimpleITK's LPS geometry and RAS affines."""

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


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def itk_to_ras_affine(origin, spacing, direction) -> np.ndarray:
    """SimpleITK (LPS origin, spacing, row-major direction) -> (4, 4) RAS voxel->world affine."""
    nd = len(spacing)
    aff = np.eye(4)
    d = np.asarray(direction, dtype=np.float64).reshape(nd, nd)
    aff[:nd, :nd] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    aff[:nd, 3] = origin
    return LPS_TO_RAS @ aff


def itk_geometry(obj) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin (3,), spacing (3,), direction (3, 3)) in LPS of a SimpleITK image or reader that has read
    the image information; a 2-D image gets unit spacing and identity direction along the missing axis."""
    nd = obj.GetDimension()
    k = min(nd, 3)
    origin, spacing, direction = np.zeros(3), np.ones(3), np.eye(3)
    origin[:k] = obj.GetOrigin()[:k]
    spacing[:k] = obj.GetSpacing()[:k]
    direction[:k, :k] = np.asarray(obj.GetDirection()).reshape(nd, nd)[:k, :k]
    return origin, spacing, direction


def ras_affine_to_itk(affine: np.ndarray):
    """(4, 4) RAS affine -> (origin, spacing, direction) in SimpleITK's LPS convention."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing[None, :]
    return tuple(lps[:3, 3]), tuple(spacing), tuple(direction.ravel())
