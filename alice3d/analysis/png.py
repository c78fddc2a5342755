"""Minimal PNG writer/reader (zlib + struct only): 8-bit grey, RGB or RGBA."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(array: np.ndarray, level: int = 6) -> bytes:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> PNG bytes."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"write_png: expected uint8 pixels, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in _COLOR_TYPE or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"write_png: expected (H, W), (H, W, 3) or (H, W, 4), got shape {np.asarray(array).shape}")
    h, w, c = a.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, w * c)], axis=1)  # filter byte 0 per row
    header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE[c], 0, 0, 0)
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level)) + _chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write uint8 (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA pixels to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))
    return path


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undo PNG scanline filters; rows (H, 1 + stride) uint8 -> (H, stride) uint8."""
    h, n = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((h, n), dtype=np.int32)
    prev = np.zeros(n, dtype=np.int32)
    for r in range(h):
        f, line = rows[r, 0], rows[r, 1:].astype(np.int32)
        if f == 0:
            cur = line
        elif f == 2:
            cur = (line + prev) & 255
        else:
            cur = line.copy()
            for i in range(n):
                left = cur[i - bpp] if i >= bpp else 0
                up = prev[i]
                if f == 1:
                    cur[i] = (cur[i] + left) & 255
                elif f == 3:
                    cur[i] = (cur[i] + (left + up) // 2) & 255
                elif f == 4:
                    ul = prev[i - bpp] if i >= bpp else 0
                    p = left + up - ul
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up if pb <= pc else ul)
                    cur[i] = (cur[i] + pred) & 255
                else:
                    raise ValueError(f"read_png: unknown filter type {f}")
        out[r] = cur
        prev = cur
    return out.astype(np.uint8)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read an 8-bit non-interlaced grey/RGB/RGBA PNG -> uint8 (H, W) or (H, W, C)."""
    data = Path(path).read_bytes()
    if not data.startswith(_SIGNATURE):
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None:
        raise ValueError(f"{path}: PNG without IHDR")
    w, h, depth, ctype, _, _, interlace = header
    if depth != 8 or ctype not in _CHANNELS or interlace:
        raise ValueError(f"{path}: only 8-bit non-interlaced grey/RGB/RGBA PNGs are supported")
    c = _CHANNELS[ctype]
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, 1 + w * c)
    px = _unfilter(rows, c).reshape(h, w, c)
    return px[:, :, 0] if c == 1 else px
