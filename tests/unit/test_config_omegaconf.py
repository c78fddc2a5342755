"""What the OmegaConf-based config machinery adds or keeps: interpolation, the fallbacks for
annotations OmegaConf cannot type, made dataclasses, exact YAML round trips."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import pytest
import yaml

from alice3d.config import (
    ConfigError,
    TrainConfig,
    apply_dict,
    from_dict,
    load_config,
    parse_override,
    save_config,
    section,
    to_dict,
    valid_keys,
)


@dataclass
class Net:
    windows: tuple[tuple[float, float], ...] = ((-250.0, 350.0),)  # OmegaConf has no tuple-of-tuples type
    norm: Literal["batch", "none"] = "batch"
    size: Union[int, list[int]] = 4  # a union with a container: no OmegaConf type either
    pair: tuple[int, str] = (1, "a")  # heterogeneous
    kwargs: dict[str, Any] = field(default_factory=dict)
    per_organ: dict[str, float] = field(default_factory=dict)
    handle: Any = None
    later: list[int] = None  # type: ignore[assignment]  # a None default makes it optional
    name: str = "net"

    @property
    def in_channels(self) -> int:
        return 1 + len(self.windows)


@dataclass
class Cfg:
    train: TrainConfig = section(lambda: TrainConfig(max_steps=40))
    net: Net = section(Net)
    out: str = ""

    def validate(self) -> None:
        if self.train.warmup_steps > self.train.max_steps:
            raise ConfigError("train.warmup_steps: expected at most train.max_steps")


def test_interpolation_resolves_after_the_last_layer(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  warmup_steps: ${train.max_steps}\n  lr: ${.min_lr}\nout: ${oc.env:ALICE3D_TEST_OUT}/run\n")
    monkeypatch.setenv("ALICE3D_TEST_OUT", "/scratch")
    cfg = load_config(Cfg, f, ["train.max_steps=7", "train.min_lr=0.25"])
    # the YAML refers to a value the command line sets later; the typed node converts the result
    assert cfg.train.warmup_steps == 7 and isinstance(cfg.train.warmup_steps, int)
    assert cfg.train.lr == 0.25 and cfg.out == "/scratch/run"
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: .*train\.nope"):
        load_config(Cfg, None, ["train.warmup_steps=${train.nope}"])
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: .*'auto'"):
        load_config(Cfg, None, ["train.warmup_steps=${train.device}"])


def test_fields_omegaconf_cannot_type_are_converted_and_checked():
    cfg = load_config(Cfg, None, ["net.windows=[[-100, 200], [0, 80]]", "net.norm=none", "net.size=[2,3]",
                                  "net.pair=[5, b]"])
    assert cfg.net.windows == ((-100.0, 200.0), (0.0, 80.0)) and isinstance(cfg.net.windows[0], tuple)
    assert isinstance(cfg.net.windows[0][0], float) and cfg.net.in_channels == 3
    assert cfg.net.norm == "none" and cfg.net.size == [2, 3] and cfg.net.pair == (5, "b")
    assert load_config(Cfg, None, ["net.size=9"]).net.size == 9
    assert load_config(Cfg).net.later is None and load_config(Cfg, None, ["net.later=3,4"]).net.later == [3, 4]
    for override, message in {
        "net.windows=[[1, 2, 3]]": r"net\.windows: expected 2 values, got \[1\.0, 2\.0, 3\.0\]",
        "net.norm=group": r"net\.norm: expected one of \['batch', 'none'\], got 'group'",
        "net.size=big": r"net\.size: expected an integer or a list \(an integer each\), got 'big'",
        "net.pair=[x, b]": r"net\.pair: expected an integer, got 'x'",
        "net.per_organ={liver: far}": r"net\.per_organ\.liver: expected a number, got 'far'",
    }.items():
        with pytest.raises(ConfigError, match=message):
            load_config(Cfg, None, [override])


def test_wrong_types_name_the_key_and_the_expected_type(tmp_path):
    for override, message in {
        "train.amp=maybe": "train.amp: expected true/false, got 'maybe'",
        "train.lr=fast": "train.lr: expected a number, got 'fast'",
        "train.betas=0.9,x": r"train.betas: expected a list of 2 values, got \['0.9', 'x'\]",
        "train=5": r"train: expected a mapping \(a config section: TrainConfig\), got 5",
        "train.lr.x=1": r"train.lr: expected a number, got \{'x': 1\}",
    }.items():
        with pytest.raises(ConfigError, match=message):
            load_config(Cfg, None, [override])
    f = tmp_path / "typo.yaml"
    f.write_text("net:\n  norm: batch\n  widths: [1]\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'net.widths'. Valid keys: train.max_steps"):
        load_config(Cfg, f)


def test_what_the_hand_written_parser_accepted_still_works(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("out:\ntrain:\n  max_steps: 12.0\n  lr: 1e-4\n")  # empty value, integral float, 1e-4
    cfg = load_config(Cfg, f, ["net.name=", "train.betas=0.8,0.9", "train.warmup_steps=3"])
    assert cfg.out == "" and cfg.net.name == "" and cfg.train.max_steps == 12 and cfg.train.lr == 1e-4
    assert cfg.train.betas == (0.8, 0.9)
    assert parse_override("net.name=[1,2") == {"net": {"name": "[1,2"}}  # not YAML: kept as text
    with pytest.raises(ConfigError, match="at most train.max_steps"):  # validate() still runs
        load_config(Cfg, None, ["train.warmup_steps=50"])


def test_a_mapping_field_is_replaced_not_merged():
    cfg = load_config(Cfg, None, ["net.kwargs={a: 1, b: [1, 2]}", "net.kwargs={c: 3}"])
    assert cfg.net.kwargs == {"c": 3}
    assert load_config(Cfg, None, ["net.kwargs={a: 1}", "net.kwargs={}"]).net.kwargs == {}


def test_apply_dict_updates_in_place_and_keeps_objects_in_any_fields():
    marker = object()
    cfg = Cfg(net=Net(handle=marker))
    net = cfg.net
    assert apply_dict(cfg, {"net": {"size": 8}, "train": {"seed": 2}}) is cfg
    assert cfg.net is net and net.size == 8 and cfg.train.seed == 2 and net.handle is marker
    assert from_dict(Net, {"windows": [[0, 1]]}).windows == ((0.0, 1.0),)


def test_save_config_reads_back_exactly_and_stays_plain_yaml(tmp_path):
    # strings that YAML loaders would read as a number, a bool, null or an interpolation
    cfg = load_config(Cfg, None, ["net.name='1e-4'", "out='true'", "net.kwargs={path: '\\${HOME}', n: 'null'}"])
    assert cfg.net.name == "1e-4" and cfg.out == "true" and cfg.net.kwargs == {"path": "${HOME}", "n": "null"}
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Cfg, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg) and again.net.windows == ((-250.0, 350.0),)
    plain = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(plain) == ["train", "net", "out"]
    assert list(plain["train"]) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert plain["train"]["max_steps"] == 40 and plain["net"]["windows"] == [[-250.0, 350.0]]


def test_made_dataclasses_work_like_written_ones(tmp_path):
    made = dataclasses.make_dataclass("Made", [
        ("method", str, field(default="alice")),
        ("loose", "typing.Any", field(default=2)),  # what make_dataclass records for a field without a type
        ("spacing", "tuple[float, ...]", field(default=(1.0,))),
        ("train", TrainConfig, section(TrainConfig)),
    ])
    assert valid_keys(made)[:4] == ["method", "loose", "spacing", "train.max_steps"]
    cfg = load_config(made, None, ["loose=[1, x]", "spacing=2,3", "train.lr=0.5"])
    assert type(cfg) is made and cfg.loose == [1, "x"] and cfg.spacing == (2.0, 3.0) and cfg.train.lr == 0.5
    save_config(cfg, tmp_path / "made.yaml")
    assert to_dict(load_config(made, tmp_path / "made.yaml")) == to_dict(cfg)
    with pytest.raises(ConfigError, match=r"unknown config key 'methd'. Valid keys: method, loose, spacing"):
        load_config(made, None, ["methd=mae"])
