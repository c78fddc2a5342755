"""Datasets for pretraining, built from the config sections, each with the report of what it left out.

    image_dataset(data, slices, img_size, in_channels, seed) -> (dataset, DataReport)
        2D: slices of volumes (or PNG/TIFF images) when img_size has 2 entries;
        3D: random body crops of the run's volumes
    load_volumes(data, min_shape, min_volumes) -> VolumeSet (store volumes or in-memory volumes,
        see alice3d.data.loading)

Alice's crop pairs need the landmark matcher, a higher layer: `landmark.pairs.pair_dataset`.
"""

from __future__ import annotations

import logging
from typing import Sequence

from torch.utils.data import Dataset

from alice3d.config import DataConfig
from alice3d.data.crops import RandomCropDataset
from alice3d.data.loading import load_run_volumes
from alice3d.data.report import DataReport
from alice3d.data.slices import SliceConfig, slice_dataset
from alice3d.data.volumes import VolumeSet

log = logging.getLogger("alice3d.data")

__all__ = ["DataReport", "image_dataset", "load_volumes"]


def load_volumes(data: DataConfig, min_shape: Sequence[int] | None, min_volumes: int = 1) -> VolumeSet:
    """The run's volumes (checked, RAS, resampled; windowed in memory or at read time from a volume
    store); bad ones per `data.on_bad_data`."""
    vset = load_run_volumes(data, min_shape, min_volumes)
    log.info("%s", vset.summary())
    return vset


def image_dataset(data: DataConfig, slices: SliceConfig, img_size: Sequence[int], in_channels: int = 1,
                  seed: int = 0) -> tuple[Dataset, DataReport]:
    """`{"image": (C, *img_size)}` samples: 2D slices/images for 2 sizes, 3D crops for 3."""
    if len(img_size) == 2:
        return slice_dataset(data, slices, img_size, seed=seed, channels=in_channels)
    vset = load_volumes(data, img_size)
    return RandomCropDataset(vset.volumes, img_size, seed=seed), DataReport(len(vset.volumes), list(vset.bad))

