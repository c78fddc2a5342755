"""ViTEncoder: MONAI/UNETR weight compatibility, visible-token forward, dense mask mode."""

import pytest
import torch
from monai.networks.nets import UNETR, ViT

from alice3d.core.masking import random_masking
from alice3d.core.patches import patchify, unpatchify
from alice3d.core.pos_embed import sincos_pos_embed
from alice3d.encoders.vit import ViTEncoder, build_vit, vit_configs
from helpers import TINY_VIT
from helpers import TINY_VIT_WIDTH as SMALL

CASES = [(3, (32, 32, 16), 8), (2, (32, 24), 8)]


def small_vit(nd, size, patch, **kw):
    args = dict(TINY_VIT)
    args.update(kw)
    torch.manual_seed(0)
    return ViTEncoder(size, patch, spatial_dims=nd, **args).eval()


def test_strict_load_into_unetr_vit_and_same_outputs():
    torch.manual_seed(0)
    enc = build_vit("vit_tiny", (32, 32, 16), **SMALL).eval()
    unetr = UNETR(1, 3, (32, 32, 16), feature_size=8, **SMALL).eval()
    unetr.vit.load_state_dict(enc.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        ours, hidden = enc(x, return_hidden=True)
        ref, ref_hidden = unetr.vit(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert len(hidden) == 12
    for a, b in zip(hidden, ref_hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The whole UNETR runs on the loaded encoder.
    assert unetr(x).shape == (2, 3, 32, 32, 16)


def test_vit_tiny_preset_loads_into_unetr():
    enc = build_vit("vit_tiny", (32, 32, 32))
    cfg = vit_configs["vit_tiny"]
    unetr = UNETR(1, 2, (32, 32, 32), feature_size=8, hidden_size=cfg["hidden_size"], mlp_dim=cfg["mlp_dim"],
                  num_heads=cfg["num_heads"])
    unetr.vit.load_state_dict(enc.state_dict(), strict=True)
    assert all(c["num_layers"] == 12 for c in vit_configs.values())


def test_strict_load_into_monai_vit_2d_and_same_outputs():
    enc = small_vit(2, (32, 24), 8, num_layers=3, qkv_bias=True)
    ref = ViT(1, (32, 24), 8, num_layers=3, spatial_dims=2, qkv_bias=True, **SMALL).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    x = torch.randn(3, 1, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x)[0], rtol=0, atol=0)


def test_cls_token_uses_monai_key_and_matches_monai_hidden_states():
    enc = small_vit(3, (32, 32, 16), 8, cls_token=True)
    ref = ViT(1, (32, 32, 16), 8, num_layers=2, classification=True, **SMALL).eval()
    missing, unexpected = ref.load_state_dict(enc.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("classification_head") for k in missing)
    x = torch.randn(2, 1, 32, 32, 16)
    with torch.no_grad():
        out, hidden = enc(x, return_hidden=True)
        _, ref_hidden = ref(x)
    assert out.shape == (2, 1 + enc.num_tokens, 48)
    torch.testing.assert_close(hidden[-1], ref_hidden[-1], rtol=0, atol=0)


@pytest.mark.parametrize("nd,size,patch", CASES)
def test_visible_forward_with_all_tokens_equals_full_forward(nd, size, patch):
    enc = small_vit(nd, size, patch)
    x = torch.randn(2, 1, *size)
    ids = torch.arange(enc.num_tokens).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(enc(x, ids_keep=ids), enc(x), rtol=0, atol=0)


@pytest.mark.parametrize("nd,size,patch", CASES)
def test_visible_forward_ignores_masked_patches(nd, size, patch):
    enc = small_vit(nd, size, patch)
    x = torch.randn(2, 1, *size)
    m = random_masking(2, enc.num_tokens, 0.75, generator=torch.Generator().manual_seed(1))
    # Change only the pixels of masked patches.
    noise = patchify(torch.randn_like(x), patch) * m.mask.unsqueeze(-1)
    x2 = x + unpatchify(noise, patch, enc.grid, 1)
    with torch.no_grad():
        a = enc(x, ids_keep=m.ids_keep)
        b = enc(x2, ids_keep=m.ids_keep)
        full = enc(x)
    assert a.shape == (2, m.num_keep, 48)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, full.gather(1, m.ids_keep[..., None].expand(-1, -1, 48)), atol=1e-4)


@pytest.mark.parametrize("nd,size,patch", CASES)
def test_token_order_matches_patchify(nd, size, patch):
    enc = small_vit(nd, size, patch)
    x = torch.randn(1, 1, *size)
    token = 5
    bump = torch.zeros(1, enc.num_tokens, patch**nd)
    bump[0, token] = 1.0
    with torch.no_grad():
        diff = (enc.patch_tokens(x + unpatchify(bump, patch, enc.grid, 1)) - enc.patch_tokens(x)).abs().sum(-1)
    changed = (diff > 1e-6).nonzero()[:, 1].tolist()
    assert changed == [token]


@pytest.mark.parametrize("nd,size,patch", CASES)
def test_dense_mask_mode(nd, size, patch):
    enc = small_vit(nd, size, patch)
    mask_token = torch.randn(1, 1, 48)
    x = torch.randn(2, 1, *size)
    m = random_masking(2, enc.num_tokens, 0.5, generator=torch.Generator().manual_seed(2))
    noise = unpatchify(patchify(torch.randn_like(x), patch) * m.mask.unsqueeze(-1), patch, enc.grid, 1)
    with torch.no_grad():
        dense = enc(x, mask=m.mask, mask_token=mask_token)
        dense2 = enc(x + noise, mask=m.mask, mask_token=mask_token)
        none_masked = enc(x, mask=torch.zeros_like(m.mask), mask_token=mask_token)
        full = enc(x)
        # A masked slot holds mask_token + its own position embedding.
        emb = enc.add_position(torch.where(m.mask[..., None], mask_token.expand(2, enc.num_tokens, 48), enc.patch_tokens(x)))
    assert dense.shape == full.shape
    torch.testing.assert_close(dense, dense2, rtol=0, atol=0)
    torch.testing.assert_close(none_masked, full, rtol=0, atol=0)
    expected = emb
    for blk in enc.blocks:
        expected = blk(expected)
    torch.testing.assert_close(dense, enc.norm(expected))
    with pytest.raises(ValueError, match="mask_token"):
        enc(x, mask=m.mask)


@pytest.mark.parametrize("nd,size,patch", CASES)
def test_position_embedding_is_saved_sincos_and_trainable_flag(nd, size, patch):
    enc = small_vit(nd, size, patch)
    key = "patch_embedding.position_embeddings"
    sd = enc.state_dict()
    torch.testing.assert_close(sd[key], sincos_pos_embed(enc.grid, 48)[None])
    enc.train()
    enc(torch.randn(1, 1, *size)).sum().backward()
    assert enc.patch_embedding.position_embeddings.grad is not None
    frozen = small_vit(nd, size, patch, pos_embed_trainable=False)
    assert key in frozen.state_dict()
    assert not frozen.patch_embedding.position_embeddings.requires_grad


def test_gradient_checkpointing_and_flash_attention_give_same_results():
    # float64 so that the comparison is exact up to rounding, not float32 kernel differences.
    x = torch.randn(2, 1, 32, 32, 16, dtype=torch.float64)
    weights = torch.randn(2, 32, 48, dtype=torch.float64)
    ref = small_vit(3, (32, 32, 16), 8).train().double()
    other = small_vit(3, (32, 32, 16), 8, grad_checkpointing=True, use_flash_attention=True).train().double()
    other.load_state_dict(ref.state_dict())
    (ref(x) * weights).sum().backward()
    (other(x) * weights).sum().backward()
    for (name, a), b in zip(ref.named_parameters(), other.parameters()):
        if not a.requires_grad:
            assert a.grad is None and b.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_every_trainable_parameter_gets_a_gradient():
    enc = small_vit(3, (32, 32, 16), 8).train()
    enc(torch.randn(1, 1, 32, 32, 16)).sum().backward()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for n, p in enc.named_parameters() if n in trainable)
    # The frozen ones are MONAI's unused cross-attention norms, still saved for UNETR.
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert frozen and all("norm_cross_attn" in n for n in frozen)
    assert frozen <= set(enc.state_dict())


def test_metadata_and_errors():
    enc = small_vit(3, (32, 32, 16), 8)
    meta = enc.metadata()
    assert meta["kind"] == "vit" and meta["img_size"] == [32, 32, 16] and meta["patch_size"] == [8, 8, 8]
    assert meta["grid"] == [4, 4, 2] and meta["hidden_size"] == 48 and meta["spatial_dims"] == 3
    with pytest.raises(ValueError, match="img_size"):
        enc(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="vit_b"):
        build_vit("vit_huge", 32)
    with pytest.raises(ValueError, match="divisible"):
        ViTEncoder((30, 32, 16), 8, **SMALL)
