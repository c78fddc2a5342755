"""Volume I/O: NIfTI through nibabel, everything else (DICOM series, .mha, .nrrd) through SimpleITK.

A `Volume` carries its array in (X, Y, Z) index order and the voxel->world affine in RAS+
millimetres (nibabel's convention): world x grows towards the patient's Right, y towards
Anterior, z towards Superior. SimpleITK/DICOM geometry (LPS+) is converted on the way in.
DICOM folders are stacked only after `alice3d.data.dicom.read_series` has checked the
slice headers (one series, one orientation, evenly spaced slices).

Every loader failure is a `DataError` that names the file and says what was expected.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel import orientations as nio
from scipy import ndimage

from alice3d.errors import DataError

from .dicom import folder_files, is_dicom_file, quiet_itk, read_series
from .geometry import itk_geometry, itk_to_ras_affine, ras_affine_to_itk

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".dcm", ".img", ".hdr", ".tif", ".tiff")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + (".mha", ".mhd", ".nrrd", ".nhdr")


@dataclass
class Volume:
    """A 3-D image (X, Y, Z) float32 with its voxel->world affine (4, 4) in RAS+ mm."""

    array: np.ndarray
    affine: np.ndarray
    path: str = ""
    label: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        nd = self.array.ndim
        return tuple(float(s) for s in np.linalg.norm(self.affine[:nd, :nd], axis=0))

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (float ok) -> (N, 3) world mm."""
        return nib.affines.apply_affine(self.affine, np.asarray(ijk, dtype=np.float64))

    def world_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) world mm -> (N, 3) fractional voxel indices."""
        return nib.affines.apply_affine(np.linalg.inv(self.affine), np.asarray(xyz, dtype=np.float64))


# ----------------------------------------------------------------------------- helpers


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom_dir(path: str | os.PathLike) -> bool:
    """A directory holding DICOM files (by .dcm suffix or the DICM magic at byte 128); hidden files,
    DICOMDIR and documents next to the slices (`dicom.folder_files`) do not count."""
    p = Path(path)
    if not p.is_dir():
        return False
    return any(is_dicom_file(f) for f in folder_files(p)[:20])


def _squeeze_trailing(arr: np.ndarray, path: str, expect_ndim: int) -> np.ndarray:
    while arr.ndim > expect_ndim and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != expect_ndim:
        raise DataError(
            f"{path}: expected a {expect_ndim}-D image, got shape {tuple(arr.shape)} ({arr.ndim}-D)"
        )
    return arr


def _check_ndim_shape(shape: Sequence[int], path: str, expect_ndim: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > expect_ndim and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != expect_ndim:
        raise DataError(f"{path}: expected a {expect_ndim}-D image, got shape {shape} ({len(shape)}-D)")
    if min(shape) < 1:
        raise DataError(f"{path}: empty image of shape {shape}")
    return shape


GZIP_MAGIC = b"\x1f\x8b"
NIFTI_MAGICS = ((344, b"n+1\x00"), (4, b"n+2\x00"))  # (byte offset, magic) of single-file NIfTI-1 and NIfTI-2


def _compression_mismatch(path: str) -> str | None:
    """What is wrong when a NIfTI file's name and its gzip compression disagree (a renamed file), else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
    except OSError:
        return None
    gz_name, gz_data = path.lower().endswith(".gz"), head[:2] == GZIP_MAGIC
    if gz_name and not gz_data and any(head[o:o + len(m)] == m for o, m in NIFTI_MAGICS):
        return "this NIfTI file is not gzip-compressed; rename it to .nii"
    if gz_data and not gz_name:
        return "this file is gzip-compressed; rename it to .nii.gz"
    return None


def _nifti_image(path: str):
    if (mismatch := _compression_mismatch(path)) is not None:
        raise DataError(f"{path}: {mismatch}")
    try:
        return nib.load(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable (gzipped) NIfTI file: {e}") from None
    except Exception as e:  # nibabel raises ImageFileError/HeaderDataError and plain ValueErrors
        raise DataError(f"{path}: not a valid NIfTI image: {e}") from None


def _check_gzip_stream(path: str) -> None:
    """Decompress to the end so gzip checks its CRC-32 and length: nibabel stops reading at the last
    voxel, so a damaged deflate block would otherwise load as silently wrong intensities."""
    with gzip.open(path, "rb") as g:
        while g.read(1 << 24):
            pass


def _nifti_data(img, path: str) -> np.ndarray:
    """Voxel data in the stored dtype (ints stay ints when the scaling is trivial)."""
    try:
        arr = np.asanyarray(img.dataobj)
        if path.lower().endswith(".gz"):
            _check_gzip_stream(path)
        return arr
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: truncated or corrupt image data ({type(e).__name__}: {e})") from None


def _sitk_reader(path: str):
    """A SimpleITK reader for a file, or for a DICOM folder whose series passed `dicom.read_series`'s checks;
    a DICOM file passes `read_series`'s file checks (complete bytes, a readable header) first."""
    if Path(path).is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(list(read_series(path).files))
        return reader
    reader = sitk.ImageFileReader()
    if is_dicom_file(path):
        read_series(path)
        reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    return reader


def _load_sitk(path: str, expect_ndim: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        reader = _sitk_reader(path)
        with quiet_itk():  # problems ITK would only print are checked (DICOM series) or raised as errors
            img = reader.Execute()
    except DataError:
        raise
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        raise DataError(f"{path}: SimpleITK could not read the image: {msg[-1] if msg else e}") from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{path}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components")
    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X) for 3-D
    arr = arr.transpose(tuple(range(arr.ndim))[::-1])  # -> (X, Y, Z), a free view
    if arr.ndim < expect_ndim:
        raise DataError(f"{path}: expected a {expect_ndim}-D image, got shape {tuple(arr.shape)} ({arr.ndim}-D)")
    origin, spacing, direction = itk_geometry(img)
    aff = itk_to_ras_affine(origin, spacing, direction.ravel())
    arr = _squeeze_trailing(arr, path, expect_ndim)
    return arr, aff


def read_array(path: str | os.PathLike, *, expect_ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Read one image file -> (array (X, Y, Z) in its stored dtype, affine (4, 4) RAS). Raises DataError."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if is_nifti(path):
        img = _nifti_image(path)
        _check_ndim_shape(img.shape, path, expect_ndim)
        arr = _squeeze_trailing(_nifti_data(img, path), path, expect_ndim)
        aff = np.asarray(img.affine, dtype=np.float64)
    else:
        arr, aff = _load_sitk(path, expect_ndim)
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise DataError(f"{path}: invalid (singular or non-finite) voxel->world affine")
    return arr, aff


def load_volume(
    path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    *,
    expect_ndim: int = 3,
    reject_constant: bool = False,
    affine_atol: float = 1e-3,
) -> Volume:
    """Load an image (and optionally its label map) into a `Volume` (array float32 (X, Y, Z)).

    NIfTI goes through nibabel; other formats and DICOM series directories through SimpleITK
    (its LPS geometry converted to a RAS affine). Raises DataError naming the file for missing,
    truncated, non-image, wrong-dimensional, non-finite or (optionally) constant images and
    for an image/label shape or affine mismatch. The label comes back as int16.
    """
    raw, aff = read_array(path, expect_ndim=expect_ndim)
    if raw.dtype.kind == "f":
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        if bad:
            raise DataError(f"{path}: {bad} non-finite (NaN/inf) voxels; expected finite intensities")
    elif raw.dtype.kind not in "iub":
        raise DataError(f"{path}: unsupported voxel type {raw.dtype}; expected a scalar numeric image")
    arr = np.asarray(raw, dtype=np.float32)
    if reject_constant and arr.size and float(arr.max()) == float(arr.min()):
        raise DataError(f"{path}: constant image (every voxel = {float(arr.min())})")
    label = None
    if label_path is not None:
        larr, laff = read_array(label_path, expect_ndim=expect_ndim)
        if larr.shape != arr.shape:
            raise DataError(f"{label_path}: label shape {larr.shape} does not match image {path} shape {arr.shape}")
        if not np.allclose(laff, aff, atol=affine_atol):
            raise DataError(
                f"{label_path}: label affine does not match image {path} "
                f"(max difference {float(np.abs(laff - aff).max()):.4g} mm)"
            )
        label = label_array(larr, str(label_path))
    return Volume(array=arr, affine=aff, path=str(path), label=label)


def label_array(arr: np.ndarray, path: str = "") -> np.ndarray:
    """Label voxels -> int16; non-finite, non-integer or out-of-range values are a DataError."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{path}: label map has non-finite voxels")
        rounded = np.rint(arr)
        if np.abs(arr - rounded).max(initial=0.0) > 1e-3:
            raise DataError(f"{path}: label map has non-integer values; expected integer class ids")
        arr = rounded
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{path}: unsupported label voxel type {arr.dtype}")
    if arr.size and (arr.min() < -32768 or arr.max() > 32767):
        raise DataError(f"{path}: label values outside the int16 range")
    return arr.astype(np.int16)


# ----------------------------------------------------------------------------- geometry


def reorient_to_ras(volume: Volume) -> Volume:
    """Flip/transpose array (and label) so the axes run R, A, S; world positions are preserved.

    The commands reorient and resample through :func:`alice3d.data.canonical.to_canonical`
    (the one geometry path, MONAI's ``Orientation``, voxel for voxel the same flips as here).
    """
    ornt = nio.io_orientation(volume.affine)
    target = nio.axcodes2ornt("RAS")
    transform = nio.ornt_transform(ornt, target)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    shape = volume.array.shape
    arr = np.ascontiguousarray(nio.apply_orientation(volume.array, transform))
    lab = None
    if volume.label is not None:
        lab = np.ascontiguousarray(nio.apply_orientation(volume.label, transform))
    aff = volume.affine @ nio.inv_ornt_aff(transform, shape)
    return replace(volume, array=arr, affine=aff, label=lab)


def reorient_array(array: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) array + affine -> the same data with axes in `axcodes` order and its affine."""
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(axcodes)))
    out = np.ascontiguousarray(nio.apply_orientation(array, transform))
    return out, np.asarray(affine) @ nio.inv_ornt_aff(transform, array.shape)


def resample_to_spacing(volume: Volume, spacing: Sequence[float], order: int = 1, exact: bool = False) -> Volume:
    """Resample to new voxel spacing (mm) on a grid with the same axes and physical extent.

    The new grid covers the old one edge to edge (voxel corners aligned), so the spacing
    is the requested one up to rounding of the voxel count. ``exact=True`` keeps the
    requested spacing exactly instead (grid centred on the old one), which is what volumes
    that must share one voxel grid (crop pairs) need. The label map, if any, is resampled
    with nearest neighbour. The affine keeps its direction cosines.

    Not the commands' path: the store, pretraining, fine-tuning, landmark and probing all use
    :func:`alice3d.data.canonical.to_canonical` (MONAI's grid: voxel 0 kept, exact spacing), so
    that fine-tuning can invert it and every command sees the same voxels. This grid (edge to
    edge, or centred) is for callers that need the extent kept.
    """
    nd = volume.array.ndim
    old = np.asarray(volume.spacing, dtype=np.float64)
    new = np.asarray(spacing, dtype=np.float64)
    if new.shape != old.shape:
        raise DataError(f"{volume.path}: spacing {tuple(new)} has {new.size} values, expected {nd}")
    if np.allclose(old, new, rtol=1e-6) if not exact else np.array_equal(old, new):
        return volume
    shape = np.maximum(1, np.rint(np.asarray(volume.array.shape) * old / new).astype(int))
    # new voxel centre i sits at old index (i + 0.5) * r - 0.5, with r = extent ratio per axis
    if exact:
        ratio = new / old
        offset = (np.asarray(volume.array.shape) - 1) / 2 - (shape - 1) / 2 * ratio
    else:
        ratio = np.asarray(volume.array.shape) / shape
        offset = 0.5 * ratio - 0.5

    def warp(a: np.ndarray, o: int) -> np.ndarray:
        return ndimage.affine_transform(a, ratio, offset=offset, output_shape=tuple(shape), order=o, mode="nearest")

    arr = warp(volume.array.astype(np.float32), order).astype(np.float32)
    lab = None if volume.label is None else warp(volume.label, 0).astype(volume.label.dtype)
    scale = np.eye(4)
    scale[:nd, :nd] = np.diag(ratio)
    scale[:nd, 3] = offset
    return replace(volume, array=arr, affine=np.asarray(volume.affine) @ scale, label=lab)


# ----------------------------------------------------------------------------- writing


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=None) -> Path:
    """Write a NIfTI-1 file (gzipped when the name ends in .gz) with sform/qform = scanner."""
    path = Path(path)
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype, copy=False)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    img.to_filename(str(path))
    return path


def save_image(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=None) -> Path:
    """Write NIfTI with nibabel or any SimpleITK format (.mha, .nrrd, ...) by file suffix."""
    if is_nifti(path):
        return save_nifti(array, affine, path, dtype)

    arr = np.asarray(array if dtype is None else np.asarray(array).astype(dtype))
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1])))
    origin, spacing, direction = ras_affine_to_itk(affine)
    img.SetOrigin(origin)
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return Path(path)
