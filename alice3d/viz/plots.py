"""Line, scatter and bar plots with matplotlib, rendered off-screen to PNG.

Figures are built from `matplotlib.figure.Figure` with an Agg canvas attached directly, so
plotting needs no display, never selects a pyplot backend and leaves pyplot's global state
(and any interactive session of the caller) untouched.

    line_plot({"mae": (xs, ys), "cae": (xs, ys2)}, "cka.png", title="CKA at mask 0.75",
              xlabel="block", ylabel="CKA")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .png import write_png

__all__ = ["PALETTE", "new_figure", "render_figure", "save_figure", "draw_lines", "render_line_plot", "line_plot",
           "scatter_plot", "bar_plot"]

# matplotlib's default cycle ("tab10") as RGB, for callers that fix one colour per name.
PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]
DPI = 100

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def new_figure(size: tuple[int, int] = (420, 640), nrows: int = 1, ncols: int = 1) -> tuple[Figure, np.ndarray]:
    """A figure of `size` (height, width) pixels with an Agg canvas and a (nrows, ncols) array of axes."""
    h, w = int(size[0]), int(size[1])
    if h < 100 or w < 100:
        raise ValueError(f"new_figure: size {size} is too small for a plot (need at least 100 x 100 pixels)")
    # half a pixel more than asked, so that the canvas' integer truncation lands on h x w
    fig = Figure(figsize=((w + 0.5) / DPI, (h + 0.5) / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def render_figure(fig: Figure) -> np.ndarray:
    """Draw `fig` -> RGB uint8 (H, W, 3)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Render `fig` and write it as PNG (atomically); returns the path."""
    return write_png(path, render_figure(fig))


def _color(k: int, label: str, colors: Mapping[str, Sequence[int]] | None) -> tuple[float, float, float]:
    rgb = colors[label] if colors and label in colors else PALETTE[k % len(PALETTE)]
    return tuple(float(c) / 255.0 for c in rgb)


def _decorate(ax: Axes, title: str, xlabel: str, ylabel: str, xlim, ylim, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if xlim is not None:
        ax.set_xlim(*xlim)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(True, color="0.9", linewidth=0.8)
    ax.set_axisbelow(True)
    if legend:
        ax.legend(loc="best", fontsize="small", frameon=False)


def draw_lines(
    ax: Axes,
    series: Series,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    xlim: tuple[float, float] | None = None,
    markers: bool = True,
    line_width: float = 1.5,
    colors: Mapping[str, Sequence[int]] | None = None,
    integer_x: bool = False,
) -> Axes:
    """One line per `{label: (xs, ys)}` on `ax`, with grid and legend.

    Non-finite points break a line into pieces. `colors` fixes the RGB (0..255) of some
    labels (e.g. the same method in several plots); the others take `PALETTE` in order.
    integer_x: ticks only at whole numbers (block or epoch indices).
    """
    for k, (label, (xs, ys)) in enumerate(series.items()):
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError(f"draw_lines: series {label!r} needs two 1-D sequences of one length, "
                             f"got shapes {xs.shape} and {ys.shape}")
        ys = np.where(np.isfinite(xs) & np.isfinite(ys), ys, np.nan)
        ax.plot(xs, ys, color=_color(k, label, colors), linewidth=line_width, label=label,
                marker="o" if markers else None, markersize=4 + line_width)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _decorate(ax, title, xlabel, ylabel, xlim, ylim, legend=bool(series))
    return ax


def render_line_plot(series: Series, size: tuple[int, int] = (420, 640), **kwargs) -> np.ndarray:
    """`series` (see `draw_lines`, whose keyword arguments pass through) -> RGB uint8 (*size, 3)."""
    fig, axes = new_figure(size)
    draw_lines(axes[0, 0], series, **kwargs)
    return render_figure(fig)


def line_plot(series: Series, path: str | os.PathLike, **kwargs) -> Path:
    """Render `series` (see `render_line_plot`) and write it as a PNG; returns the path."""
    return write_png(path, render_line_plot(series, **kwargs))


def scatter_plot(
    points: Series,
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (420, 640),
    colors: Mapping[str, Sequence[int]] | None = None,
    diagonal: bool = False,
) -> Path:
    """One point cloud per `{label: (xs, ys)}` -> PNG; `diagonal` adds y = x (predicted vs true)."""
    fig, axes = new_figure(size)
    ax = axes[0, 0]
    for k, (label, (xs, ys)) in enumerate(points.items()):
        ax.scatter(np.asarray(xs, float), np.asarray(ys, float), s=14, color=_color(k, label, colors), label=label)
    if diagonal and points:
        both = np.concatenate([np.r_[np.asarray(x, float), np.asarray(y, float)] for x, y in points.values()])
        both = both[np.isfinite(both)]
        if both.size:
            ax.plot([both.min(), both.max()], [both.min(), both.max()], color="0.5", linewidth=1, linestyle="--")
    _decorate(ax, title, xlabel, ylabel, None, None, legend=bool(points))
    return save_figure(fig, path)


def bar_plot(
    groups: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    title: str = "",
    ylabel: str = "",
    size: tuple[int, int] = (420, 640),
    ylim: tuple[float, float] | None = None,
    colors: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """Grouped bars `{group: {label: value}}` (e.g. {organ: {method: Dice}}) -> PNG.

    One bar per label within each group, labels coloured consistently across groups.
    """
    fig, axes = new_figure(size)
    ax = axes[0, 0]
    names = list(dict.fromkeys(lb for g in groups.values() for lb in g))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(groups))
    for k, name in enumerate(names):
        vals = [float(g.get(name, np.nan)) for g in groups.values()]
        ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, color=_color(k, name, colors), label=name)
    ax.set_xticks(x, list(groups), rotation=30 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    _decorate(ax, title, "", ylabel, None, ylim, legend=len(names) > 1)
    return save_figure(fig, path)
