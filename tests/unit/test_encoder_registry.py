"""The encoder registry and the token interface: shapes, masked-content isolation, presets, kwargs."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets.swin_unetr import SwinTransformer

from alice3d.config import ConfigError
from alice3d.core.masking import random_masking
from alice3d.encoders.backbone import BackboneConfig, build_backbone, unit_size
from alice3d.encoders.registry import ENCODERS, encoder_from_args, family_of, feature_dim, preset_names
from alice3d.encoders.resnet import ResNetEncoder
from helpers import TINY_VIT

TOKEN_CASES = {
    "vit3d": BackboneConfig(encoder="vit_tiny", img_size=(32, 32, 16), patch_size=8,
                            encoder_kwargs=dict(TINY_VIT)),
    "vit2d": BackboneConfig(encoder="vit_tiny", img_size=(32, 32), patch_size=8, spatial_dims=2,
                            encoder_kwargs=dict(TINY_VIT)),
    "swin3d": BackboneConfig(encoder="swin_tiny", img_size=(64, 64, 32), encoder_kwargs={"window_size": 4}),
    "swin2d": BackboneConfig(encoder="swin_tiny", img_size=(64, 64), spatial_dims=2, encoder_kwargs={"window_size": 4}),
    "nnformer3d": BackboneConfig(encoder="nnformer_tiny", img_size=(64, 64, 32)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def built(case: str):
    cfg = TOKEN_CASES[case]
    cfg.validate_backbone("model")
    torch.manual_seed(0)
    return build_backbone(cfg).eval()


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_token_forwards_have_the_documented_shapes(case):
    enc = built(case)
    cfg = TOKEN_CASES[case]
    assert enc.patch_size == unit_size(cfg)
    assert enc.grid == tuple(s // u for s, u in zip(cfg.img_size, enc.patch_size))
    x = torch.rand(2, 1, *cfg.img_size)
    masking = random_masking(2, enc.num_tokens, 0.5, generator=torch.Generator().manual_seed(0))
    token = None if enc.has_mask_token else torch.zeros(1, 1, enc.embed_dim)
    with torch.no_grad():
        assert enc.encode_full(x).shape == (2, enc.num_tokens, enc.hidden_size)
        assert enc.encode_visible(x, masking).shape == (2, masking.num_keep, enc.hidden_size)
        assert enc.encode_dense(x, masking.mask, token).shape == (2, enc.num_tokens, enc.hidden_size)
    assert enc.hidden_size == feature_dim(enc.metadata()["kind"], enc.metadata())


@pytest.mark.parametrize("case", ["vit3d", "vit2d", "swin3d", "swin2d"])
def test_masked_content_never_reaches_the_outputs(case):
    """Visible-only and dense-masked forwards must not read the voxels of masked units."""
    enc = built(case)
    cfg = TOKEN_CASES[case]
    x = torch.rand(1, 1, *cfg.img_size)
    masking = random_masking(1, enc.num_tokens, 0.5, generator=torch.Generator().manual_seed(3))
    hidden = masking.mask.reshape(1, 1, *enc.grid)
    for axis, p in enumerate(enc.patch_size):
        hidden = hidden.repeat_interleave(p, dim=2 + axis)
    y = torch.where(hidden, torch.rand_like(x) * 5, x)  # only masked units change
    token = torch.randn(1, 1, enc.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_visible(x, masking), enc.encode_visible(y, masking))
        torch.testing.assert_close(enc.encode_dense(x, masking.mask, token), enc.encode_dense(y, masking.mask, token))
        assert not torch.allclose(enc.encode_full(x), enc.encode_full(y))


def test_swin_dense_forward_is_monais_and_the_mask_token_lands_where_masked():
    enc = built("swin3d")
    x = torch.rand(1, 1, 64, 64, 32)
    with torch.no_grad():
        for ours, theirs in zip(enc.net(x), SwinTransformer.forward(enc.net, x)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        none_masked = torch.zeros(1, enc.num_tokens, dtype=torch.bool)
        torch.testing.assert_close(enc.encode_dense(x, none_masked, torch.zeros(1, 1, enc.embed_dim)),
                                   enc.encode_full(x))


def test_presets_kwargs_and_forwards_of_the_registry():
    assert family_of("vit_b").kind == "vit" and family_of("swin_b").kind == "swin"
    assert family_of("resnet18").kind == "resnet" and family_of("vit_huge") is None
    # Fields of BackboneConfig are not encoder_kwargs (one place sets each argument).
    assert "img_size" not in ENCODERS["vit"].kwargs() and "num_layers" in ENCODERS["vit"].kwargs()
    assert "in_channels" not in ENCODERS["swin"].kwargs() and "window_size" in ENCODERS["swin"].kwargs()
    assert preset_names({"cls"}) == sorted(ENCODERS["vit"].presets)
    assert preset_names({"conv"}) == sorted(ENCODERS["resnet"].presets)
    assert set(preset_names({"dense"})) == set(ENCODERS["vit"].presets) | set(ENCODERS["swin"].presets) | set(
        ENCODERS["nnformer"].presets)


def test_encoder_from_saved_args_rebuilds_the_same_weights_layout():
    for case in ("vit3d", "swin3d", "nnformer3d"):
        enc = built(case)
        meta = enc.metadata()
        rebuilt = encoder_from_args(meta["kind"], meta)
        rebuilt.load_state_dict(enc.net.state_dict(), strict=True)
    res = build_backbone(BackboneConfig(encoder="resnet18_tiny", img_size=(32, 32, 32)))
    assert isinstance(res, ResNetEncoder)
    encoder_from_args("resnet", res.metadata()).load_state_dict(res.state_dict(), strict=True)


@pytest.mark.parametrize("overrides, message", [
    ({"encoder": "vit_huge"}, r"model\.encoder: expected one of"),
    ({"encoder": "swin_tiny", "encoder_kwargs": {"num_layers": 2}}, r"model\.encoder_kwargs: unknown keys \['num_layers'\]"),
    ({"encoder": "swin_tiny", "img_size": (64, 48, 32)}, r"model\.img_size: .* Swin mask unit"),
    ({"encoder": "vit_tiny", "img_size": (30, 32, 16), "patch_size": 8}, r"multiples of patch_size=8"),
    ({"encoder": "vit_tiny", "img_size": (32, 32), "spatial_dims": 3}, r"model\.img_size: expected 3 sizes"),
    ({"encoder": "vit_tiny", "img_size": (8, 8, 8), "patch_size": 8}, r"single mask unit"),
])
def test_backbone_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        BackboneConfig(**overrides).validate_backbone("model")
