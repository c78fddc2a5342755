"""Plots with matplotlib: size, colours, data placed where the axes say, real text."""

import numpy as np
import pytest

from alice3d.viz.plots import PALETTE, bar_plot, draw_lines, line_plot, new_figure, render_figure, scatter_plot
from alice3d.viz.png import read_png


def _near(img, rgb, tol=30):
    return (np.abs(img.astype(int) - np.asarray(rgb)).max(-1) <= tol)


def test_line_plot_written_and_read_back(tmp_path):
    xs = np.arange(5)
    path = line_plot({"a": (xs, xs ** 2), "b": (xs, 10 - xs)}, tmp_path / "sub" / "l.png", size=(300, 500),
                     title="Loss", xlabel="step", ylabel="value")
    img = read_png(path)
    assert img.shape == (300, 500, 3)
    assert (img < 250).any(-1).mean() > 0.02  # axes, lines and text on the white background
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert PALETTE[0] in colours and PALETTE[1] in colours  # marker centres in the series colours
    title_band = img[:25, 150:350]
    assert (title_band < 128).any() and (title_band == 255).all(-1).any()  # dark text on white


def test_points_land_where_the_axes_say():
    fig, axes = new_figure((240, 320))
    ax = axes[0, 0]
    draw_lines(ax, {"a": ([0.0, 1.0], [0.0, 1.0])}, xlim=(-0.5, 1.5), ylim=(-0.5, 1.5), colors={"a": (200, 0, 0)})
    img = render_figure(fig)
    assert img.shape == (240, 320, 3)
    for x, y in ((0.0, 0.0), (1.0, 1.0)):
        col, row = ax.transData.transform((x, y))
        r, c = int(round(img.shape[0] - row)), int(round(col))  # display y grows upwards
        assert _near(img[r - 1:r + 2, c - 1:c + 2], (200, 0, 0), tol=10).all()
    red = np.argwhere(_near(img, (200, 0, 0), tol=10))
    assert np.corrcoef(red[:, 0], red[:, 1])[0, 1] < -0.95  # rises from bottom-left to top-right


def test_non_finite_points_break_the_line_and_bad_series_are_refused():
    fig, axes = new_figure((200, 300))
    draw_lines(axes[0, 0], {"a": ([0, 1, 2, 3], [0.0, np.nan, 2.0, 3.0])}, markers=False)
    line = axes[0, 0].get_lines()[0]
    assert np.isnan(line.get_ydata()[1]) and np.isfinite(line.get_ydata()[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="'b'"):
        draw_lines(axes[0, 0], {"b": ([0, 1, 2], [0, 1])})
    with pytest.raises(ValueError, match="too small"):
        new_figure((40, 300))


def test_bar_heights_follow_values(tmp_path):
    # bars in the lower half, so the legend ("best" place) sits above them
    path = bar_plot({"spleen": {"mae": 0.8, "cae": 0.4}}, tmp_path / "b.png", ylim=(0.0, 2.0), ylabel="Dice",
                    size=(300, 400))
    img = read_png(path)
    assert img.shape == (300, 400, 3)
    counts = [np.all(img == c, axis=-1).sum(0) for c in PALETTE[:2]]  # per column
    heights = [float(np.median(n[n > 0])) for n in counts]  # the median column skips the legend swatch
    assert heights[1] > 0 and heights[0] / heights[1] == pytest.approx(2.0, rel=0.05)


def test_scatter_plot_draws_each_cloud(tmp_path):
    rng = np.random.default_rng(0)
    pts = {"train": (rng.uniform(0, 1, 20), rng.uniform(0, 1, 20)), "test": (rng.uniform(0, 1, 9), rng.uniform(0, 1, 9))}
    img = read_png(scatter_plot(pts, tmp_path / "s.png", diagonal=True, size=(200, 260)))
    assert img.shape == (200, 260, 3)
    assert np.all(img == PALETTE[0], axis=-1).any() and np.all(img == PALETTE[1], axis=-1).any()
