"""What an image looks like: grid, orientation, intensity statistics and the modality it resembles.

`describe_volume` summarises one image from its voxels (all of them, or a subsample from
`sample_voxels`); `modality_warnings` turns a summary into warnings for a task that expects
CT in Hounsfield units: a label map or an MR volume listed as "image" trains without an
error but teaches the model nothing useful, so it is named before training starts.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nibabel import orientations as nio

from .dicom import quiet_itk, read_series
from .io import DataError, Volume, _nifti_image, is_nifti, read_array

# Multi-organ label maps have at most ~120 classes (TotalSegmentator: 117 + background), while
# CT in HU and MR images have hundreds to thousands of distinct intensities.
LABEL_MAP_MAX_DISTINCT = 128
# Air is -1000 HU; in a body CT the air around the patient, in the lungs or in the bowel is
# far more than 1% of the voxels, so the 1st percentile is well below -500 HU.
CT_AIR_P01_MAX_HU = -500.0
# A CT cropped to soft tissue still has fat (-150..-50 HU); MR magnitude images are >= 0 and
# normalised MR rarely reaches -50, so a value this low is typical of CT only.
CT_FAT_MAX_HU = -50.0
# Voxels the statistics are computed from when a caller asks for a cheap summary: percentiles
# of 2 M voxels are stable to well under 1 HU and take milliseconds.
SUMMARY_MAX_VOXELS = 1 << 21
SAMPLE_SLICES = 16  # evenly spaced slices along the last axis that `sample_voxels` reads

MODALITIES = ("CT", "MR", "label map", "unknown")


@dataclass(frozen=True)
class VolumeStats:
    """Summary of one image; intensities in the file's units (HU for CT)."""

    path: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]  # mm
    orientation: str  # nibabel axis codes of the voxel axes, e.g. "LPS", "RAS"
    minimum: float
    maximum: float
    median: float
    p01: float  # 1st percentile
    p99: float  # 99th percentile
    distinct: int | None  # distinct values when all are non-negative integers, else None
    modality: str  # one of MODALITIES: what the intensities look like
    sampled: bool  # statistics from a subsample of the voxels

    def to_dict(self) -> dict:
        """JSON-ready: tuples as lists, statistics of an image without finite voxels as None."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else list(v) if isinstance(v, tuple) else v)
                for k, v in d.items()}

    def summary(self) -> str:
        """One line: '48x48x33 voxels, 7.94x7.94x8 mm, LPS, CT, -1024..574 HU (median -995)'."""
        unit = " HU" if self.modality == "CT" else ""
        return (f"{'x'.join(str(s) for s in self.shape)} voxels, {'x'.join(f'{s:.3g}' for s in self.spacing)} mm, "
                f"{self.orientation}, {self.modality}, {self.minimum:g}..{self.maximum:g}{unit} "
                f"(median {self.median:g}{', sampled' if self.sampled else ''})")


def _thin(voxels: np.ndarray, max_voxels: int | None) -> tuple[np.ndarray, bool]:
    """A regular strided subsample with at most ~max_voxels voxels (the array itself if small enough)."""
    if max_voxels is None or voxels.size <= max_voxels or voxels.ndim == 0:
        return voxels, False
    step = math.ceil((voxels.size / max_voxels) ** (1.0 / voxels.ndim))
    return voxels[(slice(None, None, step),) * voxels.ndim], True


def _distinct_nonnegative_ints(v: np.ndarray, vmin: float, vmax: float) -> int | None:
    if vmin < 0 or vmax >= 1 << 16 or (v.dtype.kind == "f" and not np.array_equal(v, np.rint(v))):
        return None
    return int(np.count_nonzero(np.bincount(v.astype(np.int64))))


def guess_modality(minimum: float, maximum: float, p01: float, distinct: int | None) -> str:
    """The one place that decides what intensities look like (thresholds above)."""
    if not (math.isfinite(minimum) and math.isfinite(maximum)) or minimum == maximum:
        return "unknown"  # no finite voxels, or a constant image
    if distinct is not None and distinct <= LABEL_MAP_MAX_DISTINCT:
        return "label map"
    if p01 <= CT_AIR_P01_MAX_HU or minimum <= CT_FAT_MAX_HU:
        return "CT"
    return "MR"


def describe_volume(voxels: np.ndarray, affine: np.ndarray, *, shape=None, path: str | os.PathLike = "",
                    sampled: bool = False, max_voxels: int | None = None) -> VolumeStats:
    """Summarise an image: grid from ``affine`` (4, 4) and ``shape`` (default ``voxels.shape``),
    intensities from ``voxels`` (the whole array or any subsample of it, e.g. from
    `sample_voxels`; ``max_voxels`` thins it further)."""
    shape = tuple(int(s) for s in (voxels.shape if shape is None else shape))
    nd = min(len(shape), 3)
    aff = np.asarray(affine, dtype=np.float64)
    spacing = tuple(float(s) for s in np.linalg.norm(aff[:nd, :nd], axis=0))
    v, thinned = _thin(np.asarray(voxels), max_voxels)
    v = v.ravel()
    if v.dtype.kind == "f" and not np.isfinite(v).all():
        v = v[np.isfinite(v)]  # NaN/inf are reported as problems elsewhere; they would poison every statistic
    if v.size:
        vmin, vmax = float(v.min()), float(v.max())
        p01, median, p99 = (float(q) for q in np.percentile(v, [1, 50, 99]))
    else:
        vmin = vmax = p01 = median = p99 = float("nan")
    distinct = _distinct_nonnegative_ints(v, vmin, vmax) if v.size else None
    modality = guess_modality(vmin, vmax, p01, distinct)
    return VolumeStats(str(path), shape, spacing, "".join(nio.aff2axcodes(aff)), vmin, vmax, median, p01, p99,
                       distinct, modality, sampled or thinned)


def modality_warnings(stats: VolumeStats, expected: str = "CT") -> list[str]:
    """Warnings (each naming the file) when an image does not look like the ``expected`` modality."""
    p = stats.path
    if stats.modality == "label map":
        return [f"{p}: image looks like a label map ({stats.distinct} distinct integer values in "
                f"{stats.minimum:g}..{stats.maximum:g}), not a {expected} image; is a label file listed as 'image'?"]
    if expected.upper() == "CT" and stats.modality == "MR":
        return [f"{p}: intensities look like MR (or a CT not in Hounsfield units), not CT: 1st percentile "
                f"{stats.p01:g} and minimum {stats.minimum:g}, where a CT has air near -1000 HU; "
                "check the modality or convert the image to HU"]
    if expected.upper() == "MR" and stats.modality == "CT":
        return [f"{p}: intensities look like CT in Hounsfield units (1st percentile {stats.p01:g}), "
                "not the MR the task expects"]
    return []


def log_modality_warnings(volume: Volume, expected: str = "CT", log: logging.Logger | None = None) -> list[str]:
    """`modality_warnings` of a loaded volume (on a cheap subsample), each logged as a warning."""
    stats = describe_volume(volume.array, volume.affine, path=volume.path, max_voxels=SUMMARY_MAX_VOXELS)
    warnings = modality_warnings(stats, expected)
    for w in warnings:
        (log or logging.getLogger(__name__)).warning("%s", w)
    return warnings


# ----------------------------------------------------------------------------- cheap voxel samples


def _slice_steps(n: int, k: int) -> int:
    return max(1, -(-n // k))


def _sample_nifti(path: str, max_slices: int) -> np.ndarray:
    img = _nifti_image(path)
    if len(img.shape) < 3:
        return np.asanyarray(img.dataobj)
    step = _slice_steps(img.shape[2], max_slices)
    try:
        # one forward pass through the (gzip) stream, keeping only every step-th slice
        return np.asanyarray(img.dataobj[:, :, ::step])
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: truncated or corrupt image data ({type(e).__name__}: {e})") from None


def _sample_dicom(folder: str, max_slices: int) -> np.ndarray:
    files = read_series(folder).files
    chosen = files[:: _slice_steps(len(files), max_slices)]
    try:
        with quiet_itk():
            return np.stack([sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in chosen])
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise DataError(f"{folder}: SimpleITK could not read a DICOM slice: {lines[-1] if lines else e}") from None


def sample_voxels(path: str | os.PathLike, *, max_slices: int = SAMPLE_SLICES, expect_ndim: int = 3) -> np.ndarray:
    """Intensities of ``max_slices`` evenly spaced slices (any shape; NIfTI: every k-th slice of
    the last axis; DICOM folder: every k-th file), without holding the whole volume.
    Other formats (.mha, .nrrd) have no cheap partial read and are read whole. Raises DataError."""
    path = str(path)
    if is_nifti(path):
        return _sample_nifti(path, max_slices)
    if Path(path).is_dir():
        return _sample_dicom(path, max_slices)
    return read_array(path, expect_ndim=expect_ndim)[0]
