"""Image summaries (shape, spacing, orientation, intensities) and the modality heuristic."""

import logging

import numpy as np
import pytest

from alice3d.data import inspect as di
from alice3d.data.io import Volume, load_volume, save_image, save_nifti
from alice3d.data.volumes import prepare_volume

LPS = np.diag([-1.5, -1.5, 3.0, 1.0])


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    from alice3d.data.phantom import generate_cohort

    root = generate_cohort(tmp_path_factory.mktemp("coh"), n=1, seed=3, size="tiny")
    return root / "imagesTr" / "img0001.nii.gz", root / "labelsTr" / "label0001.nii.gz"


def test_describe_volume_hand_computed():
    arr = np.arange(200, dtype=np.float32).reshape(5, 5, 8) - 1000.0  # -1000 .. -801
    s = di.describe_volume(arr, LPS, path="x.nii.gz")
    assert s.shape == (5, 5, 8) and s.spacing == (1.5, 1.5, 3.0) and s.orientation == "LPS"
    assert (s.minimum, s.maximum, s.median) == (-1000.0, -801.0, -900.5)
    assert s.p01 == pytest.approx(-1000 + 0.01 * 199) and s.p99 == pytest.approx(-1000 + 0.99 * 199)
    assert s.distinct is None and s.modality == "CT" and not s.sampled  # negative values: no label ids
    assert s.summary() == "5x5x8 voxels, 1.5x1.5x3 mm, LPS, CT, -1000..-801 HU (median -900.5)"
    d = s.to_dict()
    assert d["shape"] == [5, 5, 8] and d["orientation"] == "LPS" and d["modality"] == "CT"
    assert di.describe_volume(arr, np.eye(4)).orientation == "RAS"


def test_subsample_keeps_the_true_shape_and_says_so():
    arr = np.zeros((64, 64, 64), np.float32)
    arr[:32] = -1000.0
    s = di.describe_volume(arr, np.eye(4), max_voxels=4096)  # every 4th voxel per axis: 16^3
    assert s.sampled and s.shape == (64, 64, 64) and s.median == -500.0 and s.modality == "CT"
    part = di.describe_volume(arr[:, :, ::8], np.eye(4), shape=arr.shape, sampled=True)
    assert part.shape == (64, 64, 64) and part.sampled


@pytest.mark.parametrize("values,expected", [
    (np.repeat(np.arange(14), 50), "label map"),  # BTCV ids
    (np.repeat([0, 1], 50), "label map"),  # a binary mask
    (np.random.default_rng(0).integers(0, 1501, 5000), "MR"),  # raw MR magnitudes, no air
    (np.random.default_rng(1).normal(0, 1, 5000), "MR"),  # z-scored MR
    (np.random.default_rng(2).uniform(-120, 300, 5000), "CT"),  # CT cropped to soft tissue: fat below -50 HU
    (np.r_[np.full(100, -1024.0), np.random.default_rng(3).uniform(-100, 1500, 4900)], "CT"),  # air outside
    (np.full(100, 7.0), "unknown"),  # constant
])
def test_guess_modality(values, expected):
    assert di.describe_volume(np.asarray(values).reshape(-1, 1, 1), np.eye(4)).modality == expected


def test_label_map_and_mr_as_image_warn_naming_the_file():
    lab = di.describe_volume(np.repeat(np.arange(14), 40).reshape(8, 10, 7), np.eye(4), path="/d/label7.nii.gz")
    (w,) = di.modality_warnings(lab)
    assert w.startswith("/d/label7.nii.gz: image looks like a label map (14 distinct integer values in 0..13)")
    mr = np.random.default_rng(0).uniform(0, 1500, (10, 10, 10))
    (w,) = di.modality_warnings(di.describe_volume(mr, np.eye(4), path="/d/t1.nii.gz"))
    assert w.startswith("/d/t1.nii.gz: intensities look like MR") and "air near -1000 HU" in w
    assert di.modality_warnings(di.describe_volume(mr, np.eye(4), path="t1"), expected="MR") == []
    ct = di.describe_volume(np.linspace(-1000, 800, 1000).reshape(10, 10, 10), np.eye(4), path="ct")
    assert "not the MR the task expects" in di.modality_warnings(ct, expected="MR")[0]


def test_phantom_ct_gives_no_warning(phantom_ct, caplog):
    vol = load_volume(phantom_ct[0])
    s = di.describe_volume(vol.array, vol.affine, path=vol.path)
    assert s.modality == "CT" and s.p01 <= di.CT_AIR_P01_MAX_HU and di.modality_warnings(s) == []
    with caplog.at_level(logging.WARNING):
        assert di.log_modality_warnings(vol) == []
        prepare_volume(str(phantom_ct[0]), (8.0, 8.0, 8.0), (-175.0, 250.0))
    assert not caplog.records


def test_pretraining_warns_per_file_and_goes_on(phantom_ct, caplog):
    with caplog.at_level(logging.WARNING):
        vol = prepare_volume(str(phantom_ct[1]), (8.0, 8.0, 8.0), (-175.0, 250.0))  # the label map as image
    assert vol.array.size
    (rec,) = caplog.records
    assert rec.levelno == logging.WARNING and str(phantom_ct[1]) in rec.getMessage()
    assert "looks like a label map" in rec.getMessage()


def test_log_modality_warnings_of_mr_volume(caplog):
    vol = Volume(np.random.default_rng(0).uniform(0, 1500, (12, 12, 12)).astype(np.float32), np.eye(4), "mr.nii.gz")
    with caplog.at_level(logging.WARNING, logger="alice3d.test"):
        out = di.log_modality_warnings(vol, "CT", logging.getLogger("alice3d.test"))
    assert len(out) == 1 and [r.getMessage() for r in caplog.records] == out and out[0].startswith("mr.nii.gz: ")


def test_sample_voxels_reads_every_kth_slice(tmp_path):
    arr = np.broadcast_to(np.arange(40, dtype=np.int16), (4, 3, 40)).copy()  # voxel value = its z index
    save_nifti(arr, LPS, tmp_path / "z.nii.gz")
    sample = di.sample_voxels(tmp_path / "z.nii.gz")  # 16 slices asked: every ceil(40 / 16) = 3rd
    assert sample.shape == (4, 3, 14) and np.array_equal(np.unique(sample), np.arange(0, 40, 3))
    assert di.sample_voxels(tmp_path / "z.nii.gz", max_slices=40).shape == (4, 3, 40)
    save_image(arr, LPS, tmp_path / "z.nrrd")
    assert di.sample_voxels(tmp_path / "z.nrrd").shape == (4, 3, 40)  # no partial read: read whole
