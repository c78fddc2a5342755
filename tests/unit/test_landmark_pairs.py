"""Registered crop pairs: shapes, centring on matched points, background padding, fallbacks, errors."""

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from alice3d.data.crops import crop_at
from alice3d.data.io import Volume
from alice3d.train.module import BatchDataset
from landmark.config import ModelConfig
from landmark.match import Matcher
from landmark.model import build_model, recalibrate_norms
from landmark.pairs import PairDataset, PairError, PairSampler

TINY = ModelConfig(stem_width=4, widths=(8, 8, 8, 8), fpn_dim=8, embed_dim=16, extra_windows=())
BG = 0.1  # background ("air") value of the normalised crop volumes, deliberately not 0


def _hu(seed, shape=(36, 32, 20)):
    rng = np.random.default_rng(seed)
    arr = (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 6000).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-36.0 + seed, -32.0, -20.0]
    return Volume(arr, aff, f"hu{seed}.nii.gz")


def _normalised(v):
    arr = np.clip((v.array + 1024) / 4095, 0, 1)
    arr = BG + (1 - BG) * arr
    return Volume(arr.astype(np.float32), v.affine, "")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hu = [_hu(s) for s in range(3)]
    vols = [_normalised(v) for v in hu]
    torch.manual_seed(0)
    net = recalibrate_norms(build_model(TINY), [torch.rand(1, 1, 32, 32, 32)]).eval()
    matcher = Matcher(net, cache_dir=tmp_path_factory.mktemp("cache"))
    return hu, vols, matcher


def test_crop_at_pads_with_given_value():
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = crop_at(a, (0, 1, 2), (3, 3, 3), pad_value=-5.0)
    assert out.shape == (3, 3, 3)
    assert out[1, 1, 1] == a[0, 1, 2]  # voxel size // 2 is the centre
    assert (out[0] == -5).all() and (out[:, :, 2] == -5).all()


def test_pairs_are_centred_on_query_and_match(setup):
    hu, vols, matcher = setup
    sampler = PairSampler(vols, matcher, crop_size=(16, 16, 8), min_score=-1.0, sources=hu, seed=0,
                          body_threshold=0.4)
    s = sampler.sample(3)
    assert s["q"].shape == (1, 16, 16, 8) and s["k"].shape == (1, 16, 16, 8) and s["q"].dtype == torch.float32
    meta = s["meta"]
    a, b = meta["ids"]
    assert a != b and not meta["fallback"] and meta["tries"] == 1
    for crop, vol, p in ((s["q"], vols[a], meta["points"][0]), (s["k"], vols[b], meta["points"][1])):
        ijk = np.rint(vol.world_to_voxel(np.array([p]))[0]).astype(int)
        inside = all(0 <= i < n for i, n in zip(ijk, vol.shape))
        if inside:
            assert crop[0, 8, 8, 4].item() == pytest.approx(vol.array[tuple(ijk)])
    # the query point lies in the body of A
    qa = vols[a].world_to_voxel(np.array([meta["points"][0]]))[0]
    assert np.abs(qa - np.rint(qa)).max() <= 0.5
    assert vols[a].array[tuple(np.rint(qa).astype(int))] > 0.4
    # the match is what the matcher returns for that point
    found, score = matcher.match(hu[a], hu[b], np.array([meta["points"][0]]))
    np.testing.assert_allclose(found[0], meta["points"][1], atol=1e-6)
    assert meta["score"] == pytest.approx(float(score[0]), abs=1e-6)


def test_border_crops_are_padded_with_background_not_zero(setup):
    hu, vols, matcher = setup
    sampler = PairSampler(vols, matcher, crop_size=(32, 32, 16), min_score=-1.0, sources=hu, seed=0)
    s = sampler.sample(0)
    for key in ("q", "k"):
        crop = s[key].numpy()
        assert crop.min() >= BG - 1e-6  # no zeros from padding
        assert np.isclose(crop, BG).mean() > 0.02  # crops nearly as large as the volumes reach past borders


def test_dataset_is_deterministic_per_item(setup):
    hu, vols, matcher = setup
    sampler = PairSampler(vols, matcher, crop_size=(16, 16, 8), min_score=-1.0, sources=hu)
    ds = PairDataset(sampler, seed=7)
    x, y = ds[5], ds[5]
    assert torch.equal(x["q"], y["q"]) and torch.equal(x["k"], y["k"]) and torch.equal(x["ids"], y["ids"])
    assert not torch.equal(ds[6]["q"], x["q"])
    assert not isinstance(ds, BatchDataset)  # the trainer batches single pairs


def test_low_scores_fall_back_logged_and_counted(setup, caplog):
    hu, vols, matcher = setup
    sampler = PairSampler(vols, matcher, crop_size=(16, 16, 8), min_score=2.0, max_retries=2, sources=hu)
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        s = sampler.sample(1)
    assert s["meta"]["fallback"] and s["meta"]["tries"] == 3
    assert sampler.stats == {"pairs": 1, "retries": 2, "fallback": 1}
    assert "below min_score" in caplog.text
    pos = PairSampler(vols, matcher, crop_size=(16, 16, 8), min_score=2.0, max_retries=0, sources=hu,
                      fallback="position")
    s = pos.sample(1)
    a, b = s["meta"]["ids"]
    np.testing.assert_allclose(s["meta"]["points"][1], pos.position_match(a, b, np.array(s["meta"]["points"][0])))


def test_matcher_free_baseline_uses_body_boxes():
    vols = [_normalised(_hu(s)) for s in range(2)]
    sampler = PairSampler(vols, None, crop_size=(8, 8, 8))
    s = sampler.sample(0)
    a, b = s["meta"]["ids"]
    ea, eb = sampler.entries[a], sampler.entries[b]
    rel_a = (np.array(s["meta"]["points"][0]) - ea.lo) / (ea.hi - ea.lo)
    rel_b = (np.array(s["meta"]["points"][1]) - eb.lo) / (eb.hi - eb.lo)
    np.testing.assert_allclose(rel_a, rel_b, atol=1e-9)


def test_bad_inputs_raise_pair_errors(setup):
    hu, vols, matcher = setup
    with pytest.raises(PairError, match="larger than every volume"):
        PairSampler(vols, None, crop_size=(64, 16, 8))
    with pytest.raises(PairError, match="at least two volumes"):
        PairSampler(vols[:1], None, crop_size=(8, 8, 8))
    other = Volume(vols[1].array, np.diag([3.0, 2.0, 2.0, 1.0]), "x")
    with pytest.raises(PairError, match="one spacing and orientation"):
        PairSampler([vols[0], other], None, crop_size=(8, 8, 8))
    with pytest.raises(PairError, match="no source path"):
        PairSampler(vols, matcher, crop_size=(8, 8, 8))


@pytest.mark.parametrize("mode", ["none", "affine"])
def test_pairs_use_the_configured_matcher_consistency(setup, tmp_path, mode):
    hu, vols, matcher = setup
    m = Matcher(matcher.net, cache_dir=tmp_path)
    sampler = PairSampler(vols, m, crop_size=(16, 16, 8), min_score=-1.0, sources=hu, seed=0, consistency=mode)
    meta = sampler.sample(3)["meta"]
    a, b = meta["ids"]
    assert m.consistency == mode
    assert m.stats["pair_transforms"] + m.stats["pair_fallbacks"] == (1 if mode == "affine" else 0)
    ref = Matcher(matcher.net, cache_dir=tmp_path, consistency=mode)
    found, _ = ref.match(hu[a], hu[b], np.array([meta["points"][0]]))
    np.testing.assert_allclose(found[0], meta["points"][1], atol=1e-6)
