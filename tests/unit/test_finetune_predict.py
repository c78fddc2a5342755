"""``predict`` writes the segmentation in the input's space (shape, affine) for RAS and LPS inputs."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from alice3d.data.io import DataError
from alice3d.finetune.predict import load_run, predict
from helpers import write_tiny_best_run
from alice3d.train.checkpoint import CheckpointError

RAS = np.array([[4.0, 0, 0, -60], [0, 4.5, 0, -50], [0, 0, 6.0, 10], [0, 0, 0, 1]])


def _as_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with x and y reversed (LPS voxel order), same world positions."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return np.ascontiguousarray(array[::-1, ::-1]), affine @ flip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a best.pt of a tiny UNETR whose head is biased so several labels appear."""
    return write_tiny_best_run(tmp_path_factory.mktemp("run"))


def _image(shape=(40, 36, 18)) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full(shape, -1000.0, np.float32)
    inner = (slice(4, -4), slice(4, -4), slice(2, -2))
    img[inner] = rng.normal(30, 60, img[inner].shape)
    return img


def test_predict_keeps_shape_and_affine_for_ras_and_lps(run_dir, tmp_path):
    img = _image()
    nib.save(nib.Nifti1Image(img, RAS), tmp_path / "ras.nii.gz")
    lps_img, lps_aff = _as_lps(img, RAS)
    nib.save(nib.Nifti1Image(lps_img, lps_aff), tmp_path / "lps.nii.gz")
    assert nib.aff2axcodes(lps_aff) == ("L", "P", "S")

    segs = {}
    for name in ("ras", "lps"):
        out = predict(run_dir, tmp_path / f"{name}.nii.gz", tmp_path / f"{name}_seg.nii.gz", device="cpu")
        ref, seg = nib.load(tmp_path / f"{name}.nii.gz"), nib.load(out)
        assert seg.shape == ref.shape
        assert np.allclose(seg.affine, ref.affine)
        data = np.asarray(seg.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= set(range(14))
        segs[name] = data
    assert len(np.unique(segs["ras"])) > 2  # a non-trivial segmentation
    # The same anatomy stored in another orientation gets the same labels at the same world points.
    assert np.array_equal(segs["lps"], segs["ras"][::-1, ::-1])


def test_predict_errors(run_dir, tmp_path):
    with pytest.raises(DataError, match="missing.nii.gz: file not found"):
        predict(run_dir, tmp_path / "missing.nii.gz", tmp_path / "o.nii.gz", device="cpu")
    nib.save(nib.Nifti1Image(np.full((10, 10, 10), -1000.0, np.float32) + np.arange(10)[:, None, None], RAS),
             tmp_path / "air.nii.gz")
    with pytest.raises(DataError, match="air.nii.gz: no voxel above -175 HU"):
        predict(run_dir, tmp_path / "air.nii.gz", tmp_path / "o.nii.gz", device="cpu")
    with pytest.raises(CheckpointError, match="no best.pt"):
        load_run(tmp_path)


def test_predict_reads_and_writes_other_formats_in_the_same_space(run_dir, tmp_path):
    import SimpleITK as sitk

    from alice3d.data.io import read_array, save_image

    img, aff = _as_lps(_image((24, 20, 10)), RAS)
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "ct.nii.gz")
    array, ras = read_array(tmp_path / "ct.nii.gz")
    save_image(array, ras, tmp_path / "ct.mha")
    nii = predict(run_dir, tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", device="cpu")
    mha = predict(run_dir, tmp_path / "ct.mha", tmp_path / "seg.mha", device="cpu")
    ref, got = sitk.ReadImage(str(tmp_path / "ct.mha")), sitk.ReadImage(str(mha))
    assert got.GetSize() == ref.GetSize()
    assert np.allclose(got.GetOrigin(), ref.GetOrigin()) and np.allclose(got.GetDirection(), ref.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(got).transpose(2, 1, 0), np.asarray(nib.load(nii).dataobj))


@pytest.mark.parametrize("shape,batch,overlap,expected", [
    ((40, 36, 18), 2, 0.25, 4),  # steps 24/24/12 -> 2 windows per axis, 8 windows, 2 per call
    ((32, 20, 16), 4, 0.5, 1),   # padded to the ROI: one window
    ((70, 32, 16), 3, 0.5, 2),   # steps 16: 4 windows along x, exactly the ROI elsewhere; 3 per call
])
def test_window_batches_counts_the_network_calls(shape, batch, overlap, expected):
    from alice3d.finetune.config import EvalConfig
    from alice3d.finetune.evaluate import sliding_window_logits
    from alice3d.finetune.predict import window_batches

    ecfg = EvalConfig(sw_batch_size=batch, sw_overlap=overlap)
    calls = []
    sliding_window_logits(lambda x: calls.append(x.shape[0]) or x, torch.zeros(1, 1, *shape), (32, 32, 16), ecfg)
    assert window_batches(shape, (32, 32, 16), ecfg) == len(calls) == expected


def test_predict_cli_reports_completion_once_and_progress_in_logs(run_dir, tmp_path, capsys, monkeypatch):
    import alice3d.runtime
    from alice3d.cli.finetune import main

    monkeypatch.setattr(alice3d.runtime, "MIN_INTERVAL_S", 0.0)
    nib.save(nib.Nifti1Image(_image((80, 72, 36)), RAS), tmp_path / "ct.nii.gz")
    seg = tmp_path / "seg.nii.gz"
    with pytest.raises(SystemExit) as e:
        main(["predict", "--run", str(run_dir), "--image", str(tmp_path / "ct.nii.gz"), "--out", str(seg),
              "--device", "cpu"])
    assert e.value.code in (0, None) and seg.exists()
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert len([l for l in lines if str(seg) in l]) == 1, lines
    # After resampling to 8 mm and the foreground crop: 36x35x23 voxels -> 2x2x2 windows of 32x32x16,
    # 2 per network call; pytest's stderr is no TTY, so progress comes as log lines.
    progress = [l.split("alice3d.finetune: ", 1)[1] for l in lines if "sliding-window inference: " in l]
    assert [p.split(" (")[0] for p in progress[:-1]] == [f"sliding-window inference: {k}/4" for k in (1, 2, 3)]
    assert progress[-1].startswith("sliding-window inference: 4/4 done in ")
