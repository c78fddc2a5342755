"""Typed configs: dataclass defaults, YAML overrides, dotted ``key=value`` overrides.

The dataclasses are the single source of defaults. A YAML file and the command line
only override fields that already exist; an unknown key is an error that lists the
valid keys, so a typo never silently trains with a default.

    cfg = load_config(PretrainConfig, "configs/pretrain/alice_vit_b.yaml", ["train.lr=1e-4"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from alice3d.errors import Alice3DError

T = TypeVar("T")


class ConfigError(Alice3DError, ValueError):
    """A config file or override that does not fit the config schema."""


# ---------------------------------------------------------------- shared sections


@dataclass
class TrainConfig:
    """Loop settings shared by every training command (pretrain, landmark, finetune)."""

    max_steps: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    min_lr: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    grad_clip: float = 3.0  # max grad norm; 0 disables clipping
    grad_accum: int = 1
    seed: int = 0
    ckpt_every: int = 50  # steps between checkpoints
    log_every: int = 1
    preview_every: int = 0  # steps between preview PNGs; 0 = only at the end
    device: str = "auto"  # cpu | cuda | auto
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    # bf16 autocast on the CPU too: ~1.8x faster convolutions on CPUs with native bf16 (AVX512-BF16,
    # AMX), slower on others; off by default so CPU runs stay fp32 and comparable.
    cpu_amp: bool = False
    deterministic: bool = False
    num_workers: int = 0
    max_bad_steps: int = 20  # consecutive non-finite steps before the run stops
    compile: bool = False
    tensorboard: bool = False
    dist_timeout_s: float = 600.0  # a collective waiting longer than this aborts the run
    eval_every: int = 0  # steps between evaluations (commands that evaluate); 0 = only at the end


@dataclass
class DataConfig:
    """Where volumes come from and how they are normalised."""

    data: str = ""  # datalist JSON, directory or volume store; "" = embedded phantom cohort
    on_bad_data: str = "skip"  # skip | fail
    spacing: tuple[float, ...] = (2.0, 2.0, 2.0)  # mm, target voxel spacing
    hu_window: tuple[float, float] = (-125.0, 255.0)  # clipped, then scaled to [0, 1]
    cache: str = "memory"  # memory | none
    phantom_n: int = 16  # subjects in the embedded cohort
    phantom_seed: int = 0
    # Pretraining crops: "auto" reads them from a volume store for a STORE, the embedded cohort
    # and raw data of at least store_min_volumes volumes (preprocessed once into
    # $ALICE3D_CACHE/stores), else from volumes held in memory; "always" / "never" force one.
    store: str = "auto"
    store_min_volumes: int = 32
    store_cache_mb: float = 256.0  # per process: decoded volumes are kept when the whole cohort fits


# ---------------------------------------------------------------- machinery


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cls_or_obj: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a config dataclass, e.g. ``['train.lr', 'train.seed', ...]``."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            keys += valid_keys(tp, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if tp is Any:
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            parsed = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
            value = parsed
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        out = [_coerce(v, elem, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _merge(obj: Any, data: dict, prefix: str, all_keys: list[str]) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for name, value in data.items():
        key = prefix + str(name)
        if name not in types_:
            raise ConfigError(
                f"unknown config key '{key}'. Valid keys: {', '.join(all_keys)}"
            )
        tp = types_[name]
        if _is_dataclass_type(tp):
            _merge(getattr(obj, name), value, key + ".", all_keys)
        else:
            setattr(obj, name, _coerce(value, tp, key))


def apply_dict(cfg: T, data: dict) -> T:
    """Override fields of ``cfg`` in place from a nested dict; unknown keys raise."""
    _merge(cfg, data or {}, "", valid_keys(cfg))
    return cfg


def parse_override(text: str) -> dict:
    """``"train.lr=1e-4"`` -> ``{"train": {"lr": 1e-4}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return nested


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    for text in overrides:
        apply_dict(cfg, parse_override(text))
    return cfg


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Defaults of ``cls`` <- YAML file <- dotted overrides."""
    cfg = cls()
    if path:
        try:
            apply_dict(cfg, read_yaml(path))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    apply_overrides(cfg, overrides)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    return apply_dict(cls(), data)


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")


def check_ratio(key: str, value: float) -> None:
    """A fraction strictly between 0 and 1 (mask ratios)."""
    if not 0.0 < value < 1.0:
        raise ConfigError(f"{key}: expected a value in (0, 1), got {value}")


def section(factory: Any) -> Any:
    """Shorthand for a nested config section with its own defaults."""
    return field(default_factory=factory)
