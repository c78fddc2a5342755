"""On-disk cache of volume embeddings (zarr v3 groups) and of pair affines (small single files).

Layout below the cache directory::

    CACHE/<model key[:20]>/<image key>.zarr/        one embedding (:func:`write_group`)
        zarr.json                                   group metadata; its attributes (format, the keys it
                                                    was computed for, affines, every array's dtype, shape
                                                    and shard size) are the entry's commit marker
        fine/ coarse/ body/                         zarr v3 arrays, each one shard file of blosc-zstd
                                                    chunks with a crc32c each (zarr checks it on read)
    CACHE/<model key[:20]>/pairs/<pair key>.pair    one pair's affine (:func:`write_entry`, below)
    CACHE/<model key[:20]>/<image key>.emb          an embedding in the older single-file format:
                                                    never read, reported once, removed by ``clear_cache``

An embedding is written into a temporary sibling folder (its group metadata last) that is renamed
into place complete, so concurrent processes never see half an entry. Reading checks the keys
first (a stale entry is a :class:`CacheError` before any chunk is read), then each shard file's
size against the metadata (zarr would read a missing shard as zeros), then decodes the arrays,
zarr verifying every chunk's crc32c; any failure is a CacheError that the caller turns into a
logged recomputation. Arrays are decoded into memory (not memory-mapped): what bounds the memory
of many embeddings is the byte cap of :class:`landmark.store.EmbeddingStore`.

Pair files (a 4x4 matrix and a few numbers) keep the small pickle-free single-file format::

    b"A3DEMB01" | uint64 LE header length | JSON header (padded) | raw little-endian arrays

Size cap: ``ALICE3D_CACHE_MAX_GB`` (default 20; ``0`` or ``none``: no cap). An entry's size is
its folder's (or file's) bytes. Reading an entry sets its modification time to now, so after
every write the least recently used entries (oldest modification time first) are deleted until
the cache fits, never the one just written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from alice3d.data.digest import hash_arrays  # noqa: F401 - re-exported: cache keys of every layer
from alice3d.data.store import quiet_zarr_loop, settle_zarr_loop
from alice3d.errors import Alice3DError
from alice3d.runtime import atomic_write

log = logging.getLogger("alice3d.landmark")

MAGIC = b"A3DEMB01"
ALIGN = 64
_ALLOWED_DTYPES = {"float16", "float32", "float64", "int16", "int32", "int64", "uint8"}
GROUP_SUFFIX = ".zarr"
GROUP_FORMAT = "alice3d-embedding"
GROUP_VERSION = 2  # 1 was the single-file ``.emb`` format
OLD_SUFFIX = ".emb"
CHUNK = 32  # inner chunk side along the grid axes: a 32^3 x D float16 chunk is 2 MB at D = 32
# Where the matcher puts entries below the cache dir: embeddings, and the pair affines beside them.
ENTRY_GLOBS = ("*/*" + GROUP_SUFFIX, "*/pairs/*.pair")
OLD_GLOB = "*/*" + OLD_SUFFIX
MAX_GB_ENV = "ALICE3D_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
_TEMP_MARKS = (".tmp-", ".old-", ".del-")  # folders of unfinished writes and replaced/evicted entries


class CacheError(Alice3DError, ValueError):
    """A cache entry that is missing, truncated, corrupt or computed for other inputs."""


def default_cache_dir() -> Path:
    """``$ALICE3D_CACHE/embeddings`` when set, else ``~/.cache/alice3d/embeddings``."""
    root = os.environ.get("ALICE3D_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "alice3d"
    return base / "embeddings"


# ----------------------------------------------------------------------------- embeddings: zarr groups


def _chunks(shape: tuple) -> tuple:
    """Chunks of ``CHUNK`` along the (up to three) grid axes, whole along the rest (the channels)."""
    return tuple(max(1, min(CHUNK, n) if k < 3 else n) for k, n in enumerate(shape))


def _shard_file(array_dir: Path, ndim: int) -> Path:
    return array_dir.joinpath("c", *(["0"] * max(ndim, 1)))


def _write_array(path: Path, a: np.ndarray) -> dict:
    """One array as a single shard of crc32c-checked, zstd-compressed chunks -> its spec for the meta.

    Chunks holding only zeros are written too: zarr leaves out a shard of fill values, and every
    shard must exist with the size the metadata records (a missing one reads back as zeros).
    """
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _ALLOWED_DTYPES:
        raise ValueError(f"cache array {path.name!r}: dtype {a.dtype} not storable")
    if a.ndim == 0:
        raise ValueError(f"cache array {path.name!r}: expected at least one dimension, got a scalar")
    chunks = _chunks(a.shape)
    shard = tuple(-(-n // c) * c for n, c in zip(a.shape, chunks))
    z = zarr.create_array(
        str(path), shape=a.shape, dtype=a.dtype, shards=shard, chunks=chunks,
        compressors=[BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()],
        fill_value=0, zarr_format=3, config={"write_empty_chunks": True})
    if a.size:
        z[...] = a
    shard_file = _shard_file(path, a.ndim)
    nbytes = shard_file.stat().st_size if a.size else None
    return {"dtype": a.dtype.name, "shape": list(a.shape), "shard_bytes": nbytes}


def write_group(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``arrays`` and the JSON-able ``meta`` as the zarr v3 group ``path`` (a folder), atomically.

    Written into a temporary sibling folder, the group's metadata (with ``meta``) last, which is
    then renamed into place; an existing entry at ``path`` (stale or corrupt) is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in arrays:
        if not name.isidentifier():
            raise ValueError(f"cache array name {name!r}: expected a plain identifier")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        tmp.mkdir()
        specs = {name: _write_array(tmp / name, a) for name, a in arrays.items()}
        attributes = {"format": GROUP_FORMAT, "version": GROUP_VERSION, "meta": meta, "arrays": specs}
        zarr.create_group(str(tmp), attributes=json.loads(json.dumps(attributes, allow_nan=False)), zarr_format=3)
        _commit(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` folder to ``final``, replacing what was there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(final, old)
        except FileNotFoundError:  # another process replaced or evicted it meanwhile
            old = None
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_entry(final):  # not another process's finished copy of the same entry
            raise
    if old is not None:
        _discard(old)


def _discard(path: Path) -> None:
    """Delete what was renamed aside (a folder, or a foreign file that sat at the entry's name)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _group_attributes(path: Path) -> dict:
    """The attributes of the group ``path``'s metadata; CacheError when it is not one of our entries."""
    doc_path = path / "zarr.json"
    try:
        doc = json.loads(doc_path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{path}: no such embedding entry (no {doc_path.name})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CacheError(f"{path}: unreadable entry metadata {doc_path.name} ({e})") from None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or attrs.get("format") != GROUP_FORMAT:
        raise CacheError(f"{path}: not an alice3d embedding entry ({doc_path.name} has no format "
                         f"{GROUP_FORMAT!r})")
    if attrs.get("version") != GROUP_VERSION or not isinstance(attrs.get("arrays"), dict):
        raise CacheError(f"{path}: embedding entry of version {attrs.get('version')!r}, expected {GROUP_VERSION}")
    return attrs


def read_group_meta(path: str | os.PathLike) -> dict:
    """The ``meta`` of the group entry ``path`` from its metadata file alone (no chunk read: cheap);
    CacheError when ``path`` is not a finished entry of this format."""
    path = Path(path)
    return _meta_of(_group_attributes(path), path)


def _meta_of(attrs: dict, path: Path) -> dict:
    meta = attrs.get("meta")
    if not isinstance(meta, dict):
        raise CacheError(f"{path}: entry metadata has no 'meta' object")
    return meta


def read_group(path: str | os.PathLike, expect_meta: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays decoded into memory, meta)`` of the group written by :func:`write_group`.

    ``expect_meta``: fields that must match (e.g. the image and model keys), checked before any
    chunk is read. CacheError for anything unusable: stale, missing or resized shard files, a
    chunk whose crc32c does not match, an array whose dtype or shape is not the recorded one.
    """
    path = Path(path)
    attrs = _group_attributes(path)
    meta = _meta_of(attrs, path)
    for k, v in (expect_meta or {}).items():
        if meta.get(k) != v:
            raise CacheError(f"{path}: computed for {k}={meta.get(k)!r}, expected {v!r} (stale entry)")
    arrays = {}
    quiet_zarr_loop()
    for name, spec in attrs["arrays"].items():
        try:
            dtype, shape, nbytes = np.dtype(spec["dtype"]), tuple(int(s) for s in spec["shape"]), spec["shard_bytes"]
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{path}: array {name!r} has a malformed spec ({e})") from None
        if not str(name).isidentifier() or spec["dtype"] not in _ALLOWED_DTYPES:
            raise CacheError(f"{path}: array {name!r} spec does not add up (name/dtype)")
        if nbytes is not None:
            shard = _shard_file(path / name, len(shape))
            try:
                size = shard.stat().st_size
            except OSError as e:
                raise CacheError(f"{path}: array {name!r}: data file {shard} is missing or unreadable "
                                 f"({e.strerror or e})") from None
            if size != int(nbytes):
                raise CacheError(f"{path}: array {name!r}: data file is {size} bytes, expected {nbytes} "
                                 "(truncated or replaced)")
        try:
            z = zarr.open_array(str(path / name), mode="r", zarr_format=3)
            if z.dtype != dtype or tuple(z.shape) != shape:
                raise CacheError(f"{path}: array {name!r} is {z.dtype} {tuple(z.shape)}, the entry records "
                                 f"{dtype} {shape}")
            arrays[name] = np.asarray(z[...]) if z.size else np.zeros(shape, dtype)
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - zarr raises many kinds for a damaged array
            settle_zarr_loop()
            what = "failed its checksum (corrupt entry)" if "checksum" in str(e).lower() else "cannot be read"
            raise CacheError(f"{path}: array {name!r} {what} ({type(e).__name__}: {e})") from None
    _touch(path)
    return arrays, meta


def entry_bytes(path: str | os.PathLike) -> int:
    """Bytes of an entry: a file's size, or the sum over a folder's files (0 once it vanished)."""
    path = Path(path)
    try:
        if not path.is_dir():
            return path.stat().st_size
    except OSError:
        return 0
    total = 0
    for folder, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(folder, f)).st_size
            except OSError:
                pass  # removed meanwhile (evicted by another process)
    return total


# ----------------------------------------------------------------------------- older embedding files

_OLD_NOTED: set[tuple[str, str]] = set()


def old_entries(root: str | os.PathLike, pattern: str = OLD_GLOB) -> list[tuple[int, Path]]:
    """``(size, path)`` of the older-format embedding files (``.emb`` with its magic) at ``pattern``."""
    out = []
    for p in sorted(Path(root).glob(pattern)):
        if p.is_file() and _has_magic(p):
            try:
                out.append((p.stat().st_size, p))
            except OSError:
                continue
    return out


def note_old_entries(root: str | os.PathLike, pattern: str = OLD_GLOB, how: str = "") -> int:
    """Log once per process and ``root`` how many older-format embedding files lie there unused.

    They are never read (not even tried as zarr): embeddings are recomputed into the new format
    beside them. ``how``: how the user deletes them. Returns their count (0 when already noted).
    """
    key = (os.path.abspath(root), pattern)
    if key in _OLD_NOTED:
        return 0
    _OLD_NOTED.add(key)
    old = old_entries(root, pattern)
    if old:
        log.warning("%s: %d embedding file(s) (%s, %s) from an older alice3d format are ignored and "
                    "recomputed as zarr entries; they can be deleted%s", root, len(old), pattern,
                    _fmt_bytes(sum(s for s, _ in old)), f" ({how})" if how else "")
    return len(old)


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


# ----------------------------------------------------------------------------- pair files (single file)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B")) & 0xFFFFFFFF


def write_entry(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write arrays + JSON-able ``meta`` as one small file, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    specs, offset = {}, 0
    blobs = []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype.name not in _ALLOWED_DTYPES:
            raise ValueError(f"cache array {name!r}: dtype {a.dtype} not storable")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        specs[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset,
                       "nbytes": int(a.nbytes), "crc32": _crc(a)}
        blobs.append((offset, a))
        offset += -(-a.nbytes // ALIGN) * ALIGN
    header = json.dumps({"format": 1, "meta": meta, "arrays": specs}).encode()
    start = len(MAGIC) + 8 + len(header)
    pad = (-start) % ALIGN
    header += b" " * pad
    with atomic_write(path) as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        base = f.tell()
        for off, a in blobs:
            f.seek(base + off)
            f.write(memoryview(a).cast("B"))
        f.truncate(base + offset)
    return path


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """``(header dict, byte offset of the data block)`` of a single-file entry; CacheError when malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise CacheError(f"{path}: not an alice3d cache file (bad magic)")
            raw = f.read(8)
            if len(raw) != 8:
                raise CacheError(f"{path}: truncated header")
            (n,) = struct.unpack("<Q", raw)
            if n > 1 << 24:
                raise CacheError(f"{path}: implausible header length {n}")
            text = f.read(n)
    except FileNotFoundError:
        raise CacheError(f"{path}: no such cache file") from None
    except IsADirectoryError:
        raise CacheError(f"{path}: a folder, not a single-file cache entry") from None
    except OSError as e:
        raise CacheError(f"{path}: unreadable ({e})") from None
    if len(text) != n:
        raise CacheError(f"{path}: truncated header")
    try:
        header = json.loads(text.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: corrupt header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != 1 or not isinstance(header.get("arrays"), dict):
        raise CacheError(f"{path}: unsupported header (format {header.get('format') if isinstance(header, dict) else None!r})")
    return header, len(MAGIC) + 8 + n


def read_entry(path: str | os.PathLike, verify: bool = True, mmap: bool = True,
               expect_meta: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, meta)`` of a single-file entry; arrays are copy-on-write memory maps when ``mmap``.

    ``expect_meta``: fields that must match (e.g. the pair key) -> else CacheError.
    ``verify``: check every array's CRC-32 (reads the whole file once).
    """
    path = Path(path)
    header, base = read_header(path)
    meta = header.get("meta", {})
    for k, v in (expect_meta or {}).items():
        if meta.get(k) != v:
            raise CacheError(f"{path}: computed for {k}={meta.get(k)!r}, expected {v!r} (stale entry)")
    size = path.stat().st_size
    arrays = {}
    for name, spec in header["arrays"].items():
        try:
            dtype = np.dtype(spec["dtype"]).newbyteorder("<")
            shape = tuple(int(s) for s in spec["shape"])
            off, nbytes = int(spec["offset"]), int(spec["nbytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{path}: array {name!r} has a malformed spec ({e})") from None
        if spec["dtype"] not in _ALLOWED_DTYPES or int(np.prod(shape)) * dtype.itemsize != nbytes:
            raise CacheError(f"{path}: array {name!r} spec does not add up (dtype/shape/nbytes)")
        if base + off + nbytes > size:
            raise CacheError(f"{path}: truncated (array {name!r} ends past the end of the file)")
        if mmap and nbytes:
            a = np.memmap(path, dtype=dtype, mode="c", offset=base + off, shape=shape)
        else:
            with open(path, "rb") as f:
                f.seek(base + off)
                a = np.frombuffer(f.read(nbytes), dtype=dtype).reshape(shape).copy()
        if verify and _crc(a) != spec.get("crc32"):
            raise CacheError(f"{path}: checksum mismatch in array {name!r} (corrupt file)")
        arrays[name] = a
    _touch(path)
    return arrays, meta


def _touch(path: Path) -> None:
    # mtime, not atime, is the LRU clock: many file systems are mounted noatime/relatime.
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only shared cache is still usable; it is just not evicted by use


# ----------------------------------------------------------------------------- size cap


def cache_max_bytes() -> int | None:
    """Cap from ``$ALICE3D_CACHE_MAX_GB`` (GB = 10**9 bytes; default 20); None = no cap (``0``/``none``)."""
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * 1e9)
    if raw.lower() == "none":
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not math.isfinite(gb) or gb < 0:
        raise CacheError(f"{MAX_GB_ENV}={raw!r}: expected a size in GB (e.g. 20 or 0.5), 0 or 'none' for no cap")
    return None if gb == 0 else int(gb * 1e9)


def _has_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def is_entry(path: str | os.PathLike) -> bool:
    """True for one of our entries (a group folder with our metadata, or a file with our magic),
    so foreign files and folders are never deleted."""
    path = Path(path)
    if path.is_dir():
        try:
            _group_attributes(path)
        except CacheError:
            return False
        return True
    return _has_magic(path)


def list_entries(cache_dir: str | os.PathLike) -> list[tuple[float, int, Path]]:
    """``(mtime, size in bytes, path)`` of what lies at the entry locations, oldest first.

    Embedding entries are folders (size: all their files), pair maps files; whatever vanishes
    while listing (another process evicting) is left out.
    """
    root = Path(cache_dir)
    out = []
    for pattern in ENTRY_GLOBS:
        folder = pattern.endswith(GROUP_SUFFIX)
        for p in root.glob(pattern):
            try:
                st = p.stat()
            except OSError:
                continue
            if folder and os.path.isdir(p):
                out.append((st.st_mtime, entry_bytes(p), p))
            elif not folder and os.path.isfile(p):
                out.append((st.st_mtime, st.st_size, p))
    return sorted(out, key=lambda e: (e[0], str(e[2])))


def cache_info(cache_dir: str | os.PathLike) -> dict:
    """Entries (``list_entries`` rows that are real entries), their count per kind and total bytes,
    and the older-format embedding files (``old``: ``(size, path)``, ``old_bytes``; not entries)."""
    entries = [e for e in list_entries(cache_dir) if is_entry(e[2])]
    old = old_entries(cache_dir)
    return {"dir": Path(cache_dir), "entries": entries, "bytes": sum(e[1] for e in entries),
            "embeddings": sum(e[2].suffix == GROUP_SUFFIX for e in entries),
            "pairs": sum(e[2].suffix == ".pair" for e in entries),
            "old": old, "old_embeddings": len(old), "old_bytes": sum(s for s, _ in old)}


def _remove(path: Path) -> None:
    """Delete an entry; a folder is first renamed aside, so no reader ever sees it half deleted."""
    if path.is_dir():
        gone = path.with_name(f".{path.name}.del-{uuid.uuid4().hex[:12]}")
        os.rename(path, gone)
        _discard(gone)
    else:
        path.unlink()


def evict_lru(cache_dir: str | os.PathLike, max_bytes: int | None,
              keep: tuple[str | os.PathLike, ...] = ()) -> list[Path]:
    """Delete least recently used entries until all entries total at most ``max_bytes``.

    ``keep`` (e.g. the entry just written) is never deleted, even when it alone is over the cap.
    Safe beside other processes: an entry that vanishes meanwhile counts as freed, and one
    read (touched) since the listing is skipped. Returns the deleted paths.
    """
    if max_bytes is None:
        return []
    entries = list_entries(cache_dir)
    total = sum(e[1] for e in entries)
    kept = {os.path.realpath(k) for k in keep}
    deleted = []
    for mtime, size, path in entries:
        if total <= max_bytes:
            break
        if os.path.realpath(path) in kept:
            continue
        if not is_entry(path):
            if path.exists():  # foreign: not ours to delete, and not part of the cache's size
                total -= size
                continue
        else:
            try:
                if path.stat().st_mtime > mtime:
                    continue  # used by another process since we listed it
                _remove(path)
                deleted.append(path)
            except FileNotFoundError:
                pass
            except OSError:
                continue  # e.g. no permission: leave it, try older ones
        total -= size
    return deleted


def trim_cache(cache_dir: str | os.PathLike, max_bytes: int | None, written: str | os.PathLike) -> None:
    """:func:`evict_lru` after writing ``written``; a failure is logged, since the entry itself is fine."""
    try:
        gone = evict_lru(cache_dir, max_bytes, keep=(written,))
    except OSError as e:
        log.warning("could not trim the embedding cache %s (%s)", cache_dir, e)
        return
    if gone:
        log.info("embedding cache over its cap of %.1f GB: removed %d least recently used entries",
                 max_bytes / 1e9, len(gone))


def clear_cache(cache_dir: str | os.PathLike) -> tuple[int, int]:
    """Delete every entry, the older-format embedding files, leftovers of interrupted writes (and
    the folders left empty) -> ``(entries and older files deleted, bytes freed)``."""
    root = Path(cache_dir)
    info = cache_info(root)
    targets = [(size, path) for _, size, path in info["entries"]] + info["old"]
    n = freed = 0
    for size, path in targets:
        try:
            _remove(path)
        except FileNotFoundError:
            continue  # another process evicted it
        except OSError as e:
            raise CacheError(f"{path}: cannot delete this cache entry ({e}); {n} entries were deleted") from None
        n, freed = n + 1, freed + size
    for leftover in root.glob("*/.*"):
        if leftover.is_dir() and any(m in leftover.name for m in _TEMP_MARKS) and GROUP_SUFFIX in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)
    parents = {p.parent for _, p in targets} | {p.parent.parent for _, p in targets}
    for folder in sorted(parents, key=lambda d: -len(d.parts)):
        if folder != root:
            try:
                folder.rmdir()  # only succeeds when empty: other files keep their folder
            except OSError:
                pass
    return n, freed
