"""Collapse diagnostics: the spread metric on hand-made inputs, the monitor, and the trainer's warning."""

import logging
import math

import pytest
import torch
from torch import nn

from alice3d.config import TrainConfig
from alice3d.core.diagnostics import feature_spread
from alice3d.train.collapse import COLLAPSE_HINT, CollapseMonitor
from alice3d.train.module import TrainModule
from alice3d.train.trainer import Trainer


def test_identical_vectors_have_zero_spread():
    z = torch.tensor([[0.3, -1.0, 2.0]]).repeat(5, 1)
    assert float(feature_spread(z)) == 0.0
    # Scaling a row does not change its direction: still collapsed.
    assert float(feature_spread(z * torch.tensor([[1.0], [2.0], [3.0], [0.5], [7.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_orthonormal_rows_have_spread_one():
    # Unit basis e_1..e_D: each coordinate is 1 once and 0 D - 1 times; its (unbiased) std is
    # 1 / sqrt(D), so the metric is exactly 1.
    for d in (4, 16):
        torch.testing.assert_close(feature_spread(torch.eye(d) * 3.0), torch.tensor(1.0))


def test_two_opposite_vectors_by_hand():
    # Rows (1, 0) and (-1, 0): coordinate 0 has std sqrt(2), coordinate 1 has 0 -> mean sqrt(2)/2 * sqrt(2) = 1.
    torch.testing.assert_close(feature_spread(torch.tensor([[2.0, 0.0], [-1.0, 0.0]])), torch.tensor(1.0))


def test_random_directions_are_about_one_and_tokens_are_rows():
    z = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    assert float(feature_spread(z)) == pytest.approx(1.0, abs=0.05)
    torch.testing.assert_close(feature_spread(z.reshape(8, 64, 64)), feature_spread(z))
    # A large common offset (the random-target case) shrinks the spread towards 0.
    assert float(feature_spread(z + 20.0)) < 0.1


def test_spread_is_detached_and_a_single_row_is_zero():
    z = torch.randn(6, 8, requires_grad=True)
    out = feature_spread(z)
    assert out.ndim == 0 and not out.requires_grad
    assert float(feature_spread(torch.randn(1, 8))) == 0.0


def test_monitor_warns_after_patience_then_every_n_and_resets():
    mon = CollapseMonitor(threshold=0.2, patience=3, repeat_every=2)
    low = [mon.observe({"step": s, "target_std": 0.1}) for s in range(1, 8)]
    # Low at steps 1..7: first warning at the 3rd low record, then every 2nd.
    assert [m is not None for m in low] == [False, False, True, False, True, False, True]
    assert "step 3" in low[2] and "below 0.2 for 3 logged steps" in low[2] and COLLAPSE_HINT in low[2]
    assert mon.observe({"step": 8, "target_std": 0.5}) is None and mon.low == 0  # recovered
    assert [mon.observe({"step": s, "target_std": 0.0}) is not None for s in range(9, 12)] == [False, False, True]
    assert mon.observe({"step": 12, "loss": 1.0}) is None  # methods without a target are ignored
    assert mon.warnings == 4
    with pytest.raises(ValueError, match="patience"):
        CollapseMonitor(patience=0)


class ConstantTarget(TrainModule):
    """Logs a fixed `target_std` (a collapsed target when low)."""

    def __init__(self, spread):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.spread = spread

    def forward(self, batch):
        loss = self.lin(batch["x"]).pow(2).mean()
        return {"loss": loss, "target_std": torch.tensor(self.spread)}


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        return {"x": torch.randn(2, generator=torch.Generator().manual_seed(i))}


@pytest.mark.parametrize("spread,warned", [(0.05, True), (0.8, False)])
def test_trainer_warns_on_a_collapsed_target(tmp_path, caplog, spread, warned):
    cfg = TrainConfig(max_steps=6, batch_size=2, device="cpu", ckpt_every=0, warmup_steps=0)
    trainer = Trainer(ConstantTarget(spread), cfg, tmp_path / "run")
    trainer.collapse = CollapseMonitor(patience=4, repeat_every=100)
    with caplog.at_level(logging.WARNING, logger="alice3d.train"):
        trainer.fit(Data())
    hits = [r for r in caplog.records if "collapse" in r.getMessage()]
    assert len(hits) == (1 if warned else 0)
    if warned:
        assert "step 4" in hits[0].getMessage() and "predictor" in hits[0].getMessage()
    assert math.isclose(trainer.collapse.low, 6 if warned else 0)


def test_effective_rank_by_hand():
    from alice3d.core.diagnostics import effective_rank
    # orthonormal rows: equal singular values -> exp(log d) = d
    for d in (3, 8):
        torch.testing.assert_close(effective_rank(torch.eye(d) * 2.0), torch.tensor(float(d)), atol=1e-4, rtol=0)
    # two directions with singular values 3:1 (rows e0 x9, e1 x1 after normalisation): p = (3/4, 1/4)
    z = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(9, 1), torch.tensor([[0.0, 5.0]])])
    p = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(effective_rank(z), torch.exp(-(p * p.log()).sum()), atol=1e-4, rtol=0)
    assert float(effective_rank(torch.randn(1, 4))) == 1.0


def test_rank_one_plus_minus_v_is_flagged_by_erank_but_not_by_the_spread():
    from alice3d.core.diagnostics import spread_diagnostics
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    signs = torch.tensor([1.0, -1.0] * 16)[:, None]
    collapsed = signs * v  # (32, 64): every embedding on one line
    healthy = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    d_bad, d_good = spread_diagnostics(collapsed, collapsed), spread_diagnostics(healthy, healthy)
    # the old measure passes the rank-1 batch (it spreads as much as random directions do) ...
    assert float(d_bad["target_std"]) > 0.5 and float(d_good["target_std"]) > 0.5
    # ... the effective rank does not
    assert float(d_bad["target_erank"]) == pytest.approx(1.0, abs=1e-3)
    assert float(d_good["target_erank"]) > 20
    mon = CollapseMonitor(patience=2, repeat_every=10)
    out = [mon.observe({"step": s, **{k: float(x) for k, x in d_bad.items()}}) for s in (1, 2)]
    assert out[0] is None and "target_erank=1.000" in out[1] and "dimensional collapse" in out[1]
    healthy_mon = CollapseMonitor(patience=2, repeat_every=10)
    assert all(healthy_mon.observe({"step": s, **{k: float(x) for k, x in d_good.items()}}) is None for s in (1, 2, 3))
