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


def test_random_pairs_take_k_from_another_volume_at_its_own_random_body_point():
    """pairs.source=random: K's point is drawn in K's volume, not mapped from Q's, so it carries no
    correspondence: over many draws its normalised position is uncorrelated with Q's."""
    vols = [_volume(s, shape=(40, 36, 32)) for s in range(4)]
    sampler = PairSampler(vols, None, crop_size=(8, 8, 8), random_key=True)
    matched = PairSampler(vols, None, crop_size=(8, 8, 8))  # same normalised position (no matcher)
    rel_q, rel_k = [], []
    for seed in range(300):
        s = sampler.sample(seed)
        a, b = s["meta"]["ids"]
        assert a != b
        for i, point, out in ((a, s["meta"]["points"][0], rel_q), (b, s["meta"]["points"][1], rel_k)):
            e = sampler.entries[i]
            out.append((np.asarray(point) - e.lo) / (e.hi - e.lo))
        # The crop really is K's volume around K's point.
        np.testing.assert_array_equal(s["k"][0].numpy(), sampler.crop_around(b, np.asarray(s["meta"]["points"][1])))
    rel_q, rel_k = np.array(rel_q), np.array(rel_k)
    for axis in range(3):
        assert abs(np.corrcoef(rel_q[:, axis], rel_k[:, axis])[0, 1]) < 0.2
    # The matcher-free same-position baseline, by contrast, maps Q's position across.
    s = matched.sample(0)
    a, b = s["meta"]["ids"]
    ea, eb = matched.entries[a], matched.entries[b]
    np.testing.assert_allclose((np.asarray(s["meta"]["points"][0]) - ea.lo) / (ea.hi - ea.lo),
                               (np.asarray(s["meta"]["points"][1]) - eb.lo) / (eb.hi - eb.lo), atol=1e-6)
    PairsConfig(source="random").validate()
    with pytest.raises(Exception, match="exclude"):
        PairSampler(vols, None, crop_size=(8, 8, 8), random_key=True, same_volume=True)
