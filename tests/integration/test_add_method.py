"""Adding a method is one method file + one YAML recipe + one registry line, nothing else.

The toy method is the README's "Adding a method" example (`EXAMPLE`, verbatim), written into a
temporary package on sys.path; `register_method` is its one registry line. It then trains two
steps through `alice3d-pretrain` (config section, `--help` keys, config.yaml and resume all
derived from the registry), and its pixel head fits every encoder, nnFormer's anisotropic
unit and two input channels included.
"""

from __future__ import annotations

import importlib
import json
import math
import sys

import pytest
import torch
import yaml

from alice3d.cli.pretrain import build_parser, main
from alice3d.config import ConfigError, load_config, valid_keys
from alice3d.encoders.files import load_encoder
from alice3d.methods import METHODS, MethodEntry, register_method, unregister_method
from alice3d.pretrain.config import PretrainConfig

EXAMPLE = '''# alice3d/methods/mymim.py
from dataclasses import dataclass

import torch

from alice3d.config import check_ratio
from alice3d.core.losses import masked_mse
from alice3d.core.masking import random_masking
from alice3d.core.patches import patchify
from alice3d.encoders.backbone import BackboneConfig, build_backbone
from alice3d.methods.base import PretrainMethod, check_images, encoder_export
from alice3d.methods.common import TINY_VIT


@dataclass
class MyMIMConfig(BackboneConfig):  # encoder, encoder_kwargs, img_size, patch_size, ... for free
    mask_ratio: float = 0.6

    def validate(self, prefix: str = "mymim") -> None:
        self.validate_backbone(prefix, needs={"dense"}, method="MyMIM")  # any encoder with a dense forward
        check_ratio(f"{prefix}.mask_ratio", self.mask_ratio)


def cpu_config() -> MyMIMConfig:  # the `mymim:` section of `alice3d-pretrain` without a recipe
    return MyMIMConfig(encoder="vit_tiny", img_size=(64, 64, 32))


TINY = dict(TINY_VIT)  # overrides of cpu_config() for a ~0.1 s step in the contract tests


class MyMIM(PretrainMethod):
    def __init__(self, cfg: MyMIMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cfg.validate()
        self.encoder = build_backbone(cfg)
        # nnFormer's encoder owns its mask token (it is part of its weights); the others get one here.
        self.mask_token = None
        if not self.encoder.has_mask_token:
            self.mask_token = torch.nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
        # One value per voxel and channel of a mask unit: prod(patch_size) * in_channels
        # (nnFormer's unit is anisotropic, e.g. 32x32x16; Swin's is 32 per axis).
        self.head = torch.nn.Linear(self.encoder.hidden_size, self.encoder.patch_dim)

    def forward(self, batch):
        x = check_images(batch, "image", self.encoder)
        m = random_masking(x.shape[0], self.encoder.num_tokens, self.cfg.mask_ratio, device=x.device)
        pred = self.head(self.encoder.encode_dense(x, m.mask, self.mask_token))
        loss = masked_mse(pred, patchify(x, self.encoder.patch_size), m.mask)
        return {"loss": loss, "loss_rec": loss.detach()}

    def encoder_state(self):
        return encoder_export(self.encoder.net, "mymim")
'''

RECIPE = """\
# MyMIM: SimMIM-style dense mask tokens, pixel loss on the masked patches.
method: mymim
train:
  lr: 1.5e-4
  warmup_steps: 1
mymim:
  encoder: vit_tiny
  img_size: [64, 64, 32]
  mask_ratio: 0.5
"""


@pytest.fixture
def mymim(tmp_path, monkeypatch):
    """The example as package `toy_methods`, registered as "mymim" for the test only."""
    pkg = tmp_path / "toy_methods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mymim.py").write_text(EXAMPLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("toy_methods.mymim")
    register_method("mymim", MethodEntry(module.MyMIM, module.MyMIMConfig, "images", module.cpu_config, module.TINY))
    try:
        yield module
    finally:
        unregister_method("mymim")
        for name in ("toy_methods.mymim", "toy_methods"):
            sys.modules.pop(name, None)


@pytest.fixture
def cohort(tmp_path):
    from alice3d.data.phantom import generate_cohort

    return generate_cohort(tmp_path / "cohort", n=2, seed=0, size="tiny", shape=(64, 64, 40), spacing=(4.0, 4.0, 4.0),
                           workers=1, progress=False)


def tiny_overrides(entry: MethodEntry, name: str) -> list[str]:
    return [f"{name}.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in entry.tiny.items()]


def test_a_method_in_its_own_package_trains_through_alice3d_pretrain(mymim, cohort, tmp_path):
    torch.set_num_threads(1)
    recipe = tmp_path / "mymim_3d.yaml"
    recipe.write_text(RECIPE)
    # The config and --help follow the registry.
    assert "mymim.mask_ratio" in valid_keys(PretrainConfig) and "mymim.encoder_kwargs" in valid_keys(PretrainConfig)
    assert "mymim.mask_ratio" in build_parser().format_help()
    assert PretrainConfig().mymim == mymim.MyMIMConfig(encoder="vit_tiny", img_size=(64, 64, 32))
    run = tmp_path / "run"
    common = ["--config", str(recipe), "--data", str(cohort / "dataset_0.json"), "--out", str(run),
              *tiny_overrides(METHODS["mymim"], "mymim"), "data.spacing=[4,4,4]", "train.batch_size=1",
              "train.device=cpu", "train.ckpt_every=0", "train.preview_every=0"]
    with pytest.raises(SystemExit) as e:
        main([*common, "train.max_steps=2"])
    assert e.value.code == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == "mymim" and saved["mymim"]["mask_ratio"] == 0.5
    assert saved["mymim"]["img_size"] == [32, 32, 16] and saved["mymim"]["patch_size"] == 8
    assert list(saved)[:6] == ["method", "landmark", "train", "data", "pairs", "slices"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps[-1] == 2
    state, meta = load_encoder(run / "encoder.pt")
    assert meta["method"] == "mymim" and meta["arch"] == "vit" and meta["crop_size"] == [32, 32, 16]
    # The written config reads back into the same config, and the run continues with it.
    assert load_config(PretrainConfig, run / "config.yaml").mymim.mask_ratio == 0.5
    with pytest.raises(SystemExit) as e:
        main([*common, "train.max_steps=3", "--resume"])
    assert e.value.code == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps[-1] == 3


def test_an_unregistered_method_is_gone_from_the_config():
    assert "mymim" not in METHODS and "mymim.mask_ratio" not in valid_keys(PretrainConfig)
    with pytest.raises(ConfigError, match=r"method: expected one of \[.*'mae'.*\], got 'mymim'"):
        load_config(PretrainConfig, None, ["method=mymim"])
    with pytest.raises(ConfigError, match=r"unknown config key 'mymim'"):
        load_config(PretrainConfig, None, ["mymim.mask_ratio=0.5"])


def test_registry_refuses_a_taken_or_reserved_name(mymim):
    entry = METHODS["mymim"]
    with pytest.raises(ValueError, match="registered already"):
        register_method("mymim", entry)
    with pytest.raises(ConfigError, match=r"\['train'\] would replace PretrainConfig's own keys"):
        register_method("train", entry)
    assert "train" not in METHODS and isinstance(PretrainConfig().train.max_steps, int)


# Head widths by hand: ViT patch 8 with 2 channels 8*8*8*2; Swin unit 2*16 = 32 per axis;
# nnFormer unit (4, 4, 2) * 2**3 = (32, 32, 16), where patch_size[0] ** 3 would give 32768.
HEADS = {
    "vit_2ch": (dict(encoder="vit_tiny", in_channels=2), 1024),
    "swin": (dict(encoder="swin_tiny", encoder_kwargs={"window_size": 4}, img_size=(64, 64, 32)), 32768),
    "nnformer": (dict(encoder="nnformer_tiny", encoder_kwargs={}, img_size=(64, 64, 32)), 16384),
}


@pytest.mark.parametrize("case", sorted(HEADS))
def test_the_example_head_fits_every_encoder(mymim, case):
    torch.set_num_threads(1)
    overrides, width = HEADS[case]
    cfg = METHODS["mymim"].tiny_config(**overrides)
    torch.manual_seed(0)
    model = mymim.MyMIM(cfg)
    assert model.head.out_features == width == math.prod(model.encoder.patch_size) * cfg.in_channels
    out = model({"image": torch.rand(2, cfg.in_channels, *cfg.img_size)})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and not out["loss_rec"].requires_grad
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    state, meta = model.encoder_state()
    assert meta["method"] == "mymim" and ("mask_token" in state) == (case == "nnformer")
