"""Query points: parsing them from the command line or a file, and checking them against a grid.

Points are world coordinates in millimetres (RAS+, as in NIfTI/nibabel), ``(N, 3)`` float64.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from alice3d.data.geometry import apply_affine
from alice3d.errors import Alice3DError


class MatchError(Alice3DError, ValueError):
    """A query that cannot be answered (point outside the volume, bad points string, ...)."""


def as_points(points_world) -> np.ndarray:
    """Points as ``(N, 3)`` float64; MatchError unless finite world coordinates."""
    pts = np.atleast_2d(np.asarray(points_world, dtype=np.float64))
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.all(np.isfinite(pts)):
        raise MatchError(f"points must be finite (N, 3) world coordinates in mm, got shape {pts.shape}")
    return pts


def check_points_inside(affine: np.ndarray, shape: Sequence[int], points_world: np.ndarray, label: str) -> None:
    """MatchError naming ``label``, the points ``(N, 3)`` outside the grid's voxel extent and its world box."""
    ijk = apply_affine(np.linalg.inv(affine), points_world)
    bad = np.nonzero(((ijk < -0.5) | (ijk > np.asarray(shape, dtype=np.float64) - 0.5)).any(axis=1))[0]
    if len(bad):
        lo, hi = world_bounds(affine, shape)
        pts = "; ".join(",".join(f"{v:.1f}" for v in points_world[i]) for i in bad[:5])
        raise MatchError(
            f"{len(bad)} query point(s) outside volume {label} "
            f"(world extent {np.round(lo, 1).tolist()} .. {np.round(hi, 1).tolist()} mm): {pts}"
        )


def world_bounds(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world box (mm) covered by the voxels of a grid (corners included)."""
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape], indexing="ij")).reshape(len(shape), -1).T
    w = apply_affine(affine, corners)
    return w.min(0), w.max(0)


def parse_points(text: str) -> np.ndarray:
    """``"x,y,z;x,y,z"`` -> ``(N, 3)`` world mm; MatchError saying what was expected."""
    pts = []
    for part in text.replace("\n", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        vals = part.replace(" ", ",").split(",")
        vals = [v for v in vals if v]
        try:
            xyz = [float(v) for v in vals]
        except ValueError:
            xyz = []
        if len(xyz) != 3:
            raise MatchError(f"--points: expected 'x,y,z;x,y,z;...' in world mm, could not read {part!r}")
        pts.append(xyz)
    if not pts:
        raise MatchError("--points: no points given (expected 'x,y,z;x,y,z;...' in world mm)")
    return np.asarray(pts, dtype=np.float64)


def read_points_file(path: str | os.PathLike) -> np.ndarray:
    """Points from a file -> ``(N, 3)`` world mm; MatchError naming the file and what was expected.

    JSON: ``[[x, y, z], ...]`` or ``{"points": [[x, y, z], ...]}``; otherwise text with one
    ``x,y,z`` (or ``x y z``) per line, blank lines and ``#`` comments ignored.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MatchError(f"--points-file {path}: cannot read it ({e})") from None
    rows = _json_points(path, text) if text.lstrip()[:1] in ("[", "{") else _text_points(path, text)
    if not rows:
        raise MatchError(f"--points-file {path}: no points in it (expected JSON [[x, y, z], ...] or one "
                         "'x,y,z' per line, world mm)")
    pts = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(pts)):
        raise MatchError(f"--points-file {path}: coordinates must be finite numbers (world mm)")
    return pts


def _json_points(path: Path, text: str) -> list:
    expected = 'expected a JSON list of [x, y, z] lists (world mm) or {"points": [...]}'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MatchError(f"--points-file {path}: not valid JSON ({e}); {expected}") from None
    if isinstance(data, dict):
        if "points" not in data:
            raise MatchError(f"--points-file {path}: no 'points' key (keys: {sorted(data)}); {expected}")
        data = data["points"]
    if not isinstance(data, list):
        raise MatchError(f"--points-file {path}: got a JSON {type(data).__name__}; {expected}")
    for i, p in enumerate(data):
        if not (isinstance(p, list) and len(p) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)):
            raise MatchError(f"--points-file {path}: point {i} is {json.dumps(p)}; {expected}")
    return data


def _text_points(path: Path, text: str) -> list:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            xyz = [float(v) for v in line.replace(",", " ").split()]
        except ValueError:
            xyz = []
        if len(xyz) != 3:
            raise MatchError(f"--points-file {path} line {n}: expected 'x,y,z' in world mm, could not read {line!r}")
        rows.append(xyz)
    return rows
