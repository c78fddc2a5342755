"""alice3d-data command line: phantoms, preview, validate."""

import json
import subprocess
import sys

import numpy as np
import pytest

from alice3d.analysis.png import read_png
from alice3d.cli.data import main


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
