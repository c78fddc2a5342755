"""2D data: PNG/TIFF folders and slices of volumes along any axis, deterministic in the index."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from alice3d.config import DataConfig
from alice3d.data.io import DataError, Volume, save_nifti
from alice3d.data.slices import (
    ImageFolderDataset,
    SliceConfig,
    VolumeSliceDataset,
    list_images_2d,
    read_image_2d,
    slice_dataset,
)


def write_image(path, arr, vector=False):
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=vector), str(path))


def coded_volume():
    """Voxel (x, y, z) holds 0.001 * (x + 100 y + 10000 z) / 100: every slice is identifiable."""
    x, y, z = np.meshgrid(np.arange(20), np.arange(18), np.arange(16), indexing="ij")
    arr = ((x + 100 * y + 10000 * z) / 1e6 + 0.1).astype(np.float32)
    label = ((x // 10) + 2 * (z // 8)).astype(np.int16)
    return Volume(array=arr, affine=np.eye(4), label=label)


def test_read_png_and_tiff_in_unit_range(tmp_path):
    grey = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    write_image(tmp_path / "g.png", grey)
    out = read_image_2d(tmp_path / "g.png")
    assert out.shape == (1, 12, 20)
    np.testing.assert_allclose(out[0], grey / 255.0, atol=1e-6)
    deep = (np.arange(6 * 7, dtype=np.uint16) * 1000).reshape(6, 7)
    write_image(tmp_path / "d.tif", deep)
    np.testing.assert_allclose(read_image_2d(tmp_path / "d.tif")[0], deep / 65535.0, atol=1e-6)
    rgb = np.stack([np.full((5, 6), v, np.uint8) for v in (30, 60, 90)], axis=-1)
    write_image(tmp_path / "c.png", rgb, vector=True)
    np.testing.assert_allclose(read_image_2d(tmp_path / "c.png"), np.full((1, 5, 6), 60 / 255.0), atol=1e-6)
    assert read_image_2d(tmp_path / "c.png", channels=3).shape == (3, 5, 6)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        read_image_2d(tmp_path / "bad.png")


def test_image_folder_dataset_crops_deterministically_and_skips_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "a.png", (rng.random((40, 50)) * 255).astype(np.uint8))
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "b.tif", (rng.random((20, 24)) * 255).astype(np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    files = list_images_2d(tmp_path)
    assert [f.name for f in files] == ["a.png", "broken.png", "b.tif"]
    ds = ImageFolderDataset(files, (32, 32), seed=3)
    assert [p for p, _ in ds.bad] == [str(tmp_path / "broken.png")]
    a, b = ds[0]["image"], ds[1]["image"]
    assert a.shape == b.shape == (1, 32, 32)
    assert torch.equal(ds[0]["image"], a)  # same index, same sample
    assert not torch.equal(ds[2]["image"], a)  # same file, another crop
    # b.tif (20 x 24) is padded with zeros to 32 x 32.
    assert float((b == 0).float().mean()) >= 1 - (20 * 24) / (32 * 32) - 1e-6
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderDataset(files, (32, 32), on_bad_data="fail")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_volume_slices_along_any_axis(axis):
    vol = coded_volume()
    ds = VolumeSliceDataset([vol], (8, 6), axis=axis, seed=0)
    s = ds[7]
    assert s["image"].shape == (1, 8, 6) and torch.equal(ds[7]["image"], s["image"])
    img = s["image"][0].numpy()
    # Find where the window sits: a slice normal to `axis` means one constant coordinate on that axis.
    inside = img > 0
    code = np.round((img[inside] - 0.1) * 1e6).astype(int)
    coords = np.stack([code % 100, (code // 100) % 100, code // 10000])
    assert len(np.unique(coords[axis])) == 1
    others = [a for a in range(3) if a != axis]
    assert all(len(np.unique(coords[a])) > 1 for a in others)
    centre = tuple(ds.centres[0][np.random.default_rng(np.random.SeedSequence((0, 7)).generate_state(1)[0]).integers(len(ds.centres[0]))])
    assert int(s["center_label"]) == int(vol.label[centre])
    assert s["label"].shape == (1, 8, 6)


def test_slice_dataset_reads_image_folders_and_volume_folders(tmp_path):
    img_dir = tmp_path / "pngs"
    img_dir.mkdir()
    write_image(img_dir / "x.png", np.full((16, 16), 128, np.uint8))
    ds, report = slice_dataset(DataConfig(data=str(img_dir)), SliceConfig(), (16, 16))
    assert isinstance(ds, ImageFolderDataset) and report.used == 1 and report.bad == []
    torch.testing.assert_close(ds[0]["image"], torch.full((1, 16, 16), 128 / 255.0))

    vol_dir = tmp_path / "vols"
    (vol_dir / "imagesTr").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(2):
        save_nifti((rng.random((24, 24, 12)) * 400 - 100).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]),
                   vol_dir / "imagesTr" / f"img{k:04d}.nii.gz")
    datalist = {"training": [{"image": f"imagesTr/img{k:04d}.nii.gz"} for k in range(2)]}
    (vol_dir / "dataset_0.json").write_text(json.dumps(datalist))
    cfg = DataConfig(data=str(vol_dir / "dataset_0.json"), spacing=(2.0, 2.0, 2.0))
    ds, report = slice_dataset(cfg, SliceConfig(axis=1), (16, 8))
    assert isinstance(ds, VolumeSliceDataset) and len(ds.volumes) == 2 and report.used == 2
    sample = ds[3]["image"]
    assert sample.shape == (1, 16, 8) and 0.0 <= float(sample.min()) and float(sample.max()) <= 1.0


def test_bad_axis_is_rejected():
    with pytest.raises(ValueError, match="slices.axis"):
        SliceConfig(axis=3).validate()


@pytest.mark.slow
def test_phantom_cohort_is_the_embedded_default():
    """Generates (or reuses) the cached phantom cohort; axial slices come from its volumes."""
    ds, _ = slice_dataset(DataConfig(spacing=(3.0, 3.0, 3.0)), SliceConfig(axis=2), (64, 64), seed=1)
    assert isinstance(ds, VolumeSliceDataset) and len(ds.volumes) >= 2
    a = ds[0]["image"]
    assert a.shape == (1, 64, 64) and torch.equal(ds[0]["image"], a)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and float(a.std()) > 0.01
