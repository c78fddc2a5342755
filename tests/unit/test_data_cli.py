"""alice3d-data command line: phantoms, preview, validate."""

import json
import subprocess
import sys

import numpy as np
import pytest

from alice3d.cli.data import main
from alice3d.viz.png import read_png


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "alice3d.cli.data", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("phantoms", "preview", "validate"):
        assert cmd in out.stdout
    sub = subprocess.run([sys.executable, "-m", "alice3d.cli.data", "phantoms", "--help"], capture_output=True, text=True)
    assert sub.returncode == 0 and "--seed" in sub.stdout and "--size" in sub.stdout


def test_phantoms_validate_preview(tmp_path, capsys):
    out = tmp_path / "coh"
    assert main(["phantoms", "--out", str(out), "--n", "3", "--seed", "2", "--size", "tiny", "--preview"]) == 0
    doc = json.loads((out / "dataset_0.json").read_text())
    assert len(doc["training"]) == 2 and len(doc["validation"]) == 1
    assert (out / "phantom_maps.json").is_file() and (out / "previews" / "img0003.png").is_file()

    assert main(["validate", str(out), "--full"]) == 0
    report = capsys.readouterr().out
    assert "3 good, 0 bad" in report

    png = tmp_path / "p.png"
    img = out / "imagesTr" / "img0001.nii.gz"
    assert main(["preview", "--image", str(img), "--label", str(out / "labelsTr" / "label0001.nii.gz"),
                 "--out", str(png), "--point", "0,0,0", "--size", "64"]) == 0
    px = read_png(png)
    assert px.ndim == 3 and px.shape[0] == 64

    # break one case: validate reports it and exits non-zero
    (out / "imagesTr" / "img0002.nii.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    capsys.readouterr()
    assert main(["validate", str(out)]) == 1
    report = capsys.readouterr().out
    assert "BAD" in report and "img0002" in report and "2 good, 1 bad" in report


def test_validate_label_set_and_bad_datalist(tmp_path, capsys):
    from alice3d.data.io import save_nifti

    save_nifti(np.zeros((4, 4, 4), np.float32) + np.arange(4), np.eye(4), tmp_path / "imagesTr" / "a.nii.gz")
    save_nifti(np.full((4, 4, 4), 20, np.uint8), np.eye(4), tmp_path / "labelsTr" / "a.nii.gz")
    assert main(["validate", str(tmp_path), "--labels", "0-13"]) == 1
    assert "outside the expected set" in capsys.readouterr().out
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    assert main(["validate", str(bad)]) == 2
    assert "malformed JSON" in capsys.readouterr().err


def test_preview_of_unreadable_image(tmp_path, capsys):
    (tmp_path / "x.nii.gz").write_text("nope")
    assert main(["preview", "--image", str(tmp_path / "x.nii.gz"), "--out", str(tmp_path / "x.png")]) == 2
    assert "x.nii.gz" in capsys.readouterr().err


def _validate_json(tmp_path, *argv):
    code = main(["validate", *map(str, argv), "--json", str(tmp_path / "report.json")])
    return code, json.loads((tmp_path / "report.json").read_text())


def test_validate_prints_what_it_read_and_writes_json(tmp_path, capsys):
    from nibabel.orientations import aff2axcodes

    from alice3d.data.io import load_volume

    out = tmp_path / "coh"
    main(["phantoms", "--out", str(out), "--n", "2", "--seed", "1", "--size", "tiny"])
    capsys.readouterr()
    code, doc = _validate_json(tmp_path, out, "--full")
    printed = capsys.readouterr().out
    assert code == 0 and doc["read"] == "full" and doc["intensity_stats_from"] == "all voxels"
    assert (doc["good"], doc["bad"], doc["warnings"]) == (2, 0, 0) and "2 good, 0 bad, 0 warning(s)" in printed
    for case in doc["cases"]:
        vol = load_volume(case["image"])
        a = vol.array
        assert case["status"] == "ok" and case["problems"] == [] and case["warnings"] == []
        assert tuple(case["shape"]) == a.shape and np.allclose(case["spacing"], vol.spacing)
        assert case["orientation"] == "".join(aff2axcodes(vol.affine)) and case["modality"] == "CT"
        assert (case["minimum"], case["maximum"], case["median"]) == (a.min(), a.max(), np.median(a))
        assert case["p01"] == pytest.approx(np.percentile(a, 1)) and case["sampled"] is False
        line = (f"{'x'.join(map(str, a.shape))} voxels, {'x'.join(f'{s:.3g}' for s in vol.spacing)} mm, "
                f"{case['orientation']}, CT, {a.min():g}..{a.max():g} HU (median {np.median(a):g})")
        assert f"ok   {case['split']}: {case['image'].rsplit('/', 1)[1]}: {line}" in printed
    code, doc = _validate_json(tmp_path, out)  # header checks: statistics from a subsample
    assert code == 0 and doc["read"] == "header" and doc["intensity_stats_from"].startswith("a subsample")
    for case in doc["cases"]:
        a = load_volume(case["image"]).array
        assert case["sampled"] is True and tuple(case["shape"]) == a.shape and case["modality"] == "CT"
        assert a.min() <= case["minimum"] <= case["maximum"] <= a.max()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["validate", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "every voxel; without it only headers are checked and the statistics come from a subsample" in helptext


def test_validate_warns_about_label_maps_and_mr_given_as_images(tmp_path, capsys):
    from alice3d.data.io import save_nifti

    rng = np.random.default_rng(0)
    ct = np.clip(rng.normal(0, 400, (16, 16, 12)), -1024, 2000).astype(np.int16)
    ct[:3] = -1000
    save_nifti(ct, np.eye(4), tmp_path / "imagesTr" / "ct.nii.gz")
    save_nifti(rng.integers(0, 14, (16, 16, 12)).astype(np.uint8), np.eye(4), tmp_path / "imagesTr" / "seg.nii.gz")
    save_nifti(rng.integers(0, 1501, (16, 16, 12)).astype(np.int16), np.eye(4), tmp_path / "imagesTr" / "t1.nii.gz")
    code, doc = _validate_json(tmp_path, tmp_path / "imagesTr")
    printed = capsys.readouterr().out
    assert code == 0 and (doc["good"], doc["bad"], doc["warnings"]) == (3, 0, 2)
    assert "3 good, 0 bad, 2 warning(s)" in printed
    warn = [l for l in printed.splitlines() if l.startswith("WARN")]
    assert len(warn) == 2
    assert str(tmp_path / "imagesTr" / "seg.nii.gz") + ": image looks like a label map" in warn[0]
    assert str(tmp_path / "imagesTr" / "t1.nii.gz") + ": intensities look like MR" in warn[1]
    by_name = {c["image"].rsplit("/", 1)[1]: c for c in doc["cases"]}
    assert [by_name[n]["modality"] for n in ("ct.nii.gz", "seg.nii.gz", "t1.nii.gz")] == ["CT", "label map", "MR"]
    assert by_name["ct.nii.gz"]["warnings"] == [] and by_name["seg.nii.gz"]["distinct"] == 14
    # for an MR task the CT and the label map are out of place
    assert main(["validate", str(tmp_path / "imagesTr"), "--modality", "mr"]) == 0
    warn = [l for l in capsys.readouterr().out.splitlines() if l.startswith("WARN")]
    assert len(warn) == 2 and "ct.nii.gz: intensities look like CT" in warn[0] and "seg.nii.gz" in warn[1]


def test_validate_lists_every_missing_file_as_a_bad_case(tmp_path, capsys):
    from alice3d.data.io import save_nifti

    img = np.linspace(-1000, 500, 8 * 8 * 6).reshape(8, 8, 6).astype(np.float32)
    save_nifti(img, np.eye(4), tmp_path / "good.nii.gz")
    save_nifti((img > 0).astype(np.uint8), np.eye(4), tmp_path / "good_label.nii.gz")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({
        "training": [{"image": "good.nii.gz", "label": "good_label.nii.gz"},
                     {"image": "gone1.nii.gz", "label": "good_label.nii.gz"},
                     {"image": "good.nii.gz", "label": "gone_label.nii.gz"}],
        "validation": [{"image": "gone2.nii.gz"}]}))
    for full in ([], ["--full"]):
        code, doc = _validate_json(tmp_path, datalist, *full)
        printed = capsys.readouterr()
        assert code == 1 and printed.err == "" and "1 good, 3 bad" in printed.out
        bad = [l for l in printed.out.splitlines() if l.startswith("BAD")]
        assert len(bad) == 3
        assert bad[0].startswith("BAD  training: gone1.nii.gz: ") and "gone1.nii.gz: file not found" in bad[0]
        assert bad[1].startswith("BAD  training: good.nii.gz: ") and "gone_label.nii.gz: file not found" in bad[1]
        assert bad[2].startswith("BAD  validation: gone2.nii.gz: ")
        cases = {(c["split"], c["image"].rsplit("/", 1)[1], c["label"] and c["label"].rsplit("/", 1)[1]): c
                 for c in doc["cases"]}
        assert cases[("training", "good.nii.gz", "good_label.nii.gz")]["status"] == "ok"
        reasons = cases[("validation", "gone2.nii.gz", None)]["problems"]
        assert cases[("validation", "gone2.nii.gz", None)]["status"] == "bad"
        assert reasons == [f"{tmp_path / 'gone2.nii.gz'}: file not found"]
    # a datalist that cannot be read at all stays exit 2
    datalist.write_text(json.dumps({"validation": []}))
    assert main(["validate", str(datalist)]) == 2
    assert "no 'training' list" in capsys.readouterr().err
