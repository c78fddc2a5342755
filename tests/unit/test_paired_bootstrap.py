"""alice3d.analysis.stats.paired_bootstrap: the crossed seeds x cases bootstrap of a paired difference."""

from __future__ import annotations

import numpy as np
import pytest

from alice3d.analysis.stats import paired_bootstrap


def test_a_constant_difference_has_a_degenerate_interval_at_that_value():
    rng = np.random.default_rng(0)
    b = rng.random((5, 24))
    res = paired_bootstrap(b + 0.1, b, n_boot=2000)
    assert res.diff == pytest.approx(0.1)
    assert res.low == pytest.approx(0.1) and res.high == pytest.approx(0.1)
    assert res.p_le_0 == 0.0 and res.excludes_zero
    assert (res.n_seeds, res.n_cases) == (5, 24)


def test_two_cases_of_opposite_sign_give_the_hand_computed_interval():
    # One seed, differences +1 and -1: a replicate draws both cases with replacement, so its mean is
    # +1 (p = 1/4), 0 (1/2) or -1 (1/4); the 2.5 % and 97.5 % quantiles are -1 and +1, P(<= 0) = 3/4.
    res = paired_bootstrap([[1.0, 0.0]], [[0.0, 1.0]], n_boot=20000, seed=1)
    assert res.diff == 0.0
    assert (res.low, res.high) == (-1.0, 1.0)
    assert res.p_le_0 == pytest.approx(0.75, abs=0.02)
    assert not res.excludes_zero


def test_nan_cells_are_left_out_of_the_estimate():
    a = np.array([[0.5, np.nan, 0.7], [0.6, 0.4, np.nan]])
    b = np.array([[0.4, 0.3, np.nan], [0.5, 0.2, 0.1]])
    res = paired_bootstrap(a, b, n_boot=500)
    # scored by both: (0,0) 0.1, (1,0) 0.1, (1,1) 0.2 -> mean 0.4 / 3
    assert res.diff == pytest.approx(0.4 / 3)
    assert 0.1 - 1e-12 <= res.low <= res.diff <= res.high <= 0.2 + 1e-12


def test_seed_spread_widens_the_interval():
    # The same case spread, plus a run-to-run offset per seed: the interval must widen.
    rng = np.random.default_rng(3)
    noise = rng.normal(0, 0.05, (5, 30))
    tight = paired_bootstrap(0.1 + noise, np.zeros((5, 30)), n_boot=4000)
    seed_offsets = np.array([-0.2, -0.1, 0.0, 0.1, 0.2])[:, None]
    wide = paired_bootstrap(0.1 + noise + seed_offsets, np.zeros((5, 30)), n_boot=4000)
    assert (wide.high - wide.low) > 3 * (tight.high - tight.low)
    assert tight.excludes_zero and not wide.excludes_zero


def test_shapes_must_agree_and_some_cell_must_be_scored():
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="no cell"):
        paired_bootstrap([[np.nan]], [[1.0]])
