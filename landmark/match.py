"""Point matching between volumes with cached landmark embeddings, in world millimetres.

:class:`Matcher` is a small facade over one job per module: :mod:`landmark.preprocess` turns a
model file and an image into an embedding, :mod:`landmark.store` keeps embeddings (memory LRU,
on-disk cache), :mod:`landmark.search` finds the best voxel of B for each query and
:mod:`landmark.consistency` fits and caches one affine per volume pair. Its settings are one
:class:`~landmark.config.MatchConfig`. Matching never touches voxel indices of the input
arrays: query points go world -> embedding grid of A, matches come back embedding grid of
B -> world, so any orientation (RAS, LPS, ...) and spacing works.

Similarity of a query with voxel ``v`` of B: ``S(v) = w * fine(v) + (1 - w) * up(coarse)(v)``.
Consistency ``affine`` (default) maps every query through the pair's affine and scores it
there; ``none`` returns the per-point argmax of ``S``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alice3d.data.geometry import apply_affine
from landmark.config import LandmarkConfig, resolve_match_config
from landmark.consistency import PairAffines, PairTransform
from landmark.embed_cache import cache_max_bytes, default_cache_dir
from landmark.model import LandmarkNet
from landmark.points import MatchError, as_points, check_points_inside, parse_points, read_points_file, world_bounds
from landmark.preprocess import compute_embedding, load_landmark_model, model_key, window_channels
from landmark.search import SEARCH_MODES, best_voxels, best_voxels_near, query_vectors, score_at
from landmark.store import DiskEmbeddingCache, Embedding, EmbeddingStore, as_volume, image_key

# The package's public face: callers import these from here, wherever they live.
__all__ = ["Matcher", "MatchError", "Embedding", "PairTransform", "load_landmark_model", "parse_points",
           "read_points_file", "check_points_inside", "world_bounds", "window_channels"]


def _source_path(item) -> str:
    """The image path of a path or ``Volume`` ("" for an embedding or a volume without one)."""
    if isinstance(item, Embedding):
        return ""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return str(getattr(item, "path", "") or "")


def _first(*values):
    """The first value that is not None (an explicit 0 or empty value counts)."""
    return next(v for v in values if v is not None)


def _config_field(name: str) -> property:
    """An attribute of the matcher that is the field ``name`` of its :class:`MatchConfig`."""
    return property(lambda self: getattr(self.config, name), lambda self, value: setattr(self.config, name, value),
                    doc=f"``config.{name}``")


class Matcher:
    """Find points of volume A in volume B (world mm in, world mm out).

    ``model``: path to ``landmark.pt`` or a :class:`LandmarkNet` (then ``spacing`` and
    ``hu_window`` describe its input; defaults of :class:`LandmarkConfig`). The match settings
    (``fine_weight`` ... ``roundtrip_mm``, see :class:`MatchConfig`) resolve per field to the
    argument unless it is None, else the model file's ``match`` metadata, else the default.
    ``cache_dir``: on-disk embedding cache (default ``$ALICE3D_CACHE/embeddings`` or
    ``~/.cache/alice3d/embeddings``); ``use_cache=False`` keeps embeddings in memory only.
    ``search``: ``"full"`` (dense similarity maps over every voxel of B; fast on GPU),
    ``"pruned"`` (exact branch-and-bound: same result as full, fast when similarity maps are
    peaked), ``"coarse"`` (coarse-to-fine: exact scores on the voxels of the ``coarse_cells``
    most similar coarse cells; fast on CPU, as accurate as full search on the phantom
    evaluation) or ``"auto"`` (full on CUDA, coarse otherwise).
    """

    fine_weight = _config_field("fine_weight")
    refine = _config_field("refine")
    coarse_cells = _config_field("coarse_cells")
    chunk_voxels = _config_field("chunk_voxels")
    consistency = _config_field("consistency")
    anchors = _config_field("anchors")
    roundtrip_mm = _config_field("roundtrip_mm")
    local_radius_mm = _config_field("local_radius_mm")

    def __init__(self, model: str | os.PathLike | LandmarkNet, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", use_cache: bool = True, search: str = "auto",
                 fine_weight: float | None = None, refine: bool | None = None,
                 spacing: Sequence[float] | None = None, hu_window: Sequence[float] | None = None,
                 memory_items: int = 32, verify_cache: bool = True, chunk_voxels: int | None = None,
                 coarse_cells: int | None = None, consistency: str | None = None, anchors: int | None = None,
                 roundtrip_mm: float | None = None, local_radius_mm: float | None = None):
        data = LandmarkConfig().data
        if isinstance(model, LandmarkNet):
            self.net, meta = model, {}
        else:
            self.net, meta = load_landmark_model(model)
        self.spacing = tuple(float(s) for s in _first(spacing, meta.get("spacing"), data.spacing))
        self.hu_window = tuple(float(h) for h in _first(hu_window, meta.get("hu_window"), data.hu_window))
        self.config = resolve_match_config(
            meta.get("match"), fine_weight=fine_weight, refine=refine, chunk_voxels=chunk_voxels,
            coarse_cells=coarse_cells, consistency=consistency, anchors=anchors, roundtrip_mm=roundtrip_mm,
            local_radius_mm=local_radius_mm)
        if search not in ("auto", *SEARCH_MODES):
            raise ValueError(f"search: expected 'auto', 'full', 'pruned' or 'coarse', got {search!r}")
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.search = search if search != "auto" else ("full" if self.device.type == "cuda" else "coarse")
        self.net = self.net.to(self.device).eval()
        self.use_cache = use_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        max_bytes = cache_max_bytes() if use_cache else None  # a bad value fails before any work
        self.model_key = model_key(self.net, self.spacing, self.hu_window)
        self.disk = DiskEmbeddingCache(self.cache_dir, self.model_key, max_bytes, verify_cache)
        self.store = EmbeddingStore(self._compute, [self.disk] if use_cache else [], memory_items)
        pair_folder = self.cache_dir / self.model_key[:20] / "pairs" if use_cache else None
        self.pairs = PairAffines(self.cache_dir, pair_folder, max_bytes, 4 * memory_items)

    @property
    def memory_items(self) -> int:
        """Embeddings kept in memory (and four times as many pair affines)."""
        return self.store.memory_items

    @memory_items.setter
    def memory_items(self, n: int) -> None:
        self.store.memory_items, self.pairs.memory_items = n, 4 * n

    @property
    def stats(self) -> dict:
        """Where embeddings came from (computed, disk/memory hits, bad cache entries) and pair fits."""
        return {**self.store.stats, **self.pairs.stats}

    # ------------------------------------------------------------- embeddings

    def image_key(self, volume) -> str:
        return image_key(volume)

    def cache_path(self, key: str) -> Path:
        """The on-disk cache file of the image with ``key`` (see :meth:`image_key`)."""
        return self.disk.path(key)

    def embed(self, volume, name: str | None = None) -> Embedding:
        """Embedding of a ``Volume`` or image path: memory LRU -> disk cache -> network.

        Logs and errors call it ``name``, else the name :meth:`name_sources` gave its image, else
        its file (or DICOM folder) name: name a list of volumes first, so that they read apart."""
        return self.store.get(volume, name)

    def name_sources(self, volumes: Sequence) -> dict[str, str]:
        """Name the images of ``volumes`` (``Volume``s or paths; embeddings are skipped) apart from
        each other and from every image named before (``patient1_PATIENT_DICOM``,
        ``patient2_PATIENT_DICOM``, see :meth:`EmbeddingStore.name_sources`); images named already
        keep their names unless a new one shares them. Returns the name of every image named so far
        ({} when all of ``volumes`` were named before)."""
        paths = [str(p) for p in (_source_path(v) for v in volumes) if p]
        if all(os.path.abspath(p) in self.store.names for p in paths):
            return {}
        return self.store.name_sources([*self.store.names, *paths])

    def _compute(self, volume, key: str, name: str) -> Embedding:
        return compute_embedding(self.net, volume, self.spacing, self.hu_window, self.device, key, name)

    def _on_device(self, emb: Embedding) -> torch.Tensor:
        """``emb.fine (*Sf, D)`` on the matcher's device, copied once per embedding."""
        cached = getattr(emb, "_device_fine", None)
        if cached is None or cached.device != self.device:
            cached = emb.fine.reshape(-1, emb.fine.shape[-1]).to(self.device)
            emb._device_fine = cached  # type: ignore[attr-defined]
        return cached.view(*emb.fine_shape, -1)

    # ------------------------------------------------------------- matching

    def match(self, source, target, points_world) -> tuple[np.ndarray, np.ndarray]:
        """``points_world (N, 3)`` in A -> ``(points in B (N, 3) world mm, scores (N,))``."""
        if not isinstance(source, Embedding):
            source = as_volume(source)
            # from the geometry alone: a point outside A should not cost two embeddings and a pair fit
            check_points_inside(source.affine, source.shape, as_points(points_world), source.path or "A")
        self.name_sources([source, target])  # patient1/PATIENT_DICOM and patient2/PATIENT_DICOM read apart
        return self.match_embeddings(self.embed(source), self.embed(target), points_world)

    def query(self, emb_a: Embedding, points_world, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine and coarse query vectors ``(N, D)`` at world points of A (interpolated, unit length)."""
        pts = as_points(points_world)
        if check:
            emb_a.check_inside(pts)
        fi = torch.from_numpy(apply_affine(np.linalg.inv(emb_a.fine_affine), pts))
        ci = torch.from_numpy(apply_affine(np.linalg.inv(emb_a.coarse_affine), pts))
        return query_vectors(emb_a.fine, emb_a.coarse, fi, ci)

    def match_embeddings(self, emb_a: Embedding, emb_b: Embedding, points_world) -> tuple[np.ndarray, np.ndarray]:
        """Points of A (world mm) -> ``(points in B (N, 3), scores (N,))`` with the configured consistency."""
        if self.consistency == "affine":
            transform = self.pair_transform(emb_a, emb_b)
            if transform is not None:
                return self._match_mapped(emb_a, emb_b, points_world, transform)
        return self.match_argmax(emb_a, emb_b, points_world)

    def match_argmax(self, emb_a: Embedding, emb_b: Embedding, points_world,
                     check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Per point, the voxel of B with the highest combined similarity (sub-voxel refined)."""
        q_f, q_c = self.query(emb_a, points_world, check=check)
        if len(q_f) == 0:
            return np.zeros((0, 3)), np.zeros(0)
        c = self.config
        dense = self._on_device(emb_b) if self.device.type == "cuda" and self.search != "coarse" else None
        idx, score = best_voxels(q_f, q_c, emb_b.fine, emb_b.coarse, emb_b.factor, mode=self.search,
                                 fine_weight=c.fine_weight, coarse_cells=c.coarse_cells,
                                 chunk_voxels=c.chunk_voxels, refine=c.refine, dense_fine=dense)
        return apply_affine(emb_b.fine_affine, idx.numpy()), score.numpy()

    def pair_transform(self, emb_a: Embedding, emb_b: Embedding) -> PairTransform | None:
        """Robust affine world A -> world B from round-trip-consistent anchor matches.

        Fitted once per pair and these settings, then cached in memory and on disk. None (logged)
        when fewer than ``MIN_ANCHORS`` anchors survive the round trip, e.g. when the two fields
        of view barely overlap; matching then falls back to the per-point argmax.
        """
        c = self.config
        settings = {"anchors": c.anchors, "roundtrip_mm": c.roundtrip_mm, "fine_weight": c.fine_weight,
                    "search": self.search, "coarse_cells": c.coarse_cells, "refine": c.refine}
        key = PairAffines.key(emb_a, emb_b, self.model_key, settings)
        return self.pairs.get(key, emb_a, emb_b, self._anchor_argmax, c.anchors, c.roundtrip_mm)

    def _anchor_argmax(self, emb_a: Embedding, emb_b: Embedding, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # anchors lie on A's grid and their matches on B's: no source-extent check
        return self.match_argmax(emb_a, emb_b, points, check=False)

    def _match_mapped(self, emb_a: Embedding, emb_b: Embedding, points_world,
                      transform: PairTransform) -> tuple[np.ndarray, np.ndarray]:
        """Queries through the pair's affine; those it maps outside B get the per-point argmax."""
        q_f, q_c = self.query(emb_a, points_world)
        pts = np.atleast_2d(np.asarray(points_world, dtype=np.float64))
        mapped = apply_affine(transform.matrix, pts)
        fi = apply_affine(np.linalg.inv(emb_b.fine_affine), mapped)
        ci = apply_affine(np.linalg.inv(emb_b.coarse_affine), mapped)
        outside = ((fi < -0.5) | (fi > np.asarray(emb_b.fine_shape) - 0.5)).any(axis=1)
        c = self.config
        if c.local_radius_mm > 0:
            spacing = np.linalg.norm(emb_b.fine_affine[:3, :3], axis=0)
            radius = [max(1, int(round(c.local_radius_mm / float(sp)))) for sp in spacing]
            idx, score_t = best_voxels_near(q_f, q_c, emb_b.fine, emb_b.coarse, emb_b.factor, torch.from_numpy(fi),
                                            radius, fine_weight=c.fine_weight, refine=c.refine)
            mapped, score = apply_affine(emb_b.fine_affine, idx.numpy()), score_t.numpy()
        else:
            score = score_at(q_f, q_c, emb_b.fine, emb_b.coarse, torch.from_numpy(fi), torch.from_numpy(ci),
                             c.fine_weight).numpy()
        if outside.any():
            mapped[outside], score[outside] = self.match_argmax(emb_a, emb_b, pts[outside])
        return mapped, score
