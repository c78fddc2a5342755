"""What crop datasets read from: one small interface over in-memory volumes and store volumes.

A crop source is a 3-D volume at the run's spacing in RAS with

    name, path          for messages and reports
    shape, affine       (X, Y, Z) voxels, voxel -> world (RAS mm)
    lo, hi              world (mm) box of the body voxels
    pad_value           what crops are padded with outside the volume
    label               (X, Y, Z) int label map or None
    body_voxels()       (K, 3) voxel indices inside the body, where crop centres are drawn
    read_crop(c, size)  float32 crop of ``size`` voxels whose voxel ``size // 2`` is voxel ``c``,
                        intensities windowed to [0, 1]

:class:`MemoryVolume` wraps a windowed :class:`~alice3d.data.io.Volume` (tests, small data);
:class:`alice3d.data.store.StoreVolume` reads only the chunks a crop touches from a volume
store. Datasets take either (or plain ``Volume`` objects, wrapped by :func:`as_sources`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from alice3d.data.datalists import display_names
from alice3d.data.geometry import apply_affine
from alice3d.data.io import Volume

__all__ = ["CropSource", "MemoryVolume", "as_sources", "body_voxels", "box_world", "crop_at", "source_name",
           "source_names"]


class CropSource(Protocol):
    name: str
    path: str
    shape: tuple[int, ...]
    affine: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    pad_value: float
    label: np.ndarray | None

    def body_voxels(self) -> np.ndarray:
        """(K, 3) int voxel indices inside the body."""

    def read_crop(self, center: Sequence[int], size: Sequence[int]) -> np.ndarray:
        """(*size) float32, windowed, padded with ``pad_value`` outside the volume."""


def crop_at(array: np.ndarray, center: Sequence[int], size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """Crop ``size`` voxels centred on ``center``; parts outside the array are ``pad_value``."""
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    src, dst = crop_slices(array.shape, center, size)
    if src is not None:
        out[dst] = array[src]
    return out


def crop_slices(shape: Sequence[int], center: Sequence[int], size: Sequence[int]):
    """``(source slices, crop slices)`` of the part of a crop inside an array of ``shape``;
    ``(None, None)`` when the crop misses the array."""
    src, dst = [], []
    for c, s, n in zip(center, size, shape):
        start = int(c) - int(s) // 2
        lo, hi = max(start, 0), min(start + int(s), int(n))
        if hi <= lo:
            return None, None
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    return tuple(src), tuple(dst)


def body_voxels(mask: np.ndarray, n: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sample (K, 3), lo (3,), hi (3,))``: up to ``n`` voxels of ``mask`` drawn without replacement
    (all of them when ``n`` is None or larger) and the voxel box of the whole mask.

    An empty mask counts as all voxels, so a volume without body still yields crops.
    """
    idx = np.argwhere(mask)
    if len(idx) == 0:
        idx = np.argwhere(np.ones(mask.shape, dtype=bool))
    lo, hi = idx.min(0), idx.max(0)
    if n is not None and len(idx) > n:
        idx = idx[rng.choice(len(idx), n, replace=False)]
    return idx, lo, hi


def box_world(affine: np.ndarray, lo: Sequence[int], hi: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) axis-aligned box of the voxel box ``[lo, hi]`` (its 8 corner voxel centres)."""
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(len(lo), -1).T
    w = apply_affine(np.asarray(affine, dtype=np.float64), corners)
    return w.min(0), w.max(0)


def source_name(v, i: int) -> str:
    """The file name of a volume's source, or ``#i`` (one volume alone; a list of volumes is named
    by :func:`source_names`, which tells apart sources of the same name)."""
    p = getattr(v, "path", "")
    return Path(p).name if p else f"#{i}"


def source_names(volumes: Sequence) -> list[str]:
    """The name of each volume in messages, computed over the whole list: its source's file (or
    DICOM folder) name, with the nearest parent folders that tell apart sources of the same name
    (``patient1_PATIENT_DICOM.nii.gz``, ``patient2_PATIENT_DICOM.nii.gz``; see
    :func:`alice3d.data.datalists.display_names`), or ``#i`` for a volume without a path."""
    paths = [str(getattr(v, "path", "") or "") for v in volumes]
    named = iter(display_names([p for p in paths if p], keep_suffix=True))
    return [next(named) if p else f"#{i}" for i, p in enumerate(paths)]


class MemoryVolume:
    """A windowed in-memory :class:`Volume` as a crop source.

    ``body_threshold``: intensity above which a voxel is body; ``max_body``: body voxels kept for
    drawing centres (drawn with ``rng``); ``pad_value`` None: the volume's minimum.
    """

    def __init__(self, volume: Volume, body_threshold: float = 0.05, max_body: int | None = 4096,
                 rng: np.random.Generator | None = None, pad_value: float | None = 0.0, name: str = ""):
        self.array = volume.array
        self.affine = np.asarray(volume.affine, dtype=np.float64)
        self.path, self.label = volume.path, volume.label
        self.name = name or source_name(volume, 0)
        self.shape = tuple(self.array.shape)
        self.pad_value = float(self.array.min()) if pad_value is None else float(pad_value)
        rng = rng if rng is not None else np.random.default_rng(0)
        mask = self.array > body_threshold
        self.empty_body = not bool(mask.any())
        self.body, box_lo, box_hi = body_voxels(mask, max_body, rng)
        self.lo, self.hi = box_world(self.affine, box_lo, box_hi)

    def body_voxels(self) -> np.ndarray:
        return self.body

    def read_crop(self, center: Sequence[int], size: Sequence[int]) -> np.ndarray:
        return crop_at(self.array, center, size, self.pad_value)


def as_sources(volumes: Sequence, body_threshold: float = 0.05, max_body: int | None = 4096, seed: int = 0,
               pad_value: float | None = 0.0) -> list:
    """Crop sources: ``Volume`` objects wrapped as :class:`MemoryVolume` (body voxels drawn with one
    generator seeded by ``seed``, in order), crop sources as they are."""
    rng = np.random.default_rng(seed)
    names = source_names(volumes)
    out = []
    for i, v in enumerate(volumes):
        if isinstance(v, Volume):
            v = MemoryVolume(v, body_threshold, max_body, rng, pad_value, name=names[i])
        out.append(v)
    return out
