"""CASA against a direct evaluation of Alice Eq. 3-4 with explicit matrices."""

import math

import pytest
import torch

from alice3d.methods.casa import CASA


def layer_norm(x, gamma, beta, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def randomise(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_single_head_matches_equations():
    casa = CASA(query_dim=12, kv_dim=8).double()
    randomise(casa)
    v = torch.randn(2, 5, 12, dtype=torch.float64)  # V: visible tokens (N_m = 5)
    h = torch.randn(2, 9, 8, dtype=torch.float64)  # H: all tokens (N = 9)
    wq, wk, wv = casa.to_q.weight.T, casa.to_k.weight.T, casa.to_v.weight.T
    q = layer_norm(v, casa.norm_q.weight, casa.norm_q.bias) @ wq
    hn = layer_norm(h, casa.norm_kv.weight, casa.norm_kv.bias)
    k, val = hn @ wk, hn @ wv
    c = q.shape[-1]
    att = torch.exp(q @ k.transpose(1, 2) / math.sqrt(c))
    att = att / att.sum(-1, keepdim=True)
    expected = (att @ val) @ casa.proj.weight.T + casa.proj.bias  # zeta
    out = casa(v, h)
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(out, expected)


def test_multi_head_splits_channels():
    casa = CASA(query_dim=6, kv_dim=8, dim=8, out_dim=4, num_heads=2).double()
    randomise(casa)
    v = torch.randn(1, 3, 6, dtype=torch.float64)
    h = torch.randn(1, 7, 8, dtype=torch.float64)
    q = casa.to_q(casa.norm_q(v))
    k, val = casa.to_k(casa.norm_kv(h)), casa.to_v(casa.norm_kv(h))
    heads = []
    for i in range(2):
        sl = slice(4 * i, 4 * (i + 1))
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)
        heads.append(a @ val[..., sl])
    expected = casa.proj(torch.cat(heads, -1))
    torch.testing.assert_close(casa(v, h), expected)


def test_query_is_shared_between_student_and_teacher():
    casa = CASA(query_dim=12, kv_dim=8).double()
    v = torch.randn(2, 5, 12, dtype=torch.float64)
    h, y = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    q = casa.query(v)
    torch.testing.assert_close(casa.attend(q, h), casa(v, h))
    torch.testing.assert_close(casa.attend(q, y), casa(v, y))
    # Permuting the key/value tokens does not change the result (attention is a set operation).
    perm = torch.randperm(9)
    torch.testing.assert_close(casa(v, y[:, perm]), casa(v, y))


def test_gradients_reach_every_parameter_and_both_inputs():
    casa = CASA(query_dim=12, kv_dim=8)
    v = torch.randn(2, 5, 12, requires_grad=True)
    h = torch.randn(2, 9, 8, requires_grad=True)
    casa(v, h).square().sum().backward()
    assert v.grad is not None and h.grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in casa.parameters())


def test_errors():
    with pytest.raises(ValueError, match="divisible"):
        CASA(12, 8, num_heads=3)
    with pytest.raises(ValueError, match="batch"):
        CASA(12, 8)(torch.randn(2, 5, 12), torch.randn(3, 9, 8))
