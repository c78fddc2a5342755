"""Preview images: windowed orthogonal slices with label overlays and markers, tiled into mosaics.

Display convention (radiological): axial slices with the patient's right on the image left
and anterior up; coronal with superior up and the patient's right on the left; sagittal with
superior up and anterior on the left. Arrays are taken as RAS-ordered unless an affine is
given, in which case they are reoriented first. Pixels are resampled to square physical size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .png import write_png

_BTCV_COLORS = np.array(
    [
        (0, 0, 0),  # 0 background
        (220, 60, 60),  # 1 spleen
        (60, 180, 75),  # 2 right kidney
        (255, 225, 25),  # 3 left kidney
        (0, 130, 200),  # 4 gallbladder
        (245, 130, 48),  # 5 esophagus
        (145, 30, 180),  # 6 liver
        (70, 240, 240),  # 7 stomach
        (240, 50, 230),  # 8 aorta
        (210, 245, 60),  # 9 IVC
        (250, 190, 212),  # 10 portal/splenic veins
        (0, 128, 128),  # 11 pancreas
        (220, 190, 255),  # 12 right adrenal
        (170, 110, 40),  # 13 left adrenal
    ],
    dtype=np.uint8,
)
MARKER_COLOR = (255, 255, 0)


def label_colors() -> np.ndarray:
    """(256, 3) uint8 colour per label id: fixed BTCV colours for 0..13, hashed colours beyond."""
    rng = np.random.default_rng(1234)
    lut = rng.integers(40, 256, size=(256, 3)).astype(np.uint8)
    lut[: len(_BTCV_COLORS)] = _BTCV_COLORS
    return lut


def to_uint8(array: np.ndarray, window: Sequence[float] | None = (-175.0, 250.0)) -> np.ndarray:
    """Window intensities to 0..255 (window None = min..max of the array)."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = (float(a.min()), float(a.max())) if window is None else (float(window[0]), float(window[1]))
    scale = 255.0 / max(hi - lo, 1e-6)
    return np.clip((a - lo) * scale, 0, 255).astype(np.uint8)


def to_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


def overlay(gray: np.ndarray, label: np.ndarray | None, alpha: float = 0.4) -> np.ndarray:
    """uint8 (H, W) grey + integer (H, W) labels -> RGB (H, W, 3) with labels colour-blended."""
    rgb = to_rgb(gray).astype(np.float32)
    if label is not None:
        lab = np.asarray(label).astype(np.int64) % 256
        colors = label_colors()[lab].astype(np.float32)
        m = (lab > 0)[:, :, None]
        rgb = np.where(m, (1 - alpha) * rgb + alpha * colors, rgb)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def resize_nearest(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W[, C]) to (h, w)."""
    h, w = max(1, int(hw[0])), max(1, int(hw[1]))
    rows = np.minimum((np.arange(h) + 0.5) * img.shape[0] / h, img.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(w) + 0.5) * img.shape[1] / w, img.shape[1] - 1).astype(int)
    return img[rows][:, cols]


def draw_crosshair(rgb: np.ndarray, row: float, col: float, color=MARKER_COLOR, gap: int = 3, arm: int = 10) -> np.ndarray:
    """Draw a cross-hair with a gap at (row, col) on an RGB image (in place; also returned)."""
    h, w = rgb.shape[:2]
    r, c = int(round(row)), int(round(col))
    for d in range(gap, gap + arm):
        for rr, cc in ((r - d, c), (r + d, c), (r, c - d), (r, c + d)):
            if 0 <= rr < h and 0 <= cc < w:
                rgb[rr, cc] = color
    return rgb


def mosaic(rows: Sequence[Sequence[np.ndarray]], pad: int = 4, bg: int = 0) -> np.ndarray:
    """Tile panels (grey (H, W) or RGB (H, W, 3) uint8) row by row -> one RGB uint8 image."""
    rows = [[to_rgb(p) for p in row] for row in rows if len(row)]
    if not rows:
        raise ValueError("mosaic: expected at least one panel")
    heights = [max(p.shape[0] for p in row) for row in rows]
    widths = [sum(p.shape[1] for p in row) + pad * (len(row) - 1) for row in rows]
    out = np.full((sum(heights) + pad * (len(rows) - 1), max(widths), 3), bg, dtype=np.uint8)
    y = 0
    for row, h in zip(rows, heights):
        x = 0
        for p in row:
            out[y:y + p.shape[0], x:x + p.shape[1]] = p
            x += p.shape[1] + pad
        y += h + pad
    return out


def _as_ras(array, label, affine, point_vox, point_world):
    """Reorient to RAS when an affine is given; returns array, label, spacing, point (RAS voxels)."""
    import nibabel as nib

    from ..data.io import reorient_array

    if affine is None:
        return array, label, None, point_vox
    affine = np.asarray(affine, dtype=np.float64)
    if point_vox is not None and point_world is None:
        point_world = nib.affines.apply_affine(affine, np.asarray(point_vox, dtype=np.float64))
    arr, aff = reorient_array(np.asarray(array), affine, "RAS")
    lab = None if label is None else reorient_array(np.asarray(label), affine, "RAS")[0]
    point = None
    if point_world is not None:
        point = nib.affines.apply_affine(np.linalg.inv(aff), np.asarray(point_world, dtype=np.float64))
    return arr, lab, tuple(np.linalg.norm(aff[:3, :3], axis=0)), point


def ortho_views(
    volume_array: np.ndarray,
    label: np.ndarray | None = None,
    point_vox: Sequence[float] | None = None,
    window: Sequence[float] | None = (-175.0, 250.0),
    spacing: Sequence[float] | None = None,
    affine: np.ndarray | None = None,
    point_world: Sequence[float] | None = None,
    alpha: float = 0.4,
    max_px: int = 320,
) -> np.ndarray:
    """[axial, coronal, sagittal] RGB uint8 slices through `point_vox` (default: the centre).

    volume_array: (X, Y, Z), RAS-ordered unless `affine` is given; label: same shape, drawn as
    a colour overlay; spacing: voxel size per axis (taken from `affine` when given); a marker
    is drawn at the point when one is given. Panels are scaled to square pixels, the longest
    panel side `max_px` pixels.
    """
    arr, lab, sp, point = _as_ras(volume_array, label, affine, point_vox, point_world)
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"ortho_slices: expected a 3-D (X, Y, Z) array, got shape {arr.shape}")
    if lab is not None and np.shape(lab) != arr.shape:
        raise ValueError(f"ortho_slices: label shape {np.shape(lab)} does not match image shape {arr.shape}")
    sp = np.asarray(sp if sp is not None else (spacing if spacing is not None else (1.0, 1.0, 1.0)), dtype=float)
    nx, ny, nz = arr.shape
    centre = np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]) if point is None else np.asarray(point, float)
    i, j, k = (int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(centre, arr.shape))
    gray = to_uint8(arr, window)
    extent = np.asarray(arr.shape) * sp
    px = float(extent.max()) / max_px
    # (panel, row spacing, col spacing, marker row, marker col)
    views = [
        (gray[::-1, ::-1, k].T, None if lab is None else lab[::-1, ::-1, k].T, sp[1], sp[0], ny - 1 - centre[1], nx - 1 - centre[0]),
        (gray[::-1, j, ::-1].T, None if lab is None else lab[::-1, j, ::-1].T, sp[2], sp[0], nz - 1 - centre[2], nx - 1 - centre[0]),
        (gray[i, ::-1, ::-1].T, None if lab is None else lab[i, ::-1, ::-1].T, sp[2], sp[1], nz - 1 - centre[2], ny - 1 - centre[1]),
    ]
    panels = []
    for g, l, sr, sc, mr, mc in views:
        hw = (round(g.shape[0] * sr / px), round(g.shape[1] * sc / px))
        rgb = overlay(resize_nearest(g, hw), None if l is None else resize_nearest(l, hw), alpha)
        if point is not None:
            draw_crosshair(rgb, (mr + 0.5) * hw[0] / g.shape[0] - 0.5, (mc + 0.5) * hw[1] / g.shape[1] - 0.5)
        panels.append(rgb)
    return panels


def ortho_slices(volume_array: np.ndarray, label: np.ndarray | None = None, point_vox=None, window=(-175.0, 250.0),
                 **kwargs) -> np.ndarray:
    """Axial | coronal | sagittal slices in one RGB uint8 row; arguments as in `ortho_views`."""
    return mosaic([ortho_views(volume_array, label, point_vox, window, **kwargs)])


def save_preview(path: str | os.PathLike, volume, label=None, **kwargs) -> Path:
    """Write `ortho_slices` of an array or a `Volume` (its affine and label are used) as PNG."""
    if hasattr(volume, "array") and hasattr(volume, "affine"):
        label = volume.label if label is None else label
        kwargs.setdefault("affine", volume.affine)
        volume = volume.array
    return write_png(path, ortho_slices(volume, label, **kwargs))


def _panel_window(a: np.ndarray, shared: tuple[float, float]) -> tuple[float, float]:
    """The shared window, unless the panel's values live elsewhere (e.g. attention scores)."""
    lo, hi = float(np.percentile(a, 1)), float(np.percentile(a, 99))
    width = shared[1] - shared[0]
    if lo >= shared[0] - 0.5 * width and hi <= shared[1] + 0.5 * width:
        return shared
    return float(a.min()), float(max(a.max(), a.min() + 1e-6))


def volume_panels(
    panels: dict[str, np.ndarray] | Sequence[np.ndarray],
    window: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    max_px: int = 160,
) -> np.ndarray:
    """Side-by-side grey panels (e.g. input | masked | reconstruction) -> RGB uint8 mosaic.

    Each panel is 2-D (H, W) or 3-D (X, Y, Z) (RAS-ordered); 3-D panels show axial, coronal and
    sagittal slices through the centre, one view per row, one panel per column. All panels
    share one intensity window (default: 1st-99th percentile of the first panel) unless a
    panel's values lie far outside it, which then gets its own min..max.
    """
    arrays = [np.asarray(a, dtype=np.float32) for a in (panels.values() if isinstance(panels, dict) else panels)]
    if not arrays:
        raise ValueError("volume_panels: expected at least one panel")
    nd = arrays[0].ndim
    if nd not in (2, 3) or any(a.ndim != nd for a in arrays):
        raise ValueError(f"volume_panels: expected all 2-D or all 3-D panels, got shapes {[a.shape for a in arrays]}")
    first = arrays[0]
    shared = tuple(window) if window is not None else (float(np.percentile(first, 1)), float(np.percentile(first, 99)))
    if shared[1] <= shared[0]:
        shared = (shared[0], shared[0] + 1.0)
    columns = []
    for a in arrays:
        w = shared if window is not None else _panel_window(a, shared)
        if nd == 2:
            sp = np.asarray(spacing if spacing is not None else (1.0, 1.0), float)
            px = max(a.shape[0] * sp[0], a.shape[1] * sp[1]) / max_px
            columns.append([to_rgb(resize_nearest(to_uint8(a, w), (round(a.shape[0] * sp[0] / px), round(a.shape[1] * sp[1] / px))))])
        else:
            columns.append(ortho_views(a, window=w, spacing=spacing, max_px=max_px))
    rows = [[col[r] for col in columns] for r in range(len(columns[0]))]
    return mosaic(rows)


def save_volume_panels(panels: dict[str, np.ndarray] | Sequence[np.ndarray], path: str | os.PathLike, **kwargs) -> Path:
    """Write `volume_panels` as PNG and return the path."""
    return write_png(path, volume_panels(panels, **kwargs))
