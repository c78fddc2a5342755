"""Registered crop pairs for Alice: the same body part cropped from two different volumes.

A query point is drawn inside the body of volume A, the landmark matcher finds it in
another volume B (world mm in, world mm out), and crops Q and K of the configured size
are cut around the two points. The volumes are the run's crop sources (windowed in-memory
volumes or volumes of a volume store read chunk by chunk, :mod:`alice3d.data.sources`; same
spacing and axis directions for all of them); the matcher works on embeddings of the original
images, made once up front by the preparation step (:mod:`landmark.prepare`).

With ``pairs.consistency=reference`` every volume is fitted once to a reference volume and a
pair's map is composed (:mod:`landmark.cohort`): O(N) fits instead of one per pair, and no
embeddings at training time (the preparation keeps none on disk, only the fits). ``auto`` (the
default) uses it for store-backed runs and the per-point argmax for volumes held in memory.

The datasets here only read what the preparation made: :func:`pair_dataset` and
:func:`store_pair_sampler` on a store whose fits or embeddings are missing or stale raise a
:class:`~landmark.cohort.CohortError` that names the command making them. Volumes held in memory
are prepared in the same process (:func:`landmark.prepare.prepare_in_memory`).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from alice3d.config import DataConfig
from alice3d.data.crops import MAX_REDRAWS, Redraw, guarded_read, is_quarantined, no_readable_volumes, redraw_generator
from alice3d.data.geometry import apply_affine
from alice3d.data.report import DataReport
from alice3d.data.sources import as_sources, source_name
from alice3d.data.store import StoreVolume, VolumeStore
from alice3d.errors import Alice3DError
from landmark.cohort import (
    CohortError,
    case_input,
    compose,
    fit_identity,
    missing_store_embeddings,
    preparation_hint,
    reference_transforms,
    store_transforms,
)
from landmark.config import PairsConfig
from landmark.match import Matcher
from landmark.prepare import (
    PairPreparation,
    grid_of,
    load_pair_volumes,
    pair_consistency,
    pair_model,
    prepare_in_memory,
    prepare_volumes,
)
from landmark.store import StoreEmbeddings

log = logging.getLogger("alice3d.landmark")


class PairError(Alice3DError, ValueError):
    """Volumes or settings that cannot produce crop pairs (sizes, geometry, missing sources)."""


class PairSampler:
    """Draw (Q, K) crop pairs centred on matched points of two different volumes.

    ``volumes``: normalised in-memory ``Volume`` objects or crop sources (e.g. store volumes)
    at the crop spacing, all with the same spacing and axis directions. ``matcher``: a
    :class:`landmark.match.Matcher`, a path
    to ``landmark.pt``, or None for the matcher-free baseline (same normalised position in
    the two body boxes). ``sources``: what the matcher embeds for each volume (images in HU);
    default: each volume's ``path``. A match scoring below ``min_score`` is retried with a
    new query point up to ``max_retries`` times; after that the ``fallback`` applies
    (``"best"``: the best-scoring try, ``"position"``: same normalised position), which is
    logged, counted in :attr:`stats` and flagged in the sample's metadata. ``consistency``:
    the matcher's mode for these pairs (``"none"``: per-point argmax, ``"affine"``: through
    the pair's fitted affine, see :mod:`landmark.match`; ``"reference"``: through the composed
    per-volume maps ``transforms`` (T_V, world V -> world reference, one (4, 4) per volume),
    fitted with the matcher when not given; a match that leaves B's volume is retried like a
    low score). ``embeddings``: per-volume embeddings to use instead of embedding ``sources``
    (a lazy sequence for a store). Given a matcher but neither ``transforms`` nor ``embeddings``,
    the sampler prepares its volumes itself, in this process
    (:func:`landmark.prepare.prepare_volumes`).
    """

    def __init__(self, volumes: Sequence, matcher=None, crop_size: Sequence[int] = (192, 192, 64),
                 min_score: float = 0.5, max_retries: int = 4, seed: int = 0, body_threshold: float = 0.05,
                 fallback: str = "best", sources: Sequence | None = None, pad_value: float | None = None,
                 device: str = "cpu", match_device: str = "cpu", consistency: str = "none",
                 transforms: Sequence | None = None, embeddings: Sequence | None = None, same_volume: bool = False,
                 random_key: bool = False):
        if len(volumes) < 2:
            raise PairError(f"crop pairs need at least two volumes, got {len(volumes)}")
        if fallback not in ("best", "position"):
            raise PairError(f"fallback: expected 'best' or 'position', got {fallback!r}")
        self.crop = tuple(int(c) for c in crop_size)
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise PairError(f"crop_size: expected three positive sizes, got {tuple(crop_size)}")
        self.min_score, self.max_retries, self.fallback = float(min_score), int(max_retries), fallback
        self.seed = seed
        self.same_volume = bool(same_volume)  # K = Q's crop of the same volume (no matcher used)
        # K at a random body point of another volume: Alice's pipeline without the registration.
        self.random_key = bool(random_key)
        if self.same_volume and self.random_key:
            raise PairError("same_volume and random_key exclude each other")
        if consistency not in ("none", "affine", "reference"):
            raise PairError(f"consistency: expected 'none', 'affine' or 'reference', got {consistency!r}")
        self._check_geometry(volumes)
        self.entries = as_sources(volumes, body_threshold, 50000, seed, pad_value=pad_value)
        for e in self.entries:
            if getattr(e, "empty_body", False):
                log.warning("volume %s has no voxel above the body threshold %.3g; query points are drawn anywhere",
                            e.name, body_threshold)
        self._inv = [np.linalg.inv(e.affine) for e in self.entries]
        self.consistency = consistency
        self.matcher = None
        self.embeddings: Sequence = []
        self.transforms = None if transforms is None else [np.asarray(t, np.float64) for t in transforms]
        if self.transforms is not None and len(self.transforms) != len(self.entries):
            raise PairError(f"transforms: expected {len(self.entries)} (one per volume), got {len(self.transforms)}")
        if consistency == "reference" and self.transforms is None and matcher is None:
            raise PairError("consistency='reference' needs a landmark matcher or the fitted per-volume transforms")
        if matcher is not None and self.transforms is None:
            if not isinstance(matcher, Matcher):
                matcher = Matcher(matcher, device=device, memory_items=max(32, len(volumes)))
            self.matcher = matcher
            self.matcher.consistency = "none" if consistency == "reference" else consistency
            boxes = [(e.lo, e.hi) for e in self.entries]
            if embeddings is None:
                self.transforms, self.embeddings = prepare_volumes(
                    self.matcher, self._sources(volumes, sources), boxes, [grid_of(v) for v in volumes], consistency)
            else:
                self.embeddings = embeddings
            if consistency == "reference":
                if self.transforms is None:
                    self.transforms = reference_transforms(self.matcher, self.embeddings, boxes)
                self.matcher, self.embeddings = None, []
            elif match_device != str(self.matcher.device):
                # Embeddings are computed once on ``device``; the per-pair queries run on
                # ``match_device`` (CPU by default, which is safe inside DataLoader workers).
                self.matcher.device = torch.device(match_device)
                self.matcher.search = "full" if self.matcher.device.type == "cuda" else "coarse"
        self.stats = {"pairs": 0, "retries": 0, "fallback": 0}

    # ------------------------------------------------------------- setup

    def _check_geometry(self, volumes: Sequence) -> None:
        shapes = np.array([v.shape for v in volumes])
        too_big = [f"axis {d}: crop {self.crop[d]} > largest volume {shapes[:, d].max()}"
                   for d in range(3) if self.crop[d] > shapes[:, d].max()]
        if too_big:
            raise PairError(
                "crop_size " + str(self.crop) + " is larger than every volume (" + "; ".join(too_big)
                + "); use a smaller crop or a finer spacing"
            )
        small = [_name(v, i) for i, v in enumerate(volumes) if any(s < c for s, c in zip(v.shape, self.crop))]
        if small:
            log.warning("%d volume(s) smaller than the crop %s are padded with background: %s",
                        len(small), self.crop, ", ".join(small[:5]) + (" ..." if len(small) > 5 else ""))
        ref = np.asarray(volumes[0].affine, dtype=np.float64)[:3, :3]
        for i, v in enumerate(volumes[1:], 1):
            lin = np.asarray(v.affine, dtype=np.float64)[:3, :3]
            if not np.allclose(lin, ref, atol=1e-3 * np.abs(ref).max()):
                raise PairError(
                    f"volume {_name(v, i)} has voxel axes/spacing {np.round(lin, 4).tolist()} but "
                    f"{_name(volumes[0], 0)} has {np.round(ref, 4).tolist()}; crop pairs need volumes "
                    "resampled to one spacing and orientation (e.g. RAS)"
                )

    def _sources(self, volumes: Sequence, sources: Sequence | None) -> list:
        """What the matcher embeds per volume: ``sources``, else each volume's ``path``."""
        if sources is None:
            missing = [i for i, v in enumerate(volumes) if not getattr(v, "path", "")]
            if missing:
                raise PairError(
                    f"{len(missing)} volume(s) have no source path to embed (e.g. index {missing[0]}); "
                    "pass sources= (the original images in HU) to PairSampler"
                )
            sources = [v.path for v in volumes]
        if len(sources) != len(volumes):
            raise PairError(f"sources: expected {len(volumes)} entries (one per volume), got {len(sources)}")
        return list(sources)

    # ------------------------------------------------------------- sampling

    def _query(self, i: int, rng: np.random.Generator) -> np.ndarray:
        e = self.entries[i]
        body = guarded_read(e, e.body_voxels)
        ijk = body[rng.integers(len(body))] + rng.uniform(-0.5, 0.5, size=3)
        return apply_affine(e.affine, ijk[None])[0]

    def reference_match(self, a: int, b: int, point: np.ndarray) -> tuple[np.ndarray, bool]:
        """``point`` of A mapped into B through the reference (``inv(T_B) @ T_A``); whether it lies in B."""
        pb = apply_affine(compose(self.transforms[a], self.transforms[b]), point[None])[0]
        ijk = apply_affine(self._inv[b], pb[None])[0]
        return pb, bool(((ijk >= -0.5) & (ijk <= np.asarray(self.entries[b].shape) - 0.5)).all())

    def position_match(self, a: int, b: int, point: np.ndarray) -> np.ndarray:
        """Same normalised position in B's body box as ``point`` has in A's."""
        ea, eb = self.entries[a], self.entries[b]
        rel = (point - ea.lo) / np.maximum(ea.hi - ea.lo, 1e-6)
        return eb.lo + rel * (eb.hi - eb.lo)

    def sample(self, rng: np.random.Generator | int) -> dict:
        """``{"q": (1, *crop), "k": (1, *crop), "meta": {points, score, ids, tries, fallback}}``.

        A pair touching a volume found damaged (quarantined under ``on_bad_read="skip"``, see
        :mod:`alice3d.data.crops`) is drawn again, from a generator that depends only on the state
        ``rng`` came in with, so the redraw is the same whenever the damage is found.
        """
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        start = rng.bit_generator.state
        need = 1 if self.same_volume else 2
        for attempt in range(MAX_REDRAWS + 1):
            g = rng if attempt == 0 else redraw_generator(start, attempt)
            try:
                return self._sample_once(g)
            except Redraw:
                if sum(not is_quarantined(e) for e in self.entries) < need:
                    raise no_readable_volumes(self.entries, need) from None
        raise no_readable_volumes(self.entries, need)

    def _sample_once(self, rng: np.random.Generator) -> dict:
        n = len(self.entries)
        a = int(rng.integers(n))
        b = int(rng.integers(n - 1))
        b += b >= a
        if is_quarantined(self.entries[a]) or (not self.same_volume and is_quarantined(self.entries[b])):
            raise Redraw(self.entries[a].name)
        fallback = False
        if self.same_volume:
            b = a
            p = self._query(a, rng)
            pb, score, tries = p, float("nan"), 1
        elif self.random_key:
            p, pb = self._query(a, rng), self._query(b, rng)
            score, tries = float("nan"), 1
        elif self.transforms is not None:
            for tries in range(1, self.max_retries + 2):
                p = self._query(a, rng)
                pb, inside = self.reference_match(a, b, p)
                if inside:
                    break
            score = float("nan")  # no similarity is computed: the maps were fitted beforehand
            self.stats["retries"] += tries - 1
            if not inside:
                fallback = True
                self.stats["fallback"] += 1
                if self.fallback == "position":
                    pb = self.position_match(a, b, p)
        elif self.matcher is None:
            p = self._query(a, rng)
            pb, score, tries = self.position_match(a, b, p), float("nan"), 1
        else:
            best = None
            for tries in range(1, self.max_retries + 2):
                p = self._query(a, rng)
                found, scores = self.matcher.match_embeddings(self.embeddings[a], self.embeddings[b], p[None])
                cand = (float(scores[0]), p, found[0])
                if best is None or cand[0] > best[0]:
                    best = cand
                if cand[0] >= self.min_score:
                    break
            score, p, pb = best
            self.stats["retries"] += tries - 1
            if score < self.min_score:
                fallback = True
                self.stats["fallback"] += 1
                if self.fallback == "position":
                    pb = self.position_match(a, b, p)
                k = self.stats["fallback"]
                if k == 1 or k % 100 == 0:
                    log.warning(
                        "crop pair %s -> %s: best score %.3f after %d tries is below min_score %.3f; using the %s "
                        "(fallback %d of %d pairs so far)", self.entries[a].name, self.entries[b].name, score, tries,
                        self.min_score, "best try" if self.fallback == "best" else "same normalised position",
                        k, self.stats["pairs"] + 1)
        q = self.crop_around(a, p)
        k_ = self.crop_around(b, pb)
        self.stats["pairs"] += 1  # after the reads: a pair drawn again counts once
        return {"q": torch.from_numpy(q)[None], "k": torch.from_numpy(k_)[None],
                "meta": {"points": [p.tolist(), np.asarray(pb).tolist()], "score": score, "ids": (a, b),
                         "names": (self.entries[a].name, self.entries[b].name), "tries": tries,
                         "fallback": fallback}}

    def crop_around(self, i: int, point_world: np.ndarray) -> np.ndarray:
        """Crop of volume ``i`` whose voxel ``crop // 2`` holds ``point_world``; background-padded."""
        ijk = np.rint(apply_affine(self._inv[i], point_world)).astype(int)
        e = self.entries[i]
        return np.asarray(guarded_read(e, lambda: e.read_crop(ijk, self.crop)), dtype=np.float32)


_name = source_name


class PairDataset(Dataset):
    """Crop pairs deterministic in ``(seed, index)``: item ``i`` is one pair ``{"q": (1, *crop),
    "k": (1, *crop), "score", "fallback", "ids", "view_seed"}`` (the trainer batches them;
    ``view_seed`` seeds this pair's masks and augmentations)."""

    def __init__(self, sampler: PairSampler, seed: int = 0):
        self.sampler, self.seed = sampler, seed

    def __len__(self) -> int:
        return 2**62

    def _one(self, *key: int) -> dict:
        rng = np.random.default_rng([self.seed, *key])
        # Drawn first, so a pair's views (masks, augmentation) are as reproducible as its crops.
        view_seed = int(rng.integers(2**62))
        s = self.sampler.sample(rng)
        meta = s["meta"]
        return {"q": s["q"], "k": s["k"], "score": torch.tensor(float(meta["score"])),
                "fallback": torch.tensor(bool(meta["fallback"])), "ids": torch.tensor(meta["ids"]),
                "view_seed": torch.tensor(view_seed)}

    def __getitem__(self, i: int) -> dict:
        return self._one(int(i))


def pair_dataset(data: DataConfig, pairs: PairsConfig, crop_size: Sequence[int], landmark: str = "",
                 device: str = "cpu", seed: int = 0,
                 prepared: PairPreparation | None = None) -> tuple[PairDataset, DataReport]:
    """Alice's dataset: landmark-matched (Q, K) crop pairs of the run's volumes, and its data report.

    ``prepared``: what :func:`landmark.prepare.prepare_pairs` made for the same arguments (its
    volumes are used, not loaded again). Without it, a store-backed run reads the store's
    preparation (CohortError naming the command when it is missing or stale) and volumes held in
    memory are prepared here, in this process. ``landmark`` = "" with the embedded phantom cohort
    uses the default phantom matcher; with the user's data it is an error that says how to get one.
    ``device``: where the matcher of none / affine pairs runs.
    """
    if prepared is None:
        vset = load_pair_volumes(data, crop_size)
        model = pair_model(data, pairs, landmark)
        consistency = pair_consistency(pairs, vset.store is not None) if model is not None else "none"
    else:
        vset, model, consistency = prepared.volumes, prepared.model, prepared.consistency
    kw = dict(crop_size=crop_size, min_score=pairs.min_score, max_retries=pairs.max_retries)
    if model is None:
        sampler = PairSampler(vset.volumes, None, same_volume=pairs.source == "same_volume",
                              random_key=pairs.source == "random", **kw)
    elif vset.store is not None:
        sampler = store_pair_sampler(vset.store, vset.volumes, Matcher(model, device=device), consistency,
                                     embedding_cache_mb=pairs.embedding_cache_mb, model=model, **kw)
    else:
        if prepared is None:
            prepared = prepare_in_memory(vset.volumes, model, consistency, device)
        sampler = PairSampler(vset.volumes, prepared.matcher, consistency=consistency,
                              transforms=prepared.transforms, embeddings=prepared.embeddings, **kw)
    return PairDataset(sampler, seed=seed), DataReport(len(vset.volumes), list(vset.bad))


class StoreEmbeddingList:
    """``embeddings[i]``: the embedding of store case ``i``, read (memory-mapped) from the store when
    first needed and kept in the matcher's bounded memory LRU (``pairs.embedding_cache_mb``)."""

    def __init__(self, matcher: Matcher, store: VolumeStore, cases: Sequence[dict], model: str | None = None):
        self.matcher, self.names = matcher, [c["name"] for c in cases]
        self.store_root, self.model = store.root, model
        self.inputs = [case_input(store, c) for c in cases]
        source = next((s for s in matcher.store.sources if isinstance(s, StoreEmbeddings)), None)
        if source is None:
            source = StoreEmbeddings(store.root, matcher.model_key, writable=False)
            matcher.store.sources.insert(0, source)
        for (key, _), name in zip(self.inputs, self.names):
            source.register(key, name)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        key, _ = self.inputs[i]
        return self.matcher.store.get_keyed(key, self.names[i], lambda: self._unprepared(i))

    def _unprepared(self, i: int):
        # Reached only when the store's entry became unreadable after the check at build time:
        # computing it here would be the preparation's work, done by one process in the middle of training.
        raise CohortError(f"{self.store_root}: the landmark embedding of case {self.names[i]} is unreadable; "
                          f"{preparation_hint(self.model, self.store_root)}")


def store_pair_sampler(store: VolumeStore, volumes: Sequence[StoreVolume], matcher: Matcher, consistency: str,
                       crop_size: Sequence[int], min_score: float, max_retries: int,
                       embedding_cache_mb: float, model: str | None = None) -> PairSampler:
    """Pairs of store volumes, from what the preparation (:func:`landmark.prepare.prepare_store`)
    wrote: ``reference`` reads the per-volume fits; ``none`` / ``affine`` match on the store's
    embeddings, read lazily through a memory LRU of ``embedding_cache_mb`` MB. Nothing is embedded
    or fitted here: a missing or stale preparation is a CohortError naming the command that makes
    it (``model``: the landmark model's path, for that command)."""
    cases = [v.case for v in volumes]
    kw = dict(crop_size=crop_size, min_score=min_score, max_retries=max_retries)
    if consistency == "reference":
        transforms = store_transforms(matcher.model_key, fit_identity(matcher, store), store, cases, model=model)
        return PairSampler(volumes, None, consistency="reference", transforms=transforms, **kw)
    embeddings = StoreEmbeddingList(matcher, store, cases, model=model)
    missing = missing_store_embeddings(store, matcher.model_key, embeddings.inputs, cases)
    if missing:
        raise CohortError(
            f"{store.root}: {len(missing)} case(s) have no landmark embedding for this model in the store "
            f"(missing or stale, e.g. {missing[0]}), needed by pairs.consistency={consistency}; "
            f"{preparation_hint(model, store.root)}")
    matcher.disk.writable = False  # the store keeps them, and is read first: a cache copy would never be read
    matcher.store.memory_items, matcher.store.memory_mb = len(volumes), float(embedding_cache_mb)
    return PairSampler(volumes, matcher, consistency=consistency, embeddings=embeddings, **kw)
