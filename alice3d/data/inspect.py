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
# A localizer, a single DICOM image or a two-frame file is not a 3-D volume: resampled, one
# 512x512x1 slice becomes a slab a few voxels thick that crops and patches mostly pad.
MIN_SLICES = 4

# CT stored with a +1024 offset (OpenKBP, some PACS exports as unsigned 12-bit): air at ~0,
# soft tissue near 1,024, bone near 2,000+. Without a check it looks like MR (no negative value),
# and a run that windows it at -175..250 "HU" sees almost nothing but bone and metal.
HU_OFFSET = 1024.0
# Air is -1024..-1000 HU, stored 0..24; a body CT has well over 1% air around the patient, so its
# 1st percentile is near 0. Up to 100 (-924 HU) allows for noise and a little blur into the skin.
OFFSET_AIR_P01_MAX = 100.0
# The 99th percentile of a body or head CT is bone (>= +100 HU, stored >= 1124); ~1100 leaves
# room for soft-tissue-only crops with contrast-enhanced vessels. z-scored MR (p99 ~ 3) and
# MR scaled to 0..1 or 0..1000 never get this far, so this alone rules most MR out.
OFFSET_P99_MIN = 1100.0
# Body voxels of an offset CT: above -500 HU (stored 524), which leaves out air and lung.
# Fat, muscle, organs and blood are -150..+250 HU (stored 874..1274): in head-and-neck, chest
# and abdomen CTs that band holds 70-95% of the body voxels (the rest is mostly bone), so more
# than half of them there is asked for. The gap between them, -500..-150 HU (stored 524..874),
# holds only partial-volume voxels at the skin and lung borders (a few %): more than 15% of the
# body voxels there is an MR whose dark tissues spread from the background up to the bright ones
# (an MR that is mostly a single narrow peak near 1,000 is the case it cannot tell apart).
OFFSET_BODY_MIN, OFFSET_TISSUE_BAND, OFFSET_TISSUE_MIN, OFFSET_GAP_MAX = 524.0, (874.0, 1274.0), 0.5, 0.15
# Bone stays below ~2,000-3,000 HU (dense cortical bone, tooth enamel ~3,000); above 3,000 HU is
# metal (dental fillings, prostheses, clips) or its streaks, and 12-bit scanners clip at 3,071.
METAL_MIN_HU = 3000.0
# A dental filling of ~1 cm^3 is ~1,000 voxels of a 512x512x100 scan (4e-5 of it); a few isolated
# noise voxels above 3,000 HU are ~1e-7: warn from 1e-5 (0.001 %) of the voxels upwards.
METAL_WARN_FRACTION = 1e-5
# Tooth enamel and dense cortical bone reach ~3,000 HU, and 12-bit scanners clip at 3,071, so in a
# head-and-neck CT without any implant 0.001-0.01 % of the voxels sit at 3,000-3,071 HU (seen on
# OpenKBP): only a maximum beyond what tissue reaches is metal (fillings reach 8,000-30,000 HU on
# extended-range reconstructions).
METAL_MAX_MIN_HU = 4000.0

MODALITIES = ("CT", "CT+1024", "MR", "label map", "unknown")
CT_LIKE = ("CT", "CT+1024")  # modalities whose intensities are HU (after removing the offset)


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
    # For CT-looking images: fraction of the voxels above METAL_MIN_HU (after removing a +1024
    # offset when modality is "CT+1024"); None for other modalities.
    metal: float | None = None
    # Only computed when the +1024 offset test runs (no negative values, air near 0, p99 high):
    # fractions of the voxels above OFFSET_BODY_MIN in the soft-tissue band and in the gap below it.
    offset_tissue: float | None = None
    offset_gap: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: tuples as lists, statistics of an image without finite voxels as None."""
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else list(v) if isinstance(v, tuple) else v)
                for k, v in d.items()}

    def summary(self) -> str:
        """One line: '48x48x33 voxels, 7.94x7.94x8 mm, LPS, CT, -1024..574 HU (median -995)'."""
        unit = " HU" if self.modality == "CT" else " (HU+1024)" if self.modality == "CT+1024" else ""
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


def _offset_candidate(minimum: float, p01: float, p99: float) -> bool:
    """Could these be CT intensities stored with +1024 (no fat below -50, air near 0, bone high)?"""
    return minimum > CT_FAT_MAX_HU and p01 <= OFFSET_AIR_P01_MAX and p99 >= OFFSET_P99_MIN


def _offset_fractions(v: np.ndarray) -> tuple[float, float]:
    """(tissue, gap): fractions of the voxels of ``v`` (1-D) above OFFSET_BODY_MIN that lie in
    the soft-tissue band of a +1024 CT and in the gap between air/lung and it."""
    body = np.count_nonzero(v >= OFFSET_BODY_MIN)
    if not body:
        return 0.0, 1.0
    lo, hi = OFFSET_TISSUE_BAND
    at_lo = np.count_nonzero(v >= lo)
    tissue = at_lo - np.count_nonzero(v > hi)
    return float(tissue / body), float((body - at_lo) / body)


def guess_modality(minimum: float, maximum: float, p01: float, distinct: int | None, *,
                   p99: float | None = None, offset_tissue: float | None = None,
                   offset_gap: float | None = None) -> str:
    """The one place that decides what intensities look like (thresholds above). "CT+1024" needs
    ``p99`` and the two offset fractions (`describe_volume` computes them); without them an
    offset CT is "MR", as before."""
    if not (math.isfinite(minimum) and math.isfinite(maximum)) or minimum == maximum:
        return "unknown"  # no finite voxels, or a constant image
    if distinct is not None and distinct <= LABEL_MAP_MAX_DISTINCT:
        return "label map"
    if p01 <= CT_AIR_P01_MAX_HU or minimum <= CT_FAT_MAX_HU:
        return "CT"
    if (p99 is not None and offset_tissue is not None and offset_gap is not None
            and _offset_candidate(minimum, p01, p99)
            and offset_tissue > OFFSET_TISSUE_MIN and offset_gap <= OFFSET_GAP_MAX):
        return "CT+1024"
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
    tissue = gap = None
    if v.size and _offset_candidate(vmin, p01, p99):  # a few counting passes, only for MR-or-offset-CT images
        tissue, gap = _offset_fractions(v)
    modality = guess_modality(vmin, vmax, p01, distinct, p99=p99, offset_tissue=tissue, offset_gap=gap)
    metal = None
    if modality in CT_LIKE:
        offset = HU_OFFSET if modality == "CT+1024" else 0.0
        metal = float(np.count_nonzero(v > METAL_MIN_HU + offset)) / v.size
    return VolumeStats(str(path), shape, spacing, "".join(nio.aff2axcodes(aff)), vmin, vmax, median, p01, p99,
                       distinct, modality, sampled or thinned, metal, tissue, gap)


def too_few_slices(shape) -> str:
    """Why an image of ``shape`` (X, Y, Z) is not a 3-D volume ('' when it is one)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3 or min(shape[:3]) >= MIN_SLICES:
        return ""
    return (f"too few slices for a 3-D volume: shape {shape}, fewer than {MIN_SLICES} voxels along an axis "
            "(a localizer, a single image or a two-frame file?)")


def metal_warning(stats: VolumeStats) -> str:
    """'' or a warning (naming the file) that a CT-looking image holds metal (> METAL_MIN_HU)."""
    if stats.metal is None or stats.metal < METAL_WARN_FRACTION:
        return ""
    hu_max = stats.maximum - (HU_OFFSET if stats.modality == "CT+1024" else 0.0)
    if hu_max < METAL_MAX_MIN_HU:
        return ""
    return (f"{stats.path}: metal: {100 * stats.metal:.2g} % of voxels above {METAL_MIN_HU:,.0f} HU "
            f"(max {hu_max:,.0f} HU); streak artefacts around implants (dental fillings, prostheses) distort the "
            "intensities of the tissue nearby: check the case with alice3d-data preview")


def modality_warnings(stats: VolumeStats, expected: str = "CT") -> list[str]:
    """Warnings (each naming the file) when an image does not look like the ``expected`` modality,
    and, for a CT-looking image, when it holds metal (`metal_warning`)."""
    out = _modality_mismatch(stats, expected)
    metal = metal_warning(stats)
    return out + [metal] if metal else out


def _modality_mismatch(stats: VolumeStats, expected: str) -> list[str]:
    p = stats.path
    if stats.modality == "CT+1024":
        fractions = ""
        if stats.offset_tissue is not None:
            fractions = (f", {100 * stats.offset_tissue:.0f} % of the voxels above {OFFSET_BODY_MIN:g} in "
                         f"{OFFSET_TISSUE_BAND[0]:g}..{OFFSET_TISSUE_BAND[1]:g}, soft tissue -150..250 HU + 1024")
        what = (f"{p}: air near 0, bone near 2,000: a CT stored with +1024 offset (1st percentile {stats.p01:g}, "
                f"99th {stats.p99:g}, minimum {stats.minimum:g}{fractions})")
        if expected.upper() == "MR":
            return [f"{what}, not the MR the task expects"]
        return [f"{what}; set data.hu_offset=-1024 or import it with its importer"]
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
