"""DICOM series folders: header checks (gaps, duplicates, several series, orientation) before stacking."""

import locale
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from alice3d.cli.data import main
from alice3d.data import dicom
from alice3d.data.io import DataError, load_volume
from alice3d.data.validate import header_info, validate_case
from alice3d.data.volumes import load_volume_set

UID = "1.2.826.0.1.3680043.2.1125.1.42"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@pytest.fixture(autouse=True)
def _keep_locale():
    # GDCM's writer sets the process locale to "C" (ASCII text I/O for every later test): restore it.
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def write_series(folder, positions, *, uid=UID, orientation=AXIAL, first=0, values=None, modality="CT"):
    """One CT slice file per LPS position (4 x 5 pixels of 0.7 x 0.8 mm), SimpleITK's
    "Dicom Series From Array" pattern; returns the files in writing order."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k, pos in enumerate(positions):
        arr = values[k] if values is not None else (np.arange(20, dtype=np.int16).reshape(4, 5) * 10 - 1000 + 50 * k)
        sl = sitk.GetImageFromArray(np.asarray(arr, dtype=np.int16))
        sl.SetSpacing((0.7, 0.8))
        tags = {"0008|0060": modality, "0020|000e": uid, "0020|000d": uid + ".0", "0020|0013": str(first + k + 1),
                "0008|0018": f"{uid}.{first + k + 1}", "0020|0032": "\\".join(f"{p:g}" for p in pos),
                "0020|0037": "\\".join(f"{c:g}" for c in orientation)}
        for tag, val in tags.items():
            sl.SetMetaData(tag, val)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{first + k:03d}.dcm"))
        writer.Execute(sl)
        files.append(folder / f"slice{first + k:03d}.dcm")
    return files


def _axial(n, step=2.0, z0=30.0, skip=()):
    return [(10.0, -20.0, z0 + step * k) for k in range(n) if k not in skip]


def test_uniform_series_reads_with_its_spacing(tmp_path):
    write_series(tmp_path / "ok", _axial(10))
    v = load_volume(tmp_path / "ok")
    assert v.shape == (5, 4, 10) and np.allclose(v.spacing, (0.7, 0.8, 2.0))
    # slice k holds -1000 + 50 k at pixel (0, 0) and sits at LPS z = 30 + 2 k, i.e. RAS (-10, 20, 30 + 2 k)
    assert np.array_equal(v.array[0, 0, :], -1000 + 50 * np.arange(10))
    assert np.allclose(v.voxel_to_world(np.array([[0, 0, 9]], float)), [[-10, 20, 48]])
    shape, aff = header_info(tmp_path / "ok")
    assert shape == v.shape and np.allclose(aff, v.affine)
    assert validate_case(tmp_path / "ok", full=False) == [] and validate_case(tmp_path / "ok") == []


def test_oblique_series_header_geometry_matches_the_read(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, c, s])
    normal = np.cross(row, col)
    origin = np.array([5.0, -7.0, 12.0])
    positions = [tuple(origin + 2.5 * k * normal) for k in (3, 0, 4, 1, 2)]  # files not in slice order
    write_series(tmp_path / "obl", positions, orientation=(*row, *col))
    v = load_volume(tmp_path / "obl")
    shape, aff = header_info(tmp_path / "obl")
    assert shape == v.shape == (5, 4, 5) and np.allclose(aff, v.affine, atol=1e-4)
    assert np.allclose(v.spacing, (0.7, 0.8, 2.5), atol=1e-4)
    # sorted along the normal: the slice written first (k = 3) is the fourth of the volume
    assert v.array[0, 0, 3] == -1000 and v.array[0, 0, 0] == -950


def test_missing_slice_is_an_error_naming_the_gap(tmp_path, capfd):
    folder = tmp_path / "gap"
    write_series(folder, _axial(10, skip=(4,)))
    assert sitk.ProcessObject.GetGlobalWarningDisplay()
    for check in (lambda: load_volume(folder), lambda: header_info(folder)):
        with pytest.raises(DataError) as e:
            check()
        msg = str(e.value)
        assert msg.startswith(f"{folder}: ") and "expected 2 mm between slices" in msg
        # the header's ImagePositionPatient values of the files around the gap, the step along the normal
        assert ("gap of 4 mm along the slice normal between slice003.dcm (ImagePositionPatient (10, -20, 36)) "
                "and slice004.dcm (ImagePositionPatient (10, -20, 40)), about 1 slice(s) missing") in msg
    assert "itkImageSeriesReader" not in capfd.readouterr().err  # no C++ warning naming ITK's source
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # switched back on after the read
    assert "gap of 4 mm along the slice normal" in validate_case(folder, full=False)[0]


def test_three_missing_slices_and_an_uneven_step(tmp_path):
    write_series(tmp_path / "gap3", _axial(12, skip=(5, 6, 7)))
    with pytest.raises(DataError, match=r"gap of 8 mm along the slice normal between slice004.dcm "
                                        r"\(ImagePositionPatient \(10, -20, 38\)\) and slice005.dcm "
                                        r"\(ImagePositionPatient \(10, -20, 46\)\), about 3 slice"):
        load_volume(tmp_path / "gap3")
    pos = _axial(8)
    pos[3] = (10.0, -20.0, 37.0)  # a misplaced slice: 3 mm above its neighbour below, 1 mm below the next
    write_series(tmp_path / "uneven", pos)
    with pytest.raises(DataError, match=r"found a gap of 3 mm along the slice normal between slice002.dcm "
                                        r"\(ImagePositionPatient \(10, -20, 34\)\) and slice003.dcm "
                                        r"\(ImagePositionPatient \(10, -20, 37\)\); a step of only 1 mm along the "
                                        r"slice normal between "
                                        r"slice003.dcm"):
        load_volume(tmp_path / "uneven")


def test_duplicate_positions(tmp_path):
    folder = tmp_path / "dup"
    write_series(folder, _axial(6) + [(10.0, -20.0, 34.0)])
    with pytest.raises(DataError) as e:
        load_volume(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder}: 1 duplicate DICOM slice position")
    assert "slice002.dcm and slice006.dcm both at 34 mm (ImagePositionPatient (10, -20, 34) and (10, -20, 34))" in msg


def test_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "two"
    write_series(folder, _axial(6))
    write_series(folder, _axial(3), uid=UID + ".9", first=50)
    with pytest.raises(DataError) as e:
        load_volume(folder)
    msg = str(e.value)
    assert msg.startswith(f"{folder}: 2 DICOM series")
    assert f"{UID} (6 files), {UID}.9 (3 files)" in msg and "one series per folder" in msg


def test_orientation_differs_between_slices(tmp_path):
    folder = tmp_path / "tilt"
    write_series(folder, _axial(4))
    write_series(folder, [(10.0, -20.0, 38.0)], orientation=(1, 0, 0, 0, 0.8, 0.6), first=4)
    with pytest.raises(DataError, match=r"orientation .* differs between slices: slice000.dcm has \(1, 0, 0, 0, 1, "
                                        r"0\), slice004.dcm has \(1, 0, 0, 0, 0.8, 0.6\)"):
        header_info(folder)


def test_rounding_jitter_is_accepted_without_itk_warning(tmp_path, capfd):
    pos = [(10.0, -20.0, z) for z in (30.0, 32.05, 33.98, 36.0, 38.03, 40.0)]  # positions rounded by a scanner
    write_series(tmp_path / "jitter", pos)
    v = load_volume(tmp_path / "jitter")
    assert np.allclose(v.spacing[2], 2.0)  # (40 - 30) / 5
    # ITK itself warns about non-uniform sampling here; alice3d reads it with ITK's warnings off
    assert "itkImageSeriesReader" not in capfd.readouterr().err
    assert sitk.ProcessObject.GetGlobalWarningDisplay()


def test_quiet_itk_is_reentrant_and_restores():
    assert sitk.ProcessObject.GetGlobalWarningDisplay()
    with dicom.quiet_itk():
        with dicom.quiet_itk():
            assert not sitk.ProcessObject.GetGlobalWarningDisplay()
        assert not sitk.ProcessObject.GetGlobalWarningDisplay()  # the outer reader is still running
    assert sitk.ProcessObject.GetGlobalWarningDisplay()


def test_bad_series_through_validate_preview_and_pretraining_volumes(tmp_path, capsys, caplog):
    write_series(tmp_path / "data" / "good", _axial(10))
    write_series(tmp_path / "data" / "gap", _axial(10, skip=(4,)))
    assert main(["validate", str(tmp_path / "data")]) == 1
    out = capsys.readouterr().out
    assert "ok   training: good: 5x4x10 voxels, 0.7x0.8x2 mm, LPS, CT" in out
    assert "BAD  training: gap: " in out and "gap of 4 mm" in out and "1 good, 1 bad" in out
    assert main(["validate", str(tmp_path / "data"), "--full"]) == 1
    assert "gap of 4 mm" in capsys.readouterr().out
    assert main(["preview", "--image", str(tmp_path / "data" / "gap"), "--out", str(tmp_path / "p.png")]) == 2
    assert "gap of 4 mm" in capsys.readouterr().err
    paths = [str(tmp_path / "data" / n) for n in ("good", "gap")]
    with caplog.at_level(logging.WARNING):
        vset = load_volume_set(paths, (0.7, 0.8, 2.0), (-1000.0, 0.0), on_bad_data="skip", workers=2)
    assert [v.path for v in vset.volumes] == paths[:1]
    assert [p for p, _ in vset.bad] == paths[1:] and "gap of 4 mm" in vset.bad[0][1]
    with pytest.raises(DataError, match="on_bad_data=fail"):
        load_volume_set(paths, (0.7, 0.8, 2.0), (-1000.0, 0.0), on_bad_data="fail")
