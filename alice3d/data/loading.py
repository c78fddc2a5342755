"""The run's volumes: from a volume store (read crop by crop) or loaded into memory.

``data.store`` decides (:class:`alice3d.config.DataConfig`): ``auto`` reads a STORE given as
``data.data``, and preprocesses the embedded phantom cohort and raw data of at least
``data.store_min_volumes`` volumes once into a store under ``$ALICE3D_CACHE/stores``; smaller
raw data is loaded into memory as before. ``always`` / ``never`` force one way.
"""

from __future__ import annotations

import logging
from typing import Sequence

from alice3d.config import ConfigError, DataConfig, check_choice
from alice3d.data.preprocess import auto_store
from alice3d.data.store import StoreSettings, VolumeStore, body_hu_of_window, is_store, open_store, rebuild_hint
from alice3d.data.volumes import VolumeSet, finish_volume_set, load_volume_set, resolve_image_paths, too_small

log = logging.getLogger("alice3d.data")

__all__ = ["load_run_volumes", "run_store"]

STORE_MODES = ("auto", "always", "never")


def run_store(data: DataConfig, paths: Sequence[str] | None = None) -> VolumeStore | None:
    """The volume store this run reads, or None for the in-memory path.

    ``paths``: the run's image paths when already resolved (a STORE needs none).
    """
    check_choice("data.store", data.store, list(STORE_MODES))
    if is_store(data.data):
        if data.store == "never":
            raise ConfigError(f"data.store=never, but data.data={data.data} is a volume store; give the "
                              "original datalist or folder to load the volumes into memory")
        store = open_store(data.data, data.spacing)
        store.settings.check_hu_offset(data.hu_offset, store.root)
        return store
    if data.store == "never":
        return None
    if paths is None:
        paths = resolve_image_paths(data.data, data.phantom_n, data.phantom_seed)
    if data.store == "auto" and data.data and len(paths) < data.store_min_volumes:
        return None
    if not paths:
        return None  # the in-memory path reports the empty list
    settings = StoreSettings(tuple(float(s) for s in data.spacing), body_hu_of_window(data.hu_window),
                             float(data.hu_offset))
    return auto_store(paths, settings)


def load_run_volumes(data: DataConfig, min_shape: Sequence[int] | None = None, min_volumes: int = 1,
                     paths: Sequence[str] | None = None) -> VolumeSet:
    """The run's usable volumes (store volumes or windowed in-memory ``Volume`` objects) and its bad
    ones, reported per ``data.on_bad_data``; a volume smaller than ``min_shape`` is a bad one."""
    if paths is None and not is_store(data.data):
        paths = resolve_image_paths(data.data, data.phantom_n, data.phantom_seed)
    store = run_store(data, paths)
    if store is None:
        return load_volume_set(paths, data.spacing, data.hu_window, data.on_bad_data, min_shape=min_shape,
                               min_volumes=min_volumes, hu_offset=data.hu_offset)
    if data.on_bad_data not in ("skip", "fail"):
        raise ValueError(f"data.on_bad_data: expected 'skip' or 'fail', got {data.on_bad_data!r}")
    cap = float(data.store_cache_mb) * 1e6
    if cap < 0:
        raise ConfigError(f"data.store_cache_mb: expected a size in MB >= 0, got {data.store_cache_mb}")
    fits = store.decoded_bytes <= cap
    vols, bad = [], [(b["source"], b["reason"]) for b in store.bad]
    for v in store.volumes(data.hu_window, cache_bytes=cap if fits else 0.0):
        small = too_small(v.shape, data.spacing, min_shape)
        # A deleted or cut shard is found here by its size (stats only); a damaged chunk inside a
        # whole shard is found by its checksum when a crop reads it (the crop datasets apply
        # data.on_bad_data then, through on_bad_read).
        missing = "" if small else v.file_problem()
        if small:
            bad.append((v.path, small))
        elif missing:
            bad.append((v.path, f"store case {v.name}: {missing}; {rebuild_hint(store.root)}"))
        else:
            v.on_bad_read = data.on_bad_data
            vols.append(v)
    log.info("volume store %s: %d cases, %.1f MB on disk; %s", store.root, len(store.cases),
             store.totals.get("store_bytes", 0) / 1e6,
             f"decoded volumes cached ({store.decoded_bytes / 1e6:.0f} MB <= data.store_cache_mb)" if fits
             else "crops read chunk by chunk (the cohort is larger than data.store_cache_mb)")
    vset = finish_volume_set(vols, bad, data.on_bad_data, min_volumes, len(store.cases) + len(store.bad))
    vset.store = store
    return vset
