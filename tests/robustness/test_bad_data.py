"""Bad data through the real CLIs: each broken case is named with its problem; ``skip`` trains on
the good cases and lists the bad ones at the end, ``fail`` stops before training writes anything."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from faults import COMMANDS, cohort_entries, metrics, write_datalist


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([8.0, 8.0, 8.0, 1.0]) if affine is None else affine), str(path))
    return path


def _source(cohort: Path) -> tuple[Path, Path]:
    e = cohort_entries(cohort)["training"][0]
    return Path(e["image"]), Path(e["label"])


def _float_image(cohort: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(_source(cohort)[0]))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


# Each maker writes the bad file(s) into ``d`` and returns (image, label or None, problem regex).
def truncated(d, cohort):
    raw = _source(cohort)[0].read_bytes()
    (d / "bad_truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    return d / "bad_truncated.nii.gz", None, r"truncated|corrupt"


def corrupt(d, cohort):
    raw = bytearray(gzip.decompress(_source(cohort)[0].read_bytes()))
    packed = bytearray(gzip.compress(bytes(raw)))
    mid = len(packed) // 2
    packed[mid: mid + 64] = bytes(64)  # zeroed block inside the deflate stream
    (d / "bad_corrupt.nii.gz").write_bytes(bytes(packed))
    return d / "bad_corrupt.nii.gz", None, r"corrupt|truncated|not a (readable|valid)"


def text_file(d, cohort):
    (d / "bad_text.nii.gz").write_text("patient notes, not an image\n" * 20)
    return d / "bad_text.nii.gz", None, r"not a (readable|valid)"


def image_2d(d, cohort):
    return _nifti(d / "bad_2d.nii.gz", np.random.default_rng(0).normal(0, 300, (32, 32)).astype(np.int16)), None, \
        r"expected a 3-D image, got shape \(32, 32\)"


def image_4d(d, cohort):
    arr = np.random.default_rng(0).normal(0, 300, (32, 32, 24, 2)).astype(np.int16)
    return _nifti(d / "bad_4d.nii.gz", arr), None, r"expected a 3-D image, got shape \(32, 32, 24, 2\)"


def nan_voxels(d, cohort):
    arr, aff = _float_image(cohort)
    arr[3, 4, 5] = np.nan
    return _nifti(d / "bad_nan.nii.gz", arr, aff), None, r"1 non-finite \(NaN/inf\) voxels"


def inf_voxels(d, cohort):
    arr, aff = _float_image(cohort)
    arr[0, 0, 0], arr[1, 1, 1] = np.inf, -np.inf
    return _nifti(d / "bad_inf.nii.gz", arr, aff), None, r"2 non-finite \(NaN/inf\) voxels"


def constant(d, cohort):
    return _nifti(d / "bad_constant.nii.gz", np.full((32, 32, 24), 40, np.int16)), None, r"constant image"


def missing(d, cohort):
    return d / "bad_missing.nii.gz", None, r"file not found"


def not_gzipped(d, cohort):
    plain = gzip.decompress(_source(cohort)[0].read_bytes())  # a plain .nii renamed to .nii.gz
    (d / "bad_plain.nii.gz").write_bytes(plain)
    return d / "bad_plain.nii.gz", None, r"is not gzip-compressed; rename it to \.nii"


def dicom_gap(d, cohort):
    """The first phantom as a DICOM series (8 mm slices) with its 10th slice missing."""
    import locale

    import SimpleITK as sitk

    arr = np.asarray(nib.load(str(_source(cohort)[0])).dataobj).astype(np.int16)  # (X, Y, Z)
    folder = d / "bad_dicom_gap"
    folder.mkdir()
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer switches the process locale to "C"
    try:
        for k in [k for k in range(arr.shape[2]) if k != 9]:
            sl = sitk.GetImageFromArray(np.ascontiguousarray(arr[:, :, k].T))
            sl.SetSpacing((8.0, 8.0))
            uid = "1.2.826.0.1.3680043.2.1125.9.1"
            for tag, val in {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0",
                             "0020|0013": str(k + 1), "0008|0018": f"{uid}.{k + 1}",
                             "0020|0032": f"0\\0\\{8 * k}", "0020|0037": "1\\0\\0\\0\\1\\0"}.items():
                sl.SetMetaData(tag, val)
            w = sitk.ImageFileWriter()
            w.KeepOriginalImageUIDOn()
            w.SetFileName(str(folder / f"slice{k:03d}.dcm"))
            w.Execute(sl)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return folder, None, r"not evenly spaced: expected 8 mm between slices.*gap of 16 mm along the slice normal " \
                         r"between slice008.dcm \(ImagePositionPatient \(0, 0, 64\)\) and slice010.dcm"


def smaller_than_crop(d, cohort):
    arr, aff = _float_image(cohort)
    return _nifti(d / "bad_small.nii.gz", arr[:8, :8, :8], aff), None, r"smaller than the crop"


def _labelled_copy(d: Path, cohort: Path, name: str, label: np.ndarray, affine=None) -> tuple[Path, Path]:
    image, lab = _source(cohort)
    shutil.copy(image, d / f"{name}.nii.gz")
    ref = nib.load(str(lab))
    return d / f"{name}.nii.gz", _nifti(d / f"{name}_label.nii.gz", label, ref.affine if affine is None else affine)


def _label(cohort):
    return np.asarray(nib.load(str(_source(cohort)[1])).dataobj)


def label_shape(d, cohort):
    img, lab = _labelled_copy(d, cohort, "bad_labelshape", _label(cohort)[:, :, :-2])
    return img, lab, r"label shape \(32, 32, 22\) does not match image"


def label_affine(d, cohort):
    aff = nib.load(str(_source(cohort)[1])).affine.copy()
    aff[:3, 3] += 20.0
    img, lab = _labelled_copy(d, cohort, "bad_labelaffine", _label(cohort), aff)
    return img, lab, r"label affine does not match image"


def label_values(d, cohort):
    arr = _label(cohort).copy()
    arr[0, 0, 0] = 99
    img, lab = _labelled_copy(d, cohort, "bad_labelvalues", arr)
    return img, lab, r"label ids \[99\] are not labels of task 'btcv'"


IMAGE_CASES: dict[str, Callable] = {f.__name__: f for f in (
    truncated, corrupt, text_file, image_2d, image_4d, nan_voxels, inf_voxels, constant, missing, not_gzipped)}
LABEL_CASES: dict[str, Callable] = {f.__name__: f for f in (label_shape, label_affine, label_values)}
CASES = {
    # Fine-tuning pads volumes smaller than its ROI (the BTCV recipe), so that case is the trainers' only.
    "pretrain": {**IMAGE_CASES, "smaller_than_crop": smaller_than_crop, "dicom_gap": dicom_gap},
    "landmark": {**IMAGE_CASES, "smaller_than_crop": smaller_than_crop},
    "finetune": {**IMAGE_CASES, **LABEL_CASES},
}


def _datalist(tmp_path: Path, cohort: Path, bad: list[tuple[Path, Path | None]]) -> Path:
    entries = cohort_entries(cohort)
    training = entries["training"][:2] + [
        {"image": str(img), "label": str(lab or entries["training"][2]["label"])} for img, lab in bad]
    return write_datalist(tmp_path / "datalist.json", training, entries["validation"])


def _params():
    return [pytest.param(cmd, case, id=f"{cmd}-{case}") for cmd, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("name,case", _params())
def test_fail_stops_before_training_naming_file_and_problem(name, case, cohort, tmp_path, capsys):
    cmd = COMMANDS[name]
    d = tmp_path / "data"
    d.mkdir()
    image, label, problem = CASES[name][case](d, cohort)
    run = tmp_path / "run"
    code = cmd.call(run, _datalist(tmp_path, cohort, [(image, label)]), "train.max_steps=2",
                    "data.on_bad_data=fail")
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    named = (label or image).name
    assert named in err and "on_bad_data=fail" in err, err[-3000:]
    assert re.search(problem, err), err[-3000:]
    assert "error:" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists() and not metrics(run)  # nothing was trained


@pytest.mark.parametrize("name", list(COMMANDS))
def test_skip_trains_on_the_good_cases_and_lists_the_bad_ones(name, cohort, tmp_path, capsys):
    cmd = COMMANDS[name]
    d = tmp_path / "data"
    d.mkdir()
    made = {case: make(d, cohort) for case, make in CASES[name].items()}
    datalist = _datalist(tmp_path, cohort, [(img, lab) for img, lab, _ in made.values()])
    run = tmp_path / "run"
    code = cmd.call(run, datalist, "train.max_steps=2", "data.on_bad_data=skip")
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2]
    assert (run / cmd.artifact).is_file()
    for case, (img, lab, problem) in made.items():
        named = (lab or img).name
        lines = [l for l in err.splitlines() if named in l]
        assert lines, f"{case}: {named} not named in the output"
        assert any(re.search(problem, l) for l in lines), f"{case}: problem not stated: {lines}"
    if name == "landmark":
        # the landmark trainer lists them where it loads the volumes (landmark/train.py owns the summary)
        assert f"2 volumes usable, {len(made)} quarantined" in err
        return
    # the end-of-run summary (after the last checkpoint) lists every bad file again
    tail = err[err.rindex("checkpoint saved"):]
    assert f"{len(made)} bad " in tail
    for img, lab, _ in made.values():
        assert Path(img).stem.split(".")[0] in tail
    if name == "finetune":
        report = json.loads((run / "data_report.json").read_text())
        assert sorted(report["bad_training_cases"]) == sorted(Path(img).name[: -len(".nii.gz")] for img, _, _ in
                                                              made.values())
        results = json.loads((run / "results.json").read_text())
        assert set(results["bad_train_cases"]) == set(report["bad_training_cases"])


@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("mode", ["skip", "fail"])
def test_malformed_datalist_is_named(name, mode, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text('{"training": [ {"image": "a.nii.gz"}, ]')
    code = COMMANDS[name].call(tmp_path / "run", broken, "train.max_steps=1", f"data.on_bad_data={mode}")
    err = capsys.readouterr().err
    assert code == 2 and "broken.json" in err and "malformed" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
