"""Line plots rendered to PNG with numpy alone (no matplotlib): axes, ticks, grid, legend, text.

Text uses a built-in 5x7 bitmap font (upper-case glyphs; lower case is drawn as upper case).

    line_plot({"mae": (xs, ys), "cae": (xs, ys2)}, "cka.png", title="CKA at mask 0.75",
              xlabel="block", ylabel="CKA")
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from alice3d.analysis.png import write_png

__all__ = ["line_plot", "render_line_plot", "draw_text", "text_size", "nice_ticks", "PALETTE"]

PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]

_GLYPHS_SRC = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    " ": ".....|.....|.....|.....|.....|.....|.....",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "[": ".###.|.#...|.#...|.#...|.#...|.#...|.###.",
    "]": ".###.|...#.|...#.|...#.|...#.|...#.|.###.",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "'": "..#..|..#..|.....|.....|.....|.....|.....",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
    "!": "..#..|..#..|..#..|..#..|..#..|.....|..#..",
    "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
    "*": ".....|..#..|#.#.#|.###.|#.#.#|..#..|.....",
    "#": ".#.#.|.#.#.|#####|.#.#.|#####|.#.#.|.#.#.",
    "@": ".###.|#...#|#.###|#.#.#|#.###|#....|.###.",
}
_GLYPHS = {c: np.array([[ch == "#" for ch in row] for row in rows.split("|")], dtype=bool) for c, rows in _GLYPHS_SRC.items()}
_GLYPH_W, _GLYPH_H = 5, 7


def _glyph(ch: str) -> np.ndarray:
    return _GLYPHS.get(ch.upper(), _GLYPHS["?"])


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of `text` drawn at `scale`."""
    if not text:
        return 0, 0
    return _GLYPH_H * scale, (len(text) * (_GLYPH_W + 1) - 1) * scale


def _text_mask(text: str, scale: int) -> np.ndarray:
    h, w = text_size(text, 1)
    mask = np.zeros((max(h, 1), max(w, 1)), dtype=bool)
    for i, ch in enumerate(text):
        mask[:, i * (_GLYPH_W + 1): i * (_GLYPH_W + 1) + _GLYPH_W] = _glyph(ch)
    return np.kron(mask, np.ones((scale, scale), dtype=bool)) if scale > 1 else mask


def draw_text(
    img: np.ndarray,
    text: str,
    row: int,
    col: int,
    color: Sequence[int] = (0, 0, 0),
    scale: int = 1,
    anchor: str = "tl",
    vertical: bool = False,
) -> None:
    """Draw `text` into `img (H, W, 3) uint8` in place.

    anchor: two letters, vertical `t|m|b` and horizontal `l|c|r` position of (row, col) on the
    text box. vertical: rotate 90 degrees counter-clockwise (reads bottom to top).
    """
    if not text:
        return
    mask = _text_mask(text, scale)
    if vertical:
        mask = np.rot90(mask)
    h, w = mask.shape
    r0 = row - {"t": 0, "m": h // 2, "b": h}[anchor[0]]
    c0 = col - {"l": 0, "c": w // 2, "r": w}[anchor[1]]
    rs, cs = slice(max(r0, 0), min(r0 + h, img.shape[0])), slice(max(c0, 0), min(c0 + w, img.shape[1]))
    if rs.start >= rs.stop or cs.start >= cs.stop:
        return
    sub = mask[rs.start - r0: rs.stop - r0, cs.start - c0: cs.stop - c0]
    img[rs, cs][sub] = np.asarray(color, dtype=np.uint8)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.1e}"
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.3f}".rstrip("0").rstrip(".")


def _stamp(img: np.ndarray, rr: np.ndarray, cc: np.ndarray, color: Sequence[int], radius: float) -> None:
    r = int(math.ceil(radius))
    h, w = img.shape[:2]
    col = np.asarray(color, dtype=np.uint8)
    for dr in range(-r, r + 1):
        for dc in range(-r, r + 1):
            if dr * dr + dc * dc > radius * radius + 0.25:
                continue
            y, x = rr + dr, cc + dc
            ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            img[y[ok], x[ok]] = col


def _draw_polyline(img: np.ndarray, pts: np.ndarray, color: Sequence[int], width: float) -> None:
    """pts `(N, 2)` float (row, col); segments sampled at sub-pixel steps and stamped with a disc."""
    for a, b in zip(pts[:-1], pts[1:]):
        n = int(max(abs(b - a).max() * 2, 1)) + 1
        t = np.linspace(0.0, 1.0, n)[:, None]
        seg = np.rint(a + (b - a) * t).astype(int)
        _stamp(img, seg[:, 0], seg[:, 1], color, width / 2)


def _hline(img, row, c0, c1, color):
    img[row, max(c0, 0): c1 + 1] = color


def _vline(img, col, r0, r1, color):
    img[max(r0, 0): r1 + 1, col] = color


def render_line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (420, 640),
    ylim: tuple[float, float] | None = None,
    xlim: tuple[float, float] | None = None,
    markers: bool = True,
    line_width: float = 2.0,
    colors: Mapping[str, Sequence[int]] | None = None,
) -> np.ndarray:
    """Series `{label: (xs, ys)}` -> RGB image `(H, W, 3)` uint8 with axes, grid and legend.

    Non-finite points are skipped (they break a line into pieces). `colors` fixes the RGB of
    some labels (e.g. the same method in several plots); the others take `PALETTE` in order.
    """
    h, w = size
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    labels = list(series)
    legend_w = (max((text_size(lb)[1] for lb in labels), default=0) + 30) if labels else 0
    left, right, top, bottom = 62, 16 + legend_w, 30 if title else 14, 46
    x0, x1, y0, y1 = left, w - right, top, h - bottom  # plot box (cols x0..x1, rows y0..y1)
    if x1 - x0 < 20 or y1 - y0 < 20:
        raise ValueError(f"render_line_plot: size {size} is too small for the labels and legend")

    xs_all = np.concatenate([np.asarray(s[0], float) for s in series.values()]) if series else np.zeros(0)
    ys_all = np.concatenate([np.asarray(s[1], float) for s in series.values()]) if series else np.zeros(0)
    fin = np.isfinite(xs_all) & np.isfinite(ys_all)
    if xlim is None:
        xlim = (float(xs_all[fin].min()), float(xs_all[fin].max())) if fin.any() else (0.0, 1.0)
    if ylim is None:
        if fin.any():
            lo, hi = float(ys_all[fin].min()), float(ys_all[fin].max())
            pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi) * 0.05, 0.05)
            ylim = (lo - pad, hi + pad)
        else:
            ylim = (0.0, 1.0)
    if xlim[1] <= xlim[0]:
        xlim = (xlim[0] - 0.5, xlim[1] + 0.5)
    if ylim[1] <= ylim[0]:
        ylim = (ylim[0] - 0.5, ylim[1] + 0.5)

    def to_px(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        col = x0 + (x - xlim[0]) / (xlim[1] - xlim[0]) * (x1 - x0)
        row = y1 - (y - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0)
        return np.stack([row, col], axis=-1)

    grid_c, axis_c, text_c = (228, 228, 228), (40, 40, 40), (20, 20, 20)
    for t in nice_ticks(*ylim):
        r = int(round(to_px(np.array([xlim[0]]), np.array([t]))[0, 0]))
        if y0 <= r <= y1:
            _hline(img, r, x0, x1, grid_c)
            _hline(img, r, x0 - 4, x0, axis_c)
            draw_text(img, _fmt(t), r, x0 - 7, text_c, anchor="mr")
    for t in nice_ticks(*xlim, target=6):
        c = int(round(to_px(np.array([t]), np.array([ylim[0]]))[0, 1]))
        if x0 <= c <= x1:
            _vline(img, c, y0, y1, grid_c)
            _vline(img, c, y1, y1 + 4, axis_c)
            draw_text(img, _fmt(t), y1 + 8, c, text_c, anchor="tc")
    _hline(img, y1, x0, x1, axis_c)
    _vline(img, x0, y0, y1, axis_c)
    _hline(img, y0, x0, x1, axis_c)
    _vline(img, x1, y0, y1, axis_c)

    canvas = img[y0 + 1: y1, x0 + 1: x1]  # lines are clipped to the plot box
    for k, (label, (xs, ys)) in enumerate(series.items()):
        color = tuple(colors[label]) if colors and label in colors else PALETTE[k % len(PALETTE)]
        xs, ys = np.asarray(xs, float), np.asarray(ys, float)
        pts = to_px(xs, ys) - np.array([y0 + 1, x0 + 1])
        ok = np.isfinite(pts).all(1)
        runs = np.split(np.arange(len(pts)), np.flatnonzero(~ok))
        for run in runs:
            run = run[ok[run]]
            if len(run) > 1:
                _draw_polyline(canvas, pts[run], color, line_width)
            if markers and len(run):
                rr, cc = np.rint(pts[run]).astype(int).T
                _stamp(canvas, rr, cc, color, line_width + 1.0)
        # legend entry
        ly = y0 + 8 + 14 * k
        lx = x1 + 10
        _draw_polyline(img, np.array([[ly, lx], [ly, lx + 16]], float), color, line_width)
        draw_text(img, label, ly, lx + 22, text_c, anchor="ml")

    if title:
        draw_text(img, title, 8, (x0 + x1) // 2, text_c, scale=1, anchor="tc")
    if xlabel:
        draw_text(img, xlabel, h - 6, (x0 + x1) // 2, text_c, anchor="bc")
    if ylabel:
        draw_text(img, ylabel, (y0 + y1) // 2, 6, text_c, anchor="ml", vertical=True)
    return img


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    **kwargs,
) -> Path:
    """Render `series` (see `render_line_plot`) and write it as a PNG; returns the path."""
    return write_png(path, render_line_plot(series, **kwargs))
