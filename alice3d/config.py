"""Typed configs on OmegaConf structured configs: dataclass defaults <- YAML file <- dotted overrides.

The dataclasses are the single source of defaults. A YAML file and the command line only
override fields that already exist; an unknown key is an error that lists the valid keys, so a
typo never silently trains with a default. OmegaConf does the typing, merging and the
``${...}`` interpolation (``${train.max_steps}``, ``${oc.env:VAR}``), resolved after the last
layer; the caller gets the project's own dataclass instances back (tuples as tuples, methods
and properties intact).

    cfg = load_config(PretrainConfig, "configs/pretrain/alice_vit_b.yaml", ["train.lr=1e-4"])
    save_config(cfg, run_dir / "config.yaml")

OmegaConf cannot type every annotation the configs use (``Literal``, tuples of tuples, unions of
containers), so the schema is a mirror dataclass per config class in OmegaConf's vocabulary:
tuples become ``List``, ``Literal`` its value type, and what has no OmegaConf type becomes
``Any`` and is checked here (union arms one by one, again through OmegaConf). The resolved
values are then written onto an instance of the real class.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import functools
import pathlib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TypeVar, Union

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

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
    num_threads: int = 0  # torch threads per process; 0 = usable cores / (processes x (1 + num_workers))
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
    # Added to every intensity right after reading, before any check that assumes HU: -1024 for a
    # CT stored as HU + 1024 (air at 0, e.g. OpenKBP). A volume store records the offset it was
    # built with and refuses a run asking for another.
    hu_offset: float = 0.0
    cache: str = "memory"  # memory | none
    phantom_n: int = 16  # subjects in the embedded cohort
    phantom_seed: int = 0
    # Pretraining crops: "auto" reads them from a volume store for a STORE, the embedded cohort
    # and raw data of at least store_min_volumes volumes (preprocessed once into
    # $ALICE3D_CACHE/stores), else from volumes held in memory; "always" / "never" force one.
    store: str = "auto"
    store_min_volumes: int = 32
    store_cache_mb: float = 256.0  # per process: decoded volumes are kept when the whole cohort fits


# ---------------------------------------------------------------- schema

_NONE = type(None)
_PRIMITIVES = (int, float, bool, str, bytes, pathlib.Path)
_FLAGS = {"allow_objects": True}  # Any fields (fallbacks) may hold objects OmegaConf has no node for


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of every field; one that cannot be resolved (a string annotation of a
    made dataclass naming something out of reach) counts as Any."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - one bad annotation must not hide the others
        hints = {}
    scope = {**vars(builtins), **vars(typing), "typing": typing, **vars(sys.modules.get(cls.__module__, typing))}
    out = {}
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        if isinstance(tp, str):
            try:
                tp = eval(tp, scope)  # noqa: S307 - an annotation of the class itself
            except Exception:  # noqa: BLE001
                tp = Any
        out[f.name] = tp
    return out


def _fixed_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and bool(args) and args[-1] is not Ellipsis


def _omega_type(tp: Any) -> Any:
    """The annotation OmegaConf gets for ``tp``; Any where it has none (checked by :func:`_fit`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return Any
    if _is_dataclass_type(tp):
        return _mirror(tp)
    if isinstance(tp, type) and (issubclass(tp, _PRIMITIVES) or issubclass(tp, enum.Enum)):
        return tp
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 and kinds <= {str, int, bool} else Any
    if _is_union(tp):
        arms = [a for a in args if a is not _NONE]
        if len(arms) == 1:
            inner = _omega_type(arms[0])
            return Any if inner is Any else Optional[inner]
        if all(a in (int, float, bool, str) for a in arms):
            return tp  # OmegaConf types unions of primitives itself
        return Any
    if origin in (tuple, list) or tp in (tuple, list):
        elems = [a for a in args if a is not Ellipsis]
        same = elems and all(a == elems[0] for a in elems)
        return List[_omega_type(elems[0]) if same else Any]  # type: ignore[misc]
    if origin is dict or tp is dict:
        key, value = args if len(args) == 2 else (Any, Any)
        key = key if key in (str, int, float, bool) or (isinstance(key, type) and issubclass(key, enum.Enum)) else Any
        return Dict[key, _omega_type(value)]  # type: ignore[valid-type]
    return Any


@functools.lru_cache(maxsize=None)
def _mirror(cls: type) -> type:
    """``cls`` as a dataclass OmegaConf can type; leaves are MISSING until the defaults merge in."""
    specs = []
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, tp in _field_types(cls).items():
        otp = _omega_type(tp)
        if defaults[name] is None and otp is not Any:
            otp = Optional[otp]  # a None default makes the field optional whatever its annotation says
        default = field(default_factory=otp) if _is_dataclass_type(tp) else field(default=MISSING)
        specs.append((name, otp, default))
    return dataclasses.make_dataclass(cls.__name__, specs)


@functools.lru_cache(maxsize=None)
def _holder(otp: Any) -> type:
    return dataclasses.make_dataclass("value", [("value", otp, field(default=MISSING))])


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


# ---------------------------------------------------------------- into OmegaConf


def _prepare(value: Any, tp: Any) -> Any:
    """What OmegaConf would refuse but the configs always accepted: ``4,4,2`` (or one value) for a
    list, null for a string (= ""), integral floats for integers, and ints in nested number lists
    (OmegaConf's merge checks those without converting)."""
    if isinstance(value, str) and "${" in value:
        return value  # an interpolation: OmegaConf checks what it resolves to
    if value is None:
        return "" if tp is str else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            return value
        types_ = _field_types(tp)
        return {k: _prepare(v, types_[k]) if k in types_ else v for k, v in value.items()}
    if _is_union(tp):
        arms = [a for a in args if a is not _NONE]
        return value if value is None or len(arms) != 1 else _prepare(value, arms[0])
    if origin in (tuple, list) or tp in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        elif not isinstance(value, (list, tuple)):
            value = [value]
        elems = [a for a in args if a is not Ellipsis] or [Any]
        per = elems if _fixed_tuple(tp) and len(elems) == len(value) else [elems[0]] * len(value)
        return [_prepare(v, a) for v, a in zip(value, per)]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {k: _prepare(v, args[1]) for k, v in value.items()}
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _replace_mappings(node: DictConfig, data: dict, cls: type, prefix: str = "") -> None:
    """A mapping field named in a layer is replaced, not merged into (``encoder_kwargs={}`` clears
    it); only config sections merge key by key."""
    types_ = _field_types(cls)
    for name, value in data.items():
        tp = types_.get(name)
        if tp is None or name not in node:
            continue
        if _is_dataclass_type(tp) and not isinstance(value, dict):
            raise ConfigError(f"{prefix}{name}: expected {_describe(tp)}, got {value!r}")
        if _is_dataclass_type(tp) and isinstance(node[name], DictConfig):
            _replace_mappings(node[name], value, tp, f"{prefix}{name}.")
        elif isinstance(value, dict) and OmegaConf.is_dict(node._get_node(name)):
            node[name] = {}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return " or ".join("null" if a is _NONE else _describe(a) for a in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if _fixed_tuple(tp):
        return f"a list of {len(args)} values"
    if origin in (tuple, list) or tp in (tuple, list):
        return f"a list ({_describe(args[0])} each)" if args and args[0] is not Any else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if _is_dataclass_type(tp):
        return f"a mapping (a config section: {tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {[m.name for m in tp]}"
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", pathlib.Path: "a path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _lookup(cls: type, data: Any, key: str) -> tuple[str, Any, Any]:
    """(the config key, its annotation, the value given) for OmegaConf's ``full_key``
    (``model.dims[1]``, ``task.nsd_tolerance_per_organ.liver``)."""
    tp, value, done = cls, data, []
    for part in [p for p in re.split(r"\.|\[[^\]]*\]", key) if p]:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if _is_dataclass_type(tp) and part in _field_types(tp):
            tp = _field_types(tp)[part]
        elif origin is dict and len(args) == 2:
            tp = args[1]
        else:
            break
        done.append(part)
        value = value.get(part, value) if isinstance(value, dict) else value
    return ".".join(done), tp, value


def _error(e: OmegaConfBaseException, cls: type, data: Any) -> ConfigError:
    key = str(getattr(e, "full_key", "") or "")
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and not isinstance(e, ValidationError):
        return ConfigError(f"unknown config key '{key}'. Valid keys: {', '.join(valid_keys(cls))}")
    what = str(e).splitlines()[0] if str(e) else type(e).__name__
    name, tp, value = _lookup(cls, data, key)
    if isinstance(e, ValidationError) and name and data is not None:
        return ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")
    return ConfigError(f"{name or key or 'config'}: {what}")


# ---------------------------------------------------------------- back to the dataclasses


def _fit(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked and converted for ``tp`` where OmegaConf saw only Any."""
    otp = _omega_type(tp)
    if otp is Any:
        return _finish(value, tp, key, checked=True) if tp is not Any else value
    try:
        node = OmegaConf.merge(OmegaConf.structured(_holder(otp), flags=_FLAGS), {"value": _prepare(value, tp)})
        value = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)["value"]
    except OmegaConfBaseException:
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}") from None
    return _finish(value, tp, key, checked=True)


def _finish(value: Any, tp: Any, key: str, checked: bool) -> Any:
    """A resolved OmegaConf value as the annotation wants it: tuples, fixed lengths, Literal
    choices, dataclass instances; ``checked`` says OmegaConf already typed it."""
    if not checked:
        return _fit(value, tp, key)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        if value is None and _NONE in args:
            return None
        arms = [a for a in args if a is not _NONE]
        if _omega_type(tp) is not Any:
            return _finish(value, arms[0], key, True) if len(arms) == 1 else value
        for arm in arms:
            try:
                return _fit(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if value is None:
        return None  # OmegaConf let it through: the field is optional
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        elems = [a for a in args if a is not Ellipsis] or [Any]
        if _fixed_tuple(tp):
            if len(value) != len(elems):
                raise ConfigError(f"{key}: expected {len(elems)} values, got {list(value)!r}")
        else:
            elems = [elems[0]] * len(value)
        inner = _omega_type(tp).__args__[0] is not Any
        out = [_finish(v, a, key, inner) for v, a in zip(value, elems)]
        return tuple(out) if tuple in (origin, tp) else out
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        inner = _omega_type(args[1]) is not Any
        return {k: _finish(v, args[1], f"{key}.{k}", inner) for k, v in value.items()}
    if _is_dataclass_type(tp) and isinstance(value, dict):
        return _assign(tp(), value, key + ".")
    return value


def _assign(obj: T, data: dict, prefix: str) -> T:
    """Write resolved values onto ``obj``; sections are updated in place, like every field."""
    for name, tp in _field_types(type(obj)).items():
        if name not in data:
            continue
        value, current = data[name], getattr(obj, name, None)
        if _is_dataclass_type(tp) and isinstance(value, dict) and isinstance(current, tp):
            _assign(current, value, prefix + name + ".")
        else:
            setattr(obj, name, _finish(value, tp, prefix + name, checked=True))
    return obj


def _apply(cfg: T, layers: Sequence[tuple[str, dict]]) -> T:
    """``cfg``'s current values <- each layer in turn (``(where, nested dict)``; ``where`` prefixes
    the errors of that layer), interpolations resolved at the end; written back into ``cfg``."""
    cls = type(cfg)
    current = _prepare(to_dict(cfg), cls)
    try:
        node = OmegaConf.merge(OmegaConf.structured(_mirror(cls), flags=_FLAGS), current)
    except OmegaConfBaseException as e:
        raise _error(e, cls, current) from None
    for where, layer in layers:
        if not isinstance(layer, dict):
            raise ConfigError(f"{where + ': ' if where else ''}config: expected a mapping, got {layer!r}")
        data = _prepare(layer, cls)
        try:
            _replace_mappings(node, data, cls)
            node.merge_with(data)
        except (OmegaConfBaseException, ConfigError) as e:
            err = e if isinstance(e, ConfigError) else _error(e, cls, data)
            raise ConfigError(f"{where}: {err}" if where else str(err)) from None
    try:
        plain = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise _error(e, cls, None) from None
    return _assign(cfg, plain, "")


# ---------------------------------------------------------------- public API


def apply_dict(cfg: T, data: dict) -> T:
    """Override fields of ``cfg`` in place from a nested dict; unknown keys raise."""
    return _apply(cfg, [("", data or {})])


def parse_override(text: str) -> dict:
    """``"train.lr=1e-4"`` -> ``{"train": {"lr": 1e-4}}`` (value parsed as YAML by OmegaConf;
    ``key=`` is the empty string, text that is not YAML stays text)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        conf = OmegaConf.from_dotlist([f"{key}={raw}" if raw.strip() else f"{key}=''"])
    except yaml.YAMLError:
        conf = OmegaConf.create()
        OmegaConf.update(conf, key, raw, force_add=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"override '{text}': {str(e).splitlines()[0]}") from None
    return OmegaConf.to_container(conf, resolve=False)


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    return _apply(cfg, [("", parse_override(text)) for text in overrides])


def read_yaml(path: str | Path) -> dict:
    """The mapping of a YAML file, interpolations left unresolved (they resolve after the merge)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        conf = OmegaConf.load(path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"{path}: expected a mapping at the top level ({str(e).splitlines()[0]})") from None
    if not isinstance(conf, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a list")
    return OmegaConf.to_container(conf, resolve=False)


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> T:
    """Defaults of ``cls`` <- YAML file <- dotted overrides."""
    layers = []
    if path:
        try:
            layers.append((str(path), read_yaml(path)))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    layers += [("", parse_override(text)) for text in overrides]
    cfg = _apply(cls(), layers)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists, enums their names) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, enum.Enum):
            return v.name
        return v

    return plain(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    return apply_dict(cls(), data)


def save_config(cfg: Any, path: str | Path) -> None:
    """The resolved config as block YAML, written with OmegaConf's dumper so that every value
    reads back as itself (a string such as ``1e-4`` is quoted, a literal ``${`` escaped)."""

    def escaped(v: Any) -> Any:
        if isinstance(v, str):
            return v.replace("${", "\\${")
        if isinstance(v, list):
            return [escaped(x) for x in v]
        if isinstance(v, dict):
            return {k: escaped(x) for k, x in v.items()}
        return v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(escaped(to_dict(cfg))), sort_keys=False))


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


def forget_schemas() -> None:
    """Forget what the machinery memoised per config class (field types, OmegaConf schema mirrors).

    For a class whose fields change after first use (``PretrainConfig`` is rebuilt in place when a
    method is registered)."""
    for fn in (globals()[n] for n in list(globals())):
        clear = getattr(fn, "cache_clear", None)
        if callable(clear) and getattr(fn, "__module__", "") == __name__:
            clear()
