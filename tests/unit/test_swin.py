"""SwinEncoder: MONAI SwinUNETR compatibility and the visible-token (masked) forward."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import compute_mask, get_window_size, window_partition, window_reverse

from alice3d.encoders import swin_masked as sm
from alice3d.encoders.swin import SwinEncoder, build_swin, swin_configs

# (batch, spatial shape, window size, downsample): padding of the grid to the window,
# clamped windows at the coarse stages, anisotropic windows, both merging orders and
# several samples per batch are covered; 3D runs one sample to stay fast on CPU
CASES = [
    pytest.param(1, (32, 32, 64), 7, "merging", id="3d-w7"),
    pytest.param(1, (64, 32, 64), (5, 3, 4), "mergingv2", id="3d-w534-v2"),
    pytest.param(2, (64, 96), 7, "merging", id="2d-w7"),
    pytest.param(3, (96, 64), (3, 5), "mergingv2", id="2d-w35-v2"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_encoder(shape, window, downsample, **kw) -> SwinEncoder:
    torch.manual_seed(0)
    enc = build_swin("swin_tiny", spatial_dims=len(shape), window_size=window, downsample=downsample, **kw)
    # MONAI initialises the bias tables near zero; large values make index mistakes visible
    for name, p in enc.named_parameters():
        if "relative_position_bias_table" in name:
            torch.nn.init.normal_(p, std=0.5)
    return enc.eval()


def random_mask(batch, units, num_masked, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    total = 1
    for u in units:
        total *= u
    ranks = torch.rand(batch, total, generator=g).argsort(1).argsort(1)
    return (ranks < num_masked).reshape(batch, *units)


def voxel_mask(enc: SwinEncoder, unit_mask: torch.Tensor) -> torch.Tensor:
    """``(B, 1, *spatial)`` bool, True inside masked units."""
    m = unit_mask
    for axis, u in enumerate(enc.unit_size):
        m = m.repeat_interleave(u, dim=axis + 1)
    return m[:, None]


def at_coords(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Values of a dense ``(B, C, *grid)`` map at ``(B, N, n)`` coordinates -> ``(B, N, C)``."""
    b = torch.arange(dense.shape[0])[:, None].expand(coords.shape[:2])
    return dense.movedim(1, -1)[(b, *coords.unbind(-1))]


def reference_block(blk, grid: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """MONAI's SwinTransformerBlock on a dense channels-last grid where attention reads only
    visible tokens and MONAI's zero padding, one window at a time (slow, literal)."""
    b, *size, c = grid.shape
    n_dims = len(size)
    ws, ss = get_window_size(tuple(size), blk.window_size, blk.shift_size)
    pads = [(w - s % w) % w for s, w in zip(size, ws)]
    padded = [s + p for s, p in zip(size, pads)]
    flat_pad = [0, 0] + list(itertools.chain(*[(0, p) for p in reversed(pads)]))
    h = F.pad(blk.norm1(grid), flat_pad)
    present = F.pad(visible.float(), flat_pad[2:], value=1.0)
    shifted = any(s > 0 for s in ss)
    dims = tuple(range(1, n_dims + 1))
    if shifted:
        h = torch.roll(h, [-s for s in ss], dims)
        present = torch.roll(present, [-s for s in ss], dims)
        region_mask = compute_mask(padded, ws, ss, h.device)
    windows = window_partition(h, ws)
    present_w = window_partition(present[..., None], ws)[..., 0] > 0.5
    attn = blk.attn
    n = windows.shape[1]
    heads = attn.num_heads
    table = attn.relative_position_bias_table[attn.relative_position_index[:n, :n].reshape(-1)]
    table = table.view(n, n, heads).permute(2, 0, 1)
    out = torch.zeros_like(windows)
    num_windows = windows.shape[0] // b
    for w in range(windows.shape[0]):
        idx = torch.nonzero(present_w[w]).flatten()
        if idx.numel() == 0:
            continue
        t = windows[w, idx]
        q, k, v = attn.qkv(t).reshape(len(idx), 3, heads, c // heads).permute(1, 2, 0, 3)
        logits = (q * attn.scale) @ k.transpose(-2, -1) + table[:, idx][:, :, idx]
        if shifted:
            logits = logits + region_mask[w % num_windows][idx][:, idx]
        o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(len(idx), c)
        out[w, idx] = attn.proj(o)
    y = window_reverse(out, ws, [b, *padded])
    if shifted:
        y = torch.roll(y, list(ss), dims)
    y = y[(slice(None), *[slice(0, s) for s in size])]
    grid = grid + y
    return grid + blk.mlp(blk.norm2(grid))


def reference_masked(enc: SwinEncoder, x, unit_mask, fill=float("nan")) -> list[torch.Tensor]:
    """Dense-grid reference of ``forward_masked``; masked positions hold ``fill``.

    Returns MONAI's five hidden states ``(B, C, *grid)`` (normalized); only their visible
    positions are meaningful.
    """
    n_dims = enc.spatial_dims
    grid = enc.patch_embed(x).movedim(1, -1)
    visible = ~unit_mask
    for axis in range(n_dims):
        visible = visible.repeat_interleave(2**4, dim=axis + 1)
    grid = torch.where(visible[..., None], grid, torch.full_like(grid, fill))
    outs = [grid]
    for layer in enc._stage_layers():
        for blk in layer.blocks:
            grid = reference_block(blk, grid, visible)
        grid = layer.downsample(grid)
        visible = visible[(slice(None), *[slice(None, None, 2)] * n_dims)]
        outs.append(grid)
    return [F.layer_norm(o, [o.shape[-1]]).movedim(-1, 1) for o in outs]


# ---------------------------------------------------------------- MONAI compatibility


@pytest.mark.parametrize(
    "spatial_dims,kw",
    [(3, {}), (2, {}), (3, {"downsample": "mergingv2", "use_v2": True}), (2, {"patch_norm": True})],
)
def test_strict_load_into_swinunetr_and_same_outputs(spatial_dims, kw):
    enc = build_swin("swin_tiny", spatial_dims=spatial_dims, in_channels=2, **kw).eval()
    net = SwinUNETR(**enc.swinunetr_kwargs(), out_channels=3).eval()
    result = net.swinViT.load_state_dict(enc.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 2, *([32] * spatial_dims))
    with torch.no_grad():
        ours, theirs = enc(x), net.swinViT(x, net.normalize)
    assert len(ours) == 5
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    # and back: a SwinUNETR encoder loads strictly into SwinEncoder
    SwinEncoder(**enc.swinunetr_kwargs()).load_state_dict(net.swinViT.state_dict(), strict=True)


def test_state_dict_and_metadata_survive_weights_only_load():
    enc = build_swin("swin_tiny", spatial_dims=3)
    buf = io.BytesIO()
    torch.save({"state_dict": enc.state_dict(), "metadata": enc.metadata()}, buf)
    buf.seek(0)
    blob = torch.load(buf, weights_only=True)
    meta = blob["metadata"]
    assert meta["kind"] == "swin" and meta["stride"] == 32 and meta["mask_unit"] == [32, 32, 32]
    assert meta["window_size"] == [7, 7, 7] and meta["patch_size"] == 2 and meta["spatial_dims"] == 3
    assert meta["out_channels"] == [12, 24, 48, 96, 192]
    rebuilt = SwinEncoder(**{k: meta[k] for k in enc.swinunetr_kwargs()})
    rebuilt.load_state_dict(blob["state_dict"], strict=True)


def test_presets_are_swinunetr_compatible():
    for name, cfg in swin_configs.items():
        assert cfg["feature_size"] % 12 == 0, name
        for i, heads in enumerate(cfg["num_heads"]):
            assert (cfg["feature_size"] * 2**i) % heads == 0, name
    enc = build_swin("swin_small", spatial_dims=2, in_channels=3, patch_size=4)
    assert enc.unit_size == (64, 64) and enc.unit_grid((128, 192)) == (2, 3)
    assert enc.metadata()["stride"] == 64


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"feature_size": 18}, "divisible by 12"),
        ({"depths": (2, 2, 2)}, "4 entries"),
        ({"num_heads": (5, 6, 12, 24)}, "not divisible"),
        ({"downsample": "pool"}, "downsample"),
    ],
)
def test_bad_config_is_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        SwinEncoder(**{"feature_size": 12, **kw})
    with pytest.raises(ValueError, match="unknown preset"):
        build_swin("swin_huge")


# ---------------------------------------------------------------- masked forward


@pytest.mark.parametrize("batch,shape,window,downsample", CASES)
def test_all_visible_mask_equals_dense_forward(batch, shape, window, downsample):
    enc = make_encoder(shape, window, downsample)
    x = torch.randn(batch, 1, *shape)
    mask = torch.zeros(batch, *enc.unit_grid(shape), dtype=torch.bool)
    with torch.no_grad():
        dense = enc(x, normalize=False)
        raw = enc.forward_masked(x, mask, normalize=False)
        out = enc.forward_masked(x, mask)
    assert len(out.hidden_states) == 5
    for i, (d, h, c, g) in enumerate(zip(dense, raw.hidden_states, out.coords, out.grid_shapes)):
        assert tuple(d.shape[2:]) == g
        assert h.shape == (batch, d.shape[2:].numel(), d.shape[1])
        # every grid position exactly once
        flat = sm.ravel(c, g)
        assert torch.equal(flat.sort(1).values, torch.arange(len(flat[0])).expand_as(flat))
        expected = at_coords(d, c)
        torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5, msg=f"stage {i}")
        # normalize=True is MONAI's proj_out: a layer norm over channels
        normed = F.layer_norm(expected, [expected.shape[-1]])
        torch.testing.assert_close(out.hidden_states[i], normed, rtol=0, atol=1e-5, msg=f"stage {i}")


@pytest.mark.parametrize("batch,shape,window,downsample", CASES)
def test_masked_forward_matches_windowwise_reference(batch, shape, window, downsample):
    enc = make_encoder(shape, window, downsample)
    units = enc.unit_grid(shape)
    mask = random_mask(batch, units, num_masked=math.prod(units) // 2, seed=1)
    x = torch.randn(batch, 1, *shape)
    with torch.no_grad():
        out = enc.forward_masked(x, mask)
        ref = reference_masked(enc, x, mask)
    for i, (h, c, r) in enumerate(zip(out.hidden_states, out.coords, ref)):
        expected = at_coords(r, c)
        assert torch.isfinite(expected).all(), "the reference read a masked (NaN) token"
        torch.testing.assert_close(h, expected, rtol=0, atol=1e-5, msg=f"stage {i}")


@pytest.mark.parametrize("batch,shape,window,downsample", [CASES[0], CASES[3]])
def test_masked_units_never_influence_visible_outputs(batch, shape, window, downsample):
    enc = make_encoder(shape, window, downsample)
    units = enc.unit_grid(shape)
    mask = random_mask(batch, units, num_masked=math.prod(units) // 2, seed=2)
    inside = voxel_mask(enc, mask)
    x = torch.randn(batch, 1, *shape)
    with torch.no_grad():
        a = enc.forward_masked(x, mask)
        b = enc.forward_masked(torch.where(inside, torch.randn_like(x) * 100, x), mask)
        c = enc.forward_masked(torch.where(inside, torch.full_like(x, float("nan")), x), mask)
    for ha, hb, hc in zip(a.hidden_states, b.hidden_states, c.hidden_states):
        assert torch.isfinite(ha).all()
        assert torch.equal(ha, hb) and torch.equal(ha, hc)
    # and the visible content does matter
    with torch.no_grad():
        d = enc.forward_masked(torch.where(inside, x, x + 1.0), mask)
    assert not torch.allclose(a.last, d.last)


@pytest.mark.parametrize("batch,shape,window,downsample", [CASES[0], CASES[2]])
def test_gradients_skip_masked_voxels_and_reach_every_parameter(batch, shape, window, downsample):
    enc = make_encoder(shape, window, downsample)
    units = enc.unit_grid(shape)
    mask = random_mask(batch, units, num_masked=math.prod(units) // 2, seed=3)
    x = torch.randn(batch, 1, *shape, requires_grad=True)
    out = enc.forward_masked(x, mask)
    sum(h.square().mean() for h in out.hidden_states).backward()
    for k, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, k
    inside = voxel_mask(enc, mask)
    assert torch.equal(x.grad[inside], torch.zeros_like(x.grad[inside]))
    assert (x.grad[~inside] != 0).float().mean() > 0.9


@pytest.mark.parametrize(
    "batch,shape,window,downsample",
    [
        pytest.param(2, (64, 64), (3, 5), "mergingv2", id="2d-w35-v2"),
        pytest.param(1, (64, 32, 64), (5, 3, 4), "mergingv2", id="3d-w534-v2"),
    ],
)
def test_gradients_match_windowwise_reference(batch, shape, window, downsample):
    enc = make_encoder(shape, window, downsample)
    if len(shape) == 2:
        enc.double()  # exact comparison; 3D stays float32 for speed
    dtype = next(enc.parameters()).dtype
    units = enc.unit_grid(shape)
    mask = random_mask(batch, units, num_masked=math.prod(units) // 2, seed=3)
    x = torch.randn(batch, 1, *shape, dtype=dtype)
    weights = [torch.randn(batch, 1, c, dtype=dtype) for c in (12, 24, 48, 96, 192)]

    out = enc.forward_masked(x, mask)
    sum((h * w).sum() for h, w in zip(out.hidden_states, weights)).backward()
    ours = {k: p.grad.clone() for k, p in enc.named_parameters()}
    enc.zero_grad()
    ref = reference_masked(enc, x, mask, fill=0.0)
    sum((at_coords(r, c) * w).sum() for r, c, w in zip(ref, out.coords, weights)).backward()
    for k, p in enc.named_parameters():
        # float32 sums over thousands of tokens: compare relative to the gradient's scale
        atol = 1e-10 if dtype == torch.double else 1e-4 * float(p.grad.abs().max())
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=atol, msg=k)


def test_checkpointing_and_training_mode_keep_results():
    shape = (64, 64)
    enc = make_encoder(shape, 7, "merging")
    ckpt = make_encoder(shape, 7, "merging", use_checkpoint=True)
    ckpt.load_state_dict(enc.state_dict())
    enc.train(), ckpt.train()
    mask = random_mask(2, enc.unit_grid(shape), 2, seed=4)
    x = torch.randn(2, 1, *shape)
    a, b = enc.forward_masked(x, mask).last, ckpt.forward_masked(x, mask).last
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    for (k, p), q in zip(enc.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_drop_path_is_per_sample_in_training():
    shape = (64, 64)
    enc = make_encoder(shape, 7, "merging").train()
    for layer in enc._stage_layers():
        for blk in layer.blocks:
            blk.drop_path = DropPath(1.0)
    mask = random_mask(2, enc.unit_grid(shape), 2, seed=5)
    x = torch.randn(2, 1, *shape)
    # every residual branch dropped: stage outputs are merges of the patch embedding
    out = enc.forward_masked(x, mask, normalize=False)
    t = out.hidden_states[0].reshape(-1, 12)
    for layer, h in zip(enc._stage_layers(), out.hidden_states[1:]):
        t = sm.patch_merge(layer.downsample, t, sm.merge_order(layer.downsample, 2))
        torch.testing.assert_close(h.reshape(-1, h.shape[-1]), t)
    # p = 0.5: each sample keeps (x2) or drops its whole branch
    torch.manual_seed(0)
    batch_index = torch.arange(16).repeat_interleave(5)
    y = sm._drop_path(DropPath(0.5).train(), torch.ones(80, 3), batch_index, 16).view(16, 15)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert (y == y[:, :1]).all()
    assert torch.equal(sm._drop_path(DropPath(0.5).eval(), torch.ones(80, 3), batch_index, 16), torch.ones(80, 3))


def test_ids_keep_order_and_restore():
    shape = (96, 128)
    enc = make_encoder(shape, 7, "merging")
    units = enc.unit_grid(shape)
    mask = random_mask(2, units, 9, seed=6)
    x = torch.randn(2, 1, *shape)
    with torch.no_grad():
        out = enc.forward_masked(x, mask)
    flat = mask.reshape(2, -1)
    assert out.last.shape == (2, 3, 192)
    assert torch.equal(out.ids_keep, torch.stack([torch.nonzero(~m).flatten() for m in flat]))
    assert torch.equal(sm.ravel(out.coords[-1], units), out.ids_keep)
    ids_mask = torch.stack([torch.nonzero(m).flatten() for m in flat])
    shuffled = torch.cat([out.ids_keep, ids_mask], 1)
    assert torch.equal(torch.gather(shuffled, 1, out.ids_restore), torch.arange(12).expand(2, 12))
    # MAE-style scatter back: visible features land on their units
    full = torch.zeros(2, 12, 192)
    full.scatter_(1, out.ids_keep[..., None].expand(-1, -1, 192), out.last)
    assert torch.equal(full.reshape(2, *units, 192)[~mask], out.last.reshape(-1, 192))


@pytest.mark.parametrize(
    "mask_shape,make,match",
    [
        ((2, 2, 2), lambda s: torch.zeros(s, dtype=torch.bool), "unit_mask must be bool of shape"),
        ((2, 2, 3), lambda s: torch.zeros(s), "unit_mask must be bool"),
        ((2, 2, 3), lambda s: torch.tensor([[[1, 0, 0], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]]]).bool(), "same"),
        ((2, 2, 3), lambda s: torch.ones(s, dtype=torch.bool), "non-zero"),
    ],
)
def test_bad_masks_are_rejected(mask_shape, make, match):
    enc = build_swin("swin_tiny", spatial_dims=2)
    with pytest.raises(ValueError, match=match):
        enc.forward_masked(torch.randn(2, 1, 64, 96), make(mask_shape))


def test_bad_inputs_are_rejected():
    enc = build_swin("swin_tiny", spatial_dims=2)
    with pytest.raises(ValueError, match="divisible by the mask unit"):
        enc.forward_masked(torch.randn(1, 1, 64, 80), torch.zeros(1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="use_v2"):
        build_swin("swin_tiny", spatial_dims=2, use_v2=True).forward_masked(
            torch.randn(1, 1, 32, 32), torch.zeros(1, 1, 1, dtype=torch.bool)
        )


# ---------------------------------------------------------------- primitives


def test_morton_offsets_group_children():
    assert sm.morton_offsets(2, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    offs = sm.morton_offsets(8, 3)
    assert offs.shape == (512, 3) and len({tuple(o) for o in offs.tolist()}) == 512
    parents = (offs // 2).view(-1, 8, 3)
    assert (parents == parents[:, :1]).all()
    # children listed in itertools.product order, parents again in Morton order
    assert torch.equal(offs.view(-1, 8, 3)[0], torch.tensor(list(itertools.product(range(2), repeat=3))))
    assert torch.equal(parents[:, 0], sm.morton_offsets(4, 3))


def test_merge_order_matches_monai_patch_merging():
    for downsample, n in [("merging", 3), ("mergingv2", 3), ("merging", 2), ("mergingv2", 2)]:
        enc = build_swin("swin_tiny", spatial_dims=n, downsample=downsample)
        ds = enc.layers1[0].downsample
        grid = torch.randn(1, *([4] * n), 12)
        dense = ds(grid)  # (1, *[2]*n, 24)
        offs = sm.morton_offsets(4, n)
        tokens = grid[(0, *offs.unbind(-1))]
        merged = sm.patch_merge(ds, tokens, sm.merge_order(ds, n))
        torch.testing.assert_close(merged, dense[(0, *(offs[:: 2**n] // 2).unbind(-1))])


def test_gather_rows_gradient():
    table = torch.randn(6, 3, dtype=torch.double, requires_grad=True)
    index = torch.tensor([4, 0, 2, 5])
    inverse = sm.inverse_index(index, 6)
    assert inverse.tolist() == [1, 4, 2, 4, 0, 3]
    assert torch.autograd.gradcheck(lambda t: sm.gather_rows(t, index, inverse), (table,))


def test_fused_attention_path_matches_explicit_math():
    # the CUDA path (scaled_dot_product_attention) run on CPU against MONAI's arithmetic
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 4, 8), torch.randn(3, 5, 6, 8), torch.randn(3, 5, 6, 8)
    bias = torch.randn(3, 5, 4, 6)
    bias[..., -2:] = float("-inf")  # unused key slots
    for b in (bias, bias[:, :1]):  # per-group bias and one bias broadcast over groups
        a = sm.attend(q, k, v, b, 0.3, fused=False)
        torch.testing.assert_close(sm.attend(q, k, v, b, 0.3, fused=True), a)
        expected = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + b, -1) @ v
        torch.testing.assert_close(a, expected)
