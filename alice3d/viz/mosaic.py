"""Tile image panels into a grid, each centred in its cell, with optional column/row titles."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .text import put_text, text_size


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Grey (H, W) or (H, W, C>=3) uint8 -> RGB (H, W, 3)."""
    img = np.asarray(img)
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


def centre_in(panel: np.ndarray, hw: tuple[int, int], bg: int = 0) -> np.ndarray:
    """RGB panel (h, w, 3) centred on a `bg` canvas (H, W, 3) with H >= h, W >= w."""
    h, w = panel.shape[:2]
    if h > hw[0] or w > hw[1]:
        raise ValueError(f"centre_in: panel {panel.shape[:2]} does not fit into a cell of {tuple(hw)}")
    out = np.full((hw[0], hw[1], 3), bg, dtype=np.uint8)
    r, c = (hw[0] - h) // 2, (hw[1] - w) // 2
    out[r:r + h, c:c + w] = to_rgb(panel)
    return out


def mosaic(
    rows: Sequence[Sequence[np.ndarray]],
    pad: int = 4,
    bg: int = 0,
    col_titles: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    title_size: int = 13,
) -> np.ndarray:
    """Grey/RGB uint8 panels, row by row -> one RGB uint8 grid image.

    Cells are as wide as the widest panel of their column and as tall as the tallest of
    their row; each panel sits in the centre of its cell. `col_titles` go in a strip above
    the grid, centred over their columns; `row_titles` in a strip above each row.
    """
    rows = [[to_rgb(p) for p in row] for row in rows if len(row)]
    if not rows:
        raise ValueError("mosaic: expected at least one panel")
    n_cols = max(len(r) for r in rows)
    widths = [max(r[c].shape[1] for r in rows if c < len(r)) for c in range(n_cols)]
    heights = [max(p.shape[0] for p in r) for r in rows]
    strip = text_size("Ag", title_size)[0] + 6
    col_strip = strip if col_titles else 0
    row_strip = strip if row_titles else 0
    x0 = np.concatenate([[0], np.cumsum(np.asarray(widths) + pad)])[:n_cols]
    total_w = int(sum(widths) + pad * (n_cols - 1))
    total_h = int(col_strip + sum(heights) + len(rows) * row_strip + pad * (len(rows) - 1))
    out = np.full((total_h, total_w, 3), bg, dtype=np.uint8)
    texts = [(t, (x0[c] + widths[c] / 2, col_strip / 2), "mm") for c, t in enumerate(col_titles or []) if c < n_cols]
    y = col_strip
    for k, (row, h) in enumerate(zip(rows, heights)):
        if row_titles and k < len(row_titles):
            texts.append((row_titles[k], (3, y + row_strip / 2), "lm"))
        y += row_strip
        for c, p in enumerate(row):
            out[y:y + h, x0[c]:x0[c] + widths[c]] = centre_in(p, (h, widths[c]), bg)
        y += h + pad
    return put_text(out, texts, size=title_size) if texts else out
