"""Pair consistency: one robust affine world A -> world B per volume pair, fitted once and cached.

Matching each point on its own confuses levels along the body axis (axial anatomy repeats).
So a few hundred body anchors of A are matched by argmax, anchors whose match does not lead
back (B -> A) to within ``roundtrip_mm`` are dropped, and a trimmed least-squares fit on the
rest gives the pair's map. Fits are kept in memory and on disk beside the embeddings (a few
hundred bytes each, keyed by both embeddings, the model and the fit's settings).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alice3d.data.geometry import apply_affine
from landmark.embed_cache import CacheError, hash_arrays, read_entry, trim_cache, write_entry
from landmark.store import Embedding

log = logging.getLogger("alice3d.landmark")

MIN_ANCHORS = 12  # consistent anchors needed to fit a pair's affine (4 would determine it)
PAIR_FORMAT = "landmark-pair-affine-v1"
_MISSING = object()  # no usable cache entry (None is a cached "could not fit")

# points of A (N, 3) -> (their matches in B (N, 3), scores (N,)), e.g. Matcher.match_argmax
ArgmaxFn = Callable[[Embedding, Embedding, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class PairTransform:
    """Affine world A -> world B of one volume pair, fitted to consistent anchor matches."""

    matrix: np.ndarray  # (4, 4)
    inliers: int  # anchors that survived the round trip
    anchors: int  # anchors tried
    residual_mm: float  # median distance of those matches from the fitted map


def anchor_points(emb: Embedding, n: int) -> np.ndarray:
    """``n`` world points ``(n, 3)`` at body voxels of the fine grid (fewer if the body is smaller).

    A fixed seed, so copies of a volume in other orientations (same RAS grid) get the same anchors.
    """
    body = emb.body if emb.body is not None else torch.ones(emb.fine_shape, dtype=torch.bool)
    idx = torch.nonzero(body).numpy()
    if len(idx) == 0:
        return np.zeros((0, len(emb.fine_shape)))
    rng = np.random.default_rng(0)
    pick = idx[np.sort(rng.choice(len(idx), size=min(n, len(idx)), replace=False))]
    return apply_affine(emb.fine_affine, pick)


def roundtrip_inliers(anchors: np.ndarray, back: np.ndarray, roundtrip_mm: float) -> np.ndarray:
    """``(N,)`` True where A -> B -> A lands within ``roundtrip_mm`` of the anchor (0: exactly on it)."""
    return np.linalg.norm(back - anchors, axis=1) <= roundtrip_mm


def robust_affine(src: np.ndarray, dst: np.ndarray, keep: float = 0.6, rounds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Trimmed least-squares affine ``dst ~ M @ src`` -> ``(M (4, 4), residuals (N,) mm)``.

    Each round refits on the ``keep`` fraction of points closest to the previous fit, so a
    minority of wrong matches (up to ``1 - keep``) does not pull the map.
    """
    x = np.c_[src, np.ones(len(src))]
    use = np.ones(len(src), dtype=bool)
    for _ in range(rounds):
        coef, *_ = np.linalg.lstsq(x[use], dst[use], rcond=None)  # (4, 3)
        residuals = np.linalg.norm(x @ coef - dst, axis=1)
        use = residuals <= np.quantile(residuals, keep)
    matrix = np.eye(4)
    matrix[:3] = coef.T
    return matrix, residuals


def fit_pair(emb_a: Embedding, emb_b: Embedding, argmax: ArgmaxFn, anchors: int,
             roundtrip_mm: float) -> PairTransform | None:
    """Affine from the anchors of A whose argmax match in B leads back; None below ``MIN_ANCHORS``."""
    points = anchor_points(emb_a, anchors)
    found, _ = argmax(emb_a, emb_b, points)
    back, _ = argmax(emb_b, emb_a, found)
    ok = roundtrip_inliers(points, back, roundtrip_mm)
    log.info("%s -> %s: %d of %d anchors match consistently", emb_a.name or "A", emb_b.name or "B",
             int(ok.sum()), len(points))
    if ok.sum() < MIN_ANCHORS:
        return None
    matrix, residuals = robust_affine(points[ok], found[ok])
    return PairTransform(matrix, int(ok.sum()), len(points), float(np.median(residuals)))


class PairAffines:
    """The fitted affine of each volume pair: memory LRU, then ``folder/<key>.pair`` files, else a fit.

    ``folder`` None: memory only. ``max_bytes``: cap of ``cache_dir`` (embeddings and pairs
    together) enforced after every write. ``stats`` counts fits and pairs that could not be fitted.
    """

    def __init__(self, cache_dir: Path | None, folder: Path | None, max_bytes: int | None, memory_items: int = 128):
        self.cache_dir, self.folder, self.max_bytes, self.memory_items = cache_dir, folder, max_bytes, memory_items
        self._memory: OrderedDict[str, PairTransform | None] = OrderedDict()
        self.stats = {"pair_transforms": 0, "pair_fallbacks": 0}

    @staticmethod
    def key(emb_a: Embedding, emb_b: Embedding, model_key: str, settings: dict) -> str:
        """Digest of both embeddings, the model and every setting that changes the fit."""
        return hash_arrays(PAIR_FORMAT, emb_a.key, emb_b.key, model_key, json.dumps(settings, sort_keys=True))

    def get(self, key: str, emb_a: Embedding, emb_b: Embedding, argmax: ArgmaxFn, anchors: int,
            roundtrip_mm: float) -> PairTransform | None:
        """The pair's affine under ``key`` (see :meth:`key`), fitted with ``fit_pair`` when not cached."""
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        transform = self._read(key) if self.folder is not None else _MISSING
        if transform is _MISSING:
            transform = fit_pair(emb_a, emb_b, argmax, anchors, roundtrip_mm)
            self.stats["pair_fallbacks" if transform is None else "pair_transforms"] += 1
            if self.folder is not None:
                self._write(key, transform)
        if transform is None:  # said once per pair and process, not at every query
            log.warning("%s -> %s: too few anchors match consistently (need %d); matching these volumes "
                        "point by point", emb_a.name or "A", emb_b.name or "B", MIN_ANCHORS)
        self._memory[key] = transform
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return transform

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.pair"

    def _read(self, key: str):
        path = self._path(key)
        if not path.exists():
            return _MISSING
        try:
            arrays, meta = read_entry(path, mmap=False, expect_meta={"pair_key": key})
            matrix = arrays["matrix"]
            if meta.get("fitted") is False:
                return None
            if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
                raise CacheError(f"{path}: matrix of shape {matrix.shape} is not a finite 4x4 affine")
            return PairTransform(np.asarray(matrix, dtype=np.float64), int(meta["inliers"]), int(meta["anchors"]),
                                 float(meta["residual_mm"]))
        except (CacheError, KeyError, TypeError, ValueError) as e:
            log.warning("pair cache entry unusable, refitting: %s", e)
            return _MISSING

    def _write(self, key: str, transform: PairTransform | None) -> None:
        meta = {"pair_key": key, "fitted": transform is not None}
        matrix = np.zeros((0,)) if transform is None else transform.matrix
        if transform is not None:
            meta.update(inliers=transform.inliers, anchors=transform.anchors, residual_mm=transform.residual_mm)
        path = self._path(key)
        try:
            write_entry(path, {"matrix": np.asarray(matrix, dtype=np.float64)}, meta)
        except OSError as e:
            log.warning("could not write pair cache %s (%s); continuing without it", path, e)
            return
        trim_cache(self.cache_dir, self.max_bytes, path)
