"""Registered crop pairs for Alice: the same body part cropped from two different volumes.

A query point is drawn inside the body of volume A, the landmark matcher finds it in
another volume B (world mm in, world mm out), and crops Q and K of the configured size
are cut around the two points. The volumes are the in-memory, normalised arrays the
pretraining run uses (same spacing and axis directions for all of them); the matcher
works on embeddings of the original images, computed once up front and cached.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from alice3d.config import ConfigError, DataConfig, check_choice
from alice3d.data.builders import load_volumes
from alice3d.data.crops import crop_at
from alice3d.data.geometry import apply_affine
from alice3d.data.report import DataReport
from alice3d.errors import Alice3DError
from alice3d.runtime import progress
from alice3d.train.module import BatchDataset
from landmark.defaults import default_landmark_model
from landmark.match import Matcher

log = logging.getLogger("alice3d.landmark")


class PairError(Alice3DError, ValueError):
    """Volumes or settings that cannot produce crop pairs (sizes, geometry, missing sources)."""


@dataclass
class PairsConfig:
    """Where Alice's (Q, K) crop pairs come from (the `pairs.` section of the pretraining config).

    ``landmark``: the landmark matcher finds the point in K that matches a random body point in
    Q (the method as published). ``same_position``: a baseline without a matcher that takes the
    same normalised position in the two volumes' bounding boxes.
    """

    source: str = "landmark"
    min_score: float = 0.3
    max_retries: int = 8
    # Matcher consistency for pairs. "affine" is far more accurate (README, landmark table) but
    # fits one affine per new volume pair first (about 1 s on CPU; then cached on disk), which
    # dominates short runs; crops are wide enough that the per-point argmax's misses overlap.
    consistency: str = "none"

    def validate(self, prefix: str = "pairs") -> None:
        check_choice(f"{prefix}.source", self.source, ["landmark", "same_position"])
        check_choice(f"{prefix}.consistency", self.consistency, ["none", "affine"])


@dataclass
class _Entry:
    array: np.ndarray
    affine: np.ndarray
    inv: np.ndarray
    body: np.ndarray  # (K, 3) voxel indices
    lo: np.ndarray  # body box, world mm
    hi: np.ndarray
    pad: float
    name: str


class PairSampler:
    """Draw (Q, K) crop pairs centred on matched points of two different volumes.

    ``volumes``: normalised in-memory ``Volume`` objects at the crop spacing, all with the
    same spacing and axis directions. ``matcher``: a :class:`landmark.match.Matcher`, a path
    to ``landmark.pt``, or None for the matcher-free baseline (same normalised position in
    the two body boxes). ``sources``: what the matcher embeds for each volume (images in HU);
    default: each volume's ``path``. A match scoring below ``min_score`` is retried with a
    new query point up to ``max_retries`` times; after that the ``fallback`` applies
    (``"best"``: the best-scoring try, ``"position"``: same normalised position), which is
    logged, counted in :attr:`stats` and flagged in the sample's metadata. ``consistency``:
    the matcher's mode for these pairs (``"none"``: per-point argmax, ``"affine"``: through
    the pair's fitted affine, see :mod:`landmark.match`).
    """

    def __init__(self, volumes: Sequence, matcher=None, crop_size: Sequence[int] = (192, 192, 64),
                 min_score: float = 0.5, max_retries: int = 4, seed: int = 0, body_threshold: float = 0.05,
                 fallback: str = "best", sources: Sequence | None = None, pad_value: float | None = None,
                 device: str = "cpu", match_device: str = "cpu", consistency: str = "none"):
        if len(volumes) < 2:
            raise PairError(f"crop pairs need at least two volumes, got {len(volumes)}")
        if fallback not in ("best", "position"):
            raise PairError(f"fallback: expected 'best' or 'position', got {fallback!r}")
        self.crop = tuple(int(c) for c in crop_size)
        if len(self.crop) != 3 or min(self.crop) < 1:
            raise PairError(f"crop_size: expected three positive sizes, got {tuple(crop_size)}")
        self.min_score, self.max_retries, self.fallback = float(min_score), int(max_retries), fallback
        self.seed = seed
        self._check_geometry(volumes)
        rng = np.random.default_rng(seed)
        self.entries = []
        for i, v in enumerate(volumes):
            arr = np.asarray(v.array, dtype=np.float32)
            body = np.argwhere(arr > body_threshold)
            if len(body) == 0:
                log.warning("volume %s has no voxel above the body threshold %.3g; query points are drawn anywhere",
                            _name(v, i), body_threshold)
                body = np.argwhere(np.ones(arr.shape, dtype=bool))
            b_lo, b_hi = body.min(0), body.max(0)
            corners = np.array(np.meshgrid(*zip(b_lo, b_hi), indexing="ij")).reshape(3, -1).T
            w = apply_affine(v.affine, corners)
            if len(body) > 50000:
                body = body[rng.choice(len(body), 50000, replace=False)]
            pad = float(arr.min()) if pad_value is None else float(pad_value)
            aff = np.asarray(v.affine, dtype=np.float64)
            self.entries.append(_Entry(arr, aff, np.linalg.inv(aff), body, w.min(0), w.max(0), pad, _name(v, i)))
        self.matcher = None
        self.embeddings: list = []
        if matcher is not None:
            if not isinstance(matcher, Matcher):
                matcher = Matcher(matcher, device=device, memory_items=max(32, len(volumes)))
            self.matcher = matcher
            self.matcher.memory_items = max(self.matcher.memory_items, len(volumes))
            self.matcher.consistency = consistency
            self.embeddings = self._embed_all(volumes, sources)
            if match_device != str(self.matcher.device):
                # Embeddings are computed once on ``device``; the per-pair queries run on
                # ``match_device`` (CPU by default, which is safe inside DataLoader workers).
                self.matcher.device = torch.device(match_device)
                self.matcher.search = "full" if self.matcher.device.type == "cuda" else "coarse"
        self.stats = {"pairs": 0, "retries": 0, "fallback": 0}

    # ------------------------------------------------------------- setup

    def _check_geometry(self, volumes: Sequence) -> None:
        shapes = np.array([v.array.shape for v in volumes])
        too_big = [f"axis {d}: crop {self.crop[d]} > largest volume {shapes[:, d].max()}"
                   for d in range(3) if self.crop[d] > shapes[:, d].max()]
        if too_big:
            raise PairError(
                "crop_size " + str(self.crop) + " is larger than every volume (" + "; ".join(too_big)
                + "); use a smaller crop or a finer spacing"
            )
        small = [_name(v, i) for i, v in enumerate(volumes) if any(s < c for s, c in zip(v.array.shape, self.crop))]
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

    def _embed_all(self, volumes: Sequence, sources: Sequence | None) -> list:
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

        return [self.matcher.embed(src) for src in progress(list(sources), desc="landmark embeddings",
                                                            unit="volume", logger=log)]

    # ------------------------------------------------------------- sampling

    def _query(self, i: int, rng: np.random.Generator) -> np.ndarray:
        e = self.entries[i]
        ijk = e.body[rng.integers(len(e.body))] + rng.uniform(-0.5, 0.5, size=3)
        return apply_affine(e.affine, ijk[None])[0]

    def position_match(self, a: int, b: int, point: np.ndarray) -> np.ndarray:
        """Same normalised position in B's body box as ``point`` has in A's."""
        ea, eb = self.entries[a], self.entries[b]
        rel = (point - ea.lo) / np.maximum(ea.hi - ea.lo, 1e-6)
        return eb.lo + rel * (eb.hi - eb.lo)

    def sample(self, rng: np.random.Generator | int) -> dict:
        """``{"q": (1, *crop), "k": (1, *crop), "meta": {points, score, ids, tries, fallback}}``."""
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        n = len(self.entries)
        a = int(rng.integers(n))
        b = int(rng.integers(n - 1))
        b += b >= a
        fallback = False
        if self.matcher is None:
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
        self.stats["pairs"] += 1
        q = self.crop_around(a, p)
        k_ = self.crop_around(b, pb)
        return {"q": torch.from_numpy(q)[None], "k": torch.from_numpy(k_)[None],
                "meta": {"points": [p.tolist(), np.asarray(pb).tolist()], "score": score, "ids": (a, b),
                         "names": (self.entries[a].name, self.entries[b].name), "tries": tries,
                         "fallback": fallback}}

    def crop_around(self, i: int, point_world: np.ndarray) -> np.ndarray:
        """Crop of volume ``i`` whose voxel ``crop // 2`` holds ``point_world``; background-padded."""
        e = self.entries[i]
        ijk = np.rint(apply_affine(e.inv, point_world)).astype(int)
        return crop_at(e.array, ijk, self.crop, e.pad)


def _name(v, i: int) -> str:
    p = getattr(v, "path", "")
    return Path(p).name if p else f"#{i}"


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


class PairBatches(BatchDataset):
    """Item ``k`` is a whole batch of ``batch_size`` pairs of ``pairs`` ``{"q": (B, 1, *crop), "k": ...}``,
    pair ``j`` of it drawn from the key ``(k, j)``."""

    def __init__(self, pairs: PairDataset, batch_size: int):
        self.pairs, self.batch_size = pairs, batch_size

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> dict:
        items = [self.pairs._one(int(k), j) for j in range(self.batch_size)]
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}


def build_pair_sampler(volumes: Sequence, landmark: str | os.PathLike | None, crop_size: Sequence[int],
                       min_score: float = 0.5, max_retries: int = 4, device: str = "cpu", seed: int = 0,
                       **kwargs) -> PairSampler:
    """Sampler for pretraining: ``landmark`` = path to landmark.pt, or None for the position baseline."""
    matcher = None
    if landmark is not None:
        matcher = Matcher(landmark, device=device, memory_items=max(32, len(volumes)))
    return PairSampler(volumes, matcher, crop_size=crop_size, min_score=min_score, max_retries=max_retries,
                       seed=seed, **kwargs)


def pair_dataset(data: DataConfig, pairs: PairsConfig, crop_size: Sequence[int], landmark: str = "",
                 device: str = "cpu", seed: int = 0) -> tuple[PairDataset, DataReport]:
    """Alice's dataset: landmark-matched (Q, K) crop pairs of the run's volumes, and its data report.

    ``landmark`` = "" with the embedded phantom cohort uses the default phantom matcher (shipped or
    trained once and cached); with the user's data it is an error that says how to get one.
    """
    if len(crop_size) != 3:
        raise ConfigError("alice.img_size: Alice pairs are 3D crops; expected 3 sizes")
    vset = load_volumes(data, crop_size, min_volumes=2)
    if pairs.source == "landmark" and not landmark:
        if data.data:
            raise ConfigError(
                "Alice pairs need a landmark model for your data: train one with "
                "`alice3d-landmark train --data <same data> --out LM` and pass --landmark LM/landmark.pt "
                "(or set pairs.source=same_position for the matcher-free baseline)"
            )
        landmark = str(default_landmark_model(n=data.phantom_n, seed=data.phantom_seed))
        log.info("using the default phantom landmark model %s", landmark)
    sampler = build_pair_sampler(
        vset.volumes, landmark if pairs.source == "landmark" else None, crop_size=crop_size,
        min_score=pairs.min_score, max_retries=pairs.max_retries, device=device, consistency=pairs.consistency,
    )
    return PairDataset(sampler, seed=seed), DataReport(len(vset.volumes), list(vset.bad))
