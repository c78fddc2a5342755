"""DICOM edge cases: gantry tilt, truncated or foreign files, multi-frame files, one-slice series, and
header scans that never hold (or decode) the pixel data."""

import locale
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk

import alice3d
from alice3d.cli.data import main
from alice3d.data import dicom
from alice3d.data.datalists import load_datalist
from alice3d.data.inspect import too_few_slices
from alice3d.data.io import DataError, is_dicom_dir, load_volume
from alice3d.data.validate import header_info, validate_case

UID = "1.2.826.0.1.3680043.2.1125.1.77"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXELS = np.arange(20, dtype=np.int16).reshape(4, 5) * 10 - 1000  # 4 rows x 5 columns, 40 bytes


@pytest.fixture(autouse=True)
def _keep_locale():
    # GDCM's writer sets the process locale to "C" (ASCII text I/O for every later test): restore it.
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def _write(image, path, tags, compressor=None):
    for tag, val in tags.items():
        image.SetMetaData(tag, val)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    if compressor is not None:
        writer.SetUseCompression(True)
        writer.SetCompressor(compressor)
    writer.SetFileName(str(path))
    writer.Execute(image)
    return path


def write_series(folder, positions, orientation=AXIAL, compressor=None, pixels=(4, 5)):
    """One CT slice file per LPS position (0.7 x 0.8 mm pixels, slice k = PIXELS + 50 k); the files in order."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, pos in enumerate(positions):
        arr = PIXELS + 50 * k if pixels == (4, 5) else np.full(pixels, k, np.int16)
        sl = sitk.GetImageFromArray(np.asarray(arr, dtype=np.int16))
        sl.SetSpacing((0.7, 0.8))
        tags = {"0008|0060": "CT", "0020|000e": UID, "0020|000d": UID + ".0", "0020|0013": str(k + 1),
                "0008|0018": f"{UID}.{k + 1}", "0020|0032": "\\".join(f"{p:g}" for p in pos),
                "0020|0037": "\\".join(f"{c:g}" for c in orientation)}
        files.append(_write(sl, folder / f"slice{k:03d}.dcm", tags, compressor))
    return files


def _axial(n, step=2.0):
    return [(10.0, -20.0, 30.0 + step * k) for k in range(n)]


def _cut(path, nbytes):
    data = path.read_bytes()
    path.write_bytes(data[:-nbytes])


# ----------------------------------------------------------------------------- gantry tilt


def test_gantry_tilted_series_is_refused_with_its_angle(tmp_path, capsys):
    # the image plane is tilted 15 degrees about the row (x) axis while the table moves the slices along z:
    # the normal is (0, -sin 15, cos 15), so the steps along it are an even 5 cos 15 = 4.83 mm and
    # only the sideways drift (5 sin 15 = 1.29 mm per slice) shows the tilt
    t = np.radians(15.0)
    folder = tmp_path / "data" / "tilted"
    write_series(folder, [(10.0, -20.0, 30.0 + 5.0 * k) for k in range(6)],
                 orientation=(1, 0, 0, 0, np.cos(t), np.sin(t)))
    for check in (lambda: dicom.read_series(folder), lambda: load_volume(folder), lambda: header_info(folder)):
        with pytest.raises(DataError) as e:
            check()
        msg = str(e.value)
        assert msg.startswith(f"{folder}: DICOM slice positions (ImagePositionPatient 0020|0032) advance 15.0 "
                              "degrees away from the slice normal")
        assert "gantry-tilted" in msg
        assert ("slice005.dcm (ImagePositionPatient (10, -20, 55)) would land 6.47 mm from where it was acquired "
                "relative to slice000.dcm (ImagePositionPatient (10, -20, 30)), 1.29 mm per slice") in msg
        assert "dcm2niix" in msg and "NIfTI" in msg
    assert "15.0 degrees" in validate_case(folder, full=False)[0]
    assert main(["validate", str(tmp_path / "data")]) == 1
    assert "BAD  training: tilted: " in capsys.readouterr().out


def test_small_tilt_is_refused_and_rounding_is_not_tilt(tmp_path):
    # 0.5 degrees over 9 steps of 5 mm: the last slice is 45 sin(0.5 deg) = 0.39 mm sideways (> 0.2 mm)
    a = np.radians(0.5)
    write_series(tmp_path / "small", [(10.0, -20.0 + 5 * k * np.sin(a), 30.0 + 5 * k * np.cos(a)) for k in range(10)])
    with pytest.raises(DataError, match=r"advance 0\.5 degrees away from the slice normal"):
        header_info(tmp_path / "small")
    # positions a scanner rounded to 0.1 mm: up to 0.05 mm off in x and y, an untilted stack
    jitter = [(0.0, 0.0), (0.05, -0.05), (-0.05, 0.05), (0.05, 0.05), (-0.05, -0.05), (0.0, 0.05)]
    write_series(tmp_path / "rounded", [(10.0 + dx, -20.0 + dy, 30.0 + 2 * k) for k, (dx, dy) in enumerate(jitter)])
    shape, aff = header_info(tmp_path / "rounded")
    assert shape == (5, 4, 6) and np.allclose(aff[:3, 3], [-10, 20, 30])


# ----------------------------------------------------------------------------- damaged and foreign files


def test_truncated_last_file_is_named_not_dropped(tmp_path):
    folder = tmp_path / "cutlast"
    files = write_series(folder, _axial(10))
    _cut(files[-1], 10)
    for check in (lambda: load_volume(folder), lambda: header_info(folder)):
        with pytest.raises(DataError) as e:
            check()
        msg = str(e.value)
        assert msg.startswith(f"{folder}: 1 of the 10 files in the DICOM series folder cannot be used: ")
        # the slice's pixel data element says 4 x 5 x 2 = 40 bytes; 30 of them are left
        assert ("slice009.dcm: truncated DICOM file: pixel data needs 40 bytes, the file holds 30 after the header"
                in msg)
    assert "slice009.dcm: truncated" in validate_case(folder, full=False)[0]


def test_truncated_middle_file_is_named_not_reported_as_a_gap(tmp_path):
    folder = tmp_path / "cutmid"
    files = write_series(folder, _axial(10))
    _cut(files[4], 1)
    with pytest.raises(DataError) as e:
        load_volume(folder)
    msg = str(e.value)
    assert "slice004.dcm: truncated DICOM file: pixel data needs 40 bytes, the file holds 39 after the header" in msg
    assert "missing" not in msg and "slice003.dcm" not in msg
    # cut into the header: the element the file ends in is named
    _cut(files[2], 600)
    msg = str(pytest.raises(DataError, header_info, folder).value)
    assert msg.startswith(f"{folder}: 2 of the 10 files") and "slice002.dcm: truncated DICOM file: " in msg
    assert "slice004.dcm: truncated" in msg


def test_every_file_of_the_folder_is_a_slice_or_named(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder, _axial(5))
    # skipped: hidden files, the DICOMDIR index of a CD, documents next to the slices
    (folder / ".DS_Store").write_bytes(b"\0" * 300)
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    (folder / "README.txt").write_text("exported by PACS")
    (folder / "sub").mkdir()
    assert header_info(folder)[0] == (5, 4, 5)
    assert dicom.read_series(folder).files == tuple(str(folder / f"slice{k:03d}.dcm") for k in range(5))
    (folder / "IM_extra").write_bytes(b"not a dicom file" * 20)
    (folder / "empty.dcm").write_bytes(b"")
    msg = str(pytest.raises(DataError, header_info, folder).value)
    assert "2 of the 7 files" in msg
    assert "IM_extra: not a DICOM file (no 'DICM' marker at byte 128)" in msg
    assert "empty.dcm: empty file (0 bytes)" in msg
    assert "move other files out of the folder" in msg


def test_compressed_pixel_data_must_end_with_its_delimiter(tmp_path):
    folder = tmp_path / "j2k"
    # 16 x 16 constant slices: GDCM's JPEG 2000 coder aborts on tiny images and may be lossy on larger ones
    files = write_series(folder, _axial(4), compressor="JPEG2000", pixels=(16, 16))
    assert b"\xfe\xff\xdd\xe0" in files[0].read_bytes()[-8:]  # encapsulated: the sequence delimiter closes the file
    v = load_volume(folder)
    assert v.shape == (16, 16, 4) and np.all(v.array[:, :, 3] == 3)
    _cut(files[3], 4)  # half the delimiter
    with pytest.raises(DataError, match=r"slice003.dcm: truncated DICOM file: its compressed pixel data stops after "
                                        r"\d fragment\(s\) without the sequence delimiter \(FFFE,E0DD\)"):
        header_info(folder)
    _cut(files[3], 20)  # into the last fragment
    with pytest.raises(DataError, match=r"slice003.dcm: truncated DICOM file: compressed pixel data fragment \d needs "
                                        r"\d+ bytes, the file holds \d+ after its header"):
        header_info(folder)


def test_file_problem_walks_sequences_and_reads_no_pixel_data(tmp_path):
    # an enhanced multi-frame file has nested sequences of undefined length before its pixel data
    arr = np.zeros((3, 4, 5), np.int16)
    path = _write(sitk.GetImageFromArray(arr), tmp_path / "mf.dcm", {"0008|0060": "CT"})
    data = path.read_bytes()
    assert b"\x00\x52\x30\x92" in data  # PerFrameFunctionalGroupsSequence (5200,9230)
    assert dicom.file_problem(path) == ""
    # native pixel data of 3 x 4 x 5 x 2 = 120 bytes
    _cut(path, 7)
    assert dicom.file_problem(path) == ("truncated DICOM file: pixel data needs 120 bytes, "
                                        "the file holds 113 after the header")
    # a header whose element length promises less than Rows x Columns x frames needs
    # (GDCM writes implicit VR little endian: tag (7FE0,0010), then a 4-byte length)
    pixel_element = b"\xe0\x7f\x10\x00" + (120).to_bytes(4, "little")
    assert data.count(pixel_element) == 1
    path.write_bytes(data.replace(pixel_element, b"\xe0\x7f\x10\x00" + (80).to_bytes(4, "little"))[:-40])
    assert dicom.file_problem(path) == ("corrupt DICOM file: its pixel data holds 80 bytes where its Rows, Columns, "
                                        "NumberOfFrames, SamplesPerPixel and BitsAllocated need 120")


def _el(group, elem, vr, value, explicit=True):
    """One little-endian data element; a value of None gives an undefined length (its content follows)."""
    head = struct.pack("<HH", group, elem)
    length = b"\xff\xff\xff\xff" if value is None else struct.pack("<I", len(value))
    if not explicit or group == 0xFFFE:
        return head + length + (value or b"")
    if vr in (b"OB", b"OW", b"SQ", b"UN"):
        return head + vr + b"\0\0" + length + (value or b"")
    return head + vr + struct.pack("<H", len(value)) + value


def _part10(body, ts=b"1.2.840.10008.1.2.1\0"):
    return b"\0" * 128 + b"DICM" + _el(0x0002, 0x0010, b"UI", ts) + body


def _image(explicit=True):
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    return (_el(0x0028, 0x0010, b"US", us(2), explicit) + _el(0x0028, 0x0011, b"US", us(2), explicit)
            + _el(0x0028, 0x0100, b"US", us(16), explicit) + _el(0x7FE0, 0x0010, b"OW", b"\1" * 8, explicit))


def test_file_problem_on_hand_written_encodings(tmp_path):
    item = lambda content: _el(0xFFFE, 0xE000, b"", None) + content + _el(0xFFFE, 0xE00D, b"", b"")  # noqa: E731
    seq_end = _el(0xFFFE, 0xE0DD, b"", b"")
    # a UN element of undefined length holds implicit VR (PS3.5 6.2.2); some writers keep explicit VR inside
    for inner in (_el(0x0009, 0x0010, b"LO", b"ABCD", explicit=False), _el(0x0009, 0x0010, b"LO", b"ABCD")):
        body = _el(0x0008, 0x0060, b"CS", b"CT") + _el(0x0009, 0x1010, b"UN", None) + item(inner) + seq_end + _image()
        path = tmp_path / "un.dcm"
        path.write_bytes(_part10(body))
        assert dicom.file_problem(path) == ""
        path.write_bytes(_part10(body)[:-3])
        assert dicom.file_problem(path) == ("truncated DICOM file: pixel data needs 8 bytes, "
                                            "the file holds 5 after the header")
    # implicit VR little endian transfer syntax, a sequence of defined length skipped whole
    body = (_el(0x0008, 0x1140, b"SQ", _el(0xFFFE, 0xE000, b"", _el(0x0008, 0x1150, b"UI", b"1.2\0", False)), False)
            + _image(explicit=False))
    path.write_bytes(_part10(body, ts=b"1.2.840.10008.1.2\0"))
    assert dicom.file_problem(path) == ""
    path.write_bytes(_part10(body, ts=b"1.2.840.10008.1.2\0")[:-9])
    assert dicom.file_problem(path).startswith("truncated DICOM file: it ends inside element (7FE0,0010)")
    # no pixel data at all: a report, or a file cut before its pixel data
    path.write_bytes(_part10(_el(0x0008, 0x0060, b"CS", b"SR")))
    assert dicom.file_problem(path).startswith("holds no pixel data (7FE0,0010)")


# ----------------------------------------------------------------------------- multi-frame and one-slice files


def test_multiframe_file_reads_like_its_folder(tmp_path, capsys):
    arr = (np.arange(6 * 4 * 5, dtype=np.int16).reshape(6, 4, 5) * 3 - 1000)  # (Z, Y, X)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    (tmp_path / "mf").mkdir()
    path = _write(img, tmp_path / "mf" / "volume.dcm", {"0008|0060": "CT"})
    by_file, by_folder = load_volume(path), load_volume(tmp_path / "mf")
    assert np.array_equal(by_file.array, arr.transpose(2, 1, 0)) and np.array_equal(by_folder.array, by_file.array)
    ras = np.array([[-0.7, 0, 0, -10], [0, -0.8, 0, 20], [0, 0, 2, 30], [0, 0, 0, 1]])
    assert np.allclose(by_file.affine, ras) and np.allclose(by_folder.affine, ras)
    for p in (path, tmp_path / "mf"):
        shape, aff = header_info(p)
        assert shape == (5, 4, 6) and np.allclose(aff, ras)
    # the refusal was the datalist: a single .dcm file was not an "image file"
    assert load_datalist(path) == [{"image": str(path.resolve())}]
    assert main(["validate", str(path)]) == 0
    assert "ok   training: volume.dcm: 5x4x6 voxels, 0.7x0.8x2 mm, LPS, CT" in capsys.readouterr().out
    _cut(path, 3)
    with pytest.raises(DataError, match=rf"^{path}: truncated DICOM file: pixel data needs 240 bytes, "
                                        r"the file holds 237"):
        load_volume(path)


def test_multiframe_file_among_slices_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    write_series(folder, _axial(3))
    mf = sitk.GetImageFromArray(np.zeros((2, 4, 5), np.int16))
    mf.SetSpacing((0.7, 0.8, 2.0))
    _write(mf, folder / "volume.dcm", {"0008|0060": "CT", "0020|000e": UID})
    with pytest.raises(DataError, match=r"volume.dcm holds 2 frames; a series folder of several files must hold one "
                                        r"slice per file"):
        header_info(folder)


def test_one_slice_and_two_frame_dicom_read_so_too_few_slices_sees_them(tmp_path):
    write_series(tmp_path / "one", _axial(1))
    v = load_volume(tmp_path / "one")
    assert v.shape == (5, 4, 1) and np.array_equal(v.array[:, :, 0], PIXELS.T)
    assert header_info(tmp_path / "one")[0] == (5, 4, 1) and dicom.read_series(tmp_path / "one").shape == (5, 4, 1)
    assert "too few slices" in too_few_slices(v.shape)
    path = _write(sitk.GetImageFromArray(np.zeros((2, 4, 5), np.int16)), tmp_path / "two.dcm", {"0008|0060": "CT"})
    assert header_info(path)[0] == (5, 4, 2) == load_volume(path).shape
    assert "too few slices" in too_few_slices((5, 4, 2))
    assert is_dicom_dir(tmp_path / "one") and is_dicom_dir(tmp_path)  # two.dcm
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    assert not is_dicom_dir(tmp_path / "docs")  # a CD's index is not a series


# ----------------------------------------------------------------------------- memory


# The child's peak resident memory is VmHWM of /proc/self/status: getrusage's ru_maxrss (self or children)
# is no use here, since Linux carries the forking parent's peak (pytest with torch, ~0.5 GB) into it.
_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from alice3d.data.dicom import read_series

    def peak_kib():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))

    before = peak_kib()
    if sys.argv[1] == "scan":
        series = read_series(sys.argv[2])
        assert series.shape == (1024, 1024, 20), series.shape
        read_series(series.files[0])
    else:  # the control: hold every file's bytes, as GDCM's folder scan does
        held = [p.read_bytes() for p in sorted(Path(sys.argv[2]).iterdir())]
    print(peak_kib() - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory is read from Linux /proc")
def test_series_scan_holds_no_pixel_data(tmp_path):
    folder = tmp_path / "big"
    write_series(folder, _axial(20), pixels=(1024, 1024))  # 20 files of 2 MiB: 40 MiB of pixel data

    def peak_kib(mode):
        out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(folder)], capture_output=True, text=True,
                             timeout=120, cwd=str(tmp_path),
                             env={**os.environ, "OMP_NUM_THREADS": "1",
                                  "PYTHONPATH": os.path.dirname(os.path.dirname(alice3d.__file__))})
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    # reading every file's bytes at once raises the peak by the 40 MiB, so the measurement can see it
    assert peak_kib("hold") > 35 * 1024
    # header reads one file at a time (GDCM holds one file's 2 MiB while it parses it), nothing decoded
    assert peak_kib("scan") < 12 * 1024
