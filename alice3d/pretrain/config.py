"""`PretrainConfig`: the config of `alice3d-pretrain`. Its defaults are the embedded CPU-sized run;
configs/pretrain/*.yaml carry the paper settings.

Besides its own keys it has one section per registered method (`alice3d.methods.METHODS`),
named like the method and holding that method's config at the entry's CPU-sized defaults
(`MethodEntry.defaults`: ViT-tiny, 64x64x32 crops, small decoders). The sections follow the
registry: `register_method` / `unregister_method` rebuild the class's fields in place, so
`valid_keys`, `load_config`, `save_config` and `from_dict` always see every method.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from alice3d.config import ConfigError, DataConfig, TrainConfig, check_choice, forget_schemas, section
from alice3d.data.slices import SliceConfig
from alice3d.methods import METHODS, on_registry_change
from landmark.config import PairsConfig

__all__ = ["PretrainConfig", "PairsConfig"]


def _cpu_data() -> DataConfig:
    return DataConfig(spacing=(3.0, 3.0, 3.0))


def _cpu_train() -> TrainConfig:
    return TrainConfig(max_steps=150, batch_size=4, lr=5e-4, warmup_steps=15, ckpt_every=50, preview_every=0)


@dataclass
class PretrainConfig:
    method: str = "alice"
    landmark: str = ""  # RUN/landmark.pt; "" with the embedded cohort = the default phantom matcher
    train: TrainConfig = section(_cpu_train)
    data: DataConfig = section(_cpu_data)
    pairs: PairsConfig = section(PairsConfig)  # Alice
    slices: SliceConfig = section(SliceConfig)  # 2D methods: which slices of the volumes
    # + `<name>: <entry.config>` for every registered method, added by _sync_sections()

    def method_config(self):
        """The section of the chosen method."""
        if not hasattr(self, self.method):
            raise ConfigError(f"method: {self.method!r} has no section in this config (it was registered after the "
                              f"config was built); registered: {sorted(METHODS)}")
        return getattr(self, self.method)

    def validate(self) -> None:
        check_choice("method", self.method, sorted(METHODS))
        check_choice("data.on_bad_data", self.data.on_bad_data, ["skip", "fail"])
        self.pairs.validate("pairs")
        self.method_config().validate(self.method)


_OWN_FIELDS = dataclasses.fields(PretrainConfig)
_OWN_TYPES = typing.get_type_hints(PretrainConfig)
# What dataclasses generates from the field list: replaced together, so the class object (and
# every isinstance check and its name in checkpoints) stays the same.
_GENERATED = ("__annotations__", "__dataclass_fields__", "__init__", "__repr__", "__eq__", "__match_args__")


def _own_field(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory)
    return field(default=f.default)


def _sync_sections() -> None:
    """Make PretrainConfig's fields its own ones plus one section per entry of METHODS, in registry order."""
    own = {f.name for f in _OWN_FIELDS}
    clash = sorted(own & set(METHODS))
    if clash:
        raise ConfigError(f"method name(s) {clash} would replace PretrainConfig's own keys {sorted(own)}; "
                          "register the method under another name")
    spec = [(f.name, _OWN_TYPES[f.name], _own_field(f)) for f in _OWN_FIELDS]
    spec += [(name, entry.config, field(default_factory=entry.default_config)) for name, entry in METHODS.items()]
    built = dataclasses.make_dataclass("PretrainConfig", spec)
    for attr in _GENERATED:
        setattr(PretrainConfig, attr, built.__dict__[attr])
    forget_schemas()  # memoised for the old field list of this same class object


_sync_sections()
on_registry_change(_sync_sections)
