"""Alice with Swin and nnFormer online encoders: losses, gradient flow, export, training."""

import pytest
import torch
from monai.networks.nets import SwinUNETR

from alice3d.config import ConfigError
from alice3d.core.masking import masking_from_mask, random_masking
from alice3d.encoders.backbone import build_backbone
from alice3d.encoders.nnformer import NNFormer
from alice3d.encoders.tokens import NNFormerTokens, SwinTokens, ViTTokens
from alice3d.methods.alice import Alice, AliceConfig
from alice3d.methods.views import make_alice_views

# Swin: unit 32^3, crop 64x64x32 -> unit grid (2, 2, 1); nnFormer: total stride (32, 32, 16) -> (2, 2, 2).
BACKBONES = {
    "swin": dict(encoder="swin_tiny", encoder_kwargs={"window_size": 4}, img_size=(64, 64, 32), mask_ratio=0.5),
    "nnformer": dict(encoder="nnformer_tiny", img_size=(64, 64, 32)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(kind, **kw):
    args = dict(
        BACKBONES[kind],
        decoder_dim=24,
        decoder_depth=1,
        decoder_heads=2,
        head_out_dim=32,
        head_hidden_dim=32,
        head_bottleneck_dim=16,
    )
    args.update(kw)
    return AliceConfig(**args)


def tiny_model(kind, seed=0, **kw):
    torch.manual_seed(seed)
    return Alice(tiny_cfg(kind, **kw))


def tiny_batch(kind, b=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = BACKBONES[kind]["img_size"]
    return {"q": torch.rand(b, 1, *size, generator=g), "k": torch.rand(b, 1, *size, generator=g)}


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind", ["swin", "nnformer"])
def test_adapter_shapes_and_units(kind):
    model = tiny_model(kind)
    enc = model.encoder
    assert isinstance(enc, SwinTokens if kind == "swin" else NNFormerTokens)
    unit = (32, 32, 32) if kind == "swin" else (32, 32, 16)
    grid = (2, 2, 1) if kind == "swin" else (2, 2, 2)
    width = 12 * 16 if kind == "swin" else 16 * 8
    assert enc.patch_size == unit and enc.grid == grid and enc.num_tokens == len(torch.zeros(grid).flatten())
    assert enc.hidden_size == width
    # Pixel head: one norm-pix target per unit.
    assert model.decoder.pred.out_features == 32 * 32 * (32 if kind == "swin" else 16)
    x = tiny_batch(kind)["q"]
    masking = random_masking(1, enc.num_tokens, model.cfg.mask_ratio, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = enc.encode_full(x)
        vis = enc.encode_visible(x, masking)
    assert full.shape == (1, enc.num_tokens, width)
    assert vis.shape == (1, masking.num_keep, width)
    assert torch.isfinite(full).all() and torch.isfinite(vis).all()


def test_swin_visible_tokens_ignore_masked_content():
    model = tiny_model("swin")
    x = tiny_batch("swin")["q"]
    mask = torch.tensor([[False, True, True, False]])  # units (0,0) and (1,1) visible
    masking = masking_from_mask(mask)
    y = x.clone()
    y[:, :, :32, 32:] = 5.0  # unit (0, 1)
    y[:, :, 32:, :32] = -5.0  # unit (1, 0)
    with torch.no_grad():
        a = model.encoder.encode_visible(x, masking)
        b = model.encoder.encode_visible(y, masking)
        c = model.encoder.encode_visible(x, masking_from_mask(~mask))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_nnformer_unit_mask_covers_its_stem_cells():
    enc = tiny_model("nnformer").encoder
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 5] = True  # unit (1, 0, 1) of the (2, 2, 2) grid
    stem = enc.stem_mask(mask)
    assert stem.shape == (1, 16, 16, 16)  # stem grid of 64x64x32 at patch stride (4, 4, 2)
    expected = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    expected[0, 8:, :8, 8:] = True
    assert torch.equal(stem, expected)


@pytest.mark.parametrize("kind", ["swin", "nnformer"])
def test_loss_dict_and_total(kind):
    model = tiny_model(kind)
    out = model(tiny_batch(kind))
    for key in ("loss", "loss_rec", "loss_inter", "loss_intra", "rec_q", "rec_k", "inter_cos", "intra_cos"):
        assert key in out and out[key].ndim == 0 and torch.isfinite(out[key]), key
    assert out["loss"].requires_grad
    assert not any(v.requires_grad for k, v in out.items() if k != "loss")
    torch.testing.assert_close(out["loss"].detach(), out["loss_rec"] + out["loss_inter"] + out["loss_intra"])
    torch.testing.assert_close(out["loss_rec"], out["rec_q"] + out["rec_k"])
    assert 0.5 < float(out["rec_q"]) < 2.0  # norm-pix targets, untrained head: about 1


@pytest.mark.parametrize("kind", ["swin", "nnformer"])
def test_gradients_reach_online_modules_but_never_the_target(kind):
    model = tiny_model(kind)
    model(tiny_batch(kind))["loss"].backward()
    for prefix in ("online.encoder.", "online.head.", "decoder.", "dec_proj.", "casa."):
        params = {n: p for n, p in trainable(model).items() if n.startswith(prefix)}
        assert params, prefix
        for name, p in params.items():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert any(p.grad.abs().sum() > 0 for p in params.values()), prefix
    if kind == "nnformer":
        assert model.encoder.net.mask_token.grad.abs().sum() > 0
    target_params = list(model.target.parameters())
    assert target_params and all(not p.requires_grad and p.grad is None for p in target_params)
    assert all(p.grad is not None for p in trainable(model).values())


def test_encoder_state_loads_into_swinunetr():
    model = tiny_model("swin")
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(1.0)
    state, meta = model.encoder_state()
    net = SwinUNETR(**model.encoder.net.swinunetr_kwargs(), out_channels=2)
    net.swinViT.load_state_dict(state, strict=True)
    for name, p in model.encoder.net.state_dict().items():
        torch.testing.assert_close(state[name], p, rtol=0, atol=0)
    assert meta["kind"] == "swin" and meta["method"] == "alice" and meta["mask_unit"] == [32, 32, 32]


def test_encoder_state_loads_into_nnformer():
    model = tiny_model("nnformer")
    with torch.no_grad():
        for p in model.target.parameters():
            p.add_(1.0)
    state, meta = model.encoder_state()
    net = NNFormer.from_metadata(meta, out_channels=2)
    net.encoder.load_state_dict(state, strict=True)
    for name, p in model.encoder.net.state_dict().items():
        torch.testing.assert_close(state[name], p, rtol=0, atol=0)
    assert meta["kind"] == "nnformer" and meta["method"] == "alice" and meta["total_stride"] == [32, 32, 16]


@pytest.mark.parametrize("kind", ["swin", "nnformer"])
def test_a_few_steps_lower_the_loss(kind):
    model = tiny_model(kind)
    batch = tiny_batch(kind)
    views = make_alice_views(batch["q"], batch["k"], model.encoder.num_tokens, model.cfg.mask_ratio,
                             model.cfg.aug, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, rec = [], []
    for step in range(6):
        out = model.forward_views(views)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_target(step, 6)
        losses.append(float(out["loss"].detach()))
        rec.append(float(out["loss_rec"]))
    with torch.no_grad():
        out = model.forward_views(views)
    losses.append(float(out["loss"]))
    rec.append(float(out["loss_rec"]))
    assert losses[-1] < losses[0] - 0.05, losses
    assert rec[-1] < rec[0], rec


def test_vit_presets_keep_the_plain_vit():
    cfg = AliceConfig(encoder="vit_tiny", encoder_kwargs=dict(num_layers=1), img_size=(32, 32, 16), patch_size=8)
    enc = build_backbone(cfg)
    assert isinstance(enc, ViTTokens) and enc.net is enc and enc.metadata()["kind"] == "vit"
    x = torch.rand(1, 1, 32, 32, 16)
    masking = random_masking(1, enc.num_tokens, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_visible(x, masking), enc(x, ids_keep=masking.ids_keep), rtol=0, atol=0)
        torch.testing.assert_close(enc.encode_full(x), enc(x), rtol=0, atol=0)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="img_size.*Swin mask unit"):
        Alice(tiny_cfg("swin", img_size=(64, 48, 32)))
    with pytest.raises(ConfigError, match="img_size.*total stride"):
        Alice(tiny_cfg("nnformer", img_size=(64, 64, 24)))
    with pytest.raises(ConfigError, match="single mask unit"):
        Alice(tiny_cfg("swin", img_size=(32, 32, 32)))
    with pytest.raises(ConfigError, match="encoder_kwargs.*hidden_size"):
        Alice(tiny_cfg("swin", encoder_kwargs={"hidden_size": 8}))
    with pytest.raises(ConfigError, match="alice.encoder"):
        Alice(tiny_cfg("swin", encoder="resnet50"))
    # nnFormer crops follow its total stride, which follows patch_stride.
    cfg = tiny_cfg("nnformer", encoder_kwargs={"patch_stride": [2, 2, 2]}, img_size=(32, 32, 32))
    cfg.validate()
    assert build_backbone(cfg).patch_size == (16, 16, 16)
