"""Embeddings of volumes by image key: an in-memory LRU in front of persistent sources.

An image's key digests its voxels and affine (:func:`image_key`), so a moved or edited image
is another entry. :meth:`EmbeddingStore.get` looks in memory, then in each source in order
(today the on-disk cache, :class:`DiskEmbeddingCache`; any object with the ``get``/``put`` of
:class:`EmbeddingSource` can be added), and only then runs the network. Grids are RAS-ordered
and tied to world by their affines, so nothing here depends on the input's orientation.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from alice3d.data.io import Volume, load_volume
from landmark.embed_cache import CacheError, hash_arrays, read_entry, trim_cache, write_entry
from landmark.points import check_points_inside

log = logging.getLogger("alice3d.landmark")


@dataclass
class Embedding:
    """Embeddings of one volume; grids are RAS-ordered and tied to world by their affines."""

    fine: torch.Tensor  # (Xf, Yf, Zf, D), unit vectors (float16 on CPU, memory-mapped from the cache)
    coarse: torch.Tensor  # (Xc, Yc, Zc, D) float32
    fine_affine: np.ndarray  # (4, 4) fine index -> world mm
    coarse_affine: np.ndarray  # (4, 4)
    source_shape: tuple  # the input volume (before any resampling)
    source_affine: np.ndarray
    key: str = ""
    name: str = ""
    body: torch.Tensor | None = None  # (Xf, Yf, Zf) bool, fine voxels mostly above the body threshold

    @property
    def factor(self) -> int:
        """Coarse stride in fine voxels."""
        return int(round(np.linalg.norm(self.coarse_affine[:3, 0]) / np.linalg.norm(self.fine_affine[:3, 0])))

    @property
    def fine_shape(self) -> tuple:
        return tuple(self.fine.shape[:-1])

    def check_inside(self, points_world: np.ndarray, label: str = "") -> None:
        """MatchError listing the points that lie outside the source volume's voxel extent."""
        check_points_inside(self.source_affine, self.source_shape, points_world, label or self.name or "A")


def image_key(volume) -> str:
    """Digest of a ``Volume``'s voxels and affine (rounded to 1e-6 mm, below any real difference)."""
    return hash_arrays(np.asarray(volume.array, dtype=np.float32), np.round(np.asarray(volume.affine, np.float64), 6))


def as_volume(item):
    """A ``Volume`` as it is, or the image at a path loaded (HU, any orientation)."""
    if isinstance(item, Volume):
        return item
    if isinstance(item, (str, os.PathLike)):
        return load_volume(item)
    raise TypeError(f"expected a Volume or an image path, got {type(item).__name__}")


class EmbeddingSource(Protocol):
    """Somewhere embeddings persist between processes."""

    def get(self, key: str, name: str) -> Embedding | None:
        """The embedding of image ``key``; None when there is none; CacheError when it is unusable."""

    def put(self, emb: Embedding) -> Embedding:
        """Keep ``emb``; returns the copy to use from now on (e.g. memory-mapped from the file)."""


class DiskEmbeddingCache:
    """``CACHE/<model key[:20]>/<image key>.emb`` files (format: :mod:`landmark.embed_cache`).

    ``max_bytes``: cap of the whole cache directory, enforced after every write (None: no cap).
    ``verify``: check the checksums of entries read from disk.
    """

    def __init__(self, cache_dir: str | os.PathLike, model_key: str, max_bytes: int | None, verify: bool = True):
        self.cache_dir, self.model_key = Path(cache_dir), model_key
        self.max_bytes, self.verify = max_bytes, verify

    def path(self, key: str) -> Path:
        return self.cache_dir / self.model_key[:20] / f"{key}.emb"

    def get(self, key: str, name: str) -> Embedding | None:
        path = self.path(key)
        return self._read(path, key, name, self.verify) if path.exists() else None

    def put(self, emb: Embedding) -> Embedding:
        path = self.path(emb.key)
        meta = {"image_key": emb.key, "model_key": self.model_key, "name": emb.name,
                "fine_affine": emb.fine_affine.tolist(), "coarse_affine": emb.coarse_affine.tolist(),
                "source_shape": list(emb.source_shape), "source_affine": emb.source_affine.tolist()}
        try:
            write_entry(path, {"body": emb.body.numpy().astype(np.uint8), "fine": emb.fine.numpy(),
                               "coarse": emb.coarse.numpy()}, meta)
        except OSError as e:
            log.warning("could not write embedding cache %s (%s); continuing without it", path, e)
            return emb
        trim_cache(self.cache_dir, self.max_bytes, path)
        try:
            return self._read(path, emb.key, emb.name, verify=False)  # memory-mapped, not resident
        except CacheError as e:  # evicted at once by another process
            log.debug("keeping the embedding in memory: %s", e)
            return emb

    def _read(self, path: Path, key: str, name: str, verify: bool) -> Embedding:
        arrays, meta = read_entry(path, verify=verify, expect_meta={"image_key": key, "model_key": self.model_key})
        try:
            fine, coarse, body = arrays["fine"], arrays["coarse"], arrays["body"]
            emb = Embedding(
                fine=torch.from_numpy(fine), coarse=torch.from_numpy(np.asarray(coarse, dtype=np.float32)),
                fine_affine=np.asarray(meta["fine_affine"], dtype=np.float64),
                coarse_affine=np.asarray(meta["coarse_affine"], dtype=np.float64),
                source_shape=tuple(meta["source_shape"]), source_affine=np.asarray(meta["source_affine"], np.float64),
                key=key, name=meta.get("name", name), body=torch.from_numpy(np.asarray(body, dtype=bool)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{path}: header misses a field ({e})") from None
        if fine.ndim != 4 or coarse.ndim != 4 or fine.shape[-1] != coarse.shape[-1] or body.shape != fine.shape[:-1]:
            raise CacheError(f"{path}: unexpected array shapes fine {fine.shape}, coarse {coarse.shape}, "
                             f"body {body.shape}")
        return emb


class EmbeddingStore:
    """Memory LRU of ``memory_items`` embeddings -> ``sources`` in order -> ``compute(volume, key, name)``.

    A computed embedding is put into every source. ``stats`` counts where each one came from.
    """

    def __init__(self, compute: Callable[[object, str, str], Embedding], sources: Sequence[EmbeddingSource] = (),
                 memory_items: int = 32):
        self.compute, self.sources, self.memory_items = compute, list(sources), memory_items
        self._memory: OrderedDict[str, Embedding] = OrderedDict()
        self.stats = {"computed": 0, "disk_hits": 0, "memory_hits": 0, "recomputed_bad_cache": 0}

    def get(self, volume) -> Embedding:
        """Embedding of a ``Volume`` or image path (an :class:`Embedding` is returned as it is)."""
        if isinstance(volume, Embedding):
            return volume
        vol = as_volume(volume)
        key = image_key(vol)
        if key in self._memory:
            self._memory.move_to_end(key)
            self.stats["memory_hits"] += 1
            return self._memory[key]
        name = Path(vol.path).name if getattr(vol, "path", "") else key[:12]
        emb = self._from_sources(key, name)
        if emb is None:
            emb = self.compute(vol, key, name)
            self.stats["computed"] += 1
            for source in self.sources:
                emb = source.put(emb)
        self._memory[key] = emb
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return emb

    def _from_sources(self, key: str, name: str) -> Embedding | None:
        for source in self.sources:
            try:
                emb = source.get(key, name)
            except CacheError as e:
                log.warning("embedding cache entry unusable, recomputing: %s", e)
                self.stats["recomputed_bad_cache"] += 1
                continue
            if emb is not None:
                self.stats["disk_hits"] += 1
                return emb
        return None
