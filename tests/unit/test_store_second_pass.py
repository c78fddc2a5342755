"""Volume-store preprocessing, second pass: body-less and all-fill cases, the HU offset (settings,
runs, old stores), modality warnings kept, too few slices, names of cases in shared-name
folders, duplicated entries and what ``--verify`` says."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from alice3d.cli.data import main as data_main
from alice3d.config import DataConfig
from alice3d.data import preprocess as pre
from alice3d.data.datalists import display_names
from alice3d.data.io import DataError, save_nifti
from alice3d.data.loading import run_store
from alice3d.data.store import StoreError, StoreSettings, open_case_array, open_store, verify_case
from alice3d.data.volumes import load_volume_set, prepare_volume

WINDOW = (-125.0, 255.0)
SETTINGS = StoreSettings((6.0, 6.0, 6.0), -106.0)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
BOX = (slice(6, 18), slice(4, 16), slice(8, 20))  # 12 x 12 x 12 voxels of 3 mm: 6 x 6 x 6 at 6 mm


def _ct(shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """(24, 24, 24) int16: air near -1000 HU around a soft-tissue box near 40 HU, plus ``shift``."""
    rng = np.random.default_rng(seed)
    a = -1000.0 + rng.integers(0, 20, (24, 24, 24))
    a[BOX] = 40.0 + rng.integers(0, 60, (12, 12, 12))
    return (a + shift).astype(np.int16)


def _write(path: Path, array: np.ndarray, affine=AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(array, affine, path)
    return str(path)


def _build(paths, out, settings=SETTINGS, **kw):
    return pre.build_store(paths, out, settings, workers=1, progress=False, **kw)


# ----------------------------------------------------------------------------- 1: nothing above the body threshold


def test_case_without_body_is_listed_bad_and_the_run_goes_on(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _ct())
    rng = np.random.default_rng(1)
    air = _write(tmp_path / "air.nii.gz", (-1000 + rng.integers(0, 300, (24, 24, 24))).astype(np.int16))
    out = tmp_path / "s"
    r = _build([good, air], out)
    assert r.done_now == 1 and r.manifest is not None
    (source, reason), = r.bad
    assert Path(source).name == "air.nii.gz"
    assert "no voxel above the body threshold -106 HU" in reason and "is it a CT in HU?" in reason
    assert "-1000.." in reason  # the intensities it has
    st = open_store(out)
    assert [c["name"] for c in st.cases] == ["good"] and [b["name"] for b in st.bad] == ["air"]
    assert not (out / "cases" / "air").exists()
    again = _build([good, air], out)  # the rerun neither crashes nor retries the known-bad case
    assert (again.done_now, again.skipped) == (0, 2) and again.manifest is not None


@pytest.mark.parametrize("array", [np.zeros((10, 70, 5), bool), np.zeros((9, 9, 9), np.int16)])
def test_an_all_fill_value_array_still_gets_its_shard_file(tmp_path, array):
    nbytes = pre._zarr_array(tmp_path / "a", array)
    shard = tmp_path / "a" / "c" / "0" / "0" / "0"
    assert shard.is_file() and shard.stat().st_size == nbytes > 0
    z = open_case_array(tmp_path, "a", nbytes, StoreError)
    back = np.asarray(z[...])
    assert back.dtype == array.dtype and back.shape == array.shape and not back.any()


def test_a_case_whose_body_mask_has_empty_chunks_verifies(tmp_path):
    # 24^3 voxels of 3 mm at 1 mm: 72^3, two chunks a side, the body box in one corner only
    a = np.full((24, 24, 24), -1000, np.int16)
    a[:6, :6, :6] = 40
    a[0, 0, 0] = -990
    src = _write(tmp_path / "corner.nii.gz", a)
    out = tmp_path / "s"
    r = _build([src], out, StoreSettings((1.0, 1.0, 1.0), -106.0))
    assert r.bad == [] and verify_case(out / "cases" / "corner") == ""


# ----------------------------------------------------------------------------- 2: HU offset


def test_hu_offset_turns_a_plus_1024_ct_into_the_same_store_as_the_hu_ct(tmp_path):
    hu = _write(tmp_path / "hu" / "ct.nii.gz", _ct())
    shifted = _write(tmp_path / "kbp" / "ct.nii.gz", _ct(1024.0))
    plain = _build([hu], tmp_path / "a")
    wrong = _build([shifted], tmp_path / "b")
    fixed = _build([shifted], tmp_path / "c", StoreSettings((6.0, 6.0, 6.0), -106.0, -1024.0))
    assert plain.bad == wrong.bad == fixed.bad == []
    case_a, case_b, case_c = (open_store(tmp_path / s).cases[0] for s in "abc")
    assert case_a["body_voxels"] == 6 ** 3 and case_c["body_voxels"] == 6 ** 3  # the box at 6 mm
    assert case_b["body_voxels"] == 12 ** 3  # the bug: the whole volume is "body"
    assert case_c["hu_offset"] == -1024.0 and case_c["hu_min"] == case_a["hu_min"] < -900
    va, vc = (open_store(tmp_path / s).volumes(WINDOW)[0] for s in "ac")
    np.testing.assert_array_equal(vc.read_hu(), va.read_hu())
    # the warnings of each case are kept: the +1024 CT read as HU does not look like CT
    assert case_a["warnings"] == [] and case_c["warnings"] == []
    assert case_b["warnings"] and all(shifted in w for w in case_b["warnings"])
    meta = json.loads((tmp_path / "b" / "cases" / case_b["name"] / "meta.json").read_text())
    assert meta["warnings"] == case_b["warnings"]
    doc = json.loads((tmp_path / "c" / "store.json").read_text())
    assert doc["hu_offset"] == -1024.0


def test_another_hu_offset_is_refused_naming_both(tmp_path):
    src = _write(tmp_path / "ct.nii.gz", _ct(1024.0))
    out = tmp_path / "s"
    _build([src], out, StoreSettings((6.0, 6.0, 6.0), -106.0, -1024.0))
    with pytest.raises(StoreError, match=r"built with .*HU offset -1024.*asks for .*HU offset \+0"):
        _build([src], out)
    with pytest.raises(StoreError, match=r"HU offset -1024.*data.hu_offset=0.*data.hu_offset=-1024"):
        run_store(DataConfig(data=str(out), spacing=SETTINGS.spacing))
    assert run_store(DataConfig(data=str(out), spacing=SETTINGS.spacing, hu_offset=-1024.0)).root == out


def test_a_store_written_before_the_offset_existed_still_opens_and_resumes(tmp_path):
    src = _write(tmp_path / "ct.nii.gz", _ct())
    out = tmp_path / "s"
    _build([src], out)
    for name in ("store.json", "manifest.json"):  # as an older alice3d wrote them
        doc = json.loads((out / name).read_text())
        (doc.get("settings", doc)).pop("hu_offset")
        (out / name).write_text(json.dumps(doc))
    st = open_store(out, SETTINGS.spacing)
    assert st.settings.hu_offset == 0.0 and st.settings == SETTINGS
    assert run_store(DataConfig(data=str(out), spacing=SETTINGS.spacing)).root == out
    assert _build([src], out).skipped == 1
    key = pre.store_key([src], SETTINGS)
    assert key == pre.hash_arrays({k: v for k, v in SETTINGS.to_dict().items() if k != "hu_offset"},
                                  [(str(Path(src).resolve()), pre.file_stamp(src))])  # cached stores keep their key


def test_in_memory_path_applies_the_offset_before_the_checks(tmp_path, caplog):
    hu = _write(tmp_path / "hu.nii.gz", _ct())
    shifted = _write(tmp_path / "kbp.nii.gz", _ct(1024.0))
    ref = prepare_volume(hu, SETTINGS.spacing, WINDOW)
    with caplog.at_level(logging.WARNING):
        got = prepare_volume(shifted, SETTINGS.spacing, WINDOW, hu_offset=-1024.0)
    assert not [r for r in caplog.records if shifted in r.getMessage()]  # no modality warning once in HU
    np.testing.assert_allclose(got.array, ref.array, atol=1e-6)
    vset = load_volume_set([shifted], SETTINGS.spacing, WINDOW, hu_offset=-1024.0)
    np.testing.assert_allclose(vset.volumes[0].array, ref.array, atol=1e-6)


def test_preprocess_cli_takes_a_negative_hu_offset(tmp_path, capsys):
    _write(tmp_path / "data" / "ct.nii.gz", _ct(1024.0))
    out = tmp_path / "s"
    assert data_main(["preprocess", "--data", str(tmp_path / "data"), "--out", str(out), "--spacing", "6,6,6",
                      "--hu-offset", "-1024"]) == 0
    assert "HU offset -1024" in capsys.readouterr().out
    assert open_store(out).settings.hu_offset == -1024.0
    assert open_store(out).cases[0]["body_voxels"] == 6 ** 3


# ----------------------------------------------------------------------------- 3: too few slices


def test_too_few_slices_is_bad_data_in_memory_and_in_the_store(tmp_path):
    rng = np.random.default_rng(2)
    one = _write(tmp_path / "scout.nii.gz", (-1000 + rng.integers(0, 1100, (24, 24, 2))).astype(np.int16),
                 np.diag([0.7, 0.7, 5.0, 1.0]))
    good = _write(tmp_path / "good.nii.gz", _ct())
    with pytest.raises(DataError, match=r"scout.nii.gz: too few slices.*\(24, 24, 2\)"):
        prepare_volume(one, SETTINGS.spacing, WINDOW)
    vset = load_volume_set([good, one], SETTINGS.spacing, WINDOW, on_bad_data="skip")
    assert len(vset.volumes) == 1 and [Path(p).name for p, _ in vset.bad] == ["scout.nii.gz"]
    r = _build([good, one], tmp_path / "s")
    assert [Path(p).name for p, _ in r.bad] == ["scout.nii.gz"] and "too few slices" in r.bad[0][1]
    assert [b["name"] for b in open_store(tmp_path / "s").bad] == ["scout"]


# ----------------------------------------------------------------------------- 4: names


def test_display_names_use_the_nearest_distinguishing_folder():
    assert display_names(["/d/patient1/PATIENT_DICOM", "/d/patient2/PATIENT_DICOM/", "/e/img.nii.gz"]) == [
        "patient1_PATIENT_DICOM", "patient2_PATIENT_DICOM", "img"]
    assert display_names(["/d/x/p1/CT/PATIENT_DICOM", "/d/y/p1/CT/PATIENT_DICOM", "/d/p2/CT/PATIENT_DICOM"]) == [
        "x_p1_PATIENT_DICOM", "y_p1_PATIENT_DICOM", "p2_PATIENT_DICOM"]
    assert display_names(["/a b/s.nii", "/c/s.nii"], safe=True) == ["a_b_s", "c_s"]
    # a derived name equal to another file's name: that file keeps its own, the derived one gets a digest
    names = pre.case_names(["/p/a/img.nii.gz", "/p/b/img.nii.gz", "/q/a_img.nii.gz"])
    assert names[1:] == ["b_img", "a_img"] and names[0].startswith("a_img-") and len(names[0]) == len("a_img-") + 8


def test_store_cases_of_shared_file_names_are_named_by_their_folders(tmp_path):
    a = _write(tmp_path / "patient1" / "ct.nii.gz", _ct(seed=1))
    b = _write(tmp_path / "patient2" / "ct.nii.gz", _ct(seed=2))
    c = _write(tmp_path / "other.nii.gz", _ct(seed=3))
    _build([a, b, c], tmp_path / "s")
    assert [x["name"] for x in open_store(tmp_path / "s").cases] == ["patient1_ct", "patient2_ct", "other"]


# ----------------------------------------------------------------------------- 5: duplicated entries


def test_a_duplicated_entry_is_stored_once_with_a_warning(tmp_path, caplog):
    a = _write(tmp_path / "a.nii.gz", _ct(seed=1))
    b = _write(tmp_path / "b.nii.gz", _ct(seed=2))
    with caplog.at_level(logging.WARNING, logger="alice3d.data"):
        r = _build([a, b, f"{tmp_path}/./a.nii.gz"], tmp_path / "s")  # the same file, spelled another way
    assert r.cases == 2 and r.done_now == 2 and r.duplicates == [(a, [1, 3])]
    msg = [m for m in caplog.messages if "listed 2 times" in m]
    assert len(msg) == 1 and a in msg[0] and "entries 1, 3 of the 3 given" in msg[0]
    assert [x["name"] for x in open_store(tmp_path / "s").cases] == ["a", "b"]


# ----------------------------------------------------------------------------- 6: --verify says what it checked


def test_verify_reports_intact_and_rebuilt_cases(tmp_path, capsys):
    for i in range(2):
        _write(tmp_path / "data" / f"c{i}.nii.gz", _ct(seed=i))
    args = ["preprocess", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "s"), "--spacing", "6,6,6"]
    assert data_main(args) == 0
    assert "verified" not in capsys.readouterr().out
    assert data_main([*args, "--verify"]) == 0
    assert "verified 2 case(s) already in the store: all read back intact" in capsys.readouterr().out
    shard = tmp_path / "s" / "cases" / "c1" / "image" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert data_main([*args, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verified 2 case(s) already in the store: 1 damaged, 1 rebuilt" in out and "preprocessed 1 case(s)" in out
    assert verify_case(tmp_path / "s" / "cases" / "c1") == ""
