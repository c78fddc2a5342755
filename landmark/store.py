"""Embeddings of volumes by image key: an in-memory LRU in front of persistent sources.

An image's key digests its voxels and affine (:func:`image_key`), so a moved or edited image
is another entry. :meth:`EmbeddingStore.get` looks in memory, then in each source in order
(the on-disk cache, :class:`DiskEmbeddingCache`, and the embeddings inside a volume store,
:class:`StoreEmbeddings`; any object with the ``get``/``put`` of :class:`EmbeddingSource` can be
added), and only then runs the network. Grids are RAS-ordered
and tied to world by their affines, so nothing here depends on the input's orientation.

Both persistent sources keep an embedding as a zarr v3 group (:func:`landmark.embed_cache.write_group`:
crc32c-checked chunks, written atomically) and read it back whole into memory; the memory LRU of
:class:`EmbeddingStore`, capped in items and in bytes (``DEFAULT_MEMORY_MB`` unless set), is what
bounds the memory of a process that visits many volumes. Embedding files of the older ``.emb``
format beside them are never read: they are reported once per directory and recomputed.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from alice3d.data.datalists import display_names
from alice3d.data.digest import volume_digest
from alice3d.data.io import Volume, load_volume
from landmark.embed_cache import GROUP_SUFFIX, CacheError, note_old_entries, read_group, trim_cache, write_group
from landmark.points import check_points_inside

log = logging.getLogger("alice3d.landmark")

DEFAULT_MEMORY_MB = 4096.0  # embeddings an EmbeddingStore holds by default (decoded arrays, not mapped)


@dataclass
class Embedding:
    """Embeddings of one volume; grids are RAS-ordered and tied to world by their affines."""

    fine: torch.Tensor  # (Xf, Yf, Zf, D), unit vectors (float16 on CPU)
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
    """Digest of a ``Volume``'s voxels and affine (rounded to 1e-6 mm, below any real difference).

    The same digest a volume store records for each case's source (``image_key`` in its meta).
    """
    return volume_digest(volume.array, volume.affine)


def _path_of(item) -> str:
    """The image path of a ``Volume`` (its ``path``) or of a path; "" when there is none."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return str(getattr(item, "path", "") or "")


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
        """Keep ``emb``; returns the embedding to use from now on."""

    def exists(self, key: str, name: str) -> bool:
        """Whether an entry for ``key`` is there (not read or checked: cheap)."""


def _embedding_meta(emb: Embedding, model_key: str) -> dict:
    return {"image_key": emb.key, "model_key": model_key, "name": emb.name,
            "fine_affine": emb.fine_affine.tolist(), "coarse_affine": emb.coarse_affine.tolist(),
            "source_shape": list(emb.source_shape), "source_affine": emb.source_affine.tolist()}


def _embedding_arrays(emb: Embedding) -> dict:
    return {"body": emb.body.numpy().astype(np.uint8), "fine": emb.fine.numpy(), "coarse": emb.coarse.numpy()}


def write_embedding(path: Path, emb: Embedding, model_key: str) -> Path:
    """``emb`` as the zarr group ``path`` (fine float16, coarse float32, body uint8 and the meta)."""
    return write_group(path, _embedding_arrays(emb), _embedding_meta(emb, model_key))


def read_embedding(path: Path, key: str, model_key: str, name: str, verify: bool = True) -> Embedding:
    """The embedding entry (zarr group) at ``path``, decoded into memory; CacheError when it is not
    ``key``'s under ``model_key`` or does not read back whole.

    Every chunk's crc32c is checked as zarr decodes it, whatever ``verify`` says (kept for the
    callers of the older format, whose checksums could be skipped).
    """
    arrays, meta = read_group(path, expect_meta={"image_key": key, "model_key": model_key})
    try:
        fine, coarse, body = arrays["fine"], arrays["coarse"], arrays["body"]
        emb = Embedding(
            fine=torch.from_numpy(fine), coarse=torch.from_numpy(np.asarray(coarse, dtype=np.float32)),
            fine_affine=np.asarray(meta["fine_affine"], dtype=np.float64),
            coarse_affine=np.asarray(meta["coarse_affine"], dtype=np.float64),
            source_shape=tuple(meta["source_shape"]), source_affine=np.asarray(meta["source_affine"], np.float64),
            key=key, name=meta.get("name") or name, body=torch.from_numpy(np.asarray(body, dtype=bool)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{path}: entry metadata misses a field ({e})") from None
    if fine.dtype != np.float16 or fine.ndim != 4 or coarse.ndim != 4 or fine.shape[-1] != coarse.shape[-1] or body.shape != fine.shape[:-1]:
        raise CacheError(f"{path}: unexpected arrays fine {fine.dtype} {fine.shape}, coarse {coarse.shape}, "
                         f"body {body.shape}")
    return emb


class DiskEmbeddingCache:
    """``CACHE/<model key[:20]>/<image key>.zarr`` entries (zarr groups: :mod:`landmark.embed_cache`).

    ``max_bytes``: cap of the whole cache directory, enforced after every write (None: no cap).
    ``verify``: kept for compatibility; chunks are always checksum-checked on read.
    ``writable=False``: entries are read, never written (``put`` keeps the embedding in memory).
    Older ``.emb`` files in the cache are reported once (per process and cache) and never read.
    """

    def __init__(self, cache_dir: str | os.PathLike, model_key: str, max_bytes: int | None, verify: bool = True,
                 writable: bool = True):
        self.cache_dir, self.model_key = Path(cache_dir), model_key
        self.max_bytes, self.verify, self.writable = max_bytes, verify, writable

    def path(self, key: str) -> Path:
        """The entry's folder."""
        return self.cache_dir / self.model_key[:20] / f"{key}{GROUP_SUFFIX}"

    def exists(self, key: str, name: str = "") -> bool:
        return (self.path(key) / "zarr.json").is_file()

    def get(self, key: str, name: str) -> Embedding | None:
        note_old_entries(self.cache_dir, how="`alice3d-landmark cache --clear` deletes them with the rest of "
                                             f"the cache, or `rm {self.cache_dir}/*/*.emb` only them")
        path = self.path(key)
        return read_embedding(path, key, self.model_key, name, self.verify) if path.exists() else None

    def put(self, emb: Embedding) -> Embedding:
        if not self.writable:
            return emb
        path = self.path(emb.key)
        try:
            write_embedding(path, emb, self.model_key)
        except OSError as e:
            log.warning("could not write embedding cache %s (%s); continuing without it", path, e)
            return emb
        trim_cache(self.cache_dir, self.max_bytes, path)
        return emb  # already in memory; the entry is for the next process


class StoreEmbeddings:
    """Embeddings inside a volume store: ``STORE/cases/<case>/landmark/<model key[:20]>.zarr``.

    Same entries as the disk cache (zarr groups, checksum-checked, never evicted). A case is
    found by its image key once :meth:`register` has tied the key to the case.
    ``writable=False``: read only (``put`` keeps the embedding where it is). Older ``.emb``
    files of the store are reported once (per process and store) and never read.
    """

    def __init__(self, store_root: str | os.PathLike, model_key: str, writable: bool = True, verify: bool = True):
        self.root, self.model_key, self.writable, self.verify = Path(store_root), model_key, writable, verify
        self.cases: dict[str, str] = {}

    def register(self, key: str, case: str) -> None:
        self.cases[key] = case

    def path(self, case: str) -> Path:
        """The case's entry folder."""
        return self.root / "cases" / case / "landmark" / f"{self.model_key[:20]}{GROUP_SUFFIX}"

    def case_exists(self, case: str) -> bool:
        """Whether case ``case`` has a finished entry for this model (not read or checked: cheap)."""
        return (self.path(case) / "zarr.json").is_file()

    def exists(self, key: str, name: str = "") -> bool:
        case = self.cases.get(key)
        return case is not None and self.case_exists(case)

    def get(self, key: str, name: str) -> Embedding | None:
        note_old_entries(self.root, "cases/*/landmark/*.emb", how=f"`rm {self.root}/cases/*/landmark/*.emb`")
        case = self.cases.get(key)
        if case is None or not self.path(case).exists():
            return None
        return read_embedding(self.path(case), key, self.model_key, name, self.verify)

    def put(self, emb: Embedding) -> Embedding:
        case = self.cases.get(emb.key)
        if case is None or not self.writable:
            return emb
        write_embedding(self.path(case), emb, self.model_key)
        return emb


class EmbeddingStore:
    """Memory LRU of ``memory_items`` embeddings -> ``sources`` in order -> ``compute(volume, key, name)``.

    ``memory_mb``: also keep the embeddings held at most this many MB (their arrays' sizes;
    default ``DEFAULT_MEMORY_MB``, None: no such cap), so a process that visits many volumes stays
    bounded (the most recent embedding is kept even when it alone is larger). A computed embedding is put into every source. ``stats`` counts where each one
    came from.
    """

    def __init__(self, compute: Callable[[object, str, str], Embedding], sources: Sequence[EmbeddingSource] = (),
                 memory_items: int = 32, memory_mb: float | None = DEFAULT_MEMORY_MB):
        self.compute, self.sources, self.memory_items = compute, list(sources), memory_items
        self.memory_mb = memory_mb
        self._memory: OrderedDict[str, Embedding] = OrderedDict()
        self.stats = {"computed": 0, "disk_hits": 0, "memory_hits": 0, "recomputed_bad_cache": 0}
        self.names: dict[str, str] = {}  # absolute image path -> its name in logs (see name_sources)

    def name_sources(self, volumes: Sequence) -> dict[str, str]:
        """Name the images of ``volumes`` (``Volume``s or paths) apart from each other in logs and
        errors: two series at ``patient1/PATIENT_DICOM`` and ``patient2/PATIENT_DICOM`` are
        ``patient1_PATIENT_DICOM`` and ``patient2_PATIENT_DICOM``, not both ``PATIENT_DICOM``
        (:func:`alice3d.data.datalists.display_names` over the whole list). Kept for every later
        :meth:`get`; returns the names given."""
        paths = [str(p) for p in (_path_of(v) for v in volumes) if p]
        named = dict(zip((os.path.abspath(p) for p in paths), display_names(paths, keep_suffix=True)))
        self.names.update(named)
        return named

    def name_of(self, volume, key: str = "") -> str:
        """The name :meth:`get` gives ``volume``: from :meth:`name_sources`, else its file (or
        DICOM folder) name, else the start of its image key."""
        path = _path_of(volume)
        if not path:
            return key[:12]
        return self.names.get(os.path.abspath(str(path))) or display_names([path], keep_suffix=True)[0]

    def get(self, volume, name: str | None = None) -> Embedding:
        """Embedding of a ``Volume`` or image path (an :class:`Embedding` is returned as it is);
        ``name``: what logs call it (default :meth:`name_of`)."""
        if isinstance(volume, Embedding):
            return volume
        vol = as_volume(volume)
        key = image_key(vol)
        return self.get_keyed(key, name or self.name_of(vol if _path_of(vol) else volume, key), lambda: vol)

    def get_keyed(self, key: str, name: str, load: Callable[[], object]) -> Embedding:
        """Embedding of the image whose key is known (e.g. from a volume store's meta); ``load()``
        gives the ``Volume`` to compute it from, and is called only when no source has it."""
        if key in self._memory:
            self._memory.move_to_end(key)
            self.stats["memory_hits"] += 1
            return self._memory[key]
        emb = self._from_sources(key, name)
        if emb is None:
            emb = self.compute(load(), key, name)
            self.stats["computed"] += 1
            for source in self.sources:
                emb = source.put(emb)
        self._memory[key] = emb
        self._trim()
        return emb

    def exists(self, key: str, name: str = "") -> bool:
        """Whether the memory holds ``key`` or a source has an entry for it (not read or checked)."""
        return key in self._memory or any(s.exists(key, name) for s in self.sources if hasattr(s, "exists"))

    @contextmanager
    def read_only(self) -> Iterator[None]:
        """Within the block, sources are read but nothing computed is written into them (a one-off
        job that will not read its embeddings again); each source's setting is restored after."""
        saved = [(s, s.writable) for s in self.sources if hasattr(s, "writable")]
        for s, _ in saved:
            s.writable = False
        try:
            yield
        finally:
            for s, w in saved:
                s.writable = w

    def has(self, key: str, name: str = "") -> bool:
        """Whether the memory or a source holds ``key``'s embedding (a source's unusable entry: no)."""
        return key in self._memory or self._from_sources(key, name, count=False) is not None

    def _trim(self) -> None:
        cap = None if self.memory_mb is None else self.memory_mb * 1e6
        held = sum(_nbytes(e) for e in self._memory.values())
        while len(self._memory) > self.memory_items or (cap is not None and held > cap and len(self._memory) > 1):
            _, old = self._memory.popitem(last=False)
            held -= _nbytes(old)

    def _from_sources(self, key: str, name: str, count: bool = True) -> Embedding | None:
        for source in self.sources:
            try:
                emb = source.get(key, name)
            except CacheError as e:
                if count:
                    log.warning("embedding cache entry unusable, recomputing: %s", e)
                    self.stats["recomputed_bad_cache"] += 1
                continue
            if emb is not None:
                if count:
                    self.stats["disk_hits"] += 1
                return emb
        return None


def _nbytes(emb: Embedding) -> int:
    """Bytes of the arrays an embedding holds."""
    tensors = [emb.fine, emb.coarse] + ([emb.body] if emb.body is not None else [])
    return int(sum(t.nelement() * t.element_size() for t in tensors))
