"""Landmark embeddings and pair consistency for a whole cohort in O(N): one fit per volume.

The per-pair consistency (:mod:`landmark.consistency`) fits one affine per *pair* of volumes,
n^2 fits for n volumes (4 million at 2,000). Here every volume is fitted once, to one
reference volume (the one whose body box is closest to the cohort's median size), and a pair's
map is composed: A -> B = inv(T_B) o T_A, with T_V: world V -> world reference. A volume whose
fit fails (too few round-trip-consistent anchors) maps by its body box instead (logged).

For a volume store (:mod:`alice3d.data.store`), :func:`embed_store` computes the embeddings
(into the store, ``STORE/cases/<case>/landmark/<model key[:20]>.zarr``) and the fits (a small
JSON beside them), sharded over processes: process ``i`` of ``n`` does the cases ``k % n == i``
(:func:`shard_cases`). It is the work of the preparation step (:mod:`landmark.prepare`), which
runs it before any dataset is built and waits for every process at a barrier; the pair datasets
then only read, with :func:`store_transforms` and :func:`missing_store_embeddings`, and a missing
or stale preparation is a :class:`CohortError` naming the command that makes it
(:func:`preparation_hint`). Training with ``pairs.consistency=reference`` needs only the fits:
no network, no embeddings, so a preparation for it (``keep_embeddings=False``;
:func:`reference_fits` for volumes in memory) writes none, neither into the store nor into the
embedding cache: an embedding of a head-and-neck CT takes hundreds of MB and would never be
read again.

Before any work, a preparation logs what it will cost (volumes to embed and to fit, voxels,
the disk it will write); after its first volume, the time the rest will take.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from alice3d.data.digest import file_stamp, hash_arrays
from alice3d.data.io import Volume, load_volume
from alice3d.data.store import StoreVolume, VolumeStore, read_json, write_json_atomic
from alice3d.errors import Alice3DError
from alice3d.runtime import progress
from landmark.consistency import PairTransform
from landmark.embed_cache import CacheError, read_group_meta
from landmark.store import DiskEmbeddingCache, Embedding, StoreEmbeddings

log = logging.getLogger("alice3d.landmark")

FIT_FORMAT = "landmark-reference-fit-v1"


class CohortError(Alice3DError, RuntimeError):
    """Embeddings or fits of a cohort that are missing or cannot be made (names the case)."""


# ----------------------------------------------------------------------------- reference maps


def reference_index(boxes: Sequence[tuple[np.ndarray, np.ndarray]]) -> int:
    """The volume whose body box extent (mm per axis) is closest to the cohort's median extent."""
    ext = np.array([np.asarray(hi, np.float64) - np.asarray(lo, np.float64) for lo, hi in boxes])
    return int(np.argmin(np.abs(ext - np.median(ext, axis=0)).sum(axis=1)))


def box_affine(lo_a, hi_a, lo_b, hi_b) -> np.ndarray:
    """(4, 4) per-axis scale and shift taking the world box ``[lo_a, hi_a]`` onto ``[lo_b, hi_b]``."""
    lo_a, hi_a, lo_b, hi_b = (np.asarray(v, np.float64) for v in (lo_a, hi_a, lo_b, hi_b))
    scale = (hi_b - lo_b) / np.maximum(hi_a - lo_a, 1e-6)
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = lo_b - scale * lo_a
    return m


def compose(t_a: np.ndarray, t_b: np.ndarray) -> np.ndarray:
    """World A -> world B through the reference: ``inv(T_B) @ T_A``."""
    return np.linalg.solve(np.asarray(t_b, np.float64), np.asarray(t_a, np.float64))


def fit_settings(matcher) -> dict:
    """Everything of the matcher that changes a fit (part of a fit's identity)."""
    c = matcher.config
    return {"anchors": c.anchors, "roundtrip_mm": c.roundtrip_mm, "fine_weight": c.fine_weight,
            "search": matcher.search, "coarse_cells": c.coarse_cells, "refine": c.refine}


def fit_to_reference(matcher, emb: Embedding, emb_ref: Embedding, box: tuple, box_ref: tuple) -> dict:
    """``{"matrix": T (4, 4) world -> world reference, "fitted": bool, ...}``; the box map when the fit fails."""
    if emb.key == emb_ref.key:
        return {"matrix": np.eye(4).tolist(), "fitted": True, "inliers": 0, "anchors": 0, "residual_mm": 0.0}
    t: PairTransform | None = matcher.pair_transform(emb, emb_ref)
    if t is None:
        log.warning("%s: too few anchors match the reference %s consistently; its pairs map by the body box",
                    emb.name, emb_ref.name)
        return {"matrix": box_affine(*box, *box_ref).tolist(), "fitted": False, "inliers": 0, "anchors": 0,
                "residual_mm": None}
    return {"matrix": np.asarray(t.matrix).tolist(), "fitted": True, "inliers": t.inliers, "anchors": t.anchors,
            "residual_mm": t.residual_mm}


def reference_transforms(matcher, embeddings: Sequence[Embedding], boxes: Sequence[tuple]) -> list[np.ndarray]:
    """T_V for in-memory volumes: each embedding fitted once to the reference (fits cached by the matcher)."""
    r = reference_index(boxes)
    out = []
    for emb, box in progress(list(zip(embeddings, boxes)), desc="reference fits", unit="volume", logger=log):
        out.append(np.asarray(fit_to_reference(matcher, emb, embeddings[r], box, boxes[r])["matrix"]))
    return out


def reference_fits(matcher, sources: Sequence, boxes: Sequence[tuple], grids: Sequence[tuple] = (),
                   show_progress: bool = True) -> list[np.ndarray]:
    """T_V of volumes given as images (paths or ``Volume`` in HU): one fit each to the reference.

    One volume's embedding is held at a time besides the reference's, and none is written into
    the matcher's sources (the fits are all that is used later). ``grids``: ``(shape, spacing mm)``
    per volume, for the cost line (estimated voxels at the model's spacing).
    """
    r = reference_index(boxes)
    voxels = sum(model_voxels(matcher, *g) for g in grids) if grids else None
    folder = matcher.pairs.folder  # the fits are kept (beside the cache's embeddings) for the next run
    writes = [(FIT_BYTES * (len(sources) - 1), f"{folder} (fits)")] if folder is not None else []
    log_cost("reference fits of the volumes in memory", len(sources), len(sources) - 1, voxels, writes,
             "no embeddings are kept (only the per-volume fits are used)")
    saved = matcher.memory_items
    matcher.memory_items = 2
    clock = CostClock("reference fits", len(sources) - 1)
    out = []
    # every volume named apart from the others (patient1_PATIENT_DICOM, ...) before the first is embedded
    matcher.store.name_sources(sources)
    try:
        with matcher.store.read_only():
            emb_ref = matcher.embed(sources[r])
            clock.start()
            for k, (src, box) in enumerate(progress(list(zip(sources, boxes)), desc="reference fits", unit="volume",
                                                    logger=log, enabled=show_progress)):
                emb = emb_ref if k == r else matcher.embed(src)
                out.append(np.asarray(fit_to_reference(matcher, emb, emb_ref, box, boxes[r])["matrix"]))
                if k != r:
                    clock.done()
    finally:
        matcher.memory_items = saved
    return out


# ----------------------------------------------------------------------------- cost of a preparation

FIT_BYTES = 1000  # a fit's JSON: the matrix, its counts and identity


def model_voxels(matcher, shape: Sequence[int], spacing: Sequence[float]) -> int:
    """Voxels of a volume of ``shape`` at ``spacing`` (mm) once resampled to the model's spacing."""
    return int(np.prod([max(1, round(int(n) * float(s) / float(t)))
                        for n, s, t in zip(shape, spacing, matcher.spacing)]))


def embedding_bytes(matcher, voxels: int) -> int:
    """Estimated size of the embedding file of a volume of ``voxels`` at the model's spacing:
    fine grid (float16, stride 2) + body mask, coarse grid (float32), header."""
    cfg = matcher.net.cfg
    n = len(matcher.spacing)
    fine = voxels / cfg.fine_stride**n
    coarse = voxels / cfg.coarse_stride**n
    return int(fine * (2 * cfg.embed_dim + 1) + coarse * 4 * cfg.embed_dim + 4096)


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} bytes"


def format_seconds(t: float) -> str:
    if t >= 3600:
        return f"{t / 3600:.1f} h"
    return f"{t / 60:.1f} min" if t >= 90 else f"{t:.0f} s"


def log_cost(what: str, n_embed: int, n_fit: int, voxels: int | None, writes: Sequence[tuple[int, str]],
             note: str = "") -> str:
    """Log (and return) the cost line of a preparation before it starts.

    ``writes``: ``(bytes, where)`` of what it will write to disk.
    """
    parts = [f"{n_embed} volume(s) to embed"
             + (f" (~{voxels / 1e6:.1f} Mvoxels at the model's spacing)" if voxels else ""),
             f"{n_fit} reference fit(s)"]
    if writes:
        disk = "; ".join(f"~{format_bytes(b)} into {where}" for b, where in writes)
        parts.append(f"writes {disk}")
    else:
        parts.append("writes nothing to disk")
    if note:
        parts.append(note)
    parts.append("time: estimated after the first volume" if n_embed + n_fit > 1 else "")
    line = f"landmark preparation, {what}: " + ", ".join(p for p in parts if p)
    log.info("%s", line)
    return line


class CostClock:
    """After the first of ``total`` items of a phase, logs how long the remaining ones will take."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.n = what, int(total), 0
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def done(self) -> None:
        self.n += 1
        if self.n == 1 and self.total > 1:
            first = time.perf_counter() - self.t0
            log.info("%s: the first volume took %.1f s; about %s for the remaining %d", self.what, first,
                     format_seconds(first * (self.total - 1)), self.total - 1)


# ----------------------------------------------------------------------------- volume stores


def _box(case: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(case["body_lo_mm"], np.float64), np.asarray(case["body_hi_mm"], np.float64)


def store_reference(store: VolumeStore) -> dict:
    """The reference case of a store (by body size; the same for every process)."""
    return store.cases[reference_index([_box(c) for c in store.cases])]


def case_input(store: VolumeStore, case: dict) -> tuple[str, object]:
    """``(image key, load)`` of what a case is embedded from: its source file while unchanged
    (the key the matcher's disk cache uses too), else the store's HU volume."""
    src = case["source"]
    try:
        unchanged = file_stamp(src) == case.get("source_stamp")
    except OSError:
        unchanged = False
    if unchanged:
        return case["image_key"], lambda: load_volume(src)
    log.info("%s: source %s is missing or changed; embedding the store's volume", case["name"], src)

    def from_store() -> Volume:
        hu = StoreVolume(store.root, case, (-1024.0, 3071.0)).read_hu().astype(np.float32)
        return Volume(hu, np.asarray(case["affine"], np.float64), src)

    return hash_arrays("store-volume", case["image_key"], list(store.settings.spacing)), from_store


def fit_path(store: VolumeStore, case: dict, model_key: str) -> Path:
    return store.root / "cases" / case["name"] / "landmark" / f"{model_key[:20]}.fit.json"


def read_fit(path: Path, expect: dict) -> np.ndarray | None:
    """The fit's matrix when the file is for ``expect`` (model, reference, settings), else None."""
    if not path.is_file():
        return None
    try:
        doc = read_json(path, "reference fit")
        matrix = np.asarray(doc["matrix"], dtype=np.float64)
    except (Alice3DError, KeyError, TypeError, ValueError):
        return None
    if any(doc.get(k) != v for k, v in expect.items()) or matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        return None
    return matrix


def fit_identity(matcher, store: VolumeStore) -> dict:
    ref = store_reference(store)
    return {"format": FIT_FORMAT, "model_key": matcher.model_key, "reference": ref["name"],
            "reference_key": ref["image_key"], "settings": json.loads(json.dumps(fit_settings(matcher)))}


def case_grid(store: VolumeStore, case: dict) -> tuple[list[int], list[float]]:
    """``(shape, spacing mm)`` of what a case is embedded from (its source while unchanged, as
    :func:`case_input` decides), without reading it."""
    try:
        unchanged = file_stamp(case["source"]) == case.get("source_stamp")
    except OSError:
        unchanged = False
    if unchanged and "source_shape" in case and "source_affine" in case:
        spacing = np.linalg.norm(np.asarray(case["source_affine"], np.float64)[:3, :3], axis=0)
        return [int(s) for s in case["source_shape"]], [float(s) for s in spacing]
    return [int(s) for s in case["shape"]], [float(s) for s in store.settings.spacing]


def _embed(matcher, inputs: dict, case: dict) -> Embedding:
    key, load = inputs[case["name"]]
    return matcher.store.get_keyed(key, case["name"], load)


def _store_source(matcher, store: VolumeStore) -> StoreEmbeddings:
    """The matcher's source for this store's embeddings (added first when it has none)."""
    for s in matcher.store.sources:
        if isinstance(s, StoreEmbeddings) and Path(s.root) == Path(store.root):
            return s
    source = StoreEmbeddings(store.root, matcher.model_key, writable=False)
    matcher.store.sources.insert(0, source)
    return source


def shard_cases(cases: Sequence[dict], shard: tuple[int, int] | None) -> list[dict]:
    """The cases of process ``i`` of ``n`` (``shard = (i, n)``; None: all): every ``k % n == i``, so
    the shards of ``n`` processes are disjoint and together hold every case once."""
    i, n = shard or (0, 1)
    if not (n >= 1 and 0 <= i < n):
        raise CohortError(f"shard {i}/{n}: expected 0 <= I < N")
    return [c for k, c in enumerate(cases) if k % n == i]


def embed_store(matcher, store: VolumeStore, shard: tuple[int, int] | None = None, fits: bool = True,
                keep_embeddings: bool = True, show_progress: bool = True,
                barrier: Callable[[], None] | None = None) -> dict:
    """Embed this shard's cases (into the store with ``keep_embeddings``) and fit each to the reference.

    ``keep_embeddings=False`` (a preparation that needs only the fits): embeddings already in the
    store or in the matcher's cache are used, and none is written anywhere; every shard embeds the
    reference for itself. ``barrier``: called once by every process of a sharded job between the
    embeddings and the fits (with ``keep_embeddings`` the reference is then in the store, embedded
    by its shard); without one, a shard that does not own the reference and finds it missing embeds
    it too. Logs the cost (volumes, voxels, disk) before any work. Returns counts: ``{"cases",
    "mine", "embedded", "fitted", "box_fallbacks", "seconds"}``.
    """
    t0 = time.perf_counter()
    source = _store_source(matcher, store)
    if keep_embeddings:
        source.writable = True
    ref = store_reference(store)
    mine = shard_cases(store.cases, shard)
    inputs = {c["name"]: case_input(store, c) for c in [ref, *mine]}  # once: it logs a changed source
    for name, (key, _) in inputs.items():
        source.register(key, name)
    expect = fit_identity(matcher, store) if fits else {}
    todo = [c for c in mine if fits and read_fit(fit_path(store, c, matcher.model_key), expect) is None]
    if keep_embeddings:  # every case of the shard gets its embedding into the store, fitted or not
        todo_emb = [c for c in mine if not source.case_exists(c["name"])]
    else:
        todo_emb = []
    _log_store_cost(matcher, store, ref, inputs, todo_emb, todo, keep_embeddings, shard)
    counts = {"cases": len(store.cases), "mine": len(mine), "embedded": 0, "fitted": 0, "box_fallbacks": 0}
    saved = matcher.memory_items
    matcher.memory_items = 2  # one volume at a time besides the reference: memory stays flat over the cohort
    try:
        if keep_embeddings:
            _embed_and_fit(matcher, store, ref, inputs, todo_emb, todo, expect, counts, show_progress, barrier)
        else:  # every shard embeds the reference itself: nobody keeps it to read
            with matcher.store.read_only():
                _embed_and_fit(matcher, store, ref, inputs, [], todo, expect, counts, show_progress, barrier)
    finally:
        matcher.memory_items = saved
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    return counts


def _log_store_cost(matcher, store: VolumeStore, ref: dict, inputs: dict, todo_emb: list, todo: list,
                    keep: bool, shard: tuple[int, int] | None) -> None:
    def available(c: dict) -> bool:
        return matcher.store.exists(inputs[c["name"]][0], c["name"])

    to_embed = {c["name"]: c for c in todo_emb}
    to_embed.update({c["name"]: c for c in todo if not available(c)})
    if todo and ref["name"] not in to_embed and not available(ref):
        to_embed[ref["name"]] = ref
    voxels = {name: model_voxels(matcher, *case_grid(store, c)) for name, c in to_embed.items()}
    writes = []
    if keep and todo_emb:
        per = [embedding_bytes(matcher, voxels[c["name"]]) for c in todo_emb]
        where = f"{store.root}/cases/*/landmark/ (embeddings, ~{format_bytes(sum(per) / len(per))} per volume)"
        writes.append((sum(per), where))
        disk = [s for s in matcher.store.sources if isinstance(s, DiskEmbeddingCache) and s.writable]
        for d in disk:
            writes.append((sum(per), f"the embedding cache {d.cache_dir}"))
    if todo:
        writes.append((FIT_BYTES * len(todo), f"{store.root}/cases/*/landmark/ (fits)"))
    what = f"{store.root}" + (f" (shard {shard[0]}/{shard[1]})" if shard else "")
    note = "" if keep else "no embeddings are kept (only the per-volume fits are used)"
    n_fit = sum(c["name"] != ref["name"] for c in todo)  # the reference's own fit is the identity
    log_cost(what, len(to_embed), n_fit, sum(voxels.values()), writes, note)


def _embed_and_fit(matcher, store: VolumeStore, ref: dict, inputs: dict, todo_emb: list, todo: list,
                   expect: dict, counts: dict, show_progress: bool, barrier: Callable[[], None] | None) -> None:
    clock = CostClock("embeddings", len(todo_emb))
    for case in progress(todo_emb, desc="embeddings", unit="volume", logger=log, enabled=show_progress):
        _embed(matcher, inputs, case)
        counts["embedded"] += 1
        clock.done()
    if barrier is not None:  # every process, with work left or not: a barrier needs all of them
        barrier()
    if not todo:
        return
    emb_ref = _embed(matcher, inputs, ref)
    clock = CostClock("reference fits", sum(c["name"] != ref["name"] for c in todo))
    for case in progress(todo, desc="reference fits", unit="volume", logger=log, enabled=show_progress):
        emb = _embed(matcher, inputs, case)
        fit = fit_to_reference(matcher, emb, emb_ref, _box(case), _box(ref))
        write_json_atomic(fit_path(store, case, matcher.model_key), {**expect, "case": case["name"], **fit})
        counts["fitted"] += 1
        counts["box_fallbacks"] += not fit["fitted"]
        if case["name"] != ref["name"]:
            clock.done()


def preparation_hint(model: str | Path | None, store_root: str | Path) -> str:
    """The commands that prepare a store for pairs: what a missing preparation's error tells the user."""
    return (f"run `alice3d-landmark embed --model {model or 'LM/landmark.pt'} --data {store_root}` "
            "or start alice3d-pretrain, which prepares it")


def store_transforms(matcher_key: str, expect: dict, store: VolumeStore, cases: Sequence[dict],
                     model: str | Path | None = None) -> list[np.ndarray]:
    """T_V of ``cases`` from their fit files; CohortError naming the first case without a usable fit
    (missing, or made for another model, reference or match settings) and the command that makes it."""
    out, missing = [], []
    for c in cases:
        m = read_fit(fit_path(store, c, matcher_key), expect)
        if m is None:
            missing.append(c["name"])
        else:
            out.append(m)
    if missing:
        raise CohortError(
            f"{store.root}: {len(missing)} case(s) have no reference fit for this landmark model, reference "
            f"and match settings (missing or stale, e.g. {missing[0]}); {preparation_hint(model, store.root)}")
    return out


def missing_store_embeddings(store: VolumeStore, model_key: str, inputs: Sequence[tuple[str, object]],
                             cases: Sequence[dict]) -> list[str]:
    """Names of ``cases`` whose embedding in the store is missing or was made from another image or
    model (checked on the file's header only: cheap). ``inputs``: :func:`case_input` of each case."""
    source = StoreEmbeddings(store.root, model_key, writable=False)
    out = []
    for (key, _), c in zip(inputs, cases):
        try:
            meta = read_group_meta(source.path(c["name"]))
        except CacheError:
            out.append(c["name"])
            continue
        if meta.get("image_key") != key or meta.get("model_key") != model_key:
            out.append(c["name"])
    return out
