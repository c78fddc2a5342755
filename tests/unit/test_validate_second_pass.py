"""validate, second pass: CT stored with +1024, metal, too few slices, JSON on exit 2, one image file."""

import json
import logging

import numpy as np
import pytest

from alice3d.cli.data import main
from alice3d.data import inspect as di
from alice3d.data.io import Volume, save_nifti


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))


def _body_ct_hu(shape=(24, 24, 16), seed=0) -> np.ndarray:
    """A CT in HU: 40% air (-1000), 10% fat (-100), 40% soft tissue (+40), 10% bone (400..2000)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    parts = [rng.normal(-1000, 8, int(n * 0.4)), rng.normal(-100, 20, int(n * 0.1)),
             rng.normal(40, 30, int(n * 0.4))]
    parts.append(rng.uniform(400, 2000, n - sum(len(p) for p in parts)))
    v = np.clip(np.round(np.concatenate(parts)), -1024, 3071)
    return rng.permutation(v).reshape(shape).astype(np.int16)


def _mr_like(shape=(24, 24, 16), seed=1, centre=1000.0, sd=300.0) -> np.ndarray:
    """Raw MR magnitudes: a third background at 0, tissue spread widely around ``centre``."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    v = np.r_[np.zeros(n // 3), np.clip(rng.normal(centre, sd, n - n // 3), 0, None)]
    return rng.permutation(np.round(v)).reshape(shape).astype(np.int16)


def _json(tmp_path, *argv):
    code = main(["validate", *map(str, argv), "--json", str(tmp_path / "report.json")])
    return code, json.loads((tmp_path / "report.json").read_text())


# ----------------------------------------------------------------------------- 1. CT stored as HU+1024


def test_ct_with_1024_offset_is_named_and_mr_is_not():
    hu = _body_ct_hu()
    stored = (hu.astype(np.int32) + 1024).astype(np.uint16)  # OpenKBP layout: air at ~0
    s = di.describe_volume(stored, np.eye(4), path="/d/openkbp.nii.gz")
    assert s.modality == "CT+1024" and s.minimum >= 0 and s.p01 <= di.OFFSET_AIR_P01_MAX
    # hand count: fat + soft tissue (80% of all, 50/60 of the non-air voxels) lie in 874..1274
    body = stored >= 524
    tissue = ((stored >= 874) & (stored <= 1274)).sum() / body.sum()
    assert s.offset_tissue == pytest.approx(tissue) and 0.8 < tissue < 0.86 and s.offset_gap < 0.01
    (w,) = di.modality_warnings(s)
    assert w.startswith("/d/openkbp.nii.gz: air near 0, bone near 2,000: a CT stored with +1024 offset")
    assert w.endswith("set data.hu_offset=-1024 or import it with its importer")
    assert "not the MR the task expects" in di.modality_warnings(s, "MR")[0]
    assert s.summary().startswith("24x24x16 voxels, 1x1x1 mm, RAS, CT+1024, ") and s.to_dict()["modality"] == "CT+1024"
    # the same voxels in HU are plain CT, with no offset statistics computed
    plain = di.describe_volume(hu, np.eye(4))
    assert plain.modality == "CT" and plain.offset_tissue is None and di.modality_warnings(plain) == []
    # MR-like volumes with background at 0 and a high 99th percentile stay MR
    for centre, sd in ((1000.0, 300.0), (1050.0, 200.0), (600.0, 250.0)):
        mr = di.describe_volume(_mr_like(centre=centre, sd=sd), np.eye(4), path="t1")
        assert mr.modality == "MR", (centre, sd, mr.offset_tissue, mr.offset_gap)
        assert "look like MR" in di.modality_warnings(mr)[0] and di.modality_warnings(mr, "MR") == []
    assert di.describe_volume(np.random.default_rng(0).uniform(0, 1500, (12, 12, 12)), np.eye(4)).modality == "MR"
    # the heuristic itself: without the offset statistics it cannot say CT+1024
    assert di.guess_modality(s.minimum, s.maximum, s.p01, s.distinct) == "MR"
    assert di.guess_modality(s.minimum, s.maximum, s.p01, s.distinct, p99=s.p99, offset_tissue=0.8,
                             offset_gap=0.3) == "MR"


def test_validate_reports_ct_1024_in_text_and_json(tmp_path, capsys):
    save_nifti((_body_ct_hu().astype(np.int32) + 1024).astype(np.int16), np.eye(4), tmp_path / "img" / "kbp.nii.gz")
    save_nifti(_mr_like(), np.eye(4), tmp_path / "img" / "t1.nii.gz")
    for full in ([], ["--full"]):
        code, doc = _json(tmp_path, tmp_path / "img", *full)
        out = capsys.readouterr().out
        assert code == 0 and (doc["good"], doc["warnings"]) == (2, 2)
        by = {c["image"].rsplit("/", 1)[1]: c for c in doc["cases"]}
        assert by["kbp.nii.gz"]["modality"] == "CT+1024" and by["t1.nii.gz"]["modality"] == "MR"
        assert "a CT stored with +1024 offset" in by["kbp.nii.gz"]["warnings"][0]
        assert "ok   training: kbp.nii.gz: 24x24x16 voxels, 1x1x1 mm, RAS, CT+1024," in out
        assert f"WARN training: {tmp_path / 'img' / 'kbp.nii.gz'}: air near 0, bone near 2,000" in out


# ----------------------------------------------------------------------------- 2. metal


def test_metal_warning_names_file_and_fraction(tmp_path, capsys):
    hu = _body_ct_hu((40, 40, 25))  # 40,000 voxels
    hu.reshape(-1)[:48] = 27000  # 0.12 %
    s = di.describe_volume(hu, np.eye(4), path="/d/hn.nii.gz")
    assert s.modality == "CT" and s.metal == pytest.approx(48 / 40000)
    (w,) = di.modality_warnings(s)
    assert w.startswith("/d/hn.nii.gz: metal: 0.12 % of voxels above 3,000 HU (max 27,000 HU); streak artefacts")
    # the same CT stored with +1024: the threshold moves with the offset (3,000 HU = 4,024 stored)
    off = (hu.astype(np.int32) + 1024).astype(np.int32)
    off.reshape(-1)[48:60] = 1024 + 2990  # dense bone just below 3,000 HU: not metal
    s2 = di.describe_volume(off, np.eye(4), path="kbp")
    assert s2.modality == "CT+1024" and s2.metal == pytest.approx(48 / 40000)
    assert "max 27,000 HU" in di.modality_warnings(s2)[1]
    # a CT without metal, an MR and a single noise voxel above 3,000 HU in 200,000 give no metal warning
    assert di.describe_volume(_body_ct_hu(), np.eye(4)).metal == 0.0
    mr = _mr_like().astype(np.int32)
    mr.reshape(-1)[:50] = 27000
    assert di.describe_volume(mr, np.eye(4)).metal is None
    big = _body_ct_hu((50, 50, 80))
    big[0, 0, 0] = 3500
    s3 = di.describe_volume(big, np.eye(4))
    assert s3.metal == pytest.approx(1 / 200000) and not any("metal" in w for w in di.modality_warnings(s3))
    # enamel and dense bone at a 12-bit scanner's ceiling (3,071 HU) are not metal, however many voxels
    teeth = _body_ct_hu((40, 40, 25))
    teeth.reshape(-1)[:48] = 3071
    s4 = di.describe_volume(teeth, np.eye(4))
    assert s4.metal == pytest.approx(48 / 40000) and not any("metal" in w for w in di.modality_warnings(s4))
    # validate prints it for the file, header mode (a sample of slices) and --full alike
    save_nifti(hu, np.eye(4), tmp_path / "img" / "hn.nii.gz")
    for full in ([], ["--full"]):
        code, doc = _json(tmp_path, tmp_path / "img", *full)
        out = capsys.readouterr().out
        (case,) = doc["cases"]
        assert code == 0 and case["metal"] > 0 and len(case["warnings"]) == 1
        assert f"WARN training: {tmp_path / 'img' / 'hn.nii.gz'}: metal: " in out and "above 3,000 HU" in out


# ----------------------------------------------------------------------------- 3. too few slices


def test_validate_warns_about_too_few_slices(tmp_path, capsys):
    ct = _body_ct_hu((16, 16, 12))
    save_nifti(ct[:, :, :1], np.eye(4), tmp_path / "img" / "localizer.nii.gz")
    save_nifti(ct[:, :, :2], np.eye(4), tmp_path / "img" / "two.nii.gz")
    save_nifti(ct, np.eye(4), tmp_path / "img" / "vol.nii.gz")
    for full in ([], ["--full"]):
        code, doc = _json(tmp_path, tmp_path / "img", *full)
        out = capsys.readouterr().out
        by = {c["image"].rsplit("/", 1)[1]: c for c in doc["cases"]}
        assert code == 0 and doc["good"] == 3 and doc["warnings"] == 2, out
        assert by["vol.nii.gz"]["warnings"] == []
        for name, shape in (("localizer.nii.gz", (16, 16, 1)), ("two.nii.gz", (16, 16, 2))):
            (w,) = by[name]["warnings"]
            assert w == f"{tmp_path / 'img' / name}: {di.too_few_slices(shape)}"
            assert f"WARN training: {tmp_path / 'img' / name}: too few slices for a 3-D volume" in out


# ----------------------------------------------------------------------------- 5. JSON on exit 2


def test_unreadable_datalist_still_writes_json(tmp_path, capsys):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    code, doc = _json(tmp_path, bad)
    printed = capsys.readouterr()
    assert code == 2 and "malformed JSON" in printed.err
    assert doc["data"] == str(bad) and doc["cases"] == []
    assert "malformed JSON" in doc["error"] and "broken.json" in doc["error"]
    code, doc = _json(tmp_path, tmp_path / "nowhere")
    assert code == 2 and "not found" in doc["error"] and doc["cases"] == []


# ----------------------------------------------------------------------------- 6. one image file


def test_single_image_file_is_listed_once(tmp_path, capsys):
    save_nifti(_body_ct_hu(), np.eye(4), tmp_path / "ct.nii.gz")
    code, doc = _json(tmp_path, tmp_path / "ct.nii.gz")
    out = capsys.readouterr().out
    assert code == 0 and len(doc["cases"]) == 1 and doc["good"] == 1 and "1 good, 0 bad" in out
    assert sum(l.startswith("ok ") for l in out.splitlines()) == 1
    # a folder holding one image is one case too (it has no validation split)
    code, doc = _json(tmp_path, tmp_path)
    assert code == 0 and len(doc["cases"]) == 1


def test_log_modality_warnings_keeps_its_contract(caplog):
    vol = Volume((_body_ct_hu().astype(np.int32) + 1024).astype(np.float32), np.eye(4), "kbp.nii.gz")
    with caplog.at_level(logging.WARNING, logger="alice3d.test"):
        out = di.log_modality_warnings(vol, "CT", logging.getLogger("alice3d.test"))
    assert isinstance(out, list) and len(out) == 1 and out[0].startswith("kbp.nii.gz: air near 0")
    assert [r.getMessage() for r in caplog.records] == out
