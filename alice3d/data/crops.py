"""Random crops from the in-memory volume set, indexed by sample (deterministic in the index)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from alice3d.data.io import Volume


def crop_at(array: np.ndarray, center: Sequence[int], size: Sequence[int], pad_value: float = 0.0) -> np.ndarray:
    """Crop ``size`` voxels centred on ``center``; parts outside the array are ``pad_value``."""
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    src, dst = [], []
    for c, s, n in zip(center, size, array.shape):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


class RandomCropDataset(Dataset):
    """Sample ``i``: a crop of ``crop_size`` from volume ``i % n`` at a random body position.

    Centres are drawn among voxels brighter than ``body_threshold`` (inside the body) so
    crops do not waste compute on air; borders are padded with 0, the background value of
    the [0, 1] windowed intensities.
    """

    def __init__(self, volumes: Sequence[Volume], crop_size: Sequence[int], seed: int = 0,
                 body_threshold: float = 0.05, key: str = "image"):
        if not volumes:
            raise ValueError("RandomCropDataset needs at least one volume")
        self.volumes, self.crop, self.seed, self.key = list(volumes), tuple(int(c) for c in crop_size), seed, key
        rng = np.random.default_rng(seed)
        self.centres = []
        for v in self.volumes:
            body = np.argwhere(v.array > body_threshold)
            if len(body) == 0:
                body = np.argwhere(np.ones(v.shape, dtype=bool))
            self.centres.append(body[rng.choice(len(body), min(len(body), 4096), replace=False)])

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng((self.seed, int(i)))
        j = int(i) % len(self.volumes)
        c = self.centres[j][rng.integers(len(self.centres[j]))]
        crop = crop_at(self.volumes[j].array, c, self.crop)
        return {self.key: torch.from_numpy(np.ascontiguousarray(crop))[None]}
