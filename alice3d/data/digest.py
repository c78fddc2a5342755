"""Content digests: of arrays and values (cache keys), of image files (has a source changed?).

One implementation for every layer, so a key computed while preprocessing a volume store is
the same key the landmark matcher computes for the same image.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["hash_arrays", "volume_digest", "file_digest", "file_stamp"]


def hash_arrays(*parts: Any) -> str:
    """Hex digest over arrays (dtype, shape and bytes), strings and numbers, in order."""
    h = hashlib.blake2b(digest_size=20)
    for p in parts:
        if isinstance(p, np.ndarray) or hasattr(p, "__array__") and not isinstance(p, (str, bytes)):
            a = np.ascontiguousarray(np.asarray(p))
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(a).cast("B"))
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"|")
    return h.hexdigest()


def volume_digest(array: np.ndarray, affine: np.ndarray) -> str:
    """Digest of an image's voxels (as float32) and affine (rounded to 1e-6 mm, below any real difference)."""
    return hash_arrays(np.asarray(array, dtype=np.float32), np.round(np.asarray(affine, np.float64), 6))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def file_digest(path: str | os.PathLike) -> str:
    """Digest of a file's bytes, or of every file under a folder (a DICOM series) with its relative name."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=20)
    for f in _files(path):
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"|")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def file_stamp(path: str | os.PathLike) -> list[int]:
    """``[total bytes, newest mtime in ns]`` of a file or folder: a cheap "has it changed?" check."""
    files = _files(Path(path))
    stats = [f.stat() for f in files]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
