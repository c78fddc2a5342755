"""Case/datalist validation and datalist loading (JSON and plain folders)."""

import json

import numpy as np
import pytest

from alice3d.data.datalists import BTCV_LABELS, load_datalist, scan_directory, write_btcv_datalist
from alice3d.data.io import DataError, save_nifti
from alice3d.data.validate import check_case, header_info, validate_case, validate_datalist

AFF = np.diag([1.0, 1.0, 2.0, 1.0])


def _case(d, name, shape=(12, 10, 8), labels=(0, 1, 2), image=None, label_aff=AFF):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    img = rng.normal(size=shape).astype(np.float32) if image is None else image
    lab = rng.choice(np.asarray(labels), size=shape).astype(np.uint8)
    ip, lp = d / "imagesTr" / f"img{name}.nii.gz", d / "labelsTr" / f"label{name}.nii.gz"
    save_nifti(img, AFF, ip)
    save_nifti(lab, label_aff, lp)
    return ip, lp


def test_good_case_has_no_problems(tmp_path):
    ip, lp = _case(tmp_path, "0001")
    assert validate_case(ip, lp, label_values=range(3)) == []
    assert validate_case(ip, lp, label_values=range(3), full=False) == []
    check_case(ip, lp)
    shape, aff = header_info(ip)
    assert shape == (12, 10, 8) and np.allclose(aff, AFF)


def test_label_values_outside_the_set(tmp_path):
    ip, lp = _case(tmp_path, "0002", labels=(0, 1, 17))
    for full in (True, False):
        problems = validate_case(ip, lp, label_values=range(14), full=full)
        assert len(problems) == 1 and "17" in problems[0] and "label0002" in problems[0]
    with pytest.raises(DataError, match="17"):
        check_case(ip, lp, label_values=range(14))


def test_header_checks_catch_mismatch_and_small_shape(tmp_path):
    ip, lp = _case(tmp_path, "0003", label_aff=np.diag([1.0, 1.0, 3.0, 1.0]))
    problems = validate_case(ip, lp, full=False)
    assert problems and "affine" in problems[0]
    ip2, _ = _case(tmp_path, "0004")
    assert "smaller" in validate_case(ip2, min_shape=(16, 16, 16), full=False)[0]


def test_constant_and_nan_images(tmp_path):
    ip, _ = _case(tmp_path, "0005", image=np.zeros((12, 10, 8), np.float32))
    assert "constant" in validate_case(ip)[0]
    assert validate_case(ip, allow_constant=True) == []
    arr = np.ones((12, 10, 8), np.float32)
    arr[0, 0, 0] = np.inf
    ip, _ = _case(tmp_path, "0006", image=arr)
    assert "non-finite" in validate_case(ip)[0]


def test_validate_datalist_splits_good_and_bad(tmp_path):
    good = [dict(zip(("image", "label"), map(str, _case(tmp_path, f"00{i}1")))) for i in range(3)]
    broken = tmp_path / "imagesTr" / "img0099.nii.gz"
    broken.write_bytes(b"\x1f\x8b garbage")
    entries = good + [{"image": str(broken)}, {"label": "x"}]
    ok, bad = validate_datalist(entries, label_values=range(3))
    assert ok == good
    assert [p for p, _ in bad][0] == str(broken) and len(bad) == 2
    assert "img0099" in bad[0][1]


def test_load_btcv_json_datalist(tmp_path):
    for i in (1, 2, 3):
        _case(tmp_path, f"000{i}")
    entries = [{"image": f"imagesTr/img000{i}.nii.gz", "label": f"labelsTr/label000{i}.nii.gz"} for i in (1, 2, 3)]
    path = write_btcv_datalist(tmp_path / "dataset_0.json", entries[:2], entries[2:], description="t")
    doc = json.loads(path.read_text())
    assert doc["labels"] == BTCV_LABELS and doc["numTraining"] == 3 and doc["tensorImageSize"] == "3D"
    train = load_datalist(path)
    assert [e["image"] for e in train] == [str((tmp_path / e["image"]).resolve()) for e in entries[:2]]
    assert len(load_datalist(path, key="validation")) == 1
    assert load_datalist(tmp_path) == train  # a folder with dataset_0.json reads through it
    assert load_datalist(path, key="test") == []
    with pytest.raises(DataError, match="'testing'.*training"):
        load_datalist(path, key="testing")


def test_malformed_json_and_missing_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"training": [ {"image": "a.nii.gz"}, ]')
    with pytest.raises(DataError, match="broken.json.*malformed JSON"):
        load_datalist(bad)
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps({"training": [{"image": "imagesTr/missing.nii.gz"}]}))
    with pytest.raises(DataError, match="missing.nii.gz"):
        load_datalist(listed)
    with pytest.raises(DataError, match="not found"):
        load_datalist(tmp_path / "nowhere.json")


def test_plain_directory_scan_pairs_labels(tmp_path):
    for i in (1, 2):
        _case(tmp_path, f"000{i}")
    (tmp_path / "imagesTr" / "readme.txt").write_text("not an image")
    entries = load_datalist(tmp_path)
    assert [e["image"].rsplit("/", 1)[1] for e in entries] == ["img0001.nii.gz", "img0002.nii.gz"]
    assert all(e["label"].endswith(f"label000{i}.nii.gz") for i, e in zip((1, 2), entries))
    # pointing at imagesTr itself pairs labels from the sibling labelsTr
    assert scan_directory(tmp_path / "imagesTr") == entries
    assert load_datalist(tmp_path, key="validation") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        load_datalist(empty)
