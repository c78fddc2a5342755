"""Ortho-slice previews: windowed axial/coronal/sagittal slices with label overlays, markers,
orientation letters and titles, and side-by-side reconstruction panels.

Display convention (radiological): axial slices with the patient's right on the image left
and anterior up; coronal with superior up and the patient's right on the left; sagittal with
superior up and anterior on the left. Each view carries these directions as letters on its
edges (R/L, A/P, S/I). Arrays are taken as RAS-ordered (+x towards the patient's right,
+y anterior, +z superior) unless an affine is given, in which case they are reoriented first.

Each view is cropped to the body (see `body_box`), scaled to square physical pixels with one
scale for all three views, and centred in a square cell of `max_px` pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import nibabel as nib
import nibabel.orientations as nio
import numpy as np

from .mosaic import centre_in, mosaic, to_rgb
from .png import write_png
from .text import put_text, text_size

__all__ = [
    "EDGE_LETTERS", "MARKER_COLOR", "body_box", "display_threshold", "label_colors", "to_uint8", "overlay",
    "resize_nearest", "draw_crosshair", "letter_gutters", "ortho_views", "ortho_slices", "save_preview",
    "volume_panels", "save_volume_panels", "label_comparison", "save_label_comparison",
]

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
LETTER_COLOR = (140, 210, 255)
# Patient directions on the (left, right, top, bottom) image edges of each view.
EDGE_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
BODY_LEVEL = 0.05  # body = brighter than this fraction of the display window above its bottom
_PROFILE_MIN = 0.01  # box edges: slabs holding at least this fraction of the fullest slab's body voxels
_MARGIN = 0.05  # crop margin, as a fraction of the body's largest extent


def label_colors() -> np.ndarray:
    """(256, 3) uint8 colour per label id: fixed BTCV colours for 0..13, hashed colours beyond."""
    rng = np.random.default_rng(1234)
    lut = rng.integers(40, 256, size=(256, 3)).astype(np.uint8)
    lut[: len(_BTCV_COLORS)] = _BTCV_COLORS
    return lut


def _window(a: np.ndarray, window: Sequence[float] | None) -> tuple[float, float]:
    return (float(a.min()), float(a.max())) if window is None else (float(window[0]), float(window[1]))


def to_uint8(array: np.ndarray, window: Sequence[float] | None = (-175.0, 250.0)) -> np.ndarray:
    """Window intensities to 0..255 (window None = min..max of the array)."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = _window(a, window)
    scale = 255.0 / max(hi - lo, 1e-6)
    return np.clip((a - lo) * scale, 0, 255).astype(np.uint8)


def display_threshold(window: Sequence[float]) -> float:
    """The intensity above which a voxel shows as more than black in `window` (lo, hi)."""
    return float(window[0]) + BODY_LEVEL * (float(window[1]) - float(window[0]))


def body_box(array: np.ndarray, threshold: float, spacing: Sequence[float] | None = None,
             margin: float = _MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Voxel box ``[lo, hi)`` per axis of the region of `array` (N-D) above `threshold`.

    An axis keeps the indices whose orthogonal slab holds at least 1 % of the body voxels of
    the fullest slab, so stray bright voxels (noise, a marker on the table) do not stretch
    the box; the box then grows by `margin` times the body's largest extent (mm, `spacing`)
    on every side. No voxel above `threshold` -> the whole array.
    """
    body = np.asarray(array) > threshold
    shape = np.asarray(body.shape)
    if not body.any():
        return np.zeros(body.ndim, dtype=int), shape
    sp = np.ones(body.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    lo, hi = np.zeros(body.ndim, dtype=int), np.zeros(body.ndim, dtype=int)
    for ax in range(body.ndim):
        profile = body.sum(axis=tuple(o for o in range(body.ndim) if o != ax))
        keep = np.flatnonzero(profile >= max(1.0, _PROFILE_MIN * profile.max()))
        lo[ax], hi[ax] = keep[0], keep[-1] + 1
    grow = np.ceil(margin * float(((hi - lo) * sp).max()) / sp).astype(int)
    return np.maximum(lo - grow, 0), np.minimum(hi + grow, shape)


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


def _reorient_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(("R", "A", "S")))
    out = np.ascontiguousarray(nio.apply_orientation(array, transform))
    return out, affine @ nio.inv_ornt_aff(transform, array.shape)


def _as_ras(array, label, affine, point_vox, point_world):
    """Reorient to RAS when an affine is given; returns array, label, spacing, point (RAS voxels)."""
    if affine is None:
        return np.asarray(array), label, None, point_vox

    affine = np.asarray(affine, dtype=np.float64)
    if point_vox is not None and point_world is None:
        point_world = nib.affines.apply_affine(affine, np.asarray(point_vox, dtype=np.float64))
    arr, aff = _reorient_ras(np.asarray(array), affine)
    lab = None if label is None else _reorient_ras(np.asarray(label), affine)[0]
    point = None
    if point_world is not None:
        point = nib.affines.apply_affine(np.linalg.inv(aff), np.asarray(point_world, dtype=np.float64))
    return arr, lab, tuple(np.linalg.norm(aff[:3, :3], axis=0)), point


def letter_gutters(max_px: int) -> tuple[int, int, int]:
    """Letter size and the (top/bottom, left/right) strips the letters sit in, in pixels."""
    size = int(np.clip(round(max_px / 16), 10, 18))
    h, w = text_size("M", size)
    return size, h + 4, w + 4


def _letter_cell(panel: np.ndarray, view: str, cell: int, letters: bool) -> np.ndarray:
    """The panel centred in a `cell` x `cell` square, with the view's letters just outside its edges."""
    out = centre_in(panel, (cell, cell))
    if not letters:
        return out
    size, gh, gw = letter_gutters(cell)
    h, w = panel.shape[:2]
    r0, c0 = (cell - h) // 2, (cell - w) // 2  # where centre_in put the panel
    left, right, top, bottom = EDGE_LETTERS[view]
    row, col = r0 + h / 2, c0 + w / 2
    items = [(left, (c0 - gw / 2, row), "mm"), (right, (c0 + w + gw / 2, row), "mm"),
             (top, (col, r0 - gh / 2), "mm"), (bottom, (col, r0 + h + gh / 2), "mm")]
    return put_text(out, items, size=size, fill=LETTER_COLOR)


def _crop_box(arr, window, spacing, crop, box, point):
    """Voxel box [lo, hi) to show: given, the body, or everything; always holds `point`."""
    shape = np.asarray(arr.shape)
    if box is not None:
        lo, hi = (np.clip(np.asarray(b, dtype=int), 0, shape) for b in box)
    elif crop:
        lo, hi = body_box(arr, display_threshold(_window(arr, window)), spacing)
    else:
        lo, hi = np.zeros(arr.ndim, dtype=int), shape
    if point is not None:
        idx = np.clip(np.rint(np.asarray(point, dtype=float)).astype(int), 0, shape - 1)
        lo, hi = np.minimum(lo, idx), np.maximum(hi, idx + 1)
    if np.any(hi <= lo):
        raise ValueError(f"ortho_views: empty crop box {tuple(lo)}..{tuple(hi)} for an array of shape {tuple(shape)}")
    return lo, hi


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
    crop: bool = True,
    box: tuple[Sequence[int], Sequence[int]] | None = None,
    letters: bool = True,
) -> list[np.ndarray]:
    """[axial, coronal, sagittal] RGB uint8 ``(max_px, max_px, 3)`` cells through `point_vox`.

    volume_array: (X, Y, Z), RAS-ordered unless `affine` is given; label: same shape, drawn as
    a colour overlay; spacing: voxel size per axis (taken from `affine` when given). Without a
    point the slices go through the centre of the shown box, with one a marker is drawn at
    it. crop: show only the body (`body_box` above `display_threshold(window)`); box: an
    explicit RAS voxel box ``(lo, hi)`` instead (panels that must match). letters: the
    patient directions of `EDGE_LETTERS` beside the image edges, in strips kept free for them.
    """
    arr, lab, sp, point = _as_ras(volume_array, label, affine, point_vox, point_world)
    if arr.ndim != 3:
        raise ValueError(f"ortho_views: expected a 3-D (X, Y, Z) array, got shape {arr.shape}")
    if lab is not None and np.shape(lab) != arr.shape:
        raise ValueError(f"ortho_views: label shape {np.shape(lab)} does not match image shape {arr.shape}")
    sp = np.asarray(sp if sp is not None else (spacing if spacing is not None else (1.0, 1.0, 1.0)), dtype=float)
    lo, hi = _crop_box(arr, window, sp, crop, box, point)
    sub = tuple(slice(a, b) for a, b in zip(lo, hi))
    gray, lab = to_uint8(arr[sub], _window(arr, window)), None if lab is None else np.asarray(lab)[sub]
    nx, ny, nz = gray.shape
    centre = (hi - lo - 1) / 2 if point is None else np.asarray(point, float) - lo
    i, j, k = (int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(centre, gray.shape))
    _, gh, gw = letter_gutters(max_px) if letters else (0, 0, 0)
    area = min(max_px - 2 * gh, max_px - 2 * gw)
    if area < 8:
        raise ValueError(f"ortho_views: max_px={max_px} leaves no room for the image beside the orientation "
                         f"letters; use max_px >= {max_px - area + 8} or letters=False")
    px = float(((hi - lo) * sp).max()) / area
    # (view, grey slice, label slice, row spacing, col spacing, marker row, marker col)
    views = [
        ("axial", gray[::-1, ::-1, k].T, None if lab is None else lab[::-1, ::-1, k].T, sp[1], sp[0],
         ny - 1 - centre[1], nx - 1 - centre[0]),
        ("coronal", gray[::-1, j, ::-1].T, None if lab is None else lab[::-1, j, ::-1].T, sp[2], sp[0],
         nz - 1 - centre[2], nx - 1 - centre[0]),
        ("sagittal", gray[i, ::-1, ::-1].T, None if lab is None else lab[i, ::-1, ::-1].T, sp[2], sp[1],
         nz - 1 - centre[2], ny - 1 - centre[1]),
    ]
    cells = []
    for view, g, lb, sr, sc, mr, mc in views:
        hw = (min(area, max(1, round(g.shape[0] * sr / px))), min(area, max(1, round(g.shape[1] * sc / px))))
        rgb = overlay(resize_nearest(g, hw), None if lb is None else resize_nearest(lb, hw), alpha)
        if point is not None:
            draw_crosshair(rgb, (mr + 0.5) * hw[0] / g.shape[0] - 0.5, (mc + 0.5) * hw[1] / g.shape[1] - 0.5)
        cells.append(_letter_cell(rgb, view, max_px, letters))
    return cells


def ortho_slices(volume_array: np.ndarray, label: np.ndarray | None = None, point_vox=None, window=(-175.0, 250.0),
                 **kwargs) -> np.ndarray:
    """Axial | coronal | sagittal cells in one RGB uint8 row ``(max_px, 3 * max_px + 8, 3)``;
    arguments as in `ortho_views`."""
    return mosaic([ortho_views(volume_array, label, point_vox, window, **kwargs)])


def save_preview(path: str | os.PathLike, volume, label=None, **kwargs) -> Path:
    """Write `ortho_slices` of an array or a `Volume` (its affine and label are used) as PNG."""
    if hasattr(volume, "array") and hasattr(volume, "affine"):
        label = volume.label if label is None else label
        kwargs.setdefault("affine", volume.affine)
        volume = volume.array
    return write_png(path, ortho_slices(volume, label, **kwargs))


def label_comparison(image: np.ndarray, labels: Mapping[str, np.ndarray], **kwargs) -> np.ndarray:
    """One titled row of ortho cells per label map over the same `image` (X, Y, Z) -> RGB uint8.

    The body box comes from the image alone, so every row shows the same region and slices
    (e.g. ground truth over prediction); `kwargs` as in `ortho_views` (window, spacing, point_vox, alpha, max_px, ...).
    """
    if not labels:
        raise ValueError("label_comparison: expected at least one label map")
    rows = [[ortho_slices(image, lab, **kwargs)] for lab in labels.values()]
    return mosaic(rows, row_titles=list(labels))


def save_label_comparison(path: str | os.PathLike, image: np.ndarray, labels: Mapping[str, np.ndarray],
                          **kwargs) -> Path:
    """Write `label_comparison` as PNG and return the path."""
    return write_png(path, label_comparison(image, labels, **kwargs))


def _panel_window(a: np.ndarray, shared: tuple[float, float]) -> tuple[float, float]:
    """The shared window, unless the panel's values live elsewhere (e.g. attention scores)."""
    lo, hi = float(np.percentile(a, 1)), float(np.percentile(a, 99))
    width = shared[1] - shared[0]
    if lo >= shared[0] - 0.5 * width and hi <= shared[1] + 0.5 * width:
        return shared
    return float(a.min()), float(max(a.max(), a.min() + 1e-6))


def _flat_cell(a: np.ndarray, window, spacing, box, max_px: int) -> np.ndarray:
    """A 2-D (H, W) panel cropped to `box`, scaled to square pixels, centred in a max_px cell."""
    lo, hi = box
    sub = a[lo[0]:hi[0], lo[1]:hi[1]]
    sp = np.asarray(spacing if spacing is not None else (1.0, 1.0), float)
    px = max(sub.shape[0] * sp[0], sub.shape[1] * sp[1]) / max_px
    hw = (min(max_px, round(sub.shape[0] * sp[0] / px)), min(max_px, round(sub.shape[1] * sp[1] / px)))
    return centre_in(to_rgb(resize_nearest(to_uint8(sub, window), hw)), (max_px, max_px))


def volume_panels(
    panels: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    window: Sequence[float] | None = None,
    spacing: Sequence[float] | None = None,
    max_px: int = 160,
    crop: bool = True,
) -> np.ndarray:
    """Side-by-side grey panels (e.g. input | masked | reconstruction) -> RGB uint8 mosaic.

    Each panel is 2-D (H, W) or 3-D (X, Y, Z) (RAS-ordered); 3-D panels show axial, coronal and
    sagittal cells through the centre, one view per row, one panel per column; 2-D panels one
    `max_px` cell each. A dict's keys title the columns. All panels share one intensity window
    (default: 1st-99th percentile of the first panel) unless a panel's values lie far outside
    it, which then gets its own min..max. Panels shaped like the first show the first one's body
    box, so a masked or reconstructed panel shows the same region as the input.
    """
    names = list(panels) if isinstance(panels, Mapping) else None
    arrays = [np.asarray(a, dtype=np.float32) for a in (panels.values() if isinstance(panels, Mapping) else panels)]
    if not arrays:
        raise ValueError("volume_panels: expected at least one panel")
    nd = arrays[0].ndim
    if nd not in (2, 3) or any(a.ndim != nd for a in arrays):
        raise ValueError(f"volume_panels: expected all 2-D or all 3-D panels, got shapes {[a.shape for a in arrays]}")
    first = arrays[0]
    shared = tuple(window) if window is not None else (float(np.percentile(first, 1)), float(np.percentile(first, 99)))
    if shared[1] <= shared[0]:
        shared = (shared[0], shared[0] + 1.0)
    first_box = _panel_box(first, shared, spacing, crop)
    columns = []
    for a in arrays:
        w = shared if window is not None else _panel_window(a, shared)
        box = first_box if a.shape == first.shape else _panel_box(a, w, spacing, crop)
        if nd == 2:
            columns.append([_flat_cell(a, w, spacing, box, max_px)])
        else:
            columns.append(ortho_views(a, window=w, spacing=spacing, max_px=max_px, box=box))
    rows = [[col[r] for col in columns] for r in range(len(columns[0]))]
    return mosaic(rows, col_titles=None if names is None else [n.replace("_", " ") for n in names])


def _panel_box(a: np.ndarray, window, spacing, crop: bool) -> tuple[np.ndarray, np.ndarray]:
    if not crop:
        return np.zeros(a.ndim, dtype=int), np.asarray(a.shape)
    return body_box(a, display_threshold(window), spacing)


def save_volume_panels(panels: Mapping[str, np.ndarray] | Sequence[np.ndarray], path: str | os.PathLike,
                       **kwargs) -> Path:
    """Write `volume_panels` as PNG and return the path."""
    return write_png(path, volume_panels(panels, **kwargs))
