"""2D training data: slices of 3D volumes along any axis, and folders/datalists of PNG or TIFF images.

Both datasets are map-style and indexed by *sample*: `dataset[i]` is deterministic in `i`
(its randomness comes from `(seed, i)`), so the trainer's exact-resume contract holds.
Samples are `{"image": (C, H, W) float32}`; volume slices also carry `"label"` (the label
slice, when the volume has one) and `"center_label"` (the class at the slice centre).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Compose, RandSpatialCrop, SpatialPad
from torch.utils.data import Dataset

from alice3d.config import ConfigError
from alice3d.data.crops import BodyCentres
from alice3d.data.io import IMAGE_SUFFIXES, DataError
from alice3d.data.loading import load_run_volumes
from alice3d.data.report import DataReport
from alice3d.data.sources import as_sources, crop_at
from alice3d.data.store import is_store
from alice3d.data.volumes import resolve_image_paths

log = logging.getLogger(__name__)

__all__ = [
    "SliceConfig",
    "IMAGE_SUFFIXES_2D",
    "is_image_2d",
    "list_images_2d",
    "read_image_2d",
    "ImageFolderDataset",
    "VolumeSliceDataset",
    "slice_dataset",
]

IMAGE_SUFFIXES_2D = (".png", ".tif", ".tiff")


@dataclass
class SliceConfig:
    """How 2D samples are drawn from 3D volumes.

    axis: array axis normal to the slice plane; volumes are RAS-ordered, so 2 = axial,
        1 = coronal, 0 = sagittal.
    body_threshold: slice centres are drawn among voxels brighter than this (inside the body).
    """

    axis: int = 2
    body_threshold: float = 0.05

    def validate(self, prefix: str = "slices") -> None:
        if self.axis not in (0, 1, 2):
            raise ConfigError(f"{prefix}.axis: expected 0, 1 or 2 (RAS axis normal to the slice), got {self.axis}")


def is_image_2d(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES_2D)


def list_images_2d(root: str | Path) -> list[Path]:
    """PNG/TIFF files under `root` (recursive, sorted)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and is_image_2d(p))


def read_image_2d(path: str | Path, channels: int = 1) -> np.ndarray:
    """PNG/TIFF -> `(channels, H, W)` float32 in [0, 1] (integer images scaled by their type's maximum).

    Colour images become grey (channel mean) when `channels == 1`; a grey image is repeated
    when more channels are asked for. Raises DataError naming the file.
    """
    path = str(path)
    try:
        img = sitk.ReadImage(path)
    except RuntimeError as e:
        raise DataError(f"{path}: not a readable PNG/TIFF image ({str(e).strip().splitlines()[-1]})") from None
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 2D image, got an array of shape {arr.shape[:-1]}")
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    else:
        arr = arr.astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{path}: image has non-finite pixels")
    if arr.shape[-1] == 4:  # drop alpha
        arr = arr[..., :3]
    arr = np.moveaxis(arr, -1, 0)  # (comps, H, W)
    if channels == 1 and arr.shape[0] > 1:
        arr = arr.mean(axis=0, keepdims=True)
    elif arr.shape[0] == 1 and channels > 1:
        arr = np.repeat(arr, channels, axis=0)
    if arr.shape[0] != channels:
        raise DataError(f"{path}: image has {arr.shape[0]} channels, expected {channels}")
    return np.ascontiguousarray(arr)


class ImageFolderDataset(Dataset):
    """Sample `i`: image `i % n`, padded with 0 to at least `size`, then a random `size` crop.

    The pad/crop are MONAI transforms whose random state is seeded by `(seed, i)`.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        size: Sequence[int],
        seed: int = 0,
        channels: int = 1,
        key: str = "image",
        on_bad_data: str = "skip",
    ) -> None:
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 2:
            raise ValueError(f"ImageFolderDataset: size must have 2 entries (H, W), got {self.size}")
        self.seed, self.channels, self.key = seed, channels, key
        self.paths, self.bad = _check_images(paths, on_bad_data)
        self.transform = Compose([SpatialPad(self.size), RandSpatialCrop(self.size, random_size=False)])

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[int(i) % len(self.paths)]
        img = read_image_2d(path, self.channels)
        self.transform.set_random_state(seed=_seed(self.seed, i))
        out = self.transform(torch.from_numpy(img))
        return {self.key: torch.as_tensor(np.asarray(out), dtype=torch.float32)}


def _check_images(paths: Sequence[str | Path], on_bad_data: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Read every image header up front; bad files are skipped (listed) or fail the run."""
    if on_bad_data not in ("skip", "fail"):
        raise ValueError(f"data.on_bad_data: expected 'skip' or 'fail', got {on_bad_data!r}")
    good, bad = [], []
    for p in map(str, paths):
        reader = sitk.ImageFileReader()
        reader.SetFileName(p)
        try:
            reader.ReadImageInformation()
            if reader.GetDimension() != 2:
                raise DataError(f"expected a 2D image, got {reader.GetDimension()} dimensions")
            good.append(p)
        except (RuntimeError, DataError) as e:
            bad.append((p, str(e).strip().splitlines()[-1]))
    for p, reason in bad:
        log.warning("bad image %s: %s", p, reason)
    if bad and on_bad_data == "fail":
        raise DataError(f"{len(bad)} unreadable image(s) (data.on_bad_data=fail): " + "; ".join(f"{p}: {r}" for p, r in bad))
    if not good:
        raise DataError("no readable PNG/TIFF images found" + (f" ({len(bad)} bad)" if bad else ""))
    return good, bad


class VolumeSliceDataset(Dataset):
    """Sample `i`: a `size` window of a slice normal to `axis` through a random body voxel of volume `i % n`.

    `volumes`: windowed in-memory `Volume` objects or crop sources (`alice3d.data.sources`,
    e.g. the volumes of a volume store, which bring their own body sample).
    """

    def __init__(
        self,
        volumes: Sequence,
        size: Sequence[int],
        axis: int = 2,
        seed: int = 0,
        body_threshold: float = 0.05,
        key: str = "image",
        max_centres: int = 4096,
    ) -> None:
        if not volumes:
            raise ValueError("VolumeSliceDataset needs at least one volume")
        self.size = tuple(int(s) for s in size)
        if len(self.size) != 2:
            raise ValueError(f"VolumeSliceDataset: size must have 2 entries, got {self.size}")
        if axis not in (0, 1, 2):
            raise ValueError(f"VolumeSliceDataset: axis must be 0, 1 or 2, got {axis}")
        self.axis, self.seed, self.key = axis, seed, key
        self.volumes = as_sources(volumes, body_threshold, max_centres, seed, pad_value=0.0)
        self.centres = BodyCentres(self.volumes)

    def window(self) -> tuple[int, ...]:
        """The 3D crop size: `size` in the slice plane, 1 along `axis`."""
        size = list(self.size)
        size.insert(self.axis, 1)
        return tuple(size)

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = np.random.default_rng(_seed(self.seed, i))
        j = int(i) % len(self.volumes)
        vol = self.volumes[j]
        centres = self.centres[j]
        c = centres[rng.integers(len(centres))]
        img = vol.read_crop(c, self.window()).squeeze(self.axis)
        out = {self.key: torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]}
        if vol.label is not None:
            lab = crop_at(vol.label, c, self.window()).squeeze(self.axis)
            out["label"] = torch.from_numpy(np.ascontiguousarray(lab).astype(np.int64))[None]
            out["center_label"] = torch.tensor(int(vol.label[tuple(c)]), dtype=torch.int64)
        return out


def _seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence((int(seed), int(i))).generate_state(1)[0])


def slice_dataset(data: Any, slices: SliceConfig, img_size: Sequence[int], seed: int = 0,
                  channels: int = 1) -> tuple[Dataset, DataReport]:
    """2D dataset from a `DataConfig`: PNG/TIFF images (folder or datalist) or slices of volumes.

    `data.data == ""` slices the embedded phantom cohort. A folder is read as 2D images when it
    holds PNG/TIFF files and no volumes; a datalist whose entries are all PNG/TIFF likewise.
    """
    slices.validate()
    root = data.data
    if is_store(root):
        return _volume_slices(data, slices, img_size, seed, None)
    if root and Path(root).is_dir():
        images = list_images_2d(root)
        if images and not _has_volumes(root):
            log.info("%d 2D images under %s", len(images), root)
            return _with_report(ImageFolderDataset(images, img_size, seed=seed, channels=channels,
                                                   on_bad_data=data.on_bad_data))
    paths = resolve_image_paths(root, data.phantom_n, data.phantom_seed)
    if paths and all(is_image_2d(p) for p in paths):
        return _with_report(ImageFolderDataset(paths, img_size, seed=seed, channels=channels,
                                               on_bad_data=data.on_bad_data))
    return _volume_slices(data, slices, img_size, seed, paths)


def _volume_slices(data: Any, slices: SliceConfig, img_size: Sequence[int], seed: int,
                   paths: Sequence[str] | None) -> tuple[Dataset, DataReport]:
    vset = load_run_volumes(data, paths=paths)
    log.info("%s", vset.summary())
    ds = VolumeSliceDataset(vset.volumes, img_size, axis=slices.axis, seed=seed, body_threshold=slices.body_threshold)
    return ds, DataReport(len(vset.volumes), list(vset.bad))


def _with_report(ds: "ImageFolderDataset") -> tuple[Dataset, DataReport]:
    return ds, DataReport(len(ds.paths), list(ds.bad))


def _has_volumes(root: str | Path) -> bool:
    return any(str(p).lower().endswith(IMAGE_SUFFIXES) for p in Path(root).rglob("*") if p.is_file())
