"""Matching in world coordinates: exact search, shift/flip/spacing changes, bad input."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from alice3d.data.io import Volume, reorient_array
from alice3d.train.checkpoint import CheckpointError, atomic_save
from landmark.config import LandmarkConfig, ModelConfig
from landmark.match import Matcher, MatchError, load_landmark_model, parse_points
from landmark.model import build_model, recalibrate_norms
from landmark.search import cell_upsampling_stencil, interp_rows, ravel_index, upsample_sim
from landmark.train import save_landmark_model

TINY = ModelConfig(stem_width=4, widths=(8, 8, 8, 8), fpn_dim=8, embed_dim=16, extra_windows=())


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(0)
    arr = (ndimage.gaussian_filter(rng.normal(size=(48, 40, 32)), 1.2) * 8000).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-48.0, -40.0, 12.0]
    return Volume(arr, aff, "a.nii.gz")


@pytest.fixture(scope="module")
def net(volume):
    torch.manual_seed(0)
    x = torch.from_numpy(np.clip((volume.array + 1024) / 4095, 0, 1))[None, None]
    return recalibrate_norms(build_model(TINY), [x[..., :32, :32, :32]]).eval()


def _points(volume, n=12, seed=1):
    rng = np.random.default_rng(seed)
    return volume.voxel_to_world(rng.uniform(4, np.asarray(volume.shape) - 5, size=(n, 3)))


def test_pruned_search_equals_full_search(net, volume, tmp_path):
    pts = _points(volume)
    other = Volume(np.roll(volume.array, 5, axis=0), volume.affine, "b")
    pruned = Matcher(net, cache_dir=tmp_path, search="pruned", consistency="none")
    full = Matcher(net, cache_dir=tmp_path, search="full", consistency="none")
    # coarse-to-fine over every cell: the same argmax (fp16 screening, float32 rescoring)
    coarse = Matcher(net, cache_dir=tmp_path, search="coarse", coarse_cells=10**6, consistency="none")
    for w in (0.5, 0.8, 1.0):
        pruned.fine_weight = full.fine_weight = coarse.fine_weight = w
        pf, sf = full.match(volume, other, pts)
        for m in (pruned, coarse):
            pb, sb = m.match(volume, other, pts)
            np.testing.assert_allclose(pb, pf, atol=1e-6)
            np.testing.assert_allclose(sb, sf, atol=1e-5)


def test_coarse_search_visits_only_the_best_cells(net, volume, tmp_path):
    """With one cell, the match lies in the cell (or its neighbours) with the highest coarse bound."""
    m = Matcher(net, cache_dir=tmp_path, search="coarse", coarse_cells=1, refine=False, consistency="none")
    emb = m.embed(volume)
    pts = _points(volume, n=5)
    found, _ = m.match(volume, volume, pts)
    _, q_c = m.query(emb, pts)
    csim = torch.einsum("nd,...d->n...", q_c, emb.coarse.float())
    bound = torch.nn.functional.max_pool3d(csim[:, None], 3, 1, 1)[:, 0]
    fine_idx = (found - emb.fine_affine[:3, 3]) @ np.linalg.inv(emb.fine_affine[:3, :3]).T
    cells = np.floor(np.rint(fine_idx) / emb.factor).astype(int)
    for k in range(len(pts)):
        assert bound[k][tuple(cells[k])] == bound[k].max()


@pytest.mark.parametrize("consistency", ["affine", "none"])
def test_same_image_voxel_centres_match_themselves(net, volume, tmp_path, consistency):
    m = Matcher(net, cache_dir=tmp_path, fine_weight=1.0, refine=False, consistency=consistency)
    emb = m.embed(volume)
    ijk = np.array([[3, 4, 5], [10, 2, 7], [20, 15, 3], [6, 6, 6]])
    pts = ijk @ emb.fine_affine[:3, :3].T + emb.fine_affine[:3, 3]
    found, scores = m.match(volume, volume, pts)
    np.testing.assert_allclose(found, pts, atol=1e-6)
    np.testing.assert_allclose(scores, 1.0, atol=2e-3)  # fp16 storage


@pytest.mark.parametrize("consistency", ["affine", "none"])
def test_translated_copy_gives_translated_matches(net, volume, tmp_path, consistency):
    m = Matcher(net, cache_dir=tmp_path, consistency=consistency)
    pts = _points(volume)
    ref, ref_s = m.match(volume, volume, pts)
    t = np.array([13.0, -7.5, 40.25])
    aff = volume.affine.copy()
    aff[:3, 3] += t
    found, s = m.match(volume, Volume(volume.array, aff, "moved"), pts)
    np.testing.assert_allclose(found, ref + t, atol=1e-6)
    np.testing.assert_allclose(s, ref_s, atol=1e-6)


@pytest.mark.parametrize("consistency", ["affine", "none"])
@pytest.mark.parametrize("codes", ["LPS", "LAI", "PIR"])
def test_reoriented_copy_gives_identical_world_matches(net, volume, tmp_path, codes, consistency):
    m = Matcher(net, cache_dir=tmp_path, consistency=consistency)
    pts = _points(volume)
    ref, _ = m.match(volume, volume, pts)
    arr, aff = reorient_array(volume.array, volume.affine, codes)
    assert not np.allclose(aff, volume.affine)
    found, _ = m.match(volume, Volume(arr, aff, codes), pts)
    np.testing.assert_allclose(found, ref, atol=1e-6)
    back, _ = m.match(Volume(arr, aff, codes), volume, pts)  # as the source too
    np.testing.assert_allclose(back, ref, atol=1e-6)


@pytest.mark.parametrize("consistency", ["affine", "none"])
@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 1, 3)])
def test_finer_spacing_copy_gives_identical_world_matches(net, volume, tmp_path, factors, consistency):
    """B stores A on a finer grid (each voxel repeated) that shares A's voxel 0 (the grid of
    alice3d.data.canonical keeps voxel 0): resampled to the model spacing it is A again."""
    m = Matcher(net, cache_dir=tmp_path, consistency=consistency)
    pts = _points(volume)
    ref, _ = m.match(volume, volume, pts)
    f = np.asarray(factors)
    arr = volume.array
    for axis, k in enumerate(f):
        # voxel j of B sits at A index j / f; f * (n - 1) + 1 voxels end on A's last voxel
        arr = np.repeat(arr, k, axis=axis)[(slice(None),) * axis + (slice(0, k * (volume.shape[axis] - 1) + 1),)]
    scale = np.diag([*(1.0 / f), 1.0])
    fine = Volume(arr, volume.affine @ scale, "fine")
    assert np.allclose(fine.spacing, np.asarray(volume.spacing) / f)
    found, _ = m.match(volume, fine, pts)
    np.testing.assert_allclose(found, ref, atol=1e-4)


def test_point_outside_source_is_an_error(net, volume, tmp_path):
    m = Matcher(net, cache_dir=tmp_path)
    with pytest.raises(MatchError, match=r"1 query point\(s\) outside volume.*500.0,0.0,0.0"):
        m.match(volume, volume, np.array([[0.0, 0.0, 30.0], [500.0, 0.0, 0.0]]))
    with pytest.raises(MatchError, match="finite"):
        m.match(volume, volume, np.array([[np.nan, 0.0, 0.0]]))


def test_parse_points():
    np.testing.assert_allclose(parse_points("1,2,3; -4.5,5,6e1"), [[1, 2, 3], [-4.5, 5, 60]])
    for bad in ["1,2", "a,b,c", "", "1,2,3,4"]:
        with pytest.raises(MatchError, match="x,y,z"):
            parse_points(bad)


def test_interp_rows_is_exact_at_voxels_and_linear_between():
    grid = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4, 1)
    idx = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 1.0], [5.0, -3.0, 0.0]])
    out = interp_rows(grid, idx)[:, 0]
    torch.testing.assert_close(out, torch.tensor([23.0, 0.5 * (5 + 17), 12.0]))


def test_model_file_roundtrip_and_wrong_kind(net, volume, tmp_path):
    cfg = LandmarkConfig()
    cfg.model = TINY
    path = save_landmark_model(net, cfg, tmp_path / "landmark.pt")
    loaded, meta = load_landmark_model(path)
    assert meta["kind"] == "alice3d-landmark" and meta["spacing"] == [2.0, 2.0, 2.0]
    assert meta["hu_window"] == [-1024.0, 3071.0]
    a = Matcher(net, cache_dir=tmp_path / "c1")
    b = Matcher(path, cache_dir=tmp_path / "c2")
    assert a.model_key == b.model_key
    np.testing.assert_array_equal(a.embed(volume).fine.numpy(), b.embed(volume).fine.numpy())
    atomic_save({"metadata": {"kind": "alice3d-encoder"}, "state_dict": {}}, tmp_path / "encoder.pt")
    with pytest.raises(CheckpointError, match="expected a file of kind 'alice3d-landmark'"):
        Matcher(tmp_path / "encoder.pt")


def test_single_channel_files_of_the_first_format_still_load(net, volume, tmp_path):
    cfg = LandmarkConfig()
    cfg.model = TINY
    obj = torch.load(save_landmark_model(net, cfg, tmp_path / "new.pt"), weights_only=True)
    old_model = {k: v for k, v in obj["metadata"]["model"].items() if k != "extra_windows"}
    obj["metadata"]["model"] = {**old_model, "in_channels": 1}  # how the first release wrote it
    atomic_save(obj, tmp_path / "old.pt")
    loaded, _ = load_landmark_model(tmp_path / "old.pt")
    assert loaded.cfg.extra_windows == () and loaded.cfg.in_channels == 1
    obj["metadata"]["model"] = {**old_model, "in_channels": 3}
    atomic_save(obj, tmp_path / "bad.pt")
    with pytest.raises(MatchError, match="bad.pt: landmark model metadata.*in_channels=3"):
        load_landmark_model(tmp_path / "bad.pt")


@pytest.mark.parametrize("cshape,factor", [((5,), 4), ((4, 3), 8), ((3, 4, 2), 4)])
def test_cell_stencil_reproduces_upsampling_inside_every_cell(cshape, factor):
    coarse = torch.rand(1, *cshape)
    fine_shape = [c * factor - 1 for c in cshape]  # the last cell is cut, as on real grids
    up = upsample_sim(coarse, factor, fine_shape)[0]
    offs, nb, w = cell_upsampling_stencil(factor, len(cshape))
    for cell in np.ndindex(*cshape):
        c = torch.tensor(cell)
        idx = torch.minimum((c + nb).clamp_min(0), torch.tensor(cshape) - 1)
        vals = w @ coarse[0].flatten()[ravel_index(idx, cshape)]
        vox = c * factor + offs
        inside = (vox < torch.tensor(fine_shape)).all(1)
        torch.testing.assert_close(vals[inside], up[tuple(vox[inside].T)], atol=1e-6, rtol=0)


def test_batched_coarse_search_equals_one_query_at_a_time(net, volume, tmp_path):
    pts = _points(volume, n=9)
    other = Volume(np.roll(volume.array, 3, axis=1), volume.affine, "b")
    batched = Matcher(net, cache_dir=tmp_path, search="coarse", coarse_cells=8, consistency="none")
    single = Matcher(net, cache_dir=tmp_path, search="coarse", coarse_cells=8, chunk_voxels=1, consistency="none")
    pb, sb = batched.match(volume, other, pts)
    ps, ss = single.match(volume, other, pts)
    np.testing.assert_allclose(pb, ps, atol=1e-6)
    np.testing.assert_allclose(sb, ss, atol=1e-6)


def test_match_settings_resolve_argument_then_model_file_then_default():
    from landmark.config import MatchConfig, resolve_match_config

    stored = {"roundtrip_mm": 5.0, "coarse_cells": 64, "fine_weight": 0.7, "from_a_later_version": 1}
    cfg = resolve_match_config(stored, roundtrip_mm=0.0, fine_weight=0.0, anchors=0)
    assert (cfg.roundtrip_mm, cfg.fine_weight, cfg.anchors) == (0.0, 0.0, 0)  # explicit zeros win
    assert cfg.coarse_cells == 64  # no argument: the model file's value
    assert cfg.chunk_voxels == MatchConfig().chunk_voxels  # neither: the default
    assert resolve_match_config(stored, roundtrip_mm=None).roundtrip_mm == 5.0
    assert resolve_match_config(None) == MatchConfig()
    with pytest.raises(TypeError, match="unknown match settings"):
        resolve_match_config({}, coarse=3)


def test_explicit_zeros_reach_the_search_and_the_fit(net, volume, tmp_path, monkeypatch):
    """coarse_cells=0, anchors=0 and roundtrip_mm=0.0 are used as given, never replaced by the defaults."""
    import landmark.consistency
    from alice3d.config import ConfigError

    cfg = LandmarkConfig()
    cfg.model = TINY
    cfg.match.roundtrip_mm, cfg.match.anchors = 7.0, 100  # the model file's values
    path = save_landmark_model(net, cfg, tmp_path / "landmark.pt")
    with pytest.raises(ConfigError, match="coarse_cells: expected at least 1, got 0"):
        Matcher(path, use_cache=False, search="coarse", coarse_cells=0)
    seen = []
    original = landmark.consistency.roundtrip_inliers
    monkeypatch.setattr(landmark.consistency, "roundtrip_inliers",
                        lambda anchors, back, mm: seen.append((len(anchors), mm)) or original(anchors, back, mm))
    for roundtrip_mm, anchors, want in ((None, None, (100, 7.0)), (0.0, None, (100, 0.0)), (None, 0, (0, 7.0))):
        m = Matcher(path, use_cache=False, roundtrip_mm=roundtrip_mm, anchors=anchors, fine_weight=1.0, refine=False)
        assert (m.anchors, m.roundtrip_mm) == want
        m.pair_transform(m.embed(volume), m.embed(volume))
        assert seen.pop() == want
    # no anchors: nothing to fit, the pair is matched point by point
    assert m.stats["pair_fallbacks"] == 1 and m.stats["pair_transforms"] == 0


def test_local_refinement_searches_only_near_where_the_affine_maps(net, volume, tmp_path):
    pts = _points(volume)
    plain = Matcher(net, cache_dir=tmp_path, consistency="affine")
    mapped, mapped_s = plain.match(volume, volume, pts)
    local = Matcher(net, cache_dir=tmp_path, consistency="affine", local_radius_mm=6.0)
    found, s = local.match(volume, volume, pts)
    fine_spacing = np.linalg.norm(local.embed(volume).fine_affine[:3, :3], axis=0)
    radius = np.maximum(1, np.round(6.0 / fine_spacing)) * fine_spacing
    # within the box (plus half a voxel for its centre, the nearest voxel, and half for the
    # sub-voxel refinement) and never a worse score
    assert (np.abs(found - mapped) <= radius + fine_spacing + 1e-6).all()
    assert not np.allclose(found, mapped)
    assert (s >= mapped_s - 1e-5).all()
    with pytest.raises(ValueError, match="local_radius_mm"):
        Matcher(net, cache_dir=tmp_path, local_radius_mm=-1.0)
