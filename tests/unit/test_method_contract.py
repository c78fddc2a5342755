"""The method contract, checked for every registered method, and method x encoder pairs.

Every entry of `alice3d.methods.METHODS` must build from its `PretrainConfig` section, return
`{"loss": <grad>, <detached scalars>}`, give every trainable parameter a gradient, export an
encoder whose state dict loads strict into the MONAI network of its family, and preview.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from monai.networks.nets import ResNet, SwinUNETR, ViT

from alice3d.config import ConfigError, load_config, valid_keys
from alice3d.encoders.backbone import BackboneConfig
from alice3d.methods import DATASET_KINDS, METHODS, PretrainMethod
from alice3d.pretrain.config import PretrainConfig

# Per method: the registry's tiny sizes (`MethodEntry.tiny`), one step in ~0.1 s.
TINY = {name: dict(entry.tiny) for name, entry in METHODS.items()}
SWIN_TINY = {"encoder": "swin_tiny", "encoder_kwargs": {"window_size": 4}}


pytestmark = pytest.mark.usefixtures("one_thread")


def method_config(name: str, **overrides):
    section = getattr(PretrainConfig(), name)
    return dataclasses.replace(section, **{**TINY[name], **overrides})


METHODS_DIR = Path(__file__).resolve().parents[2] / "alice3d" / "methods"
# Shared pieces every method may import; the other modules of methods/ are methods.
SHARED = {"__init__", "base", "common", "decoder", "views", "casa"}


def batch_for(name: str, cfg, b: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (b, cfg.in_channels, *cfg.img_size)
    if METHODS[name].dataset == "pairs":
        return {"q": torch.rand(shape, generator=g), "k": torch.rand(shape, generator=g),
                "view_seed": torch.arange(b)}
    return {"image": torch.rand(shape, generator=g)}


def monai_home(meta: dict) -> torch.nn.Module:
    """The MONAI network module an exported encoder of this metadata must load into."""
    kind = meta["kind"]
    if kind == "vit":
        return ViT(meta["in_channels"], meta["img_size"], meta["patch_size"], hidden_size=meta["hidden_size"],
                   mlp_dim=meta["mlp_dim"], num_layers=meta["num_layers"], num_heads=meta["num_heads"],
                   spatial_dims=meta["spatial_dims"], classification=False, qkv_bias=meta["qkv_bias"])
    if kind == "swin":
        kwargs = {k: meta[k] for k in ("in_channels", "feature_size", "depths", "num_heads", "spatial_dims",
                                       "window_size", "patch_size", "mlp_ratio", "qkv_bias", "patch_norm",
                                       "downsample", "use_v2")}
        for k in ("depths", "num_heads", "window_size"):
            kwargs[k] = tuple(kwargs[k])
        return SwinUNETR(out_channels=2, **kwargs).swinViT
    if kind == "resnet":
        return ResNet(**meta["monai_resnet"])
    raise AssertionError(f"no MONAI home for {kind}")


def check_contract(name: str, cfg) -> None:
    torch.manual_seed(0)
    model = METHODS[name].method(cfg)
    assert isinstance(model, PretrainMethod)
    model.train()
    out = model(batch_for(name, cfg))
    assert out["loss"].requires_grad and out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    for key, value in out.items():
        if key != "loss" and torch.is_tensor(value):
            assert not value.requires_grad, f"{name}: diagnostic {key!r} is not detached"
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert model.has_unused_parameters or not no_grad, f"{name}: trainable parameters without gradient: {no_grad}"
    model.update_target(1, 10)
    state, meta = model.encoder_state()
    assert meta["method"] == name
    monai_home(meta).load_state_dict(state, strict=True)
    panels = model.preview(batch_for(name, cfg, seed=1))
    assert panels and all(a.ndim == len(cfg.img_size) and a.dtype.kind == "f" for a in panels.values())


def test_registry_entries_are_complete():
    cfg = PretrainConfig()
    for name, entry in METHODS.items():
        assert issubclass(entry.method, PretrainMethod)
        assert issubclass(entry.config, BackboneConfig), f"{name}: its config must be a BackboneConfig"
        assert entry.dataset in DATASET_KINDS
        assert isinstance(getattr(cfg, name), entry.config), f"PretrainConfig has no '{name}' section of its type"
        assert getattr(cfg, name) == entry.default_config(), f"{name}: the section is not the entry's CPU default"
        assert set(entry.tiny) <= {f.name for f in dataclasses.fields(entry.config)}, f"{name}: tiny has unknown keys"


def test_every_registered_method_is_a_pretrain_config_section_with_its_keys():
    keys = valid_keys(PretrainConfig)
    for name, entry in METHODS.items():
        own = valid_keys(entry.config, name + ".")
        assert own and set(own) <= set(keys), f"{name}: keys missing from PretrainConfig"
        size = list(entry.tiny_config().img_size)
        cfg = load_config(PretrainConfig, None, [f"method={name}", f"{name}.img_size={size}"])
        assert cfg.method_config() is getattr(cfg, name) and list(cfg.method_config().img_size) == size


def test_no_method_file_imports_another_method_file():
    """Methods share code through base / common / decoder / views / casa only."""
    methods = {p.stem for p in METHODS_DIR.glob("*.py")} - SHARED
    assert {"alice", "mae", "cae", "ccmim", "convmim", "rmae", "cmae"} <= methods
    offenders = []
    for path in sorted(METHODS_DIR.glob("*.py")):
        if path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                module = "alice3d.methods" + (f".{node.module}" if node.module else "") if node.level else node.module
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[:2] == ["alice3d", "methods"] and len(parts) > 2 and parts[2] in methods:
                    offenders.append(f"{path.name}:{node.lineno} imports {n}")
    assert not offenders, offenders


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_fulfils_the_contract_3d(name):
    check_contract(name, method_config(name))


@pytest.mark.parametrize("name", ["mae", "cae", "ccmim", "rmae", "cmae", "convmim"])
def test_every_image_method_fulfils_the_contract_2d(name):
    size = (32, 32) if name != "convmim" else (64, 64)
    check_contract(name, method_config(name, img_size=size, spatial_dims=2))


@pytest.mark.parametrize("name, dims", [("mae", 2), ("mae", 3), ("rmae", 2), ("rmae", 3), ("cmae", 2), ("cmae", 3),
                                        ("alice", 3)])  # Alice pairs are 3D crops
def test_methods_with_a_swin_encoder_export_into_swinunetr(name, dims):
    size = (64, 64) if dims == 2 else (64, 64, 32)
    check_contract(name, method_config(name, **SWIN_TINY, img_size=size, spatial_dims=dims))


@pytest.mark.parametrize("name", ["mae", "rmae", "cmae"])
def test_methods_with_an_nnformer_encoder(name):
    torch.manual_seed(0)
    cfg = method_config(name, encoder="nnformer_tiny", encoder_kwargs={}, img_size=(64, 64, 32))
    model = METHODS[name].method(cfg)
    out = model(batch_for(name, cfg))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    state, meta = model.encoder_state()
    assert meta["kind"] == "nnformer" and "mask_token" in state


@pytest.mark.parametrize("name, encoder, forward", [
    ("ccmim", "swin_tiny", "cls"), ("cae", "nnformer_tiny", "abs_pos"), ("convmim", "vit_tiny", "conv"),
    ("mae", "resnet18_tiny", "visible"), ("alice", "resnet18_tiny", "visible"),
])
def test_pairs_that_cannot_work_are_refused_naming_the_forward(name, encoder, forward):
    with pytest.raises(ConfigError, match=rf"{name}\.encoder: .* needs the .*{forward}.* forward"):
        load_config(PretrainConfig, None, [f"method={name}", f"{name}.encoder={encoder}",
                                           f"{name}.encoder_kwargs={{}}"])


def test_unknown_encoder_lists_the_usable_presets():
    with pytest.raises(ConfigError, match=r"cmae\.encoder: expected one of \[.*'swin_tiny'.*\], got 'vit_huge'"):
        load_config(PretrainConfig, None, ["method=cmae", "cmae.encoder=vit_huge"])
