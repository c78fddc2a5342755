"""DICOM series folders: the slice headers are checked before SimpleITK stacks the slices.

SimpleITK's series reader assumes one series of parallel, evenly spaced slices. Given a
folder with a slice missing it averages the spacing (2.111 mm instead of 2 mm for 19 of 20
slices), places every slice after the gap at the wrong height and only prints a C++
warning. `read_series` reads each file's header (ImagePositionPatient 0020|0032,
ImageOrientationPatient 0020|0037) and raises a DataError naming the folder for several
series in one folder, slices of differing orientation or size, duplicate positions and
non-uniform spacing (gaps), so no caller ever gets silently misplaced voxels.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from alice3d.errors import DataError

from .geometry import itk_geometry, itk_to_ras_affine

TAG_POSITION = "0020|0032"  # ImagePositionPatient: LPS mm of the first voxel of the slice
TAG_ORIENTATION = "0020|0037"  # ImageOrientationPatient: row and column direction cosines (LPS)
TAG_SERIES_UID = "0020|000e"  # SeriesInstanceUID

# Scanners print direction cosines with at least 4-6 decimals, identical for every slice of a
# series; a difference above this is a tilted or re-oriented acquisition, not rounding.
ORIENTATION_ATOL = 1e-3
# No scanner reconstructs slices closer than 0.1 mm: two slices this close are one slice twice.
DUPLICATE_ATOL_MM = 0.01
# Positions are written with 0.01 mm precision or better, so the steps of an evenly spaced
# series agree to far less than 10%; a missing slice makes one step 100% longer.
SPACING_RTOL = 0.1
MAX_LISTED = 3  # problems of one kind spelled out in a message; the rest are counted

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_saved = True


@contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's global warning display (which names its own C++ source file) and restore it.

    Re-entrant and thread-safe: volumes load in a thread pool and the switch is process-wide,
    so it is restored only when the last reader leaves.
    """
    global _quiet_depth, _quiet_saved
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_saved = sitk.ProcessObject.GetGlobalWarningDisplay()
            sitk.ProcessObject.SetGlobalWarningDisplay(False)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                sitk.ProcessObject.SetGlobalWarningDisplay(_quiet_saved)


@dataclass(frozen=True)
class DicomSeries:
    """One checked series: its files sorted along the slice normal and its voxel grid (LPS)."""

    folder: str
    files: tuple[str, ...]
    shape: tuple[int, ...]  # (X, Y, Z) = (columns, rows, slices), the array order of `Volume`
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    spacing: tuple[float, float, float]  # mm between columns, rows and slices
    direction: tuple[float, ...]  # (3, 3) row-major; columns = row, column, slice-normal directions

    def ras_affine(self) -> np.ndarray:
        """(4, 4) voxel->world affine in RAS+ mm, as `load_volume` returns for this folder."""
        return itk_to_ras_affine(self.origin, self.spacing, self.direction)


@dataclass(frozen=True)
class _Slice:
    file: str
    position: np.ndarray  # (3,) LPS mm
    orientation: np.ndarray  # (6,) row then column direction cosines
    size: tuple[int, int]
    spacing: tuple[float, float]


def _numbers(reader, tag: str, n: int, file: str, what: str) -> np.ndarray:
    if not reader.HasMetaDataKey(tag):
        raise DataError(f"{file}: DICOM slice has no {what} ({tag}); cannot place it in the series")
    text = reader.GetMetaData(tag).strip()
    try:
        vals = np.asarray([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        vals = np.empty(0)
    if vals.shape != (n,) or not np.all(np.isfinite(vals)):
        raise DataError(f"{file}: DICOM {what} ({tag}) is {text!r}; expected {n} numbers separated by '\\'")
    return vals


def _header(file: str):
    """A SimpleITK ImageFileReader holding ``file``'s header (no voxels read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise DataError(f"{file}: SimpleITK could not read the DICOM header: {lines[-1] if lines else e}") from None
    return reader


def _read_slice(file: str) -> _Slice:
    reader = _header(file)
    return _Slice(file, _numbers(reader, TAG_POSITION, 3, file, "ImagePositionPatient"),
                  _numbers(reader, TAG_ORIENTATION, 6, file, "ImageOrientationPatient"),
                  tuple(int(s) for s in reader.GetSize()[:2]), tuple(float(s) for s in reader.GetSpacing()[:2]))


def _series_files(folder: str) -> list[str]:
    """The files of the folder's only series; several series in one folder are an error."""
    with quiet_itk():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or []
        series = {i: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, i) for i in ids}
    if not series:
        raise DataError(f"{folder}: directory holds no DICOM series")
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({len(f)} files)" for uid, f in sorted(series.items(), key=lambda kv: -len(kv[1])))
        raise DataError(f"{folder}: {len(series)} DICOM series (SeriesInstanceUID {TAG_SERIES_UID}) in one folder: "
                        f"{listing}; expected one series per folder (move each series into its own folder)")
    return list(next(iter(series.values())))


def _check_alike(folder: str, slices: list[_Slice]) -> None:
    """Every slice has the first slice's orientation, size and pixel spacing."""
    ref = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, ref.orientation, atol=ORIENTATION_ATOL):
            raise DataError(
                f"{folder}: slice orientation (ImageOrientationPatient {TAG_ORIENTATION}) differs between slices: "
                f"{Path(ref.file).name} has {_fmt(ref.orientation)}, {Path(s.file).name} has {_fmt(s.orientation)}; "
                "expected one orientation for the whole series")
        if s.size != ref.size or not np.allclose(s.spacing, ref.spacing, rtol=1e-4):
            raise DataError(
                f"{folder}: slice grids differ: {Path(ref.file).name} is {ref.size[0]}x{ref.size[1]} pixels of "
                f"{_fmt(ref.spacing)} mm, {Path(s.file).name} is {s.size[0]}x{s.size[1]} of {_fmt(s.spacing)} mm; "
                "expected the same pixel grid for every slice")


def _fmt(vals) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in vals) + ")"


def _duplicates(folder: str, names: list[str], depth: np.ndarray, steps: np.ndarray) -> None:
    dup = np.flatnonzero(steps <= DUPLICATE_ATOL_MM)
    if not dup.size:
        return
    pairs = "; ".join(f"{names[i]} and {names[i + 1]} both at {depth[i]:g} mm" for i in dup[:MAX_LISTED])
    more = f" (and {dup.size - MAX_LISTED} more)" if dup.size > MAX_LISTED else ""
    raise DataError(f"{folder}: {dup.size} duplicate DICOM slice position(s) along the slice normal: {pairs}{more}; "
                    "expected one slice per position (a file copied twice, or two acquisitions under one "
                    "SeriesInstanceUID)")


def _uniform(folder: str, names: list[str], depth: np.ndarray, steps: np.ndarray) -> float:
    """The slice step (mm); raises for gaps and uneven steps between consecutive slices."""
    expected = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - expected) > SPACING_RTOL * expected)
    if not bad.size:
        return float((depth[-1] - depth[0]) / (len(depth) - 1))

    def one(i: int) -> str:
        what = f"a gap of {steps[i]:g} mm" if steps[i] > expected else f"a step of only {steps[i]:g} mm"
        missing = int(round(steps[i] / expected)) - 1  # named only for a whole number of steps missing
        whole = abs(steps[i] - (missing + 1) * expected) <= SPACING_RTOL * expected
        hint = f", about {missing} slice(s) missing" if missing >= 1 and whole else ""
        return (f"{what} between slice positions {depth[i]:g} and {depth[i + 1]:g} mm "
                f"({names[i]} and {names[i + 1]}{hint})")

    found = "; ".join(one(i) for i in bad[:MAX_LISTED])
    more = f" (and {bad.size - MAX_LISTED} more uneven steps)" if bad.size > MAX_LISTED else ""
    raise DataError(f"{folder}: DICOM slices are not evenly spaced: expected {expected:g} mm between slices "
                    f"(the median step), found {found}{more}; refusing to stack them into one volume, "
                    "which would put slices at the wrong positions")


def read_series(folder: str | Path) -> DicomSeries:
    """Check the DICOM series in ``folder`` from its headers; raises DataError naming the folder."""
    folder = str(folder)
    files = _series_files(folder)
    if len(files) == 1:  # one (possibly multi-frame) file: ITK places its frames itself
        return _single_file(folder, files[0])
    slices = [_read_slice(f) for f in files]
    _check_alike(folder, slices)
    ref = slices[0]
    row, col = ref.orientation[:3], ref.orientation[3:]
    normal = np.cross(row, col)
    depth = np.asarray([float(s.position @ normal) for s in slices])
    order = np.argsort(depth, kind="stable")
    slices, depth = [slices[i] for i in order], depth[order]
    names = [Path(s.file).name for s in slices]
    steps = np.diff(depth)
    _duplicates(folder, names, depth, steps)
    step = _uniform(folder, names, depth, steps)
    direction = np.stack([row, col, normal], axis=1)
    return DicomSeries(folder, tuple(s.file for s in slices), (*ref.size, len(slices)),
                       tuple(float(v) for v in slices[0].position), (ref.spacing[0], ref.spacing[1], step),
                       tuple(direction.ravel()))


def _single_file(folder: str, file: str) -> DicomSeries:
    reader = _header(file)
    origin, spacing, direction = itk_geometry(reader)
    return DicomSeries(folder, (file,), tuple(int(s) for s in reader.GetSize()), tuple(origin), tuple(spacing),
                       tuple(direction.ravel()))
