"""Up-front checks of image/label files, so training commands can skip or stop on bad cases early.

`validate_case` returns a list of problems (empty = usable). With `full=False` only headers
are read where the format allows (NIfTI header, gzip trailer, SimpleITK image information):
enough to catch missing, truncated, non-image, wrong-dimensional and mismatched files cheaply.
`full=True` reads the voxels too (NaN/inf, constant image, label values). DICOM folders get
their series checks (gaps, duplicate positions, several series) in both modes.
`inspect_case` is the same check plus, on request, a summary of the image (shape, spacing,
orientation, intensities, the modality it looks like) and modality warnings.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .dicom import quiet_itk, read_series
from .geometry import itk_geometry, itk_to_ras_affine
from .inspect import VolumeStats, describe_volume, modality_warnings, sample_voxels, too_few_slices
from .io import DataError, _check_ndim_shape, _nifti_image, _sitk_reader, is_nifti, label_array, load_volume, read_array

__all__ = ["DataError", "CaseReport", "inspect_case", "validate_case", "check_case", "inspect_datalist",
           "validate_datalist", "header_info"]


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
    elif Path(path).is_dir():  # DICOM series: every slice header checked (gaps, duplicates, several series)

        series = read_series(path)
        shape = _check_ndim_shape(series.shape, path, expect_ndim)
        aff = series.ras_affine()
    else:
        reader = _sitk_reader(path)
        try:
            with quiet_itk():
                reader.ReadImageInformation()
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise DataError(f"{path}: SimpleITK could not read the image header: {lines[-1] if lines else e}") from None
        shape = _check_ndim_shape(reader.GetSize(), path, expect_ndim)
        origin, spacing, direction = itk_geometry(reader)
        aff = itk_to_ras_affine(origin, spacing, direction.ravel())
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise DataError(f"{path}: invalid (singular or non-finite) voxel->world affine")
    return shape, aff


@dataclass
class CaseReport:
    """What `inspect_case` found: problems (empty = usable), and with ``describe`` the image's
    summary and modality warnings (a warning does not make a case unusable)."""

    image: str
    label: str | None = None
    problems: list[str] = field(default_factory=list)
    stats: VolumeStats | None = None
    warnings: list[str] = field(default_factory=list)
    entry: dict | None = None  # the datalist entry it came from

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = {"image": self.image, "label": self.label, "status": "ok" if self.ok else "bad",
             "problems": list(self.problems), "warnings": list(self.warnings)}
        if self.stats is not None:
            d.update({k: v for k, v in self.stats.to_dict().items() if k != "path"})
        return d


def _header_problems(image_path: str, label_path, label_values, expect_ndim: int, affine_atol: float):
    """(problems, image shape, image affine, label array or None) from headers; shape None = unreadable image."""
    try:
        shape, aff = header_info(image_path, expect_ndim)
    except DataError as e:
        return [str(e)], None, None, None
    problems, label = [], None
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
    return problems, shape, aff, label


def inspect_case(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None = None,
    label_values: Iterable[int] | None = None,
    min_shape: Sequence[int] | None = None,
    *,
    full: bool = True,
    describe: bool = False,
    expect_modality: str = "CT",
    allow_constant: bool = False,
    expect_ndim: int = 3,
    affine_atol: float = 1e-3,
) -> CaseReport:
    """Check one case (each problem names the file). With ``describe`` also summarise the image
    (`inspect.describe_volume`: all voxels when ``full``, else `inspect.sample_voxels`) and warn when
    it does not look like ``expect_modality`` or holds metal. An image with too few slices for a
    3-D volume (`inspect.too_few_slices`) gets a warning in either mode."""
    image_path = str(image_path)
    report = CaseReport(image_path, None if label_path is None else str(label_path))
    if full:
        try:
            vol = load_volume(image_path, label_path, expect_ndim=expect_ndim, affine_atol=affine_atol)
        except DataError as e:
            report.problems.append(str(e))
            return report
        shape, label = vol.shape, vol.label
        if not allow_constant and vol.array.size and float(vol.array.max()) == float(vol.array.min()):
            report.problems.append(f"{image_path}: constant image (every voxel = {float(vol.array.min())})")
        if describe:
            report.stats = describe_volume(vol.array, vol.affine, path=image_path)
    else:
        report.problems, shape, aff, label = _header_problems(image_path, label_path, label_values, expect_ndim,
                                                              affine_atol)
        if shape is None:
            return report
        if describe:
            try:
                report.stats = describe_volume(sample_voxels(image_path, expect_ndim=expect_ndim), aff, shape=shape,
                                               path=image_path, sampled=True)
            except DataError as e:
                report.problems.append(str(e))
    if min_shape is not None and any(s < m for s, m in zip(shape, min_shape)):
        report.problems.append(f"{image_path}: shape {tuple(shape)} smaller than the minimum {tuple(min_shape)}")
    if label is not None and label_values is not None:
        allowed = np.asarray(sorted(set(int(v) for v in label_values)))
        present = np.unique(label)
        extra = present[~np.isin(present, allowed)]
        if extra.size:
            report.problems.append(f"{label_path}: label values {extra.tolist()} outside the expected set {allowed.tolist()}")
    # a warning, not a problem: such a file still loads; training decides whether it may be used
    if few := too_few_slices(shape):
        report.warnings.append(f"{image_path}: {few}")
    if report.stats is not None:
        report.warnings += modality_warnings(report.stats, expect_modality)
    return report


def validate_case(*args, **kwargs) -> list[str]:
    """Problems with one case (each names the file); an empty list means the case is usable.
    Arguments as `inspect_case` (without ``describe``)."""
    return inspect_case(*args, **kwargs).problems


def check_case(*args, **kwargs) -> None:
    """`validate_case` that raises DataError listing every problem."""
    problems = validate_case(*args, **kwargs)
    if problems:
        raise DataError("; ".join(problems))


def inspect_datalist(
    entries: Iterable[dict],
    label_values: Iterable[int] | None = None,
    min_shape: Sequence[int] | None = None,
    *,
    full: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    **kwargs,
) -> list[CaseReport]:
    """`inspect_case` of every entry, in order; an entry without an image is a bad case. A listed
    file that does not exist is a bad case too ("file not found"), so every problem is listed."""
    reports = []
    for entry in entries:
        image = entry.get(image_key)
        if image is None:
            reports.append(CaseReport(str(entry), problems=[f"entry has no {image_key!r} key"], entry=entry))
            continue
        report = inspect_case(image, entry.get(label_key), label_values, min_shape, full=full, **kwargs)
        report.entry = entry
        reports.append(report)
    return reports


def validate_datalist(*args, **kwargs) -> tuple[list[dict], list[tuple[str, str]]]:
    """Split datalist entries into (good entries, bad [(image path, reason)]); arguments as `inspect_datalist`."""
    reports = inspect_datalist(*args, **kwargs)
    return ([r.entry for r in reports if r.ok],
            [(r.image, "; ".join(r.problems)) for r in reports if not r.ok])


def describe(bad: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"  {Path(p).name}: {reason}" for p, reason in bad)
