"""Pretraining methods (one file each) and the registry: name -> `MethodEntry`.

Dataset kinds (built by `alice3d.pretrain.run`):
    "images"  {"image": (B, C, *img_size)}: 2D slices / images or 3D random body crops
    "pairs"   {"q", "k": (B, C, *crop), "view_seed": (B,)}: landmark-matched crops of two volumes

Adding a method: write `methods/<name>.py` (a `PretrainMethod`, its `BackboneConfig`-based
config, a `cpu_config()` factory and its `TINY` test sizes), add its line to `METHODS` below
(or call `register_method` from your own package) and a YAML recipe in configs/pretrain/.
`alice3d.pretrain.config.PretrainConfig` gets its `<name>:` section from the entry and the
contract tests check it with every other method. Method files import the shared pieces
(`base`, `common`, `decoder`, `views`, `casa`), never each other.
"""

from __future__ import annotations

from collections.abc import Callable

from alice3d.methods import alice, cae, ccmim, cmae, convmim, mae, rmae
from alice3d.methods.base import DATASET_KINDS, MethodEntry, PretrainMethod

__all__ = ["DATASET_KINDS", "MethodEntry", "METHODS", "PretrainMethod", "register_method", "unregister_method",
           "on_registry_change"]

METHODS: dict[str, MethodEntry] = {
    "alice": MethodEntry(alice.Alice, alice.AliceConfig, "pairs", alice.cpu_config, alice.TINY),
    "mae": MethodEntry(mae.MAE, mae.MAEConfig, "images", mae.cpu_config, mae.TINY),
    "cae": MethodEntry(cae.CAE, cae.CAEConfig, "images", cae.cpu_config, cae.TINY),
    "ccmim": MethodEntry(ccmim.CCMIM, ccmim.CCMIMConfig, "images", ccmim.cpu_config, ccmim.TINY),
    "rmae": MethodEntry(rmae.RMAE, rmae.RMAEConfig, "images", rmae.cpu_config, rmae.TINY),
    "cmae": MethodEntry(cmae.CMAE, cmae.CMAEConfig, "images", cmae.cpu_config, cmae.TINY),
    "convmim": MethodEntry(convmim.ConvMIM, convmim.ConvMIMConfig, "images", convmim.cpu_config, convmim.TINY),
}

# Called after every change of METHODS (the pretraining config rebuilds its sections).
_listeners: list[Callable[[], None]] = []


def on_registry_change(callback: Callable[[], None]) -> None:
    """Call `callback()` after each `register_method` / `unregister_method`; an error it raises undoes the change."""
    _listeners.append(callback)


def _changed(undo: Callable[[], None]) -> None:
    try:
        for callback in _listeners:
            callback()
    except Exception:
        undo()
        for callback in _listeners:
            callback()
        raise


def register_method(name: str, entry: MethodEntry) -> None:
    """Add a method from outside this package: `register_method("mymim", MethodEntry(...))`.

    Afterwards `alice3d-pretrain method=<name>` and `<name>.<key>=value` work like for the
    built-in methods. ValueError for a name that is not a Python identifier or is taken.
    """
    if not isinstance(entry, MethodEntry):
        raise TypeError(f"register_method({name!r}): expected a MethodEntry, got {type(entry).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_method: the name must be a Python identifier (it becomes a config section), "
                         f"got {name!r}")
    if name in METHODS:
        raise ValueError(f"register_method: a method {name!r} is registered already ({METHODS[name].method.__name__})")
    METHODS[name] = entry
    _changed(lambda: METHODS.pop(name))


def unregister_method(name: str) -> MethodEntry:
    """Remove a method added with `register_method` (KeyError naming the registered ones if unknown)."""
    if name not in METHODS:
        raise KeyError(f"unregister_method: no method {name!r}; registered: {sorted(METHODS)}")
    entry = METHODS.pop(name)
    _changed(lambda: METHODS.__setitem__(name, entry))
    return entry
