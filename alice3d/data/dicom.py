"""DICOM series folders and files: every file and every slice header is checked before SimpleITK reads voxels.

SimpleITK's series reader assumes one series of parallel, evenly spaced slices stacked along
the slice normal. Given a folder with a slice missing it averages the spacing (2.111 mm instead
of 2 mm for 19 of 20 slices) and places every slice after the gap at the wrong height; given a
gantry-tilted series it stacks the slices along the normal of the tilted image plane, so slice k
lands k times the per-slice shift away from where it was acquired; GDCM's own folder scan drops
a file it cannot parse (a cut last file gives a volume one slice short, a cut middle file looks
like a gap) and holds every file's bytes in memory at once. `read_series` therefore lists the
folder itself, checks every file's bytes (`file_problem`: header complete, pixel data as long as
the header says, without reading the pixel data), reads each header with SimpleITK
(ReadImageInformation, one file at a time, no pixel decoding) and raises a DataError naming the
folder and the file for damaged or foreign files, several series in one folder, slices of
differing orientation or size, duplicate positions, gantry tilt and non-uniform spacing (gaps),
so no caller ever gets silently misplaced voxels.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
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
# How far (mm) a slice may sit sideways of the line through the first slice along the slice normal.
# Positions are decimal strings, at worst rounded to 0.1 mm (+-0.05 mm per coordinate), so two
# slices of an untilted stack can differ sideways by up to ~0.14 mm; cosines printed with >= 5
# decimals tip the normal by < 2e-5 rad, < 0.02 mm over a 1 m scan. 0.2 mm is above both and below
# any CT pixel (>= 0.3 mm), while a real gantry tilt (degrees) moves slices by millimetres.
TILT_ATOL_MM = 0.2
MAX_LISTED = 3  # problems of one kind spelled out in a message; the rest are counted

# Files in a series folder that are not slices and are skipped, not refused: the media index of a
# DICOM CD (DICOMDIR), operating-system litter, and documents exporters put next to the images.
# Hidden files (".name") are skipped too. Every other regular file must be a slice of the series.
SKIPPED_NAMES = frozenset({"dicomdir", "thumbs.db", "desktop.ini"})
SKIPPED_SUFFIXES = (".txt", ".json", ".xml", ".csv", ".md", ".htm", ".html", ".pdf", ".log", ".ini")

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


# ----------------------------------------------------------------------------- file bytes
#
# A DICOM file (PS3.10) is a 128-byte preamble, "DICM", the file meta group (0002,xxxx) in explicit
# VR little endian naming the transfer syntax, then the data set as a run of elements (tag, [VR],
# length, value) in that syntax. Pixel data (7FE0,0010) is either native, with its byte length in
# the element, or encapsulated (compressed): undefined length, then fragment items (FFFE,E000), each
# with its length, closed by the sequence delimiter (FFFE,E0DD). Walking the element headers and
# seeking over every value shows whether the file holds all the bytes its header promises without
# reading (let alone decoding) the pixel data: a cut file runs out of bytes inside an element.

_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 2 reserved bytes + 4-byte length
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD  # tags as group << 16 | element
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # pixel data, float and double float pixel data
_ROWS, _COLUMNS, _SAMPLES, _BITS, _FRAMES = 0x00280010, 0x00280011, 0x00280002, 0x00280100, 0x00280008
_TS_IMPLICIT_LE, _TS_EXPLICIT_BE, _TS_DEFLATED = "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"


class _Damaged(Exception):
    """The file cannot be a complete DICOM image; the message says why (without the file name)."""


class _Unsure(Exception):
    """An encoding the walker does not know (GDCM copes with more): the file is left to GDCM's reader."""


def _tag(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """Element headers of one open file; values are seeked over except the few image-size tags."""

    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size
        self.explicit, self.little = True, True

    def take(self, n: int, what: str) -> bytes:
        data = self.fh.read(n)
        if len(data) < n:
            raise _Damaged(f"truncated DICOM file: it ends inside {what} ({self.size} bytes)")
        return data

    def skip(self, n: int, what: str) -> None:
        left = self.size - self.fh.tell()
        if n > left:
            raise _Damaged(f"truncated DICOM file: {what} needs {n} bytes, the file holds {left} after its header")
        self.fh.seek(n, os.SEEK_CUR)

    def element(self) -> tuple[int, bytes, int]:
        """(tag, VR (b'' where the syntax has none), value length) of the element at the file position."""
        e = "<" if self.little else ">"
        at = self.fh.tell()
        group, elem = struct.unpack(e + "HH", self.take(4, f"the element header at byte {at}"))
        tag = group << 16 | elem
        if group == 0xFFFE or not self.explicit:  # items and delimiters never carry a VR
            return tag, b"", struct.unpack(e + "I", self.take(4, f"element {_tag(tag)}"))[0]
        vr = self.take(2, f"element {_tag(tag)}")
        if not (vr.isalpha() and vr.isupper()):
            raise _Unsure(f"no VR at byte {at + 4}")
        if vr in _LONG_VRS:
            self.take(2, f"element {_tag(tag)}")
            return tag, vr, struct.unpack(e + "I", self.take(4, f"element {_tag(tag)}"))[0]
        return tag, vr, struct.unpack(e + "H", self.take(2, f"element {_tag(tag)}"))[0]

    def meta(self) -> str:
        """Skip the file meta group (explicit VR little endian); its transfer syntax UID."""
        ts = None
        while True:
            at = self.fh.tell()
            peek = self.fh.read(2)
            self.fh.seek(at)
            if len(peek) < 2:
                raise _Damaged(f"truncated DICOM file: it ends inside the file meta information ({self.size} bytes)")
            if struct.unpack("<H", peek)[0] != 0x0002:
                break
            tag, _, length = self.element()
            if tag == 0x00020010:
                ts = self.take(length, "the transfer syntax UID").rstrip(b"\0 ").decode("ascii", "replace")
            else:
                self.skip(length, f"file meta element {_tag(tag)}")
        if ts is None:
            raise _Unsure("no transfer syntax")
        return ts

    def dataset(self, top: bool, found: dict | None) -> tuple[int, int] | None:
        """Walk a data set to the end of the file (``top``) or to its item delimiter; at the top level
        stop at the pixel data and return (tag, value length), collecting the image-size tags in ``found``."""
        while True:
            if top and self.fh.tell() >= self.size:
                return None
            tag, vr, length = self.element()
            if tag == _ITEM_END and not top:
                return None
            if top and tag in _PIXEL_TAGS:
                return tag, length
            if length == _UNDEFINED:
                self.sequence(tag, vr == b"UN")
            elif top and tag in (_ROWS, _COLUMNS, _SAMPLES, _BITS, _FRAMES):
                found[tag] = self.take(length, f"element {_tag(tag)}")
            else:
                self.skip(length, f"element {_tag(tag)}")

    def sequence(self, tag: int, unknown_vr: bool) -> None:
        """Walk a sequence of undefined length up to its delimiter (FFFE,E0DD)."""
        if unknown_vr:  # PS3.5 6.2.2: a UN element of undefined length is encoded in implicit VR little endian
            start, saved = self.fh.tell(), (self.explicit, self.little)
            self.explicit, self.little = False, True
            try:
                return self.items(tag)
            except (_Damaged, _Unsure):
                # some writers keep the explicit encoding inside such an element: try that before calling
                # the file damaged (a real cut fails this way too)
                self.fh.seek(start)
            finally:
                self.explicit, self.little = saved
        self.items(tag)

    def items(self, tag: int) -> None:
        """The items of sequence ``tag`` in the current encoding, through its delimiter."""
        while True:
            item, _, length = self.element()
            if item == _SEQ_END:
                return
            if item != _ITEM:
                raise _Unsure(f"sequence {_tag(tag)} holds {_tag(item)} where an item was expected")
            if length == _UNDEFINED:
                self.dataset(False, None)
            else:
                self.skip(length, f"an item of sequence {_tag(tag)}")

    def fragments(self) -> None:
        """Encapsulated pixel data: every fragment complete and the delimiter (FFFE,E0DD) present."""
        k = 0
        while True:
            if self.size - self.fh.tell() < 8:
                raise _Damaged("truncated DICOM file: its compressed pixel data stops after "
                               f"{k} fragment(s) without the sequence delimiter (FFFE,E0DD)")
            tag, _, length = self.element()
            if tag == _SEQ_END:
                return
            if tag != _ITEM or length == _UNDEFINED:
                raise _Damaged(f"corrupt compressed pixel data: {_tag(tag)} where fragment {k + 1} (FFFE,E000) "
                               "was expected")
            left = self.size - self.fh.tell()
            if length > left:
                raise _Damaged(f"truncated DICOM file: compressed pixel data fragment {k + 1} needs {length} bytes, "
                               f"the file holds {left} after its header")
            self.fh.seek(length, os.SEEK_CUR)
            k += 1

    def inflate(self) -> None:
        """A deflated data set (PS3.5 A.4) cannot be walked without inflating it: check the deflate stream
        reaches its end, in bounded chunks, the inflated bytes thrown away."""
        stream = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            while not stream.eof and (chunk := self.fh.read(1 << 16)):
                while chunk and not stream.eof:
                    stream.decompress(chunk, 1 << 20)
                    chunk = stream.unconsumed_tail
        except zlib.error as e:
            raise _Damaged(f"corrupt deflate-compressed DICOM data set: {e}") from None
        if not stream.eof:
            raise _Damaged("truncated DICOM file: its deflate-compressed data set ends early")

    def native_size(self, found: dict) -> int | None:
        """Bytes Rows x Columns x frames x samples x BitsAllocated need, None when a tag is missing."""
        e = "<" if self.little else ">"
        try:
            rows, cols, bits = (struct.unpack(e + "H", found[t][:2])[0] for t in (_ROWS, _COLUMNS, _BITS))
            samples = struct.unpack(e + "H", found[_SAMPLES][:2])[0] if _SAMPLES in found else 1
            frames = int(found[_FRAMES].decode("ascii").strip("\0 ") or 1) if _FRAMES in found else 1
        except (KeyError, struct.error, ValueError, UnicodeDecodeError):
            return None
        return -(-rows * cols * frames * samples * bits // 8)

    def check(self) -> str:
        head = self.fh.read(132)
        if head[128:132] == b"DICM":
            ts = self.meta()
        else:
            # PS3.10 files carry the preamble; older exports (ACR-NEMA style) start with a group
            # 0000-0008 element and implicit VR. Anything else is not DICOM.
            group = struct.unpack("<H", head[:2])[0] if len(head) >= 8 else 0
            if not 0x0002 <= group <= 0x0008:
                if self.size < 132:
                    return (f"truncated DICOM file or not DICOM: {self.size} bytes, ending before the 'DICM' marker "
                            "at byte 128")
                return "not a DICOM file (no 'DICM' marker at byte 128)"
            self.fh.seek(0)
            if group == 0x0002:
                ts = self.meta()
            else:
                vr = head[4:6]  # a VR after the tag means explicit VR little endian
                ts = "explicit VR little endian" if vr.isalpha() and vr.isupper() else _TS_IMPLICIT_LE
        if ts == _TS_DEFLATED:
            self.inflate()
            return ""
        self.explicit, self.little = ts != _TS_IMPLICIT_LE, ts != _TS_EXPLICIT_BE
        found: dict[int, bytes] = {}
        pixel = self.dataset(True, found)
        if pixel is None:
            return ("holds no pixel data (7FE0,0010): not an image (a report or presentation state?), "
                    "or cut before its pixel data")
        tag, length = pixel
        if length == _UNDEFINED:
            self.fragments()
            return ""
        left = self.size - self.fh.tell()
        what = "pixel data" if tag == 0x7FE00010 else f"pixel data {_tag(tag)}"
        if length > left:
            return f"truncated DICOM file: {what} needs {length} bytes, the file holds {left} after the header"
        need = self.native_size(found)
        if need is not None and length < need:
            return (f"corrupt DICOM file: its {what} holds {length} bytes where its Rows, Columns, NumberOfFrames, "
                    f"SamplesPerPixel and BitsAllocated need {need}")
        return ""


def file_problem(path: str | os.PathLike) -> str:
    """What keeps ``path`` from being a complete DICOM image ('' when nothing does, as far as the bytes show).

    Reads element headers only and seeks over values, so a file's pixel data is never read. Native
    pixel data must be as long as its element says (and as Rows x Columns x ... need); compressed
    pixel data must end with its delimiter. An encoding the walker does not know is left to GDCM ('').
    """
    try:
        size = os.path.getsize(path)
        fh = open(path, "rb")
    except OSError as e:
        return f"cannot read the file: {e.strerror or e}"
    if size == 0:
        fh.close()
        return "empty file (0 bytes)"
    with fh:
        try:
            return _Walker(fh, size).check()
        except _Damaged as e:
            return str(e)
        except _Unsure:
            return ""


# ----------------------------------------------------------------------------- folders and headers


def _skipped(p: Path) -> bool:
    name = p.name.lower()
    return name.startswith(".") or name in SKIPPED_NAMES or name.endswith(SKIPPED_SUFFIXES)


def folder_files(folder: str | os.PathLike) -> list[Path]:
    """The regular files of ``folder`` (sorted; not recursive) that must all be slices of its series:
    hidden files, DICOMDIR and the documents in SKIPPED_SUFFIXES are left out."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not _skipped(p))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A regular file named *.dcm or holding the DICM marker at byte 128 (a DICOMDIR index is not an image)."""
    p = Path(path)
    if not p.is_file() or p.name.lower() in SKIPPED_NAMES:
        return False
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


@dataclass(frozen=True)
class _Slice:
    file: str
    position: np.ndarray  # (3,) LPS mm
    position_text: str  # ImagePositionPatient as the header writes it, e.g. "(-125, -125, -51.1)"
    orientation: np.ndarray  # (6,) row then column direction cosines
    size: tuple[int, int]
    spacing: tuple[float, float]


class _Unreadable(Exception):
    """One file of a folder that is not a usable DICOM image; the message says why."""


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
    """A SimpleITK reader holding ``file``'s header, after `file_problem` found its bytes complete.

    ReadImageInformation parses the header (GDCM holds the file's bytes while it does, one file at a
    time) and never decodes pixels. Raises _Unreadable.
    """
    if problem := file_problem(file):
        raise _Unreadable(problem)
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")  # a DICOM reading or an error, never another format's reader
    reader.SetFileName(file)
    reader.LoadPrivateTagsOff()
    try:
        with quiet_itk():
            reader.ReadImageInformation()
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise _Unreadable(f"SimpleITK could not read the DICOM header: {lines[-1] if lines else e}") from None
    return reader


def _read_slice(file: str, reader) -> _Slice:
    position = _numbers(reader, TAG_POSITION, 3, file, "ImagePositionPatient")
    text = "(" + ", ".join(v.strip() for v in reader.GetMetaData(TAG_POSITION).strip().split("\\")) + ")"
    return _Slice(file, position, text, _numbers(reader, TAG_ORIENTATION, 6, file, "ImageOrientationPatient"),
                  tuple(int(s) for s in reader.GetSize()[:2]), tuple(float(s) for s in reader.GetSpacing()[:2]))


def _folder_headers(folder: str) -> list[tuple[str, object]]:
    """(file, header reader) of every file of the folder's one series; raises DataError naming every
    unreadable file, and for a folder holding several series."""
    files = folder_files(folder)
    if not files:
        raise DataError(f"{folder}: directory holds no DICOM files")
    headers, bad = [], []
    for f in files:
        try:
            headers.append((str(f), _header(str(f))))
        except _Unreadable as e:
            bad.append(f"{f.name}: {e}")
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (f" (and {len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else "")
        raise DataError(f"{folder}: {len(bad)} of the {len(files)} files in the DICOM series folder cannot be used: "
                        f"{listed}; expected every file in the folder to be a complete DICOM slice of the series "
                        "(copy or export damaged files again; move other files out of the folder)")
    series: dict[str, list] = {}
    for f, reader in headers:
        uid = reader.GetMetaData(TAG_SERIES_UID).strip().rstrip("\0") if reader.HasMetaDataKey(TAG_SERIES_UID) else ""
        series.setdefault(uid, []).append((f, reader))
    if len(series) > 1:
        listing = ", ".join(f"{uid or '(none)'} ({len(f)} files)"
                            for uid, f in sorted(series.items(), key=lambda kv: -len(kv[1])))
        raise DataError(f"{folder}: {len(series)} DICOM series (SeriesInstanceUID {TAG_SERIES_UID}) in one folder: "
                        f"{listing}; expected one series per folder (move each series into its own folder)")
    return headers


# ----------------------------------------------------------------------------- series checks


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


def _ipp(s: _Slice) -> str:
    return f"{Path(s.file).name} (ImagePositionPatient {s.position_text})"


def _duplicates(folder: str, slices: list[_Slice], depth: np.ndarray, steps: np.ndarray) -> None:
    dup = np.flatnonzero(steps <= DUPLICATE_ATOL_MM)
    if not dup.size:
        return
    pairs = "; ".join(f"{Path(slices[i].file).name} and {Path(slices[i + 1].file).name} both at {depth[i]:g} mm "
                      f"(ImagePositionPatient {slices[i].position_text} and {slices[i + 1].position_text})"
                      for i in dup[:MAX_LISTED])
    more = f" (and {dup.size - MAX_LISTED} more)" if dup.size > MAX_LISTED else ""
    raise DataError(f"{folder}: {dup.size} duplicate DICOM slice position(s) along the slice normal: {pairs}{more}; "
                    "expected one slice per position (a file copied twice, or two acquisitions under one "
                    "SeriesInstanceUID)")


def _tilt(folder: str, slices: list[_Slice], normal: np.ndarray, depth: np.ndarray) -> None:
    """Refuse a stack whose positions do not advance along the slice normal (gantry tilt)."""
    rel = np.stack([s.position for s in slices]) - slices[0].position
    sideways = np.linalg.norm(rel - np.outer(rel @ normal, normal), axis=1)  # mm off the normal through slice 0
    worst = int(np.argmax(sideways))
    if sideways[worst] <= TILT_ATOL_MM:
        return
    angle = float(np.degrees(np.arctan2(sideways[worst], abs(depth[worst] - depth[0]))))
    per_slice = f", {sideways[worst] / worst:.3g} mm per slice" if worst else ""
    raise DataError(
        f"{folder}: DICOM slice positions (ImagePositionPatient {TAG_POSITION}) advance {angle:.1f} degrees away "
        f"from the slice normal (the cross product of the ImageOrientationPatient {TAG_ORIENTATION} row and column "
        f"directions): a gantry-tilted acquisition; stacked along the normal, {_ipp(slices[worst])} would land "
        f"{sideways[worst]:.3g} mm from where it was acquired relative to {_ipp(slices[0])}{per_slice}; "
        "refusing to read it. Resample the series with dcm2niix, which corrects gantry tilt (it writes the "
        "corrected copy with '_Tilt' in its name), and give that NIfTI file instead")


def _uniform(folder: str, slices: list[_Slice], depth: np.ndarray, steps: np.ndarray) -> float:
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
        return f"{what} along the slice normal between {_ipp(slices[i])} and {_ipp(slices[i + 1])}{hint}"

    found = "; ".join(one(i) for i in bad[:MAX_LISTED])
    more = f" (and {bad.size - MAX_LISTED} more uneven steps)" if bad.size > MAX_LISTED else ""
    raise DataError(f"{folder}: DICOM slices are not evenly spaced: expected {expected:g} mm between slices "
                    f"(the median step), found {found}{more}; refusing to stack them into one volume, "
                    "which would put slices at the wrong positions")


def read_series(path: str | os.PathLike) -> DicomSeries:
    """Check the DICOM series in folder ``path`` (or the one DICOM file ``path``) from its headers, without
    reading pixel data; raises DataError naming the folder (file) and the file at fault."""
    path = str(path)
    if os.path.isfile(path):  # one (possibly multi-frame) file given by name
        try:
            return _single_file(path, path, _header(path))
        except _Unreadable as e:
            raise DataError(f"{path}: {e}") from None
    if not os.path.isdir(path):
        raise DataError(f"{path}: file not found")
    headers = _folder_headers(path)
    if len(headers) == 1:  # one (possibly multi-frame) file: ITK places its frames itself
        return _single_file(path, *headers[0])
    for f, reader in headers:
        if reader.GetDimension() > 2 and reader.GetSize()[2] > 1:
            raise DataError(f"{path}: {Path(f).name} holds {reader.GetSize()[2]} frames; a series folder of several "
                            "files must hold one slice per file (give a multi-frame .dcm file by its own path)")
    slices = [_read_slice(f, reader) for f, reader in headers]
    _check_alike(path, slices)
    ref = slices[0]
    row, col = ref.orientation[:3], ref.orientation[3:]
    normal = np.cross(row, col)
    depth = np.asarray([float(s.position @ normal) for s in slices])
    order = np.argsort(depth, kind="stable")
    slices, depth = [slices[i] for i in order], depth[order]
    steps = np.diff(depth)
    _duplicates(path, slices, depth, steps)
    _tilt(path, slices, normal, depth)
    step = _uniform(path, slices, depth, steps)
    direction = np.stack([row, col, normal], axis=1)
    return DicomSeries(path, tuple(s.file for s in slices), (*ref.size, len(slices)),
                       tuple(float(v) for v in slices[0].position), (ref.spacing[0], ref.spacing[1], step),
                       tuple(direction.ravel()))


def _single_file(folder: str, file: str, reader) -> DicomSeries:
    origin, spacing, direction = itk_geometry(reader)
    size = tuple(int(s) for s in reader.GetSize())
    return DicomSeries(folder, (file,), (size + (1, 1, 1))[:3], tuple(float(v) for v in origin),
                       tuple(float(v) for v in spacing), tuple(direction.ravel()))
