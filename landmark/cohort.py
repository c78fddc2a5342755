"""Landmark embeddings and pair consistency for a whole cohort in O(N): one fit per volume.

The per-pair consistency (:mod:`landmark.consistency`) fits one affine per *pair* of volumes,
n^2 fits for n volumes (4 million at 2,000). Here every volume is fitted once, to one
reference volume (the one whose body box is closest to the cohort's median size), and a pair's
map is composed: A -> B = inv(T_B) o T_A, with T_V: world V -> world reference. A volume whose
fit fails (too few round-trip-consistent anchors) maps by its body box instead (logged).

For a volume store (:mod:`alice3d.data.store`), :func:`embed_store` computes the embeddings
(into the store, ``STORE/cases/<case>/landmark/<model key[:20]>.emb``) and the fits (a small
JSON beside them), sharded over processes: process ``i`` of ``n`` does the cases ``k % n == i``,
the reference's owner embeds it first and the others wait for it. Training with
``pairs.consistency=reference`` then needs only the fits: no network, no embeddings.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from alice3d.data.digest import file_stamp, hash_arrays
from alice3d.data.io import Volume, load_volume
from alice3d.data.store import StoreVolume, VolumeStore, read_json, write_json_atomic
from alice3d.errors import Alice3DError
from alice3d.runtime import progress
from landmark.consistency import PairTransform
from landmark.store import Embedding, StoreEmbeddings

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


def _embed(matcher, store: VolumeStore, case: dict, source: StoreEmbeddings | None) -> Embedding:
    key, load = case_input(store, case)
    if source is not None:
        source.register(key, case["name"])
    return matcher.store.get_keyed(key, case["name"], load)


def embed_store(matcher, store: VolumeStore, shard: tuple[int, int] | None = None, fits: bool = True,
                keep_embeddings: bool = True, wait_s: float = 600.0, show_progress: bool = True) -> dict:
    """Embed this shard's cases (into the store with ``keep_embeddings``) and fit each to the reference.

    Returns counts: ``{"cases", "mine", "embedded", "fitted", "box_fallbacks", "seconds"}``.
    """
    t0 = time.perf_counter()
    i, n = shard or (0, 1)
    source = StoreEmbeddings(store.root, matcher.model_key, writable=keep_embeddings) if keep_embeddings else None
    if source is not None and not any(isinstance(s, StoreEmbeddings) for s in matcher.store.sources):
        matcher.store.sources.insert(0, source)
    ref = store_reference(store)
    mine = [c for k, c in enumerate(store.cases) if k % n == i]
    mine.sort(key=lambda c: c["name"] != ref["name"])  # the reference first: other shards wait for it
    expect = fit_identity(matcher, store) if fits else {}
    todo = [c for c in mine if not fits or read_fit(fit_path(store, c, matcher.model_key), expect) is None]
    if keep_embeddings:  # every case of the shard gets its embedding into the store, fitted or not
        todo_emb = [c for c in mine if not source.path(c["name"]).is_file()]
    else:
        todo_emb = []
    counts = {"cases": len(store.cases), "mine": len(mine), "embedded": 0, "fitted": 0, "box_fallbacks": 0}
    saved = matcher.memory_items
    matcher.memory_items = 2  # one volume at a time besides the reference: memory stays flat over the cohort
    try:
        _embed_and_fit(matcher, store, ref, source, mine, todo_emb, todo if fits else [], expect, counts, wait_s,
                       show_progress)
    finally:
        matcher.memory_items = saved
    counts["seconds"] = round(time.perf_counter() - t0, 2)
    return counts


def _embed_and_fit(matcher, store: VolumeStore, ref: dict, source, mine: list, todo_emb: list, todo: list,
                   expect: dict, counts: dict, wait_s: float, show_progress: bool) -> None:
    for case in progress(todo_emb, desc="embeddings", unit="volume", logger=log, enabled=show_progress):
        _embed(matcher, store, case, source)
        counts["embedded"] += 1
    if not todo:
        return
    emb_ref = _reference_embedding(matcher, store, ref, source, mine, wait_s)
    for case in progress(todo, desc="reference fits", unit="volume", logger=log, enabled=show_progress):
        emb = _embed(matcher, store, case, source)
        fit = fit_to_reference(matcher, emb, emb_ref, _box(case), _box(ref))
        write_json_atomic(fit_path(store, case, matcher.model_key), {**expect, "case": case["name"], **fit})
        counts["fitted"] += 1
        counts["box_fallbacks"] += not fit["fitted"]


def _reference_embedding(matcher, store: VolumeStore, ref: dict, source, mine: list, wait_s: float) -> Embedding:
    """The reference's embedding: ours to make, or another shard's (waited for), else made here too."""
    key, _ = case_input(store, ref)
    if source is not None:
        source.register(key, ref["name"])
    if all(c["name"] != ref["name"] for c in mine):
        deadline = time.monotonic() + wait_s
        while not matcher.store.has(key, ref["name"]) and time.monotonic() < deadline:
            time.sleep(1.0)
        if not matcher.store.has(key, ref["name"]):
            log.warning("reference %s: not embedded by its shard within %.0f s; embedding it here as well",
                        ref["name"], wait_s)
    return _embed(matcher, store, ref, source)


def store_transforms(matcher_key: str, expect: dict, store: VolumeStore, cases: Sequence[dict]) -> list[np.ndarray]:
    """T_V of ``cases`` from their fit files; CohortError naming the first case without a usable fit."""
    out, missing = [], []
    for c in cases:
        m = read_fit(fit_path(store, c, matcher_key), expect)
        if m is None:
            missing.append(c["name"])
        else:
            out.append(m)
    if missing:
        raise CohortError(
            f"{store.root}: {len(missing)} case(s) have no reference fit for this landmark model "
            f"(e.g. {missing[0]}); run `alice3d-landmark embed --model LM --data {store.root}`")
    return out
