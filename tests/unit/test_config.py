from dataclasses import dataclass

import pytest
import yaml

from alice3d.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    load_config,
    parse_override,
    save_config,
    section,
    to_dict,
    valid_keys,
)


@dataclass
class Model:
    name: str = "vit_tiny"
    depth: int = 2
    dims: tuple[int, int, int] = (8, 8, 4)


@dataclass
class Cfg:
    train: TrainConfig = section(TrainConfig)
    data: DataConfig = section(DataConfig)
    model: Model = section(Model)


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  max_steps: 7\nmodel:\n  dims: [16, 16, 8]\n")
    cfg = load_config(Cfg, f, ["train.lr=5e-5", "model.name=vit_b", "data.on_bad_data=fail"])
    assert cfg.train.lr == 5e-5  # command line wins over YAML
    assert cfg.train.max_steps == 7  # YAML wins over defaults
    assert cfg.model.dims == (16, 16, 8) and isinstance(cfg.model.dims, tuple)
    assert cfg.model.name == "vit_b" and cfg.data.on_bad_data == "fail"
    assert cfg.train.batch_size == TrainConfig().batch_size


def test_types_are_coerced_and_checked():
    cfg = load_config(Cfg, None, ["train.max_steps=10", "train.amp=false", "model.dims=4,4,2", "data.spacing=[1.5,1.5,2]"])
    assert cfg.train.max_steps == 10 and cfg.train.amp is False
    assert cfg.model.dims == (4, 4, 2) and cfg.data.spacing == (1.5, 1.5, 2.0)
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(Cfg, None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match="model.dims: expected 3 values"):
        load_config(Cfg, None, ["model.dims=4,4"])


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, ["train.learning_rate=1"])
    assert "train.learning_rate" in str(e.value) and "train.lr" in str(e.value)
    f = tmp_path / "bad.yaml"
    f.write_text("modle:\n  depth: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown config key 'modle'"):
        load_config(Cfg, f)


def test_bad_yaml_and_bad_override(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(Cfg, f)
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "missing.yaml")


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(Cfg, None, ["train.seed=3", "model.dims=2,2,2"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Cfg, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["seed"] == 3


def test_valid_keys_cover_the_shared_override_contract():
    keys = valid_keys(Cfg)
    for k in ["train.max_steps", "train.batch_size", "train.lr", "train.seed", "train.ckpt_every",
              "train.device", "data.on_bad_data"]:
        assert k in keys
