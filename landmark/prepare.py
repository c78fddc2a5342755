"""Alice's pair preparation: the one step that embeds volumes and fits them to the reference.

It runs before any pair dataset is built, and the datasets (:mod:`landmark.pairs`) only read
what it made::

    prepare_pairs(data, pairs, crop_size, landmark, device) -> PairPreparation
        volume store: this process's share of the store's cases (:func:`preparation_shard`,
            :func:`landmark.cohort.shard_cases`) embedded into the store (pairs.consistency
            none/affine) or fitted once each to the reference (reference, the store default),
            then a ``torch.distributed`` barrier: every process returns once the store is ready.
        volumes in memory: embedded or fitted here, in this process (each process holds its own
            small cohort; nothing is shared, so there is nothing to wait for).
    landmark.pairs.pair_dataset(data, pairs, crop_size, ..., prepared=...) -> reads it

``alice3d-pretrain`` calls :func:`prepare_pairs` (``alice3d.pretrain.run``), ``alice3d-landmark
embed --data STORE`` calls :func:`prepare_store` directly.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.distributed as tdist

from alice3d.config import ConfigError, DataConfig
from alice3d.core.dist import is_dist
from alice3d.data.builders import load_volumes
from alice3d.data.preprocess import env_shard
from alice3d.data.sources import as_sources
from alice3d.data.store import VolumeStore
from alice3d.data.volumes import VolumeSet
from alice3d.runtime import progress
from landmark.cohort import CohortError, embed_store, embedding_bytes, format_bytes, log_cost, model_voxels, reference_fits
from landmark.config import PairsConfig
from landmark.defaults import default_landmark_model
from landmark.match import Matcher

log = logging.getLogger("alice3d.landmark")

# How long a process that finished its share waits at the barrier for the slowest one. Long: a
# share of a large cohort takes hours, and torchrun stops the others when one process fails.
PREPARE_TIMEOUT_S = 24 * 3600.0
BODY_THRESHOLD = 0.05  # what the pair sampler's body boxes use (PairSampler's default)


@dataclass
class PairPreparation:
    """What :func:`prepare_pairs` made, for :func:`landmark.pairs.pair_dataset` to read.

    ``volumes``: the run's crop volumes (loaded once). ``model``: the landmark model of the pairs
    (None for the matcher-free sources). ``consistency``: the resolved mode (``none`` / ``affine`` /
    ``reference``). Store-backed runs keep everything in the store (``counts``: this process's
    share of the work); volumes in memory keep ``transforms`` (reference, one (4, 4) per volume) or
    ``embeddings`` with the ``matcher`` that made them (none / affine).
    """

    volumes: VolumeSet
    model: str | None
    consistency: str
    transforms: list | None = None
    embeddings: list | None = None
    matcher: Matcher | None = None
    counts: dict = field(default_factory=dict)

    @property
    def store(self) -> VolumeStore | None:
        return self.volumes.store


def pair_model(data: DataConfig, pairs: PairsConfig, landmark: str | Path | None) -> str | None:
    """The landmark model the pairs use: ``landmark``; with the embedded phantom cohort and none
    given, the default phantom model (shipped, or trained once and cached); None when
    ``pairs.source`` needs no matcher. ConfigError for the user's data without a model."""
    if pairs.source != "landmark":
        return None
    if landmark:
        return str(landmark)
    if data.data:
        raise ConfigError(
            "Alice pairs need a landmark model for your data: train one with "
            "`alice3d-landmark train --data <same data> --out LM` and pass --landmark LM/landmark.pt "
            "(or set pairs.source=same_position for the matcher-free baseline)"
        )
    model = str(default_landmark_model(n=data.phantom_n, seed=data.phantom_seed))
    log.info("using the default phantom landmark model %s", model)
    return model


def pair_consistency(pairs: PairsConfig, store_backed: bool) -> str:
    """``pairs.consistency`` resolved: ``auto`` is reference for a volume store, none in memory."""
    if pairs.consistency == "auto":
        return "reference" if store_backed else "none"
    return pairs.consistency


def store_work(consistency: str) -> tuple[bool, bool]:
    """``(fits, keep_embeddings)`` a store needs for pairs of ``consistency``: reference pairs need
    only the fits; none / affine match on the embeddings, kept in the store."""
    return (True, False) if consistency == "reference" else (False, True)


def load_pair_volumes(data: DataConfig, crop_size: Sequence[int]) -> VolumeSet:
    """The run's crop volumes for 3D pairs (at least two)."""
    if len(crop_size) != 3:
        raise ConfigError("alice.img_size: Alice pairs are 3D crops; expected 3 sizes")
    return load_volumes(data, crop_size, min_volumes=2)


# ----------------------------------------------------------------------------- processes


def preparation_shard() -> tuple[int, int] | None:
    """``(local rank, processes on this node)`` under torchrun, else None (one process does all).

    By node, not by job: a store under ``$ALICE3D_CACHE`` is the node's own, and every node's
    processes together then prepare all of it (a store shared by the nodes is prepared by each
    node; the writes are atomic and identical).
    """
    return env_shard(local=True)


def barrier(timeout_s: float = PREPARE_TIMEOUT_S) -> None:
    """Wait until every process of the job got here; nothing without a process group.

    On a gloo group of its own: its timeout is the preparation's, not the training's
    ``train.dist_timeout_s``, and it works beside an NCCL default group.
    """
    if not is_dist():
        return
    group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        tdist.barrier(group=group)
    finally:
        tdist.destroy_process_group(group)


def prepare_store(matcher: Matcher, store: VolumeStore, fits: bool, keep_embeddings: bool,
                  shard: tuple[int, int] | None = None, timeout_s: float = PREPARE_TIMEOUT_S,
                  show_progress: bool = True) -> dict:
    """This process's ``shard`` of ``store`` embedded (``keep_embeddings``: into the store) and fitted
    to the reference (``fits``), then the barrier: on return every process's share is done.

    Two barriers, the same on every process: one between embeddings and fits (the reference's
    embedding is then in the store), one at the end. Returns :func:`embed_store`'s counts.
    """
    counts = embed_store(matcher, store, shard=shard, fits=fits, keep_embeddings=keep_embeddings,
                         show_progress=show_progress, barrier=lambda: barrier(timeout_s))
    barrier(timeout_s)
    return counts


# ----------------------------------------------------------------------------- volumes in memory


def grid_of(volume) -> tuple[tuple, np.ndarray]:
    """``(shape, spacing mm)`` of a volume or crop source (its affine's column lengths)."""
    return tuple(volume.shape), np.linalg.norm(np.asarray(volume.affine, dtype=np.float64)[:3, :3], axis=0)


def embed_volumes(matcher: Matcher, sources: Sequence, grids: Sequence[tuple]) -> list:
    """The embeddings of ``sources`` (images in HU), held by the caller for matching; the cost
    line first (``grids``: ``(shape, spacing mm)`` of each volume)."""
    voxels = [model_voxels(matcher, *g) for g in grids]
    writes = []
    if matcher.use_cache and matcher.disk.writable and sources:
        # an upper bound: which images are cached already is known only once they are read
        new = [embedding_bytes(matcher, n) for n in voxels]
        writes.append((sum(new), f"the embedding cache {matcher.disk.cache_dir} (at most; "
                                 f"~{format_bytes(sum(new) / len(new))} per volume not cached yet)"))
    log_cost(f"embeddings of the volumes in memory (pairs.consistency={matcher.consistency})", len(sources), 0,
             sum(voxels), writes, "kept in memory for matching")
    matcher.memory_items = max(matcher.memory_items, len(sources))
    # named over the whole list, so that patient1/PATIENT_DICOM and patient2/PATIENT_DICOM read apart
    matcher.store.name_sources(sources)
    return [matcher.embed(src) for src in progress(list(sources), desc="landmark embeddings",
                                                   unit="volume", logger=log)]


def prepare_volumes(matcher: Matcher, sources: Sequence, boxes: Sequence[tuple], grids: Sequence[tuple],
                    consistency: str) -> tuple[list | None, list]:
    """In-process preparation of volumes held in memory -> ``(transforms, embeddings)``.

    ``reference``: one fit per volume to the reference (``transforms``; no embedding kept);
    ``none`` / ``affine``: every volume's embedding (``embeddings``; transforms None).
    ``boxes``: world body box ``(lo, hi)`` per volume; ``grids`` as in :func:`embed_volumes`.
    """
    matcher.consistency = "none" if consistency == "reference" else consistency
    if consistency == "reference":
        return reference_fits(matcher, sources, boxes, grids), []
    return None, embed_volumes(matcher, sources, grids)


def prepare_in_memory(volumes: Sequence, model: str, consistency: str, device: str = "cpu") -> PairPreparation:
    """:func:`prepare_volumes` for a run's volumes in memory, embedded from their source images."""
    missing = [i for i, v in enumerate(volumes) if not getattr(v, "path", "")]
    if missing:
        raise CohortError(f"{len(missing)} volume(s) have no source image to embed (e.g. index {missing[0]})")
    matcher = Matcher(model, device=device, memory_items=max(32, len(volumes)))
    boxes = [(e.lo, e.hi) for e in as_sources(volumes, BODY_THRESHOLD, 1)]
    transforms, embeddings = prepare_volumes(matcher, [v.path for v in volumes], boxes,
                                             [grid_of(v) for v in volumes], consistency)
    if transforms is not None:
        return PairPreparation(VolumeSet(list(volumes)), model, consistency, transforms=transforms)
    return PairPreparation(VolumeSet(list(volumes)), model, consistency, embeddings=embeddings, matcher=matcher)


# ----------------------------------------------------------------------------- the step


def prepare_pairs(data: DataConfig, pairs: PairsConfig, crop_size: Sequence[int], landmark: str | Path | None = "",
                  device: str = "cpu", timeout_s: float = PREPARE_TIMEOUT_S) -> PairPreparation:
    """Prepare the run's pairs (see the module's docstring); call it on every process of a job.

    Returns what :func:`landmark.pairs.pair_dataset` reads (its ``prepared``). A volume store keeps
    the work for the next run: done cases are skipped.
    """
    vset = load_pair_volumes(data, crop_size)
    model = pair_model(data, pairs, landmark)
    if model is None:
        return PairPreparation(vset, None, "none")
    consistency = pair_consistency(pairs, vset.store is not None)
    if vset.store is None:
        prep = prepare_in_memory(vset.volumes, model, consistency, device)
        prep.volumes = vset
        return prep
    matcher = Matcher(model, device=device)
    matcher.disk.writable = False  # the store keeps them, and is read first: a cache copy would never be read
    fits, keep = store_work(consistency)
    counts = prepare_store(matcher, vset.store, fits, keep, shard=preparation_shard(), timeout_s=timeout_s)
    return PairPreparation(vset, model, consistency, counts=counts)
