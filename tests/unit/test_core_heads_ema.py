import math

import pytest
import torch
import torch.nn as nn

from alice3d.core.ema import cosine_momentum, ema_update, make_target
from alice3d.core.heads import PredictorMLP, ProjectionHead
from alice3d.core.schedules import cosine_schedule, cosine_warmup_factor

# ---- heads --------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bn", [False, True])
def test_projection_head_global_and_token_inputs(use_bn):
    torch.manual_seed(0)
    head = ProjectionHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, use_bn=use_bn).eval()
    x = torch.randn(3, 5, 16)
    out = head(x)
    assert out.shape == (3, 5, 32)
    torch.testing.assert_close(out, head(x.reshape(15, 16)).reshape(3, 5, 32))
    assert head(x[:, 0]).shape == (3, 32)


def test_projection_head_last_layer_is_unit_norm_and_g_frozen():
    torch.manual_seed(0)
    head = ProjectionHead(8, out_dim=6, hidden_dim=10, bottleneck_dim=4, num_layers=3)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(6))
    out = head(torch.randn(7, 8) * 100)
    assert out.abs().max() <= 1.0 + 1e-5  # cosine against unit prototypes
    out.sum().backward()
    assert g.grad is None and head.last_layer.parametrizations.weight.original1.grad is not None
    free = ProjectionHead(8, out_dim=6, norm_last_layer=False, num_layers=1)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert isinstance(free.mlp, nn.Linear)


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_predictor_shapes_and_token_statistics(norm):
    torch.manual_seed(0)
    pred = PredictorMLP(6, 12, 4, norm=norm)
    x = torch.randn(3, 5, 6)
    out = pred(x)
    assert out.shape == (3, 5, 4) and pred(x[:, 0]).shape == (3, 4)
    torch.testing.assert_close(out, pred(x.reshape(15, 6)).reshape(3, 5, 4))
    if norm == "ln":
        assert pred(torch.randn(1, 6)).shape == (1, 4)
    with pytest.raises(ValueError, match="'bn' or 'ln'"):
        PredictorMLP(6, 12, 4, norm="gn")


# ---- EMA ----------------------------------------------------------------------------------


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_make_target_is_frozen_independent_copy():
    torch.manual_seed(0)
    online = _net()
    target = make_target(online)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    for a, b in zip(online.parameters(), target.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert not torch.equal(online[0].weight, target[0].weight)
    out = target(torch.randn(4, 3))
    assert not out.requires_grad
    target.eval()
    assert online.training  # modes are independent


def test_ema_update_by_expected_amount_and_buffer_modes():
    online, target = _net(), _net()
    with torch.no_grad():
        for p in target.parameters():
            p.fill_(1.0)
        for p in online.parameters():
            p.fill_(3.0)
    online[1].running_mean.fill_(5.0)
    online[1].num_batches_tracked.fill_(7)
    target.requires_grad_(False)
    ema_update(target, online, 0.9)
    for p in target.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.2))  # 0.9 * 1 + 0.1 * 3
    assert torch.all(target[1].running_mean == 5.0) and int(target[1].num_batches_tracked) == 7

    target[1].running_mean.fill_(0.0)
    ema_update(target, online, 0.5, buffers="ema")
    assert torch.allclose(target[1].running_mean, torch.full((4,), 2.5))
    target[1].running_mean.fill_(-1.0)
    ema_update(target, online, 0.5, buffers="none")
    assert torch.all(target[1].running_mean == -1.0)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(target, online, 1.5)


def test_ema_momentum_one_keeps_target_and_zero_copies_online():
    torch.manual_seed(0)
    online = _net()
    target = make_target(_net())
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters()))
    ema_update(target, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(online.parameters(), target.parameters()))


def test_ema_on_weight_normed_projection_head_and_mismatch_error():
    torch.manual_seed(0)
    online = ProjectionHead(8, out_dim=6, hidden_dim=10, bottleneck_dim=4)
    target = make_target(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    ema_update(target, online, 0.99)
    g = target.last_layer.parametrizations.weight.original0
    assert not g.requires_grad
    v_t = target.last_layer.parametrizations.weight.original1
    v_o = online.last_layer.parametrizations.weight.original1
    torch.testing.assert_close(v_t, v_o - 0.99)
    with pytest.raises(ValueError):
        ema_update(target, _net(), 0.9)


def test_cosine_momentum_values():
    assert cosine_momentum(0, 100) == pytest.approx(0.996)
    assert cosine_momentum(50, 100) == pytest.approx(0.998)
    assert cosine_momentum(100, 100) == pytest.approx(1.0)
    assert cosine_momentum(500, 100) == pytest.approx(1.0)


# ---- schedules ----------------------------------------------------------------------------


def test_cosine_warmup_factor_known_steps():
    assert cosine_warmup_factor(0, 10, 110) == pytest.approx(0.1)
    assert cosine_warmup_factor(4, 10, 110) == pytest.approx(0.5)
    assert cosine_warmup_factor(9, 10, 110) == pytest.approx(1.0)
    assert cosine_warmup_factor(10, 10, 110) == pytest.approx(1.0)
    assert cosine_warmup_factor(60, 10, 110) == pytest.approx(0.5)
    assert cosine_warmup_factor(35, 10, 110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_warmup_factor(60, 10, 110, min_ratio=0.1) == pytest.approx(0.55)
    assert cosine_warmup_factor(110, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_warmup_factor(1000, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert cosine_warmup_factor(0, 0, 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_warmup_factor(0, 0, 0)


def test_cosine_schedule_generic():
    assert cosine_schedule(0, 10, 2.0, 0.0) == pytest.approx(2.0)
    assert cosine_schedule(5, 10, 2.0, 0.0) == pytest.approx(1.0)
    assert cosine_schedule(10, 10, 2.0, 0.0) == pytest.approx(0.0)
    assert cosine_schedule(20, 10, 0.04, 0.07) == pytest.approx(0.07)
