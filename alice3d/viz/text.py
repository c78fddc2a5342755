"""Real text on uint8 RGB arrays with Pillow's built-in scalable font (no font files needed)."""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)


@lru_cache(maxsize=16)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's default font at `size` pixels."""
    return ImageFont.load_default(size=max(int(size), 1))


def text_size(text: str, size: int) -> tuple[int, int]:
    """(height, width) in pixels of `text` set at `size`."""
    left, top, right, bottom = font(size).getbbox(text)
    return bottom - top, right - left


def put_text(
    img: np.ndarray,
    items: Iterable[tuple[str, tuple[float, float], str]],
    size: int = 12,
    fill: Sequence[int] = WHITE,
    outline: Sequence[int] | None = (0, 0, 0),
) -> np.ndarray:
    """Draw `(text, (col, row), anchor)` items onto a copy of RGB `img (H, W, 3)` uint8.

    anchor: Pillow's two-letter text anchor, e.g. ``"mm"`` (centred), ``"lt"`` (left-top).
    A one-pixel `outline` keeps text readable over bright image content.
    """
    im = Image.fromarray(np.ascontiguousarray(img[:, :, :3]), mode="RGB")
    draw = ImageDraw.Draw(im)
    f = font(size)
    stroke = {} if outline is None else {"stroke_width": 1, "stroke_fill": tuple(outline)}
    for text, (col, row), anchor in items:
        draw.text((float(col), float(row)), text, fill=tuple(fill), font=f, anchor=anchor, **stroke)
    return np.array(im, dtype=np.uint8)
