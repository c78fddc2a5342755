import ast
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from alice3d.encoders import nnformer as nnf
from alice3d.encoders.nnformer import (
    NNFormer,
    NNFormerEncoder,
    build_nnformer,
    build_nnformer_encoder,
    effective_window,
    relative_position_index,
    window_partition,
    window_reverse,
)

TINY = "nnformer_tiny"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out_channels=3, **kw):
    torch.manual_seed(0)
    return build_nnformer(TINY, in_channels=1, out_channels=out_channels, **kw)


# ---------------------------------------------------------------- window primitives


@pytest.mark.parametrize("spatial, window", [((8, 12), (4, 3)), ((4, 6, 8), (2, 3, 4)), ((6, 4, 2), (6, 4, 2))])
def test_window_partition_round_trip_and_layout(spatial, window):
    x = torch.randn(2, *spatial, 5)
    win = window_partition(x, window)
    n_windows = math.prod(s // w for s, w in zip(spatial, window))
    assert win.shape == (2 * n_windows, math.prod(window), 5)
    assert torch.equal(window_reverse(win, window, spatial), x)
    # first window of the second sample is the corner block of x[1]
    corner = x[(1, *(slice(0, w) for w in window))].reshape(-1, 5)
    assert torch.equal(win[n_windows], corner)


def test_relative_position_index_hand_values_2d():
    idx = relative_position_index((2, 2))  # tokens (0,0),(0,1),(1,0),(1,1); table 3x3
    assert idx.shape == (4, 4)
    assert idx[0, 0] == 4  # offset (0, 0) -> (1, 1) -> 1 * 3 + 1
    assert idx[0, 3] == 0  # (0,0)-(1,1) = (-1,-1) -> (0, 0)
    assert idx[3, 0] == 8  # (1, 1) -> (2, 2) -> 2 * 3 + 2
    assert idx[1, 2] == 2  # (0,1)-(1,0) = (-1, 1) -> (0, 2)


def test_relative_position_index_is_a_bijection_on_offsets_3d():
    window = (4, 3, 2)
    idx = relative_position_index(window)
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1).T
    offsets = coords[:, None, :] - coords[None, :, :]
    seen = {}
    for i in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            key = tuple(offsets[i, j].tolist())
            assert seen.setdefault(key, int(idx[i, j])) == int(idx[i, j])
    assert len(set(seen.values())) == len(seen) == math.prod(2 * w - 1 for w in window)
    assert max(seen.values()) == len(seen) - 1


def test_effective_window_clamps_and_drops_shift_per_axis():
    # feature (24, 4, 3), window (8, 8, 2): axis0 shifted by 4, axis1 clamped to 4 unshifted,
    # axis2 keeps 2 and shifts by 1
    assert effective_window((24, 4, 3), (8, 8, 2), True) == ((8, 4, 2), (4, 0, 1))
    assert effective_window((24, 4, 3), (8, 8, 2), False) == ((8, 4, 2), (0, 0, 0))
    assert effective_window((8, 8), (8, 8), True) == ((8, 8), (0, 0))


# ---------------------------------------------- brute-force reference of the block


def _reference_block(block, x, skip=None):
    """Dense attention over all tokens with an explicit 'same shifted window' rule."""
    b, *spatial, c = x.shape
    nd = len(spatial)
    attn = block.attn
    window, shift = effective_window(spatial, block.window, block.shifted)
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij")).reshape(nd, -1).T
    allowed = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool)
    for a in range(nd):
        p = coords[:, a]
        padded = math.ceil(spatial[a] / window[a]) * window[a]
        rolled = (p - shift[a]) % padded
        win_id = rolled // window[a]
        wrapped = p < shift[a]
        allowed &= (win_id[:, None] == win_id[None, :]) & (wrapped[:, None] == wrapped[None, :])
    rel = coords[:, None, :] - coords[None, :, :]
    index = torch.zeros(rel.shape[:2], dtype=torch.long)
    for a, w in enumerate(block.window):
        index += (rel[..., a] + w - 1) * math.prod(2 * v - 1 for v in block.window[a + 1 :])
    index = torch.where(allowed, index, 0)  # far pairs are masked; keep their index in range
    bias = attn.relative_position_bias_table[index].permute(2, 0, 1)  # (h, L, L)
    h = attn.num_heads
    d = c // h
    if skip is None:
        xn = block.norm1(x).reshape(b, -1, c)
        q, k, v = attn.qkv(xn).reshape(b, -1, 3, h, d).permute(2, 0, 3, 1, 4)
        shortcut = x
    else:
        q = block.norm1(x).reshape(b, -1, h, d).transpose(1, 2)
        k, v = attn.kv(block.norm1(skip).reshape(b, -1, c)).reshape(b, -1, 2, h, d).permute(2, 0, 3, 1, 4)
        shortcut = x + skip
    logits = q @ k.transpose(-1, -2) * attn.scale + bias
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, *spatial, c)
    y = shortcut + attn.proj(out)
    return y + block.mlp(block.norm2(y))


@pytest.mark.parametrize(
    "spatial, window, shifted, expect",
    [
        ((6, 5), (4, 4), True, ((4, 4), (2, 2))),  # padded 8x8, both axes shifted
        ((6, 5), (4, 4), False, ((4, 4), (0, 0))),  # padding only
        ((5, 3, 6), (4, 4, 2), True, ((4, 3, 2), (2, 0, 1))),  # pad + clamp + shift
        ((4, 4, 4), (4, 4, 4), True, ((4, 4, 4), (0, 0, 0))),  # one window, no mask
    ],
)
def test_block_matches_dense_reference(spatial, window, shifted, expect):
    torch.manual_seed(0)
    block = nnf.LocalTransformerBlock(dim=8, num_heads=2, window=window, shifted=shifted).double()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()  # make a wrong index visible
    x = torch.randn(2, *spatial, 8, dtype=torch.float64)
    assert effective_window(spatial, window, shifted) == expect
    torch.testing.assert_close(block(x), _reference_block(block, x))


def test_skip_attention_block_matches_dense_reference():
    torch.manual_seed(0)
    block = nnf.LocalTransformerBlock(dim=8, num_heads=2, window=(4, 4, 2), skip_attention=True).double()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x, skip = torch.randn(2, 2, 6, 5, 3, 8, dtype=torch.float64).unbind(0)
    assert not block.shifted and not hasattr(block.attn, "qkv")
    torch.testing.assert_close(block(x, skip), _reference_block(block, x, skip))


# ------------------------------------------------------------------ network shapes


@pytest.mark.parametrize("size", [(64, 64, 32), (96, 64, 32), (160, 64, 32), (128, 128, 64)])
def test_output_shapes_train_and_eval(size):
    model = tiny()
    x = torch.randn(1, 1, *size)
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 3
    for k, out in enumerate(outs):  # full, 1/2, 1/4
        assert out.shape == (1, 3, *(s // 2**k for s in size))
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert torch.is_tensor(out) and out.shape == (1, 3, *size)
    assert torch.isfinite(out).all()


def test_encoder_feature_shapes_and_metadata():
    enc = build_nnformer_encoder(TINY, in_channels=2)
    feats = enc(torch.randn(2, 2, 96, 64, 32))
    assert [tuple(f.shape) for f in feats] == [
        (2, 16, 24, 16, 16), (2, 32, 12, 8, 8), (2, 64, 6, 4, 4), (2, 128, 3, 2, 2)
    ]
    meta = enc.metadata()
    assert meta["kind"] == "nnformer"
    assert meta["patch_stride"] == [4, 4, 2] and meta["total_stride"] == [32, 32, 16]
    assert meta["embed_dim"] == 16 and meta["depths"] == [2, 2, 2, 2]
    assert meta["window_sizes"] == [[4, 4, 4], [4, 4, 4], [8, 8, 8], [4, 4, 4]]
    assert enc.grid_size((96, 64, 32)) == (24, 16, 16)


def test_no_deep_supervision_returns_tensor_in_training():
    model = tiny(deep_supervision=False).train()
    out = model(torch.randn(1, 1, 64, 64, 32))
    assert torch.is_tensor(out) and out.shape == (1, 3, 64, 64, 32)
    assert len(model.heads) == 1


def test_bf16_autocast_forward_is_finite():
    model = tiny().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = model(torch.randn(1, 1, 32, 32, 16))
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o.float()).all() for o in outs)


def test_2d_network_shapes():
    torch.manual_seed(0)
    model = NNFormer(1, 2, embed_dim=16, num_heads=(1, 2, 4, 8), patch_stride=4, spatial_dims=2).train()
    outs = model(torch.randn(2, 1, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 2, 64, 96), (2, 2, 32, 48), (2, 2, 16, 24)]


@pytest.mark.parametrize("size", [(65, 64, 32), (64, 64, 24), (48, 64, 32)])
def test_indivisible_size_raises_clear_error(size):
    model = tiny().eval()
    with pytest.raises(ValueError) as err:
        model(torch.randn(1, 1, *size))
    msg = str(err.value)
    assert str(size) in msg and "(32, 32, 16)" in msg


def test_wrong_channels_or_rank_raise():
    enc = build_nnformer_encoder(TINY, in_channels=1)
    with pytest.raises(ValueError, match="expects input"):
        enc(torch.randn(1, 2, 64, 64, 32))
    with pytest.raises(ValueError, match="expects input"):
        enc(torch.randn(1, 1, 64, 64))


def test_unknown_preset_and_bad_windows_raise():
    with pytest.raises(ValueError, match="nnformer_tiny"):
        build_nnformer("nnformer_huge")
    with pytest.raises(ValueError, match="window_sizes"):
        build_nnformer(TINY, window_sizes=(4, 4, 8))


# ----------------------------------------------------------- weights and masking


def test_encoder_state_dict_loads_strict_into_network():
    torch.manual_seed(1)
    enc = build_nnformer_encoder(TINY, in_channels=1)
    model = tiny()
    result = model.encoder.load_state_dict(enc.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert "mask_token" in enc.state_dict()
    x = torch.randn(1, 1, 64, 64, 32)
    enc.eval()
    model.eval()
    with torch.no_grad():
        for a, b in zip(enc(x), model.encoder(x)):
            assert torch.equal(a, b)
    # metadata rebuilds a network whose encoder takes the same weights
    rebuilt = NNFormer.from_metadata(enc.metadata(), out_channels=5)
    rebuilt.encoder.load_state_dict(enc.state_dict(), strict=True)
    assert NNFormerEncoder.from_metadata(enc.metadata()).state_dict().keys() == enc.state_dict().keys()


def test_segmentation_network_freezes_mask_token():
    model = tiny()
    assert not model.encoder.mask_token.requires_grad
    model.train()
    sum(o.sum() for o in model(torch.randn(1, 1, 64, 64, 32))).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_mask_token_replaces_only_masked_stem_positions():
    torch.manual_seed(0)
    enc = build_nnformer_encoder(TINY, in_channels=1).eval()
    x = torch.randn(2, 1, 64, 64, 32)
    grid = enc.grid_size(x.shape[2:])
    mask = torch.rand(2, *grid) < 0.3
    with torch.no_grad():
        plain = enc.embed(x)
        masked = enc.embed(x, mask)
        token = enc.mask_token.reshape(-1)
        m = mask.unsqueeze(1).expand_as(plain)
        assert torch.equal(masked[~m], plain[~m])
        assert torch.equal(masked.movedim(1, -1)[mask], token.expand(int(mask.sum()), -1))
        # flat (B, L) masks mean the same thing
        assert torch.equal(enc.embed(x, mask.flatten(1)), masked)
        # an explicit token overrides the learned one
        other = torch.full((16,), 3.0)
        assert (enc.embed(x, mask, mask_token=other).movedim(1, -1)[mask] == 3.0).all()


def test_mask_token_affects_output_only_when_something_is_masked():
    torch.manual_seed(0)
    enc = build_nnformer_encoder(TINY, in_channels=1).eval()
    x = torch.randn(1, 1, 64, 64, 32)
    grid = enc.grid_size(x.shape[2:])
    with torch.no_grad():
        ref = enc(x)
        none_masked = enc(x, torch.zeros(1, *grid, dtype=torch.bool))
        some = torch.zeros(1, *grid, dtype=torch.bool)
        some[0, :4, :4, :4] = True
        some_masked = enc(x, some)
    for a, b in zip(ref, none_masked):
        assert torch.equal(a, b)
    assert not torch.allclose(ref[0], some_masked[0])
    # the token's gradient is exactly zero when nothing is masked, non-zero otherwise
    enc.train()
    enc(x, torch.zeros(1, *grid, dtype=torch.bool))[-1].pow(2).sum().backward()
    assert enc.mask_token.grad is not None and enc.mask_token.grad.abs().max() == 0
    enc.zero_grad()
    enc(x, some)[-1].pow(2).sum().backward()
    assert enc.mask_token.grad.abs().max() > 0


def test_bad_mask_shape_raises():
    enc = build_nnformer_encoder(TINY, in_channels=1)
    with pytest.raises(ValueError, match="stem-output grid"):
        enc(torch.randn(1, 1, 64, 64, 32), torch.zeros(1, 8, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="stem-output grid"):  # right size, wrong layout
        enc(torch.randn(1, 1, 64, 64, 32), torch.zeros(1, 16, 8, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="stem-output grid"):
        enc(torch.randn(1, 1, 64, 64, 32), torch.zeros(1, 16, 16, 16))


# ------------------------------------------------------------------- training


def test_gradient_checkpointing_matches_plain():
    model = tiny()
    ckpt = tiny(use_checkpoint=True)
    ckpt.load_state_dict(model.state_dict())
    model.train()
    ckpt.train()
    x = torch.randn(1, 1, 32, 32, 16)
    outs_a, outs_b = model(x), ckpt(x)
    sum(o.square().mean() for o in outs_a).backward()
    sum(o.square().mean() for o in outs_b).backward()
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_sgd_steps_lower_dice_ce_loss():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    model = tiny(out_channels=2).train()
    y = torch.zeros(2, 1, 32, 32, 16)
    y[0, :, 4:20, 8:24, 2:10] = 1
    y[1, :, 12:28, 4:16, 6:14] = 1
    x = y + 0.1 * torch.randn_like(y)  # bright foreground
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    weights = [1.0, 0.5, 0.25]

    def loss_of(outs):
        total = 0.0
        for w, out in zip(weights, outs):
            target = F.interpolate(y, size=out.shape[2:], mode="nearest")
            total = total + w * loss_fn(out, target)
        return total / sum(weights)

    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_of(model(x))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


# ------------------------------------------------------------------- export


@pytest.mark.parametrize("size", [(64, 64, 32), (160, 64, 32)])
def test_trace_in_eval_matches_eager(size):
    model = tiny().eval()
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        out = traced(x)
        ref = model(x)
        assert torch.is_tensor(out) and out.shape == (1, 3, *size)
        torch.testing.assert_close(out, ref)
        x2 = torch.randn(1, 1, *size)
        torch.testing.assert_close(traced(x2), model(x2))


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        model = build_nnformer("nnformer", in_channels=1, out_channels=9)
    n = sum(p.numel() for p in model.parameters())
    # paper: ~150.5M for Synapse (9 classes); the encoder alone is most of it
    assert abs(n - 150.5e6) / 150.5e6 < 0.01, n
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    assert 0.7 * n < n_enc < 0.85 * n


MODULE = Path(nnf.__file__)


def test_module_imports_only_torch_and_stdlib():
    tree = ast.parse(MODULE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in a standalone module"
            roots.add(node.module.split(".")[0])
    assert roots, "no imports found: the scan is broken"
    allowed = set(sys.stdlib_module_names) | {"torch"}
    assert roots <= allowed, roots - allowed
    assert "torch" in roots and "__future__" in roots


def test_module_runs_without_alice3d(tmp_path):
    shutil.copy(MODULE, tmp_path / "standalone_nnformer.py")
    script = textwrap.dedent(
        """
        import importlib.abc, sys
        BLOCKED = {"alice3d", "landmark", "monai", "einops", "timm"}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked " + name)
                return None

        sys.meta_path.insert(0, Block())
        for name in list(sys.modules):
            if name.split(".")[0] in BLOCKED:
                del sys.modules[name]
        import torch
        torch.set_num_threads(1)
        import standalone_nnformer as m
        net = m.build_nnformer("nnformer_tiny", 1, 2).eval()
        with torch.no_grad():
            out = net(torch.randn(1, 1, 32, 32, 16))
        assert out.shape == (1, 2, 32, 32, 16)
        assert not any(k.split(".")[0] in BLOCKED for k in sys.modules)
        print("ok")
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
