"""The in-memory volume set that pretraining samples from.

Each volume is read once, checked, turned to RAS, resampled to the run's spacing and
its intensities windowed to [0, 1]; the loader then only hands out cached volumes and
sampled points, never re-reads files. Bad cases are reported up front (``on_bad_data``:
``skip`` quarantines them and lists them, ``fail`` stops before training starts); a DICOM
folder with a missing slice or several series is one of them (`alice3d.data.dicom`).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from alice3d.data.datalists import display_names, load_datalist
from alice3d.data.inspect import log_modality_warnings, too_few_slices
from alice3d.data.canonical import to_canonical
from alice3d.data.io import DataError, Volume, load_volume
from alice3d.data.phantom import default_cohort

log = logging.getLogger(__name__)


@dataclass
class VolumeSet:
    volumes: list  # Volume objects, or crop sources of a volume store (alice3d.data.store.StoreVolume)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    store: object = None  # the alice3d.data.store.VolumeStore the volumes come from, if any

    def summary(self) -> str:
        lines = [f"{len(self.volumes)} volumes usable, {len(self.bad)} quarantined"]
        lines += [f"  {p}: {r}" for p, r in self.bad]
        return "\n".join(lines)


def resolve_image_paths(data: str, phantom_n: int = 16, phantom_seed: int = 0, key: str = "training") -> list[str]:
    """Image paths of a datalist JSON, a folder, or (``data == ""``) the embedded phantom cohort."""
    if not data:
        root = default_cohort(n=phantom_n, seed=phantom_seed)
        entries = load_datalist(root / "dataset_0.json", key="training")
        try:
            entries += load_datalist(root / "dataset_0.json", key="validation")
        except DataError:
            pass
    else:
        # A listed file that is missing is one more bad volume (quarantined or fatal per on_bad_data).
        entries = load_datalist(data, key=key, check_exists=False)
    return [str(e["image"]) if isinstance(e, dict) else str(e) for e in entries]


def normalize_hu(array: np.ndarray, window: Sequence[float]) -> np.ndarray:
    lo, hi = float(window[0]), float(window[1])
    return np.clip((array - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def prepare_volume(path: str, spacing: Sequence[float], hu_window: Sequence[float],
                   min_shape: Sequence[int] | None = None, hu_offset: float = 0.0) -> Volume:
    """Load, offset, check, RAS, resample, window. Raises DataError naming the file (also for an
    image of too few slices to be a volume); an image that looks like a label map or MR (not CT)
    is logged as a warning and used. ``hu_offset`` is added to every voxel first (data.hu_offset:
    -1024 for a CT stored as HU + 1024)."""
    vol = with_hu_offset(load_volume(path, reject_constant=True), hu_offset)
    few = too_few_slices(vol.shape)
    if few:
        raise DataError(f"{path}: {few}")
    log_modality_warnings(vol, "CT", log)
    vol = to_canonical(vol, spacing)
    small = too_small(vol.shape, spacing, min_shape)
    if small:
        raise DataError(f"{path}: {small}")
    return replace(vol, array=normalize_hu(vol.array, hu_window))


def with_hu_offset(vol: Volume, hu_offset: float) -> Volume:
    """``vol`` with ``hu_offset`` added to every intensity (the volume itself for 0)."""
    if not hu_offset:
        return vol
    return replace(vol, array=(vol.array + np.float32(hu_offset)).astype(np.float32, copy=False))


def too_small(shape: Sequence[int], spacing: Sequence[float], min_shape: Sequence[int] | None) -> str:
    """Why a volume of ``shape`` cannot give crops of ``min_shape`` ('' when it can)."""
    if min_shape is None or all(s >= m for s, m in zip(shape, min_shape)):
        return ""
    return (f"volume is {tuple(int(s) for s in shape)} voxels at {tuple(spacing)} mm, smaller than the crop "
            f"{tuple(min_shape)}; use a smaller crop or a finer data.spacing")


def load_volume_set(paths: Sequence[str], spacing: Sequence[float], hu_window: Sequence[float],
                    on_bad_data: str = "skip", min_shape: Sequence[int] | None = None,
                    min_volumes: int = 1, workers: int | None = None, hu_offset: float = 0.0) -> VolumeSet:
    if on_bad_data not in ("skip", "fail"):
        raise ValueError(f"data.on_bad_data: expected 'skip' or 'fail', got {on_bad_data!r}")
    if not paths:
        raise DataError("no volumes found in the data given (empty datalist or folder)")

    def one(p: str) -> Volume | tuple[str, str]:
        try:
            return prepare_volume(p, spacing, hu_window, min_shape, hu_offset)
        except DataError as e:
            return (p, str(e).removeprefix(f"{p}: "))

    workers = workers or min(4, os.cpu_count() or 1, len(paths))
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, paths))
    vols = [r for r in results if isinstance(r, Volume)]
    bad = [r for r in results if not isinstance(r, Volume)]
    return finish_volume_set(vols, bad, on_bad_data, min_volumes, len(paths))


def finish_volume_set(vols: list, bad: list[tuple[str, str]], on_bad_data: str, min_volumes: int,
                      n_total: int) -> VolumeSet:
    """The usable volumes, after reporting the bad ones per ``on_bad_data`` (``fail``: DataError)."""
    for p, reason in bad:
        log.warning("bad volume %s: %s", p, reason)
    if bad and on_bad_data == "fail":
        listing = "\n  ".join(f"{p}: {r}" for p, r in bad)
        raise DataError(f"{len(bad)} bad volume(s) (data.on_bad_data=fail, nothing was trained):\n  {listing}")
    if len(vols) < min_volumes:
        # named over every volume of the run (usable ones too), so that patient1/PATIENT_DICOM and
        # patient2/PATIENT_DICOM read apart
        paths = [str(getattr(v, "path", "") or "") for v in vols]
        names = display_names([*(p for p in paths if p), *(str(p) for p, _ in bad)], keep_suffix=True)[-len(bad):] \
            if bad else []
        raise DataError(
            f"only {len(vols)} usable volume(s) of {n_total}; at least {min_volumes} needed"
            + (f" ({len(bad)} quarantined: " + "; ".join(f"{n}: {r}" for n, (_, r) in zip(names, bad)) + ")"
               if bad else "")
        )
    if bad:
        log.warning("%d of %d volumes quarantined for this run (data.on_bad_data=skip)", len(bad), n_total)
    return VolumeSet(vols, bad)
