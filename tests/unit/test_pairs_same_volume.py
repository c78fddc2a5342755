"""pairs.source=same_volume: Q and K are the same crop of one volume (Alice without the inter-volume term)."""

import numpy as np
import pytest

from alice3d.config import ConfigError
from alice3d.data.io import Volume
from landmark.config import PairsConfig
from landmark.pairs import PairDataset, PairSampler


def _volume(seed, shape=(24, 20, 16)):
    rng = np.random.default_rng(seed)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-20.0 + seed, -16.0, -12.0]
    return Volume(rng.uniform(0.1, 1.0, size=shape).astype(np.float32), aff, f"v{seed}.nii.gz")


def test_same_volume_pairs_are_one_crop_of_one_volume():
    vols = [_volume(s) for s in range(3)]
    sampler = PairSampler(vols, None, crop_size=(8, 8, 8), same_volume=True)
    for seed in range(5):
        s = sampler.sample(seed)
        a, b = s["meta"]["ids"]
        assert a == b
        assert s["meta"]["points"][0] == s["meta"]["points"][1]
        np.testing.assert_array_equal(s["q"].numpy(), s["k"].numpy())
    # Different draws still visit different volumes and positions.
    ids = {PairDataset(sampler, seed=0)[i]["ids"][0].item() for i in range(20)}
    assert len(ids) > 1
    # The default stays a cross-volume pair.
    cross = PairSampler(vols, None, crop_size=(8, 8, 8)).sample(0)
    assert cross["meta"]["ids"][0] != cross["meta"]["ids"][1]


def test_pairs_config_accepts_same_volume_and_names_the_key_otherwise():
    PairsConfig(source="same_volume").validate()
    with pytest.raises(ConfigError, match="pairs.source"):
        PairsConfig(source="same_patient").validate()
