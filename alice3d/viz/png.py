"""PNG files through Pillow: uint8 grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4) arrays."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> Pillow mode


def to_image(array: np.ndarray) -> Image.Image:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> a Pillow image of mode L, RGB or RGBA."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"write_png: expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in _MODES or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"write_png: expected (H, W), (H, W, 3) or (H, W, 4) pixels, got shape {np.shape(array)}")
    c = a.shape[2]
    return Image.fromarray(np.ascontiguousarray(a[:, :, 0] if c == 1 else a), mode=_MODES[c])


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write uint8 grey/RGB/RGBA pixels to `path` (parents created); returns the path.

    The file appears complete or not at all: it is written beside the target and renamed,
    so a crash or a reader polling the folder never sees half a PNG.
    """
    path = Path(path)
    image = to_image(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name opened exclusively (not mkstemp, whose 0600 mode would stick to the PNG)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit PNG -> uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA.

    Palette images come back as RGB (RGBA when they carry transparency), grey+alpha as RGBA.
    """
    try:
        with Image.open(path, formats=["PNG"]) as im:
            im.load()
            mode = im.mode
            if mode == "1":
                im = im.convert("L")
            elif mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode == "LA":
                im = im.convert("RGBA")
            elif mode not in ("L", "RGB", "RGBA"):
                raise ValueError(f"{path}: expected an 8-bit grey, RGB, RGBA or palette PNG, got mode {mode}")
            return np.array(im, dtype=np.uint8)
    except UnidentifiedImageError as e:
        raise ValueError(f"{path}: not a PNG file") from e
