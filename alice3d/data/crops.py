"""Random crops from the run's volumes (in memory or in a volume store), indexed by sample
(deterministic in the index)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from alice3d.data.sources import as_sources, crop_at

__all__ = ["BodyCentres", "RandomCropDataset", "crop_at"]


class BodyCentres:
    """``centres[j]``: the (K, 3) body voxels of source ``j``, read when first asked for (a store
    volume keeps its sample on disk, so a large cohort costs nothing up front)."""

    def __init__(self, sources: Sequence):
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.sources[j].body_voxels()


class RandomCropDataset(Dataset):
    """Sample ``i``: a crop of ``crop_size`` from volume ``i % n`` at a random body position.

    ``volumes``: windowed in-memory ``Volume`` objects or crop sources (:mod:`alice3d.data.sources`).
    Centres are drawn among voxels brighter than ``body_threshold`` (inside the body; a store
    volume brings its own body sample) so crops do not waste compute on air; borders are padded
    with 0, the background value of the [0, 1] windowed intensities.
    """

    def __init__(self, volumes: Sequence, crop_size: Sequence[int], seed: int = 0,
                 body_threshold: float = 0.05, key: str = "image"):
        if not volumes:
            raise ValueError("RandomCropDataset needs at least one volume")
        self.volumes = as_sources(volumes, body_threshold, 4096, seed, pad_value=0.0)
        self.crop, self.seed, self.key = tuple(int(c) for c in crop_size), seed, key
        self.centres = BodyCentres(self.volumes)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, int(i)))
        j = int(i) % len(self.volumes)
        centres = self.centres[j]
        c = centres[rng.integers(len(centres))]
        crop = self.volumes[j].read_crop(c, self.crop)
        return {self.key: torch.from_numpy(np.ascontiguousarray(crop))[None]}
