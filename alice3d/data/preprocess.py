"""Building a volume store (:mod:`alice3d.data.store`): once, in parallel, resumable, sharded.

Each case is read and checked (the bad-data checks of :func:`alice3d.data.io.load_volume`),
turned to RAS, resampled to the store's spacing and written into a temporary folder that is
renamed into place complete, its ``meta.json`` last. A killed run therefore leaves whole cases
and a temporary folder that the next run removes; it continues with the cases not yet done.
``shard=(i, n)`` processes the cases ``k`` with ``k % n == i``, so several nodes (or the
processes of a torchrun job) preprocess one cohort into one store on a shared filesystem;
whichever run finds every case done writes ``manifest.json`` (atomically: identical content
whoever writes it).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from alice3d.data.datalists import display_names
from alice3d.data.digest import file_digest, file_stamp, hash_arrays, volume_digest
from alice3d.data.inspect import log_modality_warnings, too_few_slices
from alice3d.data.canonical import to_canonical
from alice3d.data.io import DataError, load_volume
from alice3d.data.phantom import cache_root
from alice3d.data.sources import body_voxels, box_world
from alice3d.data.store import (
    CHUNK,
    FORMAT,
    MANIFEST_FILE,
    META_FILE,
    SETTINGS_FILE,
    VERSION,
    StoreError,
    StoreSettings,
    VolumeStore,
    read_json,
    read_settings,
    verify_case,
    write_json_atomic,
)
from alice3d.data.volumes import with_hu_offset
from alice3d.runtime import Progress, single_threaded_children

log = logging.getLogger("alice3d.data")

__all__ = ["BuildResult", "auto_store", "build_store", "case_names", "env_shard", "parse_shard", "preprocess_case",
           "unique_sources"]

BODY_SAMPLES = 4096  # body voxels kept per case for drawing crop centres


# ----------------------------------------------------------------------------- names and shards


def case_names(paths: Sequence[str]) -> list[str]:
    """One folder name per source (same list in, same names out): its file name without the image
    suffix, with the nearest parent folders that tell apart sources sharing it in front
    (:func:`alice3d.data.datalists.display_names`: ``patient1_PATIENT_DICOM``). A name that is
    still not unique (a derived name equal to another file's name) gets a digest of the full path
    appended, on the derived names only where that suffices: a file name no other source shares
    keeps its name, and with it its case in an existing store."""
    names = display_names(paths, safe=True)
    plain = [display_names([p], safe=True)[0] for p in paths]

    def digest(k: int) -> str:
        return f"{names[k]}-{hash_arrays(os.path.abspath(str(paths[k])))[:8]}"

    for derived_only in (True, False):
        counts: dict[str, int] = {}
        for s in names:
            counts[s] = counts.get(s, 0) + 1
        names = [digest(k) if counts[s] > 1 and (names[k] != plain[k] or not derived_only) else s
                 for k, s in enumerate(names)]
    return names


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected I/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard: expected 0 <= I < N, got {text!r}")
    return i, n


def env_shard(local: bool = False) -> tuple[int, int] | None:
    """``(rank, world size)`` under torchrun (``local``: within this node), else None."""
    if local:
        keys = ("LOCAL_RANK", "LOCAL_WORLD_SIZE")
    else:
        keys = ("RANK", "WORLD_SIZE")
    world = int(os.environ.get(keys[1], "1"))
    return (int(os.environ.get(keys[0], "0")), world) if world > 1 else None


# ----------------------------------------------------------------------------- one case


def _zarr_array(path: Path, array: np.ndarray) -> int:
    """Write ``array`` as one shard (the whole volume) of 64^3 crc32c-checked, zstd-compressed chunks.

    Empty (all fill value) chunks are written too: zarr leaves out a shard holding only fill
    values, and a case's shard file must exist with the size its meta records (a missing one is
    how a deleted entry is found); each empty chunk costs ~30 bytes compressed.
    """
    shard = tuple(-(-int(s) // CHUNK) * CHUNK for s in array.shape)
    z = zarr.create_array(
        str(path), shape=array.shape, dtype=array.dtype, shards=shard, chunks=(CHUNK,) * array.ndim,
        compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()],
        fill_value=0, zarr_format=3, config={"write_empty_chunks": True})
    z[...] = array
    try:
        return (path / "c" / "0" / "0" / "0").stat().st_size
    except FileNotFoundError:
        raise StoreError(f"{path}: zarr wrote no shard file for this {array.shape} {array.dtype} array") from None


def preprocess_case(source: str, name: str, root: str | os.PathLike, settings: StoreSettings) -> dict:
    """Read, offset, check, RAS, resample ``source``; write ``root/cases/<name>`` atomically; its meta.

    Raises DataError naming the file for a bad case (nothing is written then): the bad-data
    checks of `load_volume`, too few slices for a volume (on the source grid) and no voxel
    above the body threshold. The modality warnings are logged and kept in the meta.
    """
    source = str(source)
    vol = load_volume(source, reject_constant=True)
    few = too_few_slices(vol.shape)
    if few:
        raise DataError(f"{source}: {few}")
    meta = {"format": FORMAT, "version": VERSION, "name": name, "source": os.path.abspath(source),
            "source_stamp": file_stamp(source), "source_digest": file_digest(source),
            # of the file as read (no offset): the key landmark's caches give the source
            "image_key": volume_digest(vol.array, vol.affine),
            "source_shape": list(vol.shape), "source_affine": np.asarray(vol.affine).tolist()}
    vol = with_hu_offset(vol, settings.hu_offset)
    warnings = log_modality_warnings(vol, "CT", log)
    lo_hu, hi_hu = float(vol.array.min()), float(vol.array.max())
    ras = to_canonical(vol, settings.spacing)
    del vol
    hu = np.clip(np.rint(ras.array), -32768, 32767).astype(np.int16)
    body = ras.array > settings.body_hu
    if not body.any():
        raise DataError(
            f"{source}: no voxel above the body threshold {settings.body_hu:g} HU at {_fmt_mm(settings.spacing)} "
            f"mm (intensities {lo_hu:.0f}..{hi_hu:.0f} with HU offset {settings.hu_offset:+g}): is it a CT in HU? "
            "An empty or all-air scan has nothing to train on; a CT in other units needs converting to HU "
            "(or --hu-offset / data.hu_offset); the threshold is 5% up the HU window (--hu-window / "
            "data.hu_window)")
    rng = np.random.default_rng(int(meta["image_key"][:16], 16))  # content-seeded: a rebuild is identical
    sample, lo, hi = body_voxels(body, BODY_SAMPLES, rng)
    lo_mm, hi_mm = box_world(ras.affine, lo, hi)
    meta.update(spacing=list(settings.spacing), body_hu=settings.body_hu, hu_offset=settings.hu_offset,
                shape=list(hu.shape), affine=np.asarray(ras.affine).tolist(), hu_min=int(hu.min()),
                hu_max=int(hu.max()), body_voxels=int(body.sum()), body_lo_mm=lo_mm.tolist(),
                body_hi_mm=hi_mm.tolist(), warnings=list(warnings))
    root = Path(root)
    cases = root / "cases"
    tmp = cases / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir(parents=True)
        meta["image_nbytes"] = _zarr_array(tmp / "image", hu)
        meta["body_nbytes"] = _zarr_array(tmp / "body", body)
        meta["body_sample"] = sample.astype(int).tolist()
        write_json_atomic(tmp / META_FILE, meta, compact=True)  # last: a folder with meta.json is complete
        _commit(tmp, cases / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (root / "bad" / f"{name}.json").unlink(missing_ok=True)
    return _summary(meta)


def _fmt_mm(values: Sequence[float]) -> str:
    return "x".join(f"{float(v):g}" for v in values)


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder into place, replacing an outdated case."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            os.rename(final, old)
        except FileNotFoundError:
            old = None
    else:
        old = None
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / META_FILE).is_file():  # not another process's finished copy of the same case
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _summary(meta: dict) -> dict:
    """A case's manifest entry: its meta without the body sample."""
    return {k: v for k, v in meta.items() if k != "body_sample"}


def _mark_bad(root: Path, name: str, source: str, reason: str) -> dict:
    entry = {"name": name, "source": os.path.abspath(source), "source_stamp": _stamp_or_none(source),
             "reason": reason}
    write_json_atomic(root / "bad" / f"{name}.json", entry)
    shutil.rmtree(root / "cases" / name, ignore_errors=True)  # an outdated good copy must not stay usable
    return entry


def _stamp_or_none(source: str):
    try:
        return file_stamp(source)
    except OSError:
        return None


def _job(args: tuple) -> tuple[str, dict | None, str]:
    """Worker: ``(name, summary or None, reason)``."""
    source, name, root, settings = args
    try:
        return name, preprocess_case(source, name, root, settings), ""
    except DataError as e:
        return name, None, str(e).removeprefix(f"{source}: ")


# ----------------------------------------------------------------------------- state of a store


def case_state(root: Path, name: str, source: str, verify: bool = False) -> str:
    """``"done"``, ``"bad"`` (known bad, source unchanged), ``"todo"`` or (``verify``) ``"damaged"``:
    done, but it does not read back whole (to be rebuilt like ``"todo"``)."""
    stamp = _stamp_or_none(source)
    meta_path = root / "cases" / name / META_FILE
    if meta_path.is_file():
        try:
            meta = read_json(meta_path, "case metadata")
        except StoreError:
            return "todo"
        same = meta.get("source_stamp") == stamp or (
            stamp is not None and meta.get("source_digest") == file_digest(source))
        if same and meta.get("version") == VERSION and os.path.abspath(source) == meta.get("source"):
            if verify:
                reason = verify_case(root / "cases" / name)
                if reason:
                    log.warning("case %s is damaged, rebuilding it: %s", name, reason)
                    return "damaged"
            return "done"
        return "todo"
    bad_path = root / "bad" / f"{name}.json"
    if bad_path.is_file():
        try:
            if read_json(bad_path, "bad-case record").get("source_stamp") == stamp:
                return "bad"
        except StoreError:
            pass
    return "todo"


def _check_or_write_settings(root: Path, settings: StoreSettings) -> None:
    if (root / SETTINGS_FILE).is_file():
        have = read_settings(root)
        if have != settings:
            raise StoreError(f"{root}: this store was built with {have.describe()}; this run asks for "
                             f"{settings.describe()}. Use the store's settings or another --out")
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(root / SETTINGS_FILE, settings.to_dict())


def _clean_temporaries(root: Path, names: set[str]) -> None:
    """Remove the temporary folders of this shard's cases left by a killed run."""
    cases = root / "cases"
    if not cases.is_dir():
        return
    for p in cases.iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
            if p.name[1:].split(".tmp-")[0].split(".old-")[0] in names:
                shutil.rmtree(p, ignore_errors=True)


def write_manifest(root: Path, paths: Sequence[str], names: Sequence[str], settings: StoreSettings) -> Path | None:
    """``manifest.json`` from the case metas when every case is done or known bad, else None."""
    cases, bad = [], []
    for name, source in zip(names, paths):
        meta_path = root / "cases" / name / META_FILE
        bad_path = root / "bad" / f"{name}.json"
        if meta_path.is_file():
            cases.append(_summary(read_json(meta_path, "case metadata")))
        elif bad_path.is_file():
            b = read_json(bad_path, "bad-case record")
            bad.append({"name": name, "source": b.get("source", source), "reason": b.get("reason", "")})
        else:
            return None
    store_bytes = sum(int(c["image_nbytes"]) + int(c["body_nbytes"]) for c in cases)
    manifest = {
        "format": FORMAT, "version": VERSION, "settings": settings.to_dict(), "cases": cases, "bad": bad,
        "totals": {"cases": len(cases), "bad": len(bad), "store_bytes": store_bytes,
                   "source_bytes": int(sum(c["source_stamp"][0] for c in cases)),
                   "voxels": int(sum(int(np.prod(c["shape"])) for c in cases))},
    }
    write_json_atomic(root / MANIFEST_FILE, manifest)
    return root / MANIFEST_FILE


# ----------------------------------------------------------------------------- the whole store


def unique_sources(paths: Sequence[str], warn: bool = True) -> tuple[list[str], list[tuple[str, list[int]]]]:
    """``(paths with each source once, in first-seen order, [(source, its 1-based positions)]``
    of the sources listed more than once); ``warn``: each of those is logged as a warning."""
    seen: dict[str, list[int]] = {}
    out = []
    for pos, p in enumerate(paths, 1):
        key = os.path.abspath(str(p).rstrip("/") or "/")
        if key not in seen:
            seen[key] = []
            out.append(str(p))
        seen[key].append(pos)
    duplicates = [(key, at) for key, at in seen.items() if len(at) > 1]
    for key, at in duplicates if warn else ():
        log.warning("%s is listed %d times (entries %s of the %d given); preprocessing it once", key, len(at),
                    ", ".join(str(a) for a in at), len(paths))
    return out, duplicates




@dataclass
class BuildResult:
    root: Path
    cases: int  # in the whole cohort
    mine: int  # this shard's
    done_now: int  # preprocessed by this run
    skipped: int  # already done (resumed)
    bad: list[tuple[str, str]] = field(default_factory=list)  # this shard's bad (source, reason)
    manifest: Path | None = None
    seconds: float = 0.0
    verified: int = 0  # with verify: cases found done and read back whole or damaged
    damaged: int = 0  # of those, damaged (rebuilt, or bad now)
    rebuilt: int = 0  # damaged ones preprocessed again
    duplicates: list[tuple[str, list[int]]] = field(default_factory=list)  # (source, 1-based positions)


def _workers(workers: int | None, todo: int) -> int:
    if workers is not None:
        return max(1, int(workers))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    # spawned workers pay a few seconds of imports each: worth it only for a long list
    return min(cpus, 8) if todo >= 4 * cpus else 1


def build_store(paths: Sequence[str], out: str | os.PathLike, settings: StoreSettings, workers: int | None = None,
                shard: tuple[int, int] | None = None, verify: bool = False, progress: bool = True) -> BuildResult:
    """Preprocess the sources into the store ``out`` (resuming, this shard's cases only)."""
    t0 = time.perf_counter()
    if not paths:
        raise DataError("no volumes found in the data given (empty datalist or folder)")
    root = Path(out)
    _check_or_write_settings(root, settings)
    i, n = shard or (0, 1)
    paths, duplicates = unique_sources(paths, warn=i == 0)  # every shard sees them; one says so
    names = case_names(paths)
    mine = [k for k in range(len(paths)) if k % n == i]
    _clean_temporaries(root, {names[k] for k in mine})
    states = {k: case_state(root, names[k], paths[k], verify) for k in mine}
    todo = [k for k in mine if states[k] in ("todo", "damaged")]
    result = BuildResult(root, len(paths), len(mine), 0, len(mine) - len(todo), duplicates=duplicates)
    if verify:
        result.verified = sum(states[k] in ("done", "damaged") for k in mine)
        result.damaged = sum(states[k] == "damaged" for k in mine)
    if result.skipped:
        log.info("%s: %d of this run's %d cases already preprocessed (resuming)", root, result.skipped, len(mine))
    jobs = [(paths[k], names[k], str(root), settings) for k in todo]
    index = {name: k for k, name in enumerate(names)}
    with Progress(len(jobs), "preprocess", unit="case", logger=log, enabled=progress) as bar:
        for name, summary, reason in _run(jobs, _workers(workers, len(jobs))):
            k = index[name]
            if summary is None:
                _mark_bad(root, name, paths[k], reason)
                log.warning("bad volume %s: %s", paths[k], reason)
            else:
                result.done_now += 1
                result.rebuilt += states[k] == "damaged"
            bar.update(1)
    result.bad = [(paths[k], read_json(root / "bad" / f"{names[k]}.json", "bad-case record").get("reason", ""))
                  for k in mine if (root / "bad" / f"{names[k]}.json").is_file()]
    result.manifest = write_manifest(root, paths, names, settings)
    result.seconds = time.perf_counter() - t0
    return result


def _run(jobs: list[tuple], workers: int):
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _job(job)
        return
    with single_threaded_children(), ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(_job, job) for job in jobs]
        for fut in as_completed(futures):
            yield fut.result()


# ----------------------------------------------------------------------------- automatic stores


def store_key(paths: Sequence[str], settings: StoreSettings) -> str:
    """Digest of the sources (absolute paths, sizes, modification times) and the settings."""
    sources = sorted((os.path.abspath(str(p)), _stamp_or_none(str(p))) for p in paths)
    doc = settings.to_dict()
    if not settings.hu_offset:
        del doc["hu_offset"]  # the key of the stores built before the offset existed
    return hash_arrays(doc, sources)


def auto_store(paths: Sequence[str], settings: StoreSettings, workers: int | None = None,
               stall_s: float = 900.0, progress: bool = True) -> VolumeStore:
    """The store of these sources under ``$ALICE3D_CACHE/stores/<key>``: built once, reused after.

    Under torchrun the processes of each node share the work (by local rank) and all wait for
    the manifest; a node whose cache is not shared builds its own copy. A wait that sees no
    case finished for ``stall_s`` seconds gives up with a message.
    """
    # The format version is in the name: an upgrade builds a new store instead of refusing the old one.
    root = cache_root() / "stores" / f"v{VERSION}-{store_key(paths, settings)[:24]}"
    if (root / MANIFEST_FILE).is_file():
        return VolumeStore(root)
    log.info("preprocessing %d volumes into the volume store %s (once; reused by later runs)", len(paths), root)
    shard = env_shard(local=True)
    if shard is not None and workers is None:
        workers = 1  # every process of the node is one worker already
    result = build_store(paths, root, settings, workers=workers, shard=shard, progress=progress)
    if result.manifest is None:
        _wait_for_manifest(root, stall_s)
    return VolumeStore(root)


def _wait_for_manifest(root: Path, stall_s: float, poll_s: float = 1.0) -> None:
    def count() -> int:
        return sum(1 for _ in (root / "cases").glob(f"*/{META_FILE}")) + sum(1 for _ in (root / "bad").glob("*.json"))

    last, since = count(), time.monotonic()
    while not (root / MANIFEST_FILE).is_file():
        time.sleep(poll_s)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise StoreError(
                f"{root}: waited {stall_s:.0f} s without another process finishing a case of this volume store; "
                "is every process of the run alive? On several nodes, put $ALICE3D_CACHE on a shared filesystem "
                "or preprocess once with `alice3d-data preprocess` and pass --data STORE")
