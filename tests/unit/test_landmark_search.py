"""Search functions on hand-made embeddings: every mode finds the brute-force (numpy) argmax."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from landmark import search
from landmark.search import best_voxels, search_coarse, search_full, search_pruned

FACTOR = 4


def _unit(rng, *shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _upsample_np(values, factor, fine_shape):
    """Linear upsampling (align_corners=False, borders clamped), one axis at a time."""
    out = values
    for axis, size in enumerate(fine_shape):
        c = (np.arange(size) + 0.5) / factor - 0.5
        lo = np.floor(c).astype(int)
        frac = c - lo
        n = out.shape[axis + 1]
        a = np.take(out, np.clip(lo, 0, n - 1), axis=axis + 1)
        b = np.take(out, np.clip(lo + 1, 0, n - 1), axis=axis + 1)
        frac = frac.reshape([1] * (axis + 1) + [-1] + [1] * (len(fine_shape) - axis - 1))
        out = (1 - frac) * a + frac * b
    return out


def _brute_force(q_f, q_c, fine, coarse, w):
    """``(argmax indices (N, n), best scores (N,))`` of ``w * fine . q_f + (1 - w) * up(coarse . q_c)``."""
    fine_shape = fine.shape[:-1]
    coarse_sim = np.einsum("nd,...d->n...", q_c, coarse)
    score = w * np.einsum("nd,...d->n...", q_f, fine) + (1 - w) * _upsample_np(coarse_sim, FACTOR, fine_shape)
    flat = score.reshape(len(q_f), -1)
    best = flat.argmax(1)
    return np.stack(np.unravel_index(best, fine_shape), -1), flat.max(1)


@pytest.fixture(params=[(27, 23, 18), (39, 34)], ids=["3d", "2d"])
def case(request):
    """Grids with partial border cells (not multiples of the factor); each query is a noisy copy of
    one voxel's fine vector and of its cell's coarse vector, so the maps are peaked (prunable)."""
    fine_shape = request.param
    rng = np.random.default_rng(len(fine_shape))
    coarse_shape = tuple(-(-s // FACTOR) for s in fine_shape)
    fine = _unit(rng, *fine_shape, 16)
    # smooth coarse field, as trained coarse embeddings are: neighbouring cells look alike
    coarse = ndimage.gaussian_filter(rng.normal(size=(*coarse_shape, 16)), (1.0,) * len(coarse_shape) + (0,))
    coarse = (coarse / np.linalg.norm(coarse, axis=-1, keepdims=True)).astype(np.float32)
    pick = rng.choice(int(np.prod(fine_shape)), size=6, replace=False)
    voxels = np.stack(np.unravel_index(pick, fine_shape), -1)
    q_f = _unit(rng, 6, 16) * 0.3 + fine.reshape(-1, 16)[pick]
    q_c = _unit(rng, 6, 16) * 0.3 + coarse[tuple((voxels // FACTOR).T)]
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return unit(q_f), unit(q_c), fine, coarse


def _sim(q_c, coarse):
    return torch.einsum("nd,...d->n...", torch.from_numpy(q_c), torch.from_numpy(coarse))


@pytest.mark.parametrize("w", [0.5, 0.8, 1.0])  # w = 0: border voxels tie on the clamped coarse map
def test_every_mode_finds_the_brute_force_argmax(case, w, monkeypatch):
    q_f, q_c, fine, coarse = case
    want, want_score = _brute_force(q_f, q_c, fine, coarse, w)
    qf, fn = torch.from_numpy(q_f), torch.from_numpy(fine)
    csim = _sim(q_c, coarse)
    n_cells = int(np.prod(coarse.shape[:-1]))
    for best, score in (search_full(qf, csim, fn, FACTOR, w, chunk_voxels=2**20),
                        search_coarse(qf, csim, fn, FACTOR, w, cells=n_cells, chunk_voxels=2**20)):
        assert best.shape == (6, fine.ndim - 1) and score.shape == (6,)
        np.testing.assert_array_equal(best.numpy(), want)
        np.testing.assert_allclose(score.numpy(), want_score, atol=1e-5)
    dense = []
    monkeypatch.setattr(search, "search_full", lambda *a, **k: dense.append(1) or search_full(*a, **k))
    for i in range(len(q_f)):
        best, score = search_pruned(qf[i], csim[i], fn, FACTOR, w)
        np.testing.assert_array_equal(best.numpy(), want[i])
        assert score.item() == pytest.approx(want_score[i], abs=1e-5)
    if w < 1:  # (with w = 1 every cell may hold a fine similarity of 1: nothing can be pruned)
        assert len(dense) < len(q_f)  # branch and bound, not only its dense fallback


def test_best_voxels_chunks_and_modes_agree_and_stay_on_the_grid(case):
    q_f, q_c, fine, coarse = case
    want, want_score = _brute_force(q_f, q_c, fine, coarse, 0.5)
    args = (torch.from_numpy(q_f), torch.from_numpy(q_c), torch.from_numpy(fine).half(), torch.from_numpy(coarse),
            FACTOR)
    for mode in ("full", "pruned", "coarse"):
        for chunk in (1, 2**20):  # one query per block, or all of them at once
            idx, score = best_voxels(*args, mode=mode, fine_weight=0.5, coarse_cells=10**6, chunk_voxels=chunk,
                                     refine=False)
            assert idx.dtype == torch.float64 and idx.shape == want.shape
            np.testing.assert_array_equal(idx.numpy(), want)  # float16 storage: same winner here
            np.testing.assert_allclose(score.numpy(), want_score, atol=3e-3)
        refined, _ = best_voxels(*args, mode=mode, fine_weight=0.5, coarse_cells=10**6, chunk_voxels=2**20,
                                 refine=True)
        assert np.abs(refined.numpy() - want).max() <= 0.5  # sub-voxel steps stay within the peak voxel
    with pytest.raises(ValueError, match="search: expected one of"):
        best_voxels(*args, mode="exact", fine_weight=0.5, coarse_cells=1, chunk_voxels=1, refine=False)


def test_coarse_search_with_one_cell_stays_in_the_best_bound_cell(case):
    q_f, q_c, fine, coarse = case
    csim = _sim(q_c, coarse)
    best, _ = search_coarse(torch.from_numpy(q_f), csim, torch.from_numpy(fine), FACTOR, 0.5, cells=1,
                            chunk_voxels=2**20)
    pool = (torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d)[fine.ndim - 3]
    bound = pool(csim[:, None], 3, 1, 1)[:, 0]
    for k in range(len(q_f)):
        cell = tuple((best[k] // FACTOR).tolist())
        assert bound[k][cell] == bound[k].max()
    with pytest.raises(ValueError, match="coarse_cells: expected at least 1"):
        search_coarse(torch.from_numpy(q_f), csim, torch.from_numpy(fine), FACTOR, 0.5, cells=0, chunk_voxels=1)


@pytest.mark.parametrize("n", [2, 3])
def test_search_near_a_centre_takes_the_best_voxel_of_its_box_not_the_global_peak(n):
    from landmark.search import best_voxels_near

    shape = (5,) * n
    fine = torch.zeros(*shape, 2)
    fine[..., 1] = 1.0  # everywhere orthogonal to the query ...
    fine[(4,) * n] = torch.tensor([1.0, 0.0])  # ... except the global peak, far from the centre
    fine[(1,) * n] = torch.tensor([0.8, 0.6])  # and the best voxel of the centre's box
    coarse = torch.zeros(*(1,) * n, 2)
    q = torch.tensor([[1.0, 0.0]])
    idx_all, _ = best_voxels(q, q, fine, coarse, 5, mode="full", fine_weight=1.0, coarse_cells=1,
                             chunk_voxels=1000, refine=False)
    assert idx_all[0].tolist() == [4.0] * n
    centre = torch.tensor([[1.2] * (n - 1) + [0.6]], dtype=torch.float64)
    idx, score = best_voxels_near(q, q, fine, coarse, 5, centre, [1] * n, fine_weight=1.0, refine=False)
    assert idx[0].tolist() == [1.0] * n and score[0].item() == pytest.approx(0.8)
    # a box that reaches the peak finds it; one cut by the border searches what is inside
    idx, score = best_voxels_near(q, q, fine, coarse, 5, centre, [3] * n, fine_weight=1.0, refine=False)
    assert idx[0].tolist() == [4.0] * n and score[0].item() == pytest.approx(1.0)
    # half fine, half coarse (a coarse map of one cell is constant: 0 here)
    idx, score = best_voxels_near(q, q, fine, coarse, 5, centre, [1] * n, fine_weight=0.5, refine=False)
    assert score[0].item() == pytest.approx(0.4)


def test_matcher_method_overrides_settings_for_its_calls_only():
    from types import SimpleNamespace

    from alice3d.analysis.landmark_accuracy import matcher_method

    class Fake:
        consistency, local_radius_mm = "affine", 0.0

        def match(self, a, b, pts):
            seen.append((self.consistency, self.local_radius_mm))
            return pts + 1, None

    seen: list = []
    m = Fake()
    case = SimpleNamespace(volume=None)
    out = matcher_method(m, "none", local_radius_mm=8.0)(case, case, np.zeros((2, 3)))
    matcher_method(m)(case, case, np.zeros((1, 3)))
    assert seen == [("none", 8.0), ("affine", 0.0)] and (m.consistency, m.local_radius_mm) == ("affine", 0.0)
    np.testing.assert_array_equal(out, np.ones((2, 3)))
