"""OpenKBP importer on CSV fixtures written here: HU, axes against anatomy, labels, splits, resume."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from alice3d.data.datalists import load_datalist
from alice3d.data.importers.openkbp import OARS, SHAPE, anatomy_problems, import_openkbp, openkbp_affine, read_patient
from alice3d.errors import DataError

# Organ boxes in OpenKBP array indices (axis 0 anterior->posterior, 1 right->left, 2 superior->inferior)
BOXES = {
    "Brainstem": ((60, 66), (60, 66), (20, 30)),
    "SpinalCord": ((70, 74), (62, 66), (40, 90)),
    "Mandible": ((40, 46), (50, 78), (50, 60)),
    "Larynx": ((50, 56), (60, 68), (70, 78)),
    "RightParotid": ((58, 64), (46, 52), (36, 44)),
    "LeftParotid": ((58, 64), (76, 82), (36, 44)),
}


def _flat(box) -> np.ndarray:
    grid = np.zeros(SHAPE, bool)
    grid[tuple(slice(a, b) for a, b in box)] = True
    return np.flatnonzero(grid)


def _write_patient(folder: Path, organs=BOXES, ct=True, swap_parotids=False):
    folder.mkdir(parents=True)
    (folder / "voxel_dimensions.csv").write_text("3.906\n3.906\n2.5\n")
    if ct:
        body = _flat(((30, 90), (40, 88), (10, 100)))
        values = np.full(body.size, 1024 + 40.0)  # soft tissue, +40 HU, stored with the +1024 offset
        values[::7] = 1024 + 1000.0  # some bone
        lines = ",data\n" + "".join(f"{i},{v:.1f}\n" for i, v in zip(body, values))
        (folder / "ct.csv").write_text(lines)
    for name, box in organs.items():
        if swap_parotids and name in ("RightParotid", "LeftParotid"):
            name = "LeftParotid" if name == "RightParotid" else "RightParotid"
        (folder / f"{name}.csv").write_text(",data\n" + "".join(f"{i},\n" for i in _flat(box)))


@pytest.fixture()
def kbp(tmp_path):
    root = tmp_path / "open-kbp" / "provided-data"
    _write_patient(root / "train-pats" / "pt_1")
    _write_patient(root / "train-pats" / "pt_2", organs={k: v for k, v in BOXES.items() if k != "Larynx"})
    _write_patient(root / "train-pats" / "pt_3", ct=False)
    _write_patient(root / "validation-pats" / "pt_201")
    _write_patient(root / "test-pats" / "pt_241", swap_parotids=True)
    _write_patient(root / "test-pats" / "pt_242")
    return tmp_path / "open-kbp"


def test_affine_maps_array_axes_to_anatomy():
    aff = openkbp_affine((3.906, 3.906, 2.5))
    assert "".join(nib.aff2axcodes(aff)) == "PLI"
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0), [3.906, 3.906, 2.5])
    centre = (np.asarray(SHAPE) - 1) / 2
    np.testing.assert_allclose(aff[:3, :3] @ centre + aff[:3, 3], 0.0, atol=1e-9)


def test_read_patient_hu_labels_and_contoured(kbp):
    hu, label, aff, contoured = read_patient(kbp / "provided-data" / "train-pats" / "pt_2")
    assert hu.dtype == np.int16 and hu.shape == SHAPE
    assert hu[0, 0, 0] == -1024  # outside the contour: air
    assert hu[35, 45, 15] in (40, 1000)  # inside the body: stored value - 1024
    assert set(np.unique(hu)) == {-1024, 40, 1000}
    assert contoured == [n for n in OARS if n != "Larynx" and n != "Esophagus"]
    assert label[62, 62, 25] == OARS.index("Brainstem") + 1
    assert label[72, 64, 60] == OARS.index("SpinalCord") + 1
    assert not np.any(label == OARS.index("Larynx") + 1)
    assert anatomy_problems(label, aff) == []


def test_anatomy_check_catches_swapped_sides(kbp):
    _, label, aff, _ = read_patient(kbp / "provided-data" / "test-pats" / "pt_241")
    assert anatomy_problems(label, aff) == ["the left parotid is not on the patient's left of the right one"]
    flipped = openkbp_affine((3.906, 3.906, 2.5)) @ np.diag([-1.0, 1, 1, 1])  # axis 0 the wrong way round
    _, label, _, _ = read_patient(kbp / "provided-data" / "train-pats" / "pt_1")
    assert "the mandible is not anterior to the spinal cord" in anatomy_problems(label, flipped)


def test_import_writes_nifti_datalist_and_resumes(kbp, tmp_path):
    out = tmp_path / "kbp_nifti"
    r = import_openkbp(kbp, out, progress=False)
    assert r.imported == 4 and r.cases == {"training": 2, "validation": 1, "test": 1}
    assert sorted(p for p, _ in r.skipped) == ["test-pats/pt_241", "train-pats/pt_3"]
    assert dict(r.skipped)["train-pats/pt_3"] == "no ct.csv"
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["labels"] == {"0": "background", **{str(i + 1): n for i, n in enumerate(OARS)}}
    assert [e["image"] for e in doc["training"]] == ["imagesTr/pt_1.nii.gz", "imagesTr/pt_2.nii.gz"]
    assert [e["image"] for e in doc["validation"]] == ["imagesTr/pt_201.nii.gz"]
    assert [e["image"] for e in doc["test"]] == ["imagesTr/pt_242.nii.gz"]
    assert doc["training"][1]["contoured"] == [1, 2, 3, 4, 7]  # no larynx, no oesophagus in pt_2
    assert {d["patient"] for d in doc["skipped"]} == {"test-pats/pt_241", "train-pats/pt_3"}
    img = nib.load(out / "imagesTr" / "pt_1.nii.gz")
    assert "".join(nib.aff2axcodes(img.affine)) == "PLI" and img.get_data_dtype() == np.int16
    lab = np.asarray(nib.load(out / "labelsTr" / "pt_1.nii.gz").dataobj)
    assert lab[62, 62, 25] == 1
    # the datalist reads with the project's loader, paths resolved against the output folder
    entries = load_datalist(out / "dataset.json", key="training")
    assert Path(entries[0]["image"]).is_file() and Path(entries[0]["label"]).is_file()
    # a rerun keeps what is done
    mtime = (out / "imagesTr" / "pt_1.nii.gz").stat().st_mtime_ns
    again = import_openkbp(kbp / "provided-data", out, progress=False)
    assert again.imported == 0 and again.cases == r.cases
    assert (out / "imagesTr" / "pt_1.nii.gz").stat().st_mtime_ns == mtime


def test_import_names_a_folder_without_openkbp_data(tmp_path):
    with pytest.raises(DataError, match="no OpenKBP data here"):
        import_openkbp(tmp_path, tmp_path / "out", progress=False)


def test_malformed_csv_is_named(kbp, tmp_path):
    bad = kbp / "provided-data" / "train-pats" / "pt_1" / "ct.csv"
    bad.write_text(",data\n5,abc\n")
    with pytest.raises(DataError, match="pt_1/ct.csv: unreadable OpenKBP CSV"):
        read_patient(bad.parent)


def test_cli_import_openkbp(kbp, tmp_path, capsys):
    from alice3d.cli.data import main

    assert main(["import", "openkbp", "--src", str(kbp), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "SKIP train-pats/pt_3: no ct.csv" in out and "imported 4 patient(s)" in out
    assert "training 2, validation 1, test 1" in out
    assert (tmp_path / "o" / "dataset.json").is_file()
    assert main(["import", "openkbp", "--src", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert "no OpenKBP data here" in capsys.readouterr().err
