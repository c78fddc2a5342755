"""MAE baseline and the shared MAE decoder, in 2D and 3D."""

import pytest
import torch
from monai.networks.nets import UNETR, ViT

from alice3d.config import ConfigError
from alice3d.core.losses import masked_mse
from alice3d.core.masking import random_masking
from alice3d.core.patches import patchify
from alice3d.core.pos_embed import sincos_pos_embed
from alice3d.methods.decoder import MAEDecoder
from alice3d.methods.mae import MAE, MAEConfig
from helpers import TINY_VIT, TINY_VIT_WIDTH

SIZES = {3: ((32, 32, 16), 8), 2: ((32, 32), 8)}


def tiny_mae(nd=3, seed=0, **kw):
    size, patch = SIZES[nd]
    args = dict(encoder="vit_tiny", encoder_kwargs=dict(TINY_VIT), img_size=size, patch_size=patch,
                spatial_dims=nd, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    args.update(kw)
    torch.manual_seed(seed)
    return MAE(MAEConfig(**args))


def tiny_batch(nd=3, b=2, seed=1):
    return {"image": torch.rand(b, 1, *SIZES[nd][0], generator=torch.Generator().manual_seed(seed))}


@pytest.mark.parametrize("nd", [2, 3])
def test_loss_is_masked_norm_pix_mse_of_the_prediction(nd):
    model = tiny_mae(nd).eval()
    batch = tiny_batch(nd)
    torch.manual_seed(7)
    out = model(batch)
    assert set(out) == {"loss", "loss_rec"} and out["loss"].requires_grad
    torch.manual_seed(7)
    masking = random_masking(2, model.encoder.num_tokens, 0.75)
    with torch.no_grad():
        pred = model.reconstruct(batch["image"], masking)
    expected = masked_mse(pred, patchify(batch["image"], 8), masking.mask, norm_pix=True)
    torch.testing.assert_close(out["loss_rec"], expected)


@pytest.mark.parametrize("nd", [2, 3])
def test_gradients_and_a_few_steps_lower_the_loss(nd):
    model = tiny_mae(nd)
    batch = tiny_batch(nd)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss():
        torch.manual_seed(11)
        return model(batch)["loss"]

    with torch.no_grad():
        first = float(loss())
    for _ in range(8):
        opt.zero_grad()
        loss().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
    with torch.no_grad():
        last = float(loss())
    assert last < first - 0.05, (first, last)
    assert model.update_target(1, 10) is None
    # MAE keeps the sin-cos position embedding fixed.
    assert not model.encoder.patch_embedding.position_embeddings.requires_grad


def test_decoder_shapes_buffer_and_mask_token_slots():
    torch.manual_seed(0)
    dec = MAEDecoder(num_tokens=32, grid=(4, 4, 2), encoder_dim=48, decoder_dim=24, depth=1, num_heads=2, out_dim=512)
    assert "pos_embed" in dec.state_dict() and "pos_embed" not in dict(dec.named_parameters())
    torch.testing.assert_close(dec.state_dict()["pos_embed"], sincos_pos_embed((4, 4, 2), 24)[None])
    m = random_masking(2, 32, 0.75, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, m.num_keep, 48)
    feats, pred = dec(x, m.ids_restore)
    assert feats.shape == (2, 32, 24) and pred.shape == (2, 32, 512)
    # Masked slots all start from the same mask token: with the blocks removed, the embedded
    # input at a masked slot is mask_token + pos.
    dec.blocks = torch.nn.ModuleList()
    feats, _ = dec(x, m.ids_restore)
    slot = m.ids_masked[0, 0]
    torch.testing.assert_close(feats[0, slot], dec.norm(dec.mask_token[0, 0] + dec.pos_embed[0, slot]))
    with pytest.raises(ValueError, match="grid"):
        MAEDecoder(num_tokens=30, grid=(4, 4, 2), encoder_dim=48, decoder_dim=24, depth=1, num_heads=2, out_dim=8)
    assert MAEDecoder(32, (4, 4, 2), 48, 24, 1, 2, out_dim=0)(x, m.ids_restore)[1] is None


@pytest.mark.parametrize("nd", [2, 3])
def test_preview(nd):
    model = tiny_mae(nd)
    panels = model.preview(tiny_batch(nd))
    assert set(panels) == {"input", "masked", "reconstruction"}
    assert all(a.shape == SIZES[nd][0] for a in panels.values())
    hidden = panels["masked"] == 0
    assert 0.5 < hidden.mean() < 0.9  # about 75 % of the patches are masked


def test_encoder_state_loads_into_unetr_and_monai_vit_2d():
    model = tiny_mae(3, img_size=(32, 32, 32), patch_size=16, encoder_kwargs=dict(TINY_VIT, num_layers=12))
    state, meta = model.encoder_state()
    UNETR(1, 2, (32, 32, 32), feature_size=8, **TINY_VIT_WIDTH).vit.load_state_dict(
        state, strict=True
    )
    assert meta["method"] == "mae" and meta["kind"] == "vit"
    state2d, _ = tiny_mae(2).encoder_state()
    ViT(1, (32, 32), 8, spatial_dims=2, **TINY_VIT).load_state_dict(
        state2d, strict=True
    )


def test_errors():
    model = tiny_mae(3)
    with pytest.raises(ValueError, match="'image'"):
        model({"q": torch.rand(1, 1, 32, 32, 16)})
    with pytest.raises(ValueError, match=r"batch\['image'\]"):
        model({"image": torch.rand(1, 1, 32, 32)})
    with pytest.raises(ConfigError, match="encoder_kwargs"):
        tiny_mae(3, encoder_kwargs={"depth": 3})
    with pytest.raises(ConfigError, match=r"mae\.encoder: expected one of \[.*'swin_b'.*\], got 'vit_huge'"):
        tiny_mae(3, encoder="vit_huge")
    with pytest.raises(ConfigError, match="multiples of patch_size"):
        tiny_mae(3, img_size=(30, 32, 16))
    with pytest.raises(ConfigError, match="mask_ratio"):
        tiny_mae(3, mask_ratio=1.0)
