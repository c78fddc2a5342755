"""On-disk cache of volume embeddings in a small, pickle-free file format.

One file per (image, model): ``CACHE/<model key>/<image key>.emb``. Layout::

    b"A3DEMB01" | uint64 LE header length | JSON header (padded) | raw little-endian arrays

The JSON header lists every array's dtype, shape, byte offset and CRC-32, plus the keys
it was computed for and the grid affines. Reading checks magic, header, sizes, keys and
checksums; any mismatch is a :class:`CacheError` that the caller turns into a logged
recomputation. Files are written to a temporary name and renamed, so concurrent
processes never see half a file. Arrays can be memory-mapped, so many large fine
embeddings can be "open" without being resident in RAM.

Size cap: ``ALICE3D_CACHE_MAX_GB`` (default 20; ``0`` or ``none``: no cap). Reading an entry
sets its modification time to now, so after every write the least recently used entries
(oldest modification time first) are deleted until the cache fits, never the one just written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from alice3d.data.digest import hash_arrays  # noqa: F401 - re-exported: cache keys of every layer
from alice3d.errors import Alice3DError
from alice3d.runtime import atomic_write

log = logging.getLogger("alice3d.landmark")

MAGIC = b"A3DEMB01"
ALIGN = 64
_ALLOWED_DTYPES = {"float16", "float32", "float64", "int16", "int32", "int64", "uint8"}
# Where the matcher puts entries below the cache dir: embeddings, and the pair affines beside them.
ENTRY_GLOBS = ("*/*.emb", "*/pairs/*.pair")
MAX_GB_ENV = "ALICE3D_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0


class CacheError(Alice3DError, ValueError):
    """A cache file that is missing, truncated, corrupt or computed for other inputs."""


def default_cache_dir() -> Path:
    """``$ALICE3D_CACHE/embeddings`` when set, else ``~/.cache/alice3d/embeddings``."""
    root = os.environ.get("ALICE3D_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "alice3d"
    return base / "embeddings"


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B")) & 0xFFFFFFFF


def write_entry(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write arrays + JSON-able ``meta`` atomically (temp file in the same folder, then rename)."""
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
    """``(header dict, byte offset of the data block)``; CacheError when malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise CacheError(f"{path}: not an alice3d embedding cache file (bad magic)")
            raw = f.read(8)
            if len(raw) != 8:
                raise CacheError(f"{path}: truncated header")
            (n,) = struct.unpack("<Q", raw)
            if n > 1 << 24:
                raise CacheError(f"{path}: implausible header length {n}")
            text = f.read(n)
    except FileNotFoundError:
        raise CacheError(f"{path}: no such cache file") from None
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
    """``(arrays, meta)``; arrays are copy-on-write memory maps when ``mmap``.

    ``expect_meta``: fields that must match (e.g. the image and model keys) -> else CacheError.
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


def is_entry(path: str | os.PathLike) -> bool:
    """True for a file that starts like a cache entry (our magic), so foreign files are never deleted."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def list_entries(cache_dir: str | os.PathLike) -> list[tuple[float, int, Path]]:
    """``(mtime, size in bytes, path)`` of the files at the entry locations, oldest first.

    Files that vanish while listing (another process evicting) are left out.
    """
    root = Path(cache_dir)
    out = []
    for pattern in ENTRY_GLOBS:
        for p in root.glob(pattern):
            try:
                st = p.stat()
            except OSError:
                continue
            if os.path.isfile(p):
                out.append((st.st_mtime, st.st_size, p))
    return sorted(out, key=lambda e: (e[0], str(e[2])))


def cache_info(cache_dir: str | os.PathLike) -> dict:
    """Entries (``list_entries`` rows that are real entries), their count per kind and total bytes."""
    entries = [e for e in list_entries(cache_dir) if is_entry(e[2])]
    return {"dir": Path(cache_dir), "entries": entries, "bytes": sum(e[1] for e in entries),
            "embeddings": sum(e[2].suffix == ".emb" for e in entries),
            "pairs": sum(e[2].suffix == ".pair" for e in entries)}


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
            if path.exists():  # a foreign file: not ours to delete, and not part of the cache's size
                total -= size
                continue
        else:
            try:
                if path.stat().st_mtime > mtime:
                    continue  # used by another process since we listed it
                path.unlink()
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
    """Delete every entry (and the folders left empty) -> ``(entries deleted, bytes freed)``."""
    info = cache_info(cache_dir)
    n = freed = 0
    for _, size, path in info["entries"]:
        try:
            path.unlink()
        except FileNotFoundError:
            continue  # another process evicted it
        except OSError as e:
            raise CacheError(f"{path}: cannot delete this cache entry ({e}); {n} entries were deleted") from None
        n, freed = n + 1, freed + size
    for folder in sorted({p.parent for _, _, p in info["entries"]} | {p.parent.parent for _, _, p in info["entries"]},
                         key=lambda d: -len(d.parts)):
        if folder != Path(cache_dir):
            try:
                folder.rmdir()  # only succeeds when empty: other files keep their folder
            except OSError:
                pass
    return n, freed
