"""Up-front checks of image/label files, so training commands can skip or stop on bad cases early.

`validate_case` returns a list of problems (empty = usable). With `full=False` only headers
are read where the format allows (NIfTI header, gzip trailer, SimpleITK image information):
enough to catch missing, truncated, non-image, wrong-dimensional and mismatched files cheaply.
`full=True` reads the voxels too (NaN/inf, constant image, label values).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .io import DataError, is_nifti, label_array, load_volume, read_array

__all__ = ["DataError", "validate_case", "check_case", "validate_datalist", "header_info"]


def _gzip_size_ok(path: str, expected: int) -> bool:
    """Does the gzip trailer (uncompressed size mod 2**32) match? Falls back to a full read."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 18:
            return False
        fh.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", fh.read(4))
    if isize == expected % (1 << 32):
        return True
    # a multi-member gzip stream only records its last member's size: stream it to be sure
    try:
        total = 0
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 22):
                total += len(chunk)
        return total >= expected
    except (OSError, EOFError, ValueError):
        return False


def header_info(path: str | os.PathLike, expect_ndim: int = 3) -> tuple[tuple[int, ...], np.ndarray]:
    """(shape, RAS affine) from the header only; raises DataError for unusable files."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if is_nifti(path):
        from .io import _check_ndim_shape, _nifti_image

        img = _nifti_image(path)
        shape = _check_ndim_shape(img.shape, path, expect_ndim)
        hdr = img.header
        nbytes = int(np.prod(img.shape)) * hdr.get_data_dtype().itemsize
        offset = int(hdr.get("vox_offset", 352)) if hasattr(hdr, "get") else 352
        if path.lower().endswith(".gz"):
            if not _gzip_size_ok(path, offset + nbytes):
                raise DataError(f"{path}: truncated or corrupt gzip stream (expected {offset + nbytes} bytes of NIfTI)")
        elif os.path.getsize(path) < offset + nbytes:
            raise DataError(f"{path}: truncated NIfTI file ({os.path.getsize(path)} bytes, expected {offset + nbytes})")
        aff = np.asarray(img.affine, dtype=np.float64)
    else:
        import SimpleITK as sitk

        from .io import _sitk_reader, itk_to_ras_affine

        reader = _sitk_reader(path)
        try:
            if isinstance(reader, sitk.ImageSeriesReader):  # DICOM series: read the first slice's header
                r = sitk.ImageFileReader()
                r.SetFileName(reader.GetFileNames()[0])
                r.ReadImageInformation()
                shape = tuple(r.GetSize()[:2]) + (len(reader.GetFileNames()),)
                return shape, itk_to_ras_affine(r.GetOrigin(), r.GetSpacing(), r.GetDirection())
            reader.ReadImageInformation()
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise DataError(f"{path}: SimpleITK could not read the image header: {lines[-1] if lines else e}") from None
        from .io import _check_ndim_shape

        shape = _check_ndim_shape(reader.GetSize(), path, expect_ndim)
        nd = reader.GetDimension()
        k = min(nd, 3)
        origin, spacing, direction = np.zeros(3), np.ones(3), np.eye(3)
        origin[:k] = reader.GetOrigin()[:k]
        spacing[:k] = reader.GetSpacing()[:k]
        direction[:k, :k] = np.asarray(reader.GetDirection()).reshape(nd, nd)[:k, :k]
        aff = itk_to_ras_affine(origin, spacing, direction.ravel())
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise DataError(f"{path}: invalid (singular or non-finite) voxel->world affine")
    return shape, aff


def validate_case(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    label_values: Iterable[int] | None = None,
    min_shape: Sequence[int] | None = None,
    *,
    full: bool = True,
    allow_constant: bool = False,
    expect_ndim: int = 3,
    affine_atol: float = 1e-3,
) -> list[str]:
    """Problems with one case (each names the file); an empty list means the case is usable."""
    problems: list[str] = []
    image_path = str(image_path)
    if full:
        try:
            vol = load_volume(image_path, label_path, expect_ndim=expect_ndim, affine_atol=affine_atol)
        except DataError as e:
            return [str(e)]
        shape = vol.shape
        if not allow_constant and vol.array.size and float(vol.array.max()) == float(vol.array.min()):
            problems.append(f"{image_path}: constant image (every voxel = {float(vol.array.min())})")
        label = vol.label
    else:
        try:
            shape, aff = header_info(image_path, expect_ndim)
        except DataError as e:
            return [str(e)]
        label = None
        if label_path is not None:
            try:
                lshape, laff = header_info(label_path, expect_ndim)
                if tuple(lshape) != tuple(shape):
                    problems.append(f"{label_path}: label shape {tuple(lshape)} does not match image {image_path} shape {tuple(shape)}")
                elif not np.allclose(laff, aff, atol=affine_atol):
                    problems.append(f"{label_path}: label affine does not match image {image_path} "
                                    f"(max difference {float(np.abs(laff - aff).max()):.4g} mm)")
                elif label_values is not None:
                    label = label_array(read_array(label_path, expect_ndim=expect_ndim)[0], str(label_path))
            except DataError as e:
                problems.append(str(e))
    if min_shape is not None and any(s < m for s, m in zip(shape, min_shape)):
        problems.append(f"{image_path}: shape {tuple(shape)} smaller than the minimum {tuple(min_shape)}")
    if label is not None and label_values is not None:
        allowed = np.asarray(sorted(set(int(v) for v in label_values)))
        present = np.unique(label)
        extra = present[~np.isin(present, allowed)]
        if extra.size:
            problems.append(f"{label_path}: label values {extra.tolist()} outside the expected set {allowed.tolist()}")
    return problems


def check_case(*args, **kwargs) -> None:
    """`validate_case` that raises DataError listing every problem."""
    problems = validate_case(*args, **kwargs)
    if problems:
        raise DataError("; ".join(problems))


def validate_datalist(
    entries: Iterable[dict],
    label_values: Iterable[int] | None = None,
    min_shape: Sequence[int] | None = None,
    *,
    full: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    **kwargs,
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Split datalist entries into (good entries, bad [(image path, reason)])."""
    good: list[dict] = []
    bad: list[tuple[str, str]] = []
    for entry in entries:
        image = entry.get(image_key)
        if image is None:
            bad.append((str(entry), f"entry has no {image_key!r} key"))
            continue
        label = entry.get(label_key)
        problems = validate_case(image, label, label_values, min_shape, full=full, **kwargs)
        if problems:
            bad.append((str(image), "; ".join(problems)))
        else:
            good.append(entry)
    return good, bad


def describe(bad: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"  {Path(p).name}: {reason}" for p, reason in bad)
