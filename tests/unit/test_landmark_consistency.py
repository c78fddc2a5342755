"""Pair consistency: robust affine fit, anchors, caching per pair, fallbacks."""

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from alice3d.data.geometry import apply_affine
from alice3d.data.io import Volume
from landmark.consistency import MIN_ANCHORS, PairTransform, anchor_points, fit_pair, robust_affine, roundtrip_inliers
from landmark.match import Matcher
from landmark.model import build_model, recalibrate_norms
from landmark.store import Embedding
from tests.unit.test_landmark_match import TINY


@pytest.fixture(scope="module")
def volume():
    """Smooth texture inside an ellipsoidal 'body' (-1000 HU air outside)."""
    rng = np.random.default_rng(3)
    shape = (48, 40, 32)
    arr = (ndimage.gaussian_filter(rng.normal(size=shape), 1.2) * 4000).astype(np.float32)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    arr[(g**2).sum(0) > 0.8] = -1000.0
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-48.0, -40.0, 12.0]
    return Volume(arr, aff, "body.nii.gz")


@pytest.fixture(scope="module")
def net(volume):
    torch.manual_seed(0)
    x = torch.from_numpy(np.clip((volume.array + 1024) / 4095, 0, 1))[None, None]
    return recalibrate_norms(build_model(TINY), [x[..., :32, :32, :32]]).eval()


def test_robust_affine_recovers_the_map_despite_outliers():
    rng = np.random.default_rng(0)
    src = rng.uniform(-100, 100, size=(60, 3))
    true = np.eye(4)
    true[:3, :3] = [[1.1, 0.05, 0.0], [-0.02, 0.95, 0.03], [0.0, 0.04, 1.05]]
    true[:3, 3] = [5.0, -12.0, 130.0]
    dst = src @ true[:3, :3].T + true[:3, 3]
    bad = rng.choice(60, size=18, replace=False)  # 30 % gross outliers
    dst[bad] += rng.uniform(40, 90, size=(18, 3)) * rng.choice([-1, 1], size=(18, 3))
    matrix, residuals = robust_affine(src, dst)
    np.testing.assert_allclose(matrix, true, atol=1e-8)
    good = np.setdiff1d(np.arange(60), bad)
    assert residuals[good].max() < 1e-8 and residuals[bad].min() > 30
    plain, *_ = np.linalg.lstsq(np.c_[src, np.ones(60)], dst, rcond=None)
    assert np.abs(plain.T - true[:3]).max() > 0.1  # plain least squares is pulled away


def test_embedding_stores_a_body_mask_and_anchors_lie_in_it(net, volume, tmp_path):
    m = Matcher(net, cache_dir=tmp_path)
    emb = m.embed(volume)
    assert emb.body.dtype == torch.bool and tuple(emb.body.shape) == emb.fine_shape
    assert 0.2 < emb.body.float().mean() < 0.8
    anchors = anchor_points(emb, 40)
    ijk = np.rint((anchors - emb.fine_affine[:3, 3]) @ np.linalg.inv(emb.fine_affine[:3, :3]).T).astype(int)
    assert len(anchors) == 40 and emb.body[tuple(ijk.T)].all()
    np.testing.assert_array_equal(anchors, anchor_points(emb, 40))
    reread = Matcher(net, cache_dir=tmp_path).embed(volume)  # from disk
    assert torch.equal(reread.body, emb.body)


def exact(net, tmp_path, **kw):
    """Fine similarity only, no sub-voxel step: a voxel centre of A matches itself in a copy of A."""
    return Matcher(net, cache_dir=tmp_path, fine_weight=1.0, refine=False, **kw)


def shifted(volume, t):
    """The same image placed ``t`` mm further along the world axes."""
    aff = volume.affine.copy()
    aff[:3, 3] += t
    return Volume(volume.array, aff, "moved.nii.gz")


def test_shifted_copy_is_matched_through_the_fitted_translation(net, volume, tmp_path):
    t = np.array([13.0, -7.5, 40.25])
    other = shifted(volume, t)
    m = exact(net, tmp_path, consistency="affine")
    tr = m.pair_transform(m.embed(volume), m.embed(other))
    # (an untrained net has a few look-alike voxels: those anchors fail the round trip)
    assert tr is not None and tr.inliers > 0.9 * tr.anchors and tr.residual_mm < 1e-6
    expect = np.eye(4)
    expect[:3, 3] = t
    np.testing.assert_allclose(tr.matrix, expect, atol=1e-6)
    pts = np.array([[-20.3, -10.0, 40.0], [0.0, 5.7, 30.0]])  # off the voxel centres
    found, scores = m.match(volume, other, pts)
    np.testing.assert_allclose(found, pts + t, atol=1e-6)
    assert np.all(scores > 0.9)  # the query's own (interpolated) embedding, read back in B


def test_pair_transform_is_computed_once_per_pair(net, volume, tmp_path):
    m = exact(net, tmp_path, consistency="affine")
    pts = np.array([[-20.0, -10.0, 40.0]])
    for _ in range(3):
        m.match(volume, volume, pts)
    assert m.stats["pair_transforms"] == 1
    t = m.pair_transform(m.embed(volume), m.embed(volume))
    np.testing.assert_allclose(t.matrix, np.eye(4), atol=1e-6)  # a volume with itself: identity


def test_too_few_consistent_anchors_fall_back_to_argmax_with_a_warning(net, volume, tmp_path, caplog):
    m = Matcher(net, cache_dir=tmp_path, consistency="affine", anchors=MIN_ANCHORS - 1)
    plain = Matcher(net, cache_dir=tmp_path, consistency="none")
    pts = np.array([[-20.0, -10.0, 40.0], [0.0, 5.0, 30.0]])
    other = Volume(np.roll(volume.array, 3, axis=2), volume.affine, "rolled")
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        found, scores = m.match(volume, other, pts)
    assert "point by point" in caplog.text and m.stats["pair_fallbacks"] == 1
    ref, ref_s = plain.match(volume, other, pts)
    np.testing.assert_allclose(found, ref)
    np.testing.assert_allclose(scores, ref_s)


def test_points_mapped_outside_b_get_the_argmax_inside_b(net, volume, tmp_path, monkeypatch):
    """A pair map that sends some queries beyond B's field of view: those get the per-point argmax."""
    m = exact(net, tmp_path, consistency="affine")
    plain = exact(net, tmp_path, consistency="none")
    shift = np.eye(4)
    shift[2, 3] = 30.0  # B's grid ends at z = 12 + 2 * 31.5 = 75 mm
    monkeypatch.setattr(m, "pair_transform", lambda a, b: PairTransform(shift, 100, 100, 0.0))
    pts = np.array([[-10.0, 0.0, 20.0], [-10.0, 0.0, 60.0], [5.0, 3.0, 70.0]])
    found, scores = m.match(volume, volume, pts)
    np.testing.assert_allclose(found[0], pts[0] + [0, 0, 30])
    ref, ref_s = plain.match(volume, volume, pts[1:])
    np.testing.assert_allclose(found[1:], ref)
    np.testing.assert_allclose(scores[1:], ref_s)


def test_consistency_settings_are_checked_where_they_are_configured(net):
    from alice3d.config import ConfigError, load_config
    from alice3d.pretrain.config import PretrainConfig
    from landmark.config import LandmarkConfig

    assert load_config(LandmarkConfig, None, ["match.consistency=none"]).match.consistency == "none"
    with pytest.raises(ConfigError, match="match.consistency"):
        load_config(LandmarkConfig, None, ["match.consistency=rigid"])
    assert load_config(PretrainConfig, None, ["pairs.consistency=affine"]).pairs.consistency == "affine"
    with pytest.raises(ConfigError, match="pairs.consistency"):
        load_config(PretrainConfig, None, ["pairs.consistency=yes"])
    with pytest.raises(ValueError, match="consistency"):
        Matcher(net, use_cache=False, consistency="rigid")


def test_pair_transform_is_cached_on_disk_and_a_corrupt_entry_is_refitted(net, volume, tmp_path, caplog):
    other = shifted(volume, np.array([6.0, -4.0, 10.0]))
    first = exact(net, tmp_path, consistency="affine")
    ref = first.pair_transform(first.embed(volume), first.embed(other))
    (entry,) = (tmp_path).rglob("pairs/*.pair")
    second = exact(net, tmp_path, consistency="affine")  # another process would do the same
    again = second.pair_transform(second.embed(volume), second.embed(other))
    assert second.stats["pair_transforms"] == 0
    np.testing.assert_array_equal(again.matrix, ref.matrix)
    assert (again.inliers, again.anchors) == (ref.inliers, ref.anchors)
    # other fit settings are another entry
    third = exact(net, tmp_path, consistency="affine", anchors=64)
    third.pair_transform(third.embed(volume), third.embed(other))
    assert third.stats["pair_transforms"] == 1 and len(list(tmp_path.rglob("pairs/*.pair"))) == 2
    # a damaged entry is refitted, with a warning
    raw = bytearray(entry.read_bytes())
    raw[-3] ^= 0xFF
    entry.write_bytes(bytes(raw))
    fourth = exact(net, tmp_path, consistency="affine")
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        refit = fourth.pair_transform(fourth.embed(volume), fourth.embed(other))
    assert "refitting" in caplog.text and fourth.stats["pair_transforms"] == 1
    np.testing.assert_allclose(refit.matrix, ref.matrix)


def test_a_pair_that_cannot_be_fitted_is_remembered_and_warned_about_once(net, volume, tmp_path, caplog):
    other = Volume(np.roll(volume.array, 3, axis=2), volume.affine, "rolled")
    m = exact(net, tmp_path, consistency="affine", anchors=MIN_ANCHORS - 1)
    pts = np.array([[-20.0, -10.0, 40.0]])
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        for _ in range(3):
            m.match(volume, other, pts)
    assert caplog.text.count("point by point") == 1 and m.stats["pair_fallbacks"] == 1
    again = exact(net, tmp_path, consistency="affine", anchors=MIN_ANCHORS - 1)
    assert again.pair_transform(again.embed(volume), again.embed(other)) is None
    assert again.stats["pair_fallbacks"] == 0  # read from the disk cache, not refitted


TRUE_MAP = np.array([[1.05, 0.04, 0.0, 6.0], [-0.03, 0.97, 0.02, -11.0], [0.0, 0.05, 1.1, 25.0], [0, 0, 0, 1]])


def test_robust_affine_recovers_the_map_from_noisy_matches_with_outliers():
    rng = np.random.default_rng(1)
    src = rng.uniform(-100, 100, size=(200, 3))
    dst = src @ TRUE_MAP[:3, :3].T + TRUE_MAP[:3, 3] + rng.normal(scale=0.5, size=(200, 3))  # 0.5 mm noise
    bad = rng.choice(200, size=60, replace=False)  # 30 % gross outliers
    dst[bad] += rng.uniform(30, 80, size=(60, 3)) * rng.choice([-1, 1], size=(60, 3))
    matrix, residuals = robust_affine(src, dst)
    corners = np.array(np.meshgrid(*[[-100.0, 100.0]] * 3, indexing="ij")).reshape(3, -1).T
    err = np.linalg.norm(apply_affine(matrix, corners) - apply_affine(TRUE_MAP, corners), axis=1)
    assert err.max() < 0.5  # within the noise, even at the corners of the box
    assert np.median(residuals[np.setdiff1d(np.arange(200), bad)]) < 1.5 and residuals[bad].min() > 20


def _grid_embedding(name):
    """An embedding whose only use here is its grid: 2 mm voxels, every voxel body."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-40.0, -30.0, -20.0]
    return Embedding(fine=torch.zeros(40, 30, 20, 1), coarse=torch.zeros(5, 4, 3, 1), fine_affine=aff,
                     coarse_affine=aff, source_shape=(40, 30, 20), source_affine=aff, name=name,
                     body=torch.ones(40, 30, 20, dtype=torch.bool))


def test_fit_pair_drops_anchors_that_do_not_come_back_and_recovers_the_map():
    a, b = _grid_embedding("a"), _grid_embedding("b")
    rng = np.random.default_rng(0)
    wrong = set(range(0, 200, 5))  # every 5th anchor is matched somewhere else entirely

    def argmax(src, dst, pts):
        if src is a:  # A -> B: the true map, 0.1 mm noise, 20 % wrong matches
            out = apply_affine(TRUE_MAP, pts) + rng.normal(scale=0.1, size=pts.shape)
            out[sorted(wrong)] = rng.uniform(-60, 60, size=(len(wrong), 3))
        else:  # B -> A: exact inverse, so only the wrong matches miss their anchor
            out = apply_affine(np.linalg.inv(TRUE_MAP), pts)
        return out, np.ones(len(pts))

    tr = fit_pair(a, b, argmax, anchors=200, roundtrip_mm=2.0)
    assert (tr.inliers, tr.anchors) == (160, 200) and tr.residual_mm < 0.3
    np.testing.assert_allclose(tr.matrix[:3, :3], TRUE_MAP[:3, :3], atol=2e-3)
    np.testing.assert_allclose(tr.matrix[:3, 3], TRUE_MAP[:3, 3], atol=0.1)
    # a round trip that must land exactly on the anchor keeps none of the noisy matches
    assert fit_pair(a, b, argmax, anchors=200, roundtrip_mm=0.0) is None
    assert roundtrip_inliers(np.zeros((2, 3)), np.array([[0.0, 0, 0], [0, 0, 1e-9]]), 0.0).tolist() == [True, False]
