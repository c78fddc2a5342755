"""The preprocessed volume store: volumes checked, in RAS, at the run's spacing, on disk in zarr.

Layout (written by :mod:`alice3d.data.preprocess`)::

    STORE/store.json              format and settings (spacing, body threshold, HU offset); written first
    STORE/manifest.json           settings, every case's geometry and source, bad cases with
                                  reasons; written last, when every case is done
    STORE/cases/<case>/image      zarr v3 array, int16 HU (rounded, clipped), one shard file
                                  (the whole volume), inner chunks 64^3, blosc zstd, crc32c
    STORE/cases/<case>/body       zarr v3 array, bool body mask, same chunking
    STORE/cases/<case>/meta.json  geometry, source path/stamp/digest, body box and a fixed sample of
                                  body voxels; the case's commit marker (the folder is renamed
                                  into place complete)
    STORE/bad/<case>.json         a case that could not be used, with the reason

Reads fetch only the chunks a crop touches, and zarr checks each chunk's crc32c, so a corrupt
entry raises a :class:`StoreError` naming the case. Intensities stay in HU: the run's window is
applied at read time, so what defines a store is its spacing and HU offset (and the format version).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr

try:
    from zarr.core import sync as _zarr_sync  # its event loop (quiet_zarr_loop): not public API, may be absent
except ImportError:
    _zarr_sync = None

from alice3d.data.sources import crop_slices
from alice3d.data.volumes import normalize_hu
from alice3d.errors import DataError
from alice3d.runtime import atomic_write

log = logging.getLogger("alice3d.data")

__all__ = ["FORMAT", "VERSION", "StoreError", "StoreSettings", "StoreVolume", "VolumeStore", "is_store",
           "open_store", "verify_store", "body_hu_of_window"]

FORMAT = "alice3d-volume-store"
# 2: voxels on the one geometry path (alice3d.data.canonical, MONAI's grid); v1 stores are refused.
VERSION = 2
SETTINGS_FILE = "store.json"
MANIFEST_FILE = "manifest.json"
META_FILE = "meta.json"
CHUNK = 64  # inner chunk side: a 192x192x64 crop touches ~4x4x2 chunks
BODY_LEVEL = 0.05  # body = above this fraction of the HU window (the rule of the in-memory datasets)


class StoreError(DataError):
    """A volume store that cannot be used: other settings, unfinished, or a corrupt entry (named)."""


def body_hu_of_window(window: Sequence[float], level: float = BODY_LEVEL) -> float:
    """HU above which a voxel is body: ``level`` of the way up the window (-106 HU for [-125, 255])."""
    lo, hi = float(window[0]), float(window[1])
    return lo + level * (hi - lo)


@dataclass(frozen=True)
class StoreSettings:
    """What a store is built with; a run asking for another spacing or HU offset is refused.

    ``hu_offset`` is added to every source intensity right after reading (-1024 for a CT stored
    as HU + 1024, air at 0), so the store holds HU; a store written before it existed has 0.
    """

    spacing: tuple[float, float, float]
    body_hu: float = body_hu_of_window((-125.0, 255.0))
    hu_offset: float = 0.0

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "spacing": [float(s) for s in self.spacing],
                "body_hu": float(self.body_hu), "hu_offset": float(self.hu_offset)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "StoreSettings":
        if d.get("format") != FORMAT:
            raise StoreError(f"{where}: not an alice3d volume store (format {d.get('format')!r})")
        if d.get("version") != VERSION:
            raise StoreError(f"{where}: volume store format version {d.get('version')!r}, this alice3d reads "
                             f"version {VERSION}; preprocess the data again into a new --out")
        try:
            return cls(tuple(float(s) for s in d["spacing"]), float(d["body_hu"]), float(d.get("hu_offset", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed store settings ({e})") from None

    def describe(self) -> str:
        return (f"spacing {_fmt(self.spacing)} mm, body above {self.body_hu:g} HU, HU offset {self.hu_offset:+g}, "
                f"format v{VERSION}")

    def check_hu_offset(self, hu_offset: float, root: str | os.PathLike, key: str = "data.hu_offset") -> None:
        """Refuse a run whose ``key`` differs from the offset the store at ``root`` was built with."""
        if abs(float(hu_offset) - self.hu_offset) > 1e-6:
            raise StoreError(
                f"{root}: this store was preprocessed with HU offset {self.hu_offset:+g}, but the run asks for "
                f"{key}={float(hu_offset):g}; use {key}={self.hu_offset:g} or preprocess again with "
                f"--hu-offset {float(hu_offset):g} into another --out")


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def is_store(path: str | os.PathLike) -> bool:
    """A folder with a store's ``store.json`` (finished or not)."""
    return bool(path) and (Path(path) / SETTINGS_FILE).is_file()


def read_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path}: {what} missing") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{path}: {what} is not a JSON object")
    return doc


def write_json_atomic(path: Path, doc: dict, compact: bool = False) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the new one, never half."""
    with atomic_write(path, "w", file_mode=0o644) as f:
        json.dump(doc, f, allow_nan=False, **({"separators": (",", ":")} if compact else {"indent": 1}))
        f.write("\n")


def read_settings(root: Path) -> StoreSettings:
    return StoreSettings.from_dict(read_json(root / SETTINGS_FILE, "store settings"), str(root))


# ----------------------------------------------------------------------------- reading


class _LRU:
    """Values by key, evicted oldest-first above ``cap`` (in the units of ``size``)."""

    def __init__(self, cap: float, size=lambda v: 1):
        self.cap, self.size, self.total = cap, size, 0.0
        self.items: OrderedDict = OrderedDict()

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key, value) -> None:
        if key in self.items:
            return
        self.items[key] = value
        self.total += self.size(value)
        while self.total > self.cap and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.total -= self.size(old)


_QUIET_LOOP: list = [None]  # the zarr event loop whose exception handler is set (one per process)


def _zarr_loop_exception(loop, context: dict) -> None:
    exc = context.get("exception")
    log.debug("zarr event loop: %s%s", context.get("message", ""), f" ({type(exc).__name__}: {exc})" if exc else "")


def quiet_zarr_loop() -> None:
    """Keep zarr's leftover chunk tasks of a failed read out of the log.

    zarr runs every read on an asyncio loop in its own thread and gathers one task per chunk. When
    one chunk fails its checksum, the gather raises at once (that error is the one we report) and
    leaves the read's other chunk tasks behind; they finish later with errors nobody retrieves, or
    are still pending at exit when zarr shuts its executor down, and asyncio's default handler logs
    each of them with a traceback ("Task exception was never retrieved", "Task was destroyed but
    it is pending!"): dozens of lines after the one that matters. Every error zarr returns to a
    caller is raised by its ``sync()``, so what reaches this loop's handler is only such leftovers;
    they go to the debug log. The loop is per process (zarr makes a new one after a fork).
    """
    if _zarr_sync is None:  # another zarr layout: its default handling stays
        return
    loop = _zarr_sync._get_loop()
    if _QUIET_LOOP[0] is not loop:
        loop.set_exception_handler(_zarr_loop_exception)
        _QUIET_LOOP[0] = loop


def settle_zarr_loop(timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) until zarr's loop has finished the tasks a failed read left.

    Left running, they are still there at exit, when zarr closes its loop: their coroutines are
    then destroyed mid-flight and Python prints each one's "Exception ignored in ... Event loop
    is closed" traceback, which no handler of the loop can catch.
    """
    loop = None if _zarr_sync is None else _zarr_sync.loop[0]
    if loop is None or loop.is_closed():
        return

    async def settle() -> None:
        me = asyncio.current_task()
        while others := [t for t in asyncio.all_tasks() if t is not me and not t.done()]:
            await asyncio.wait(others)

    try:
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - a timeout or a closing loop: the read's own error matters
        log.debug("zarr event loop did not settle: %s", e)


# Per process (each DataLoader worker has its own): body samples of recently drawn cases, and,
# when the whole cohort fits the configured cap, the decoded volumes themselves.
_BODY = _LRU(256)
_VOLUMES = _LRU(0.0, size=lambda a: a.nbytes)


class StoreVolume:
    """One case of a store as a crop source (:mod:`alice3d.data.sources`).

    Holds only the case's summary; the zarr arrays are opened on first read in each process
    (a DataLoader worker opens its own), never pickled. ``cache``: keep the decoded volume in
    this process's volume cache of that many bytes (when the whole cohort fits it; 0: read
    crops chunk by chunk).
    """

    def __init__(self, root: str | os.PathLike, case: dict, hu_window: Sequence[float], cache_bytes: float = 0.0):
        self.root, self.case = str(root), case
        self.name, self.path = case["name"], case["source"]
        self.shape = tuple(int(s) for s in case["shape"])
        self.affine = np.asarray(case["affine"], dtype=np.float64)
        self.lo, self.hi = np.asarray(case["body_lo_mm"], np.float64), np.asarray(case["body_hi_mm"], np.float64)
        self.hu_window = tuple(float(w) for w in hu_window)
        self.pad_value = float(normalize_hu(np.float32(case["hu_min"]), self.hu_window))
        self.label = None
        self.empty_body = int(case.get("body_voxels", 1)) == 0
        self.cache_bytes = float(cache_bytes)
        # What a crop dataset does when a read of this case fails (``data.on_bad_data``, set by
        # alice3d.data.loading.load_run_volumes): "skip" quarantines the case, "fail" stops the run.
        self.on_bad_read = ""  # "": raise the error as it is
        self._z = None

    @property
    def folder(self) -> Path:
        return Path(self.root) / "cases" / self.name

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_z": None}  # every process opens its own handle

    def __repr__(self) -> str:
        return f"StoreVolume({self.folder}, shape={self.shape})"

    def _fail(self, what: str) -> StoreError:
        return StoreError(f"{self.folder}: {what} (case {self.name}, source {self.path}); {rebuild_hint(self.root)}")

    def file_problem(self) -> str:
        """'' when the case's files are there at the sizes its summary records, else what is wrong.

        Only stats (no chunk is read), so a run checks every case at start in O(cases); a damaged
        chunk inside a shard of the right size is found by its checksum when a crop reads it.
        """
        if not (self.folder / META_FILE).is_file():
            return f"case metadata {self.folder / META_FILE} is missing"
        for name in ("image", "body"):
            problem = shard_problem(self.folder, name, self.case.get(f"{name}_nbytes"))
            if problem:
                return problem
        return ""

    def _array(self):
        if self._z is None:
            self._z = open_case_array(self.folder, "image", self.case.get("image_nbytes"), self._fail)
        return self._z

    def body_voxels(self) -> np.ndarray:
        key = (self.root, self.name)
        body = _BODY.get(key)
        if body is None:
            meta = read_json(self.folder / META_FILE, "case metadata")
            body = np.asarray(meta.get("body_sample", []), dtype=np.int32).reshape(-1, 3)
            if len(body) == 0:
                raise self._fail("case metadata has no body sample")
            _BODY.put(key, body)
        return body

    def read_hu(self, region: tuple | None = None) -> np.ndarray:
        """int16 HU of the whole volume, or of ``region`` (a tuple of slices)."""
        key = (self.root, self.name)
        cached = _VOLUMES.get(key) if self.cache_bytes else None
        if cached is None and self.cache_bytes:
            _VOLUMES.cap = max(_VOLUMES.cap, self.cache_bytes)  # also in spawned workers
            cached = self._read(...)
            _VOLUMES.put(key, cached)
        if cached is not None:
            return cached if region is None else cached[region]
        return self._read(... if region is None else region)

    def _read(self, region) -> np.ndarray:
        try:
            z = self._array()
            quiet_zarr_loop()
            return np.asarray(z[region])
        except StoreError:
            raise
        except (ValueError, OSError, RuntimeError) as e:  # zarr: "Stored and computed checksum do not match"
            settle_zarr_loop()
            raise self._fail(f"corrupt store entry ({type(e).__name__}: {e})") from None

    def read_crop(self, center: Sequence[int], size: Sequence[int]) -> np.ndarray:
        out = np.full(tuple(int(s) for s in size), self.pad_value, dtype=np.float32)
        src, dst = crop_slices(self.shape, center, size)
        if src is not None:
            out[dst] = normalize_hu(self.read_hu(src).astype(np.float32), self.hu_window)
        return out


def rebuild_hint(root: str | os.PathLike) -> str:
    """How to repair the damaged cases of the store at ``root`` (only those are rebuilt)."""
    return f"rebuild it with `alice3d-data preprocess --data ... --out {root} --verify`"


def shard_problem(folder: Path, name: str, nbytes: int | None) -> str:
    """'' when the shard file of array ``folder/name`` exists with the size the case recorded
    (``nbytes``; None: any size), else what is wrong. One stat, no read."""
    shard = folder / name / "c" / "0" / "0" / "0"
    try:
        size = shard.stat().st_size
    except FileNotFoundError:
        return f"{name} data file {shard} is missing"
    except OSError as e:
        return f"{name} data file {shard} cannot be read ({e.strerror or e})"
    if nbytes is not None and size != int(nbytes):
        return f"{name} data file is {size} bytes, expected {nbytes} (truncated or replaced)"
    return ""


def open_case_array(folder: Path, name: str, nbytes: int | None, fail):
    """The zarr array ``folder/name`` after checking its shard file is the size the case recorded.

    zarr reads a missing shard as fill values; the size check turns a deleted or truncated
    shard into an error instead.
    """
    problem = shard_problem(folder, name, nbytes)
    if problem:
        raise fail(problem)
    try:
        return zarr.open_array(str(folder / name), mode="r")
    except Exception as e:  # noqa: BLE001 - zarr raises many kinds for a damaged zarr.json
        raise fail(f"cannot open the {name} array ({type(e).__name__}: {e})") from None


class VolumeStore:
    """A finished store: its settings, cases (summaries, no body samples) and bad cases."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.settings = read_settings(self.root)
        manifest_path = self.root / MANIFEST_FILE
        if not manifest_path.is_file():
            raise StoreError(
                f"{self.root}: preprocessing has not finished (no {MANIFEST_FILE}); run `alice3d-data preprocess "
                f"--data ... --out {self.root}` again (without --shard, or wait for the last shard) to complete it")
        manifest = read_json(manifest_path, "manifest")
        StoreSettings.from_dict(manifest.get("settings", {}), str(manifest_path))
        self.cases: list[dict] = list(manifest.get("cases", []))
        self.bad: list[dict] = list(manifest.get("bad", []))
        self.totals: dict = dict(manifest.get("totals", {}))

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def decoded_bytes(self) -> int:
        """int16 bytes of every volume decoded (what caching the whole cohort would take)."""
        return int(sum(2 * int(np.prod(c["shape"])) for c in self.cases))

    def check_spacing(self, spacing: Sequence[float], key: str = "data.spacing") -> None:
        want = tuple(float(s) for s in spacing)
        if len(want) != 3 or not np.allclose(want, self.settings.spacing, rtol=0, atol=1e-6):
            raise StoreError(
                f"{self.root}: this store was preprocessed at spacing {_fmt(self.settings.spacing)} mm, but the run "
                f"asks for {key}={_fmt(want)}; use {key}={list(self.settings.spacing)} or preprocess again with "
                f"--spacing {','.join(f'{s:g}' for s in want)} into another --out")

    def volumes(self, hu_window: Sequence[float], cache_bytes: float = 0.0) -> list[StoreVolume]:
        return [StoreVolume(self.root, c, hu_window, cache_bytes) for c in self.cases]


def open_store(root: str | os.PathLike, spacing: Sequence[float] | None = None) -> VolumeStore:
    """The finished store at ``root``; with ``spacing``, refused when built at another one."""
    store = VolumeStore(root)
    if spacing is not None:
        store.check_spacing(spacing)
    return store


def verify_store(root: str | os.PathLike, names: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """Read every chunk of every case (or of ``names``): ``[(case, reason)]`` of the damaged ones."""
    root = Path(root)
    folders = sorted(p for p in (root / "cases").iterdir() if p.is_dir() and not p.name.startswith("."))
    bad = []
    for folder in folders:
        if names is not None and folder.name not in names:
            continue
        reason = verify_case(folder)
        if reason:
            bad.append((folder.name, reason))
    return bad


def verify_case(folder: Path) -> str:
    """'' when the case reads back whole, else what is wrong."""
    def fail(what: str) -> StoreError:
        return StoreError(what)

    try:
        meta = read_json(folder / META_FILE, "case metadata")
        quiet_zarr_loop()
        for name in ("image", "body"):
            z = open_case_array(folder, name, meta.get(f"{name}_nbytes"), fail)
            z[...]
    except StoreError as e:
        return str(e)
    except (ValueError, OSError, RuntimeError) as e:
        settle_zarr_loop()
        return f"corrupt store entry ({type(e).__name__}: {e})"
    return ""
