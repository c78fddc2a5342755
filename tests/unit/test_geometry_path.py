"""One geometry path: the store, fine-tuning, landmark, pretraining and probing give a volume the
same voxels and the same affine (all through alice3d.data.canonical)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from alice3d.analysis.probing import load_labeled_volumes
from alice3d.data import preprocess as pre
from alice3d.data.canonical import geometry_transforms, to_canonical
from alice3d.data.io import Volume, load_volume
from alice3d.data.store import StoreSettings, open_store
from alice3d.data.volumes import normalize_hu, prepare_volume
from alice3d.finetune.data import Case, prepare_case
from alice3d.finetune.tasks import resolve_task
from alice3d.finetune.transforms import preprocess_transforms
from landmark.preprocess import prepare_array

# Of the source, in RAS axis order (x, y, z): exact in float32, which the NIfTI header stores the
# affine in (0.8 mm would read back as 0.800000012 and shift every sample by a little).
SPACING = (0.75, 1.25, 3.0)
# A window of width 2**11 whose low end is below every voxel: windowing is then exact in float32
# (a subtraction of integers and a division by a power of two) and the foreground crop of
# fine-tuning keeps the whole volume, so arrays of different commands compare voxel for voxel.
WINDOW = (-1024.0, 1024.0)
SHAPE = (11, 9, 6)  # (x, y, z) voxels of the source: (n - 1) * old / new is whole below


def _affine(permuted: bool) -> np.ndarray:
    """LPS voxel->world (RAS) affine at SPACING; ``permuted``: array axis 0 runs P, axis 1 runs L."""
    sx, sy, sz = SPACING
    aff = np.array([[-sx, 0, 0, 12.0], [0, -sy, 0, 34.0], [0, 0, sz, -56.0], [0, 0, 0, 1]])
    if permuted:
        aff[:, [0, 1]] = aff[:, [1, 0]]
    return aff


def _write_case(tmp_path, permuted: bool):
    """Image (even integer HU in [-1000, 1000]) and label (ids 0/1) NIfTI files of an LPS, anisotropic
    volume; a datalist of the one case for probing."""
    rng = np.random.default_rng(7)
    shape = (SHAPE[1], SHAPE[0], SHAPE[2]) if permuted else SHAPE
    img = (2 * rng.integers(-500, 501, size=shape)).astype(np.int16)
    lab = (img > 200).astype(np.int16)
    aff = _affine(permuted)
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "ct_lab.nii.gz")
    datalist = {"training": [{"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "ct_lab.nii.gz")}]}
    (tmp_path / "dataset.json").write_text(json.dumps(datalist))
    return tmp_path / "ct.nii.gz", tmp_path / "ct_lab.nii.gz", tmp_path / "dataset.json"


def _store_case(image, target, tmp_path):
    """What `alice3d-data preprocess` stores: (int16 HU, affine) of the one case."""
    settings = StoreSettings(tuple(target), -500.0)
    pre.build_store([str(image)], tmp_path / "store", settings, workers=1, progress=False)
    vol = open_store(tmp_path / "store", settings.spacing).volumes(WINDOW)[0]
    return vol.read_hu(), vol.affine


def _finetune_case(image, label, target):
    """What `alice3d-finetune` trains on for a custom task at ``target``: (image (X, Y, Z), label, affine)."""
    task = resolve_task("custom", labels=["organ"], spacing=tuple(target), roi=(4, 4, 4), hu_window=WINDOW)
    prepared = prepare_case(Case("ct", str(image), str(label)), task)
    return prepared.image[0].numpy(), prepared.label[0].numpy(), prepared.affine


def _landmark_input(image, target):
    """What `alice3d-landmark` embeds: (channel 0 of the network input, affine)."""
    arr, aff = prepare_array(load_volume(image), target, WINDOW)
    return arr[0], aff


@pytest.mark.parametrize("permuted", [False, True], ids=["lps", "pls"])
def test_store_finetune_and_landmark_give_identical_arrays(tmp_path, permuted):
    # Target spacing: half the resolution in x and y (every output voxel is a source voxel) and twice
    # it in z (halfway samples: the mean of two even integers), so the resampled HU are integers and
    # the store's int16 holds them without rounding; a general spacing is the next test.
    target = (1.5, 2.5, 1.5)
    image, label, datalist = _write_case(tmp_path, permuted)
    hu, store_aff = _store_case(image, target, tmp_path)
    ft_img, ft_lab, ft_aff = _finetune_case(image, label, target)
    lm_img, lm_aff = _landmark_input(image, target)
    pt = prepare_volume(str(image), target, WINDOW)  # pretraining's in-memory volumes
    probe = load_labeled_volumes(str(datalist), target, WINDOW, keys=("training",))[0]

    # MONAI's grid: voxel 0 kept, round((n - 1) * old / new) + 1 voxels, exact spacing
    assert hu.shape == (6, 5, 11)  # (10 / 2 + 1, 8 / 2 + 1, 5 * 2 + 1)
    np.testing.assert_array_equal(np.linalg.norm(store_aff[:3, :3], axis=0), target)
    for aff in (ft_aff, lm_aff, pt.affine, probe.affine):
        np.testing.assert_array_equal(aff, store_aff)
    windowed = normalize_hu(hu.astype(np.float32), WINDOW)
    for arr in (ft_img, lm_img, pt.array, probe.array):
        np.testing.assert_array_equal(arr, windowed)
    np.testing.assert_array_equal(probe.label, ft_lab.astype(np.int16))
    assert set(np.unique(ft_lab).tolist()) == {0.0, 1.0}


def test_any_spacing_gives_identical_arrays(tmp_path):
    target = (1.3, 1.7, 1.1)  # general interpolation weights
    image, label, datalist = _write_case(tmp_path, permuted=True)
    hu, store_aff = _store_case(image, target, tmp_path)
    ft_img, ft_lab, ft_aff = _finetune_case(image, label, target)
    lm_img, lm_aff = _landmark_input(image, target)
    pt = prepare_volume(str(image), target, WINDOW)
    probe = load_labeled_volumes(str(datalist), target, WINDOW, keys=("training",))[0]

    for aff in (ft_aff, lm_aff, pt.affine, probe.affine):
        np.testing.assert_array_equal(aff, store_aff)
    # the float paths are the same computation on the same voxels: equal to the bit
    for arr in (lm_img, pt.array, probe.array):
        np.testing.assert_array_equal(arr, ft_img)
    np.testing.assert_array_equal(probe.label, ft_lab.astype(np.int16))
    # the store keeps HU rounded to integers: at most half a HU off, i.e. 0.5 / 2048 after the
    # window (plus one float32 step of the windowed value, ~6e-8 below 1)
    assert ft_img.shape == hu.shape
    err = np.abs(normalize_hu(hu.astype(np.float32), WINDOW) - ft_img)
    assert float(err.max()) <= 0.5 / (WINDOW[1] - WINDOW[0]) + np.finfo(np.float32).eps
    assert float(err.max()) > 0  # the interpolated HU are not integers: the comparison means something


def test_lps_at_the_target_spacing_is_the_source_flipped_in_x_and_y():
    arr = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    lab = (np.arange(arr.size) % 3).reshape(arr.shape).astype(np.int16)
    aff = np.array([[-2.0, 0, 0, 10.0], [0, -3.0, 0, 20.0], [0, 0, 4.0, 30.0], [0, 0, 0, 1]])
    out = to_canonical(Volume(arr, aff, label=lab), (2.0, 3.0, 4.0))
    # out[i, j, k] = arr[1 - i, 2 - j, k]: voxel (0, 0, 0) is the source's (1, 2, 0)
    expected = np.array([[[20, 21, 22, 23], [16, 17, 18, 19], [12, 13, 14, 15]],
                         [[8, 9, 10, 11], [4, 5, 6, 7], [0, 1, 2, 3]]], dtype=np.float32)
    np.testing.assert_array_equal(out.array, expected)
    np.testing.assert_array_equal(out.label, lab[::-1, ::-1, :])
    assert out.label.dtype == np.int16 and out.array.dtype == np.float32
    # the source's voxel (1, 2, 0) sits at world (10 - 2, 20 - 6, 30): the RAS grid starts there
    np.testing.assert_array_equal(out.affine, [[2, 0, 0, 8], [0, 3, 0, 14], [0, 0, 4, 30], [0, 0, 0, 1]])


def test_finetune_preprocessing_uses_the_geometry_steps_and_inverts():
    task = resolve_task("custom", labels=["organ"], spacing=(1.5, 1.5, 1.5), roi=(4, 4, 4), hu_window=WINDOW)
    steps = preprocess_transforms(task)
    ours = geometry_transforms(["image", "label"], task.spacing)
    assert [type(s).__name__ for s in steps[1:3]] == [type(s).__name__ for s in ours]
    assert steps[2].spacing_transform.pixdim.tolist() == list(task.spacing)
    assert [m for m in steps[2].mode] == ["bilinear", "nearest"]
    # the inverse of the geometry steps lands on the source grid (what predict's Invertd relies on)
    src = MetaTensor(torch.zeros(1, *SHAPE), affine=torch.tensor(_affine(False)))
    pipe = mt.Compose(geometry_transforms(["image"], task.spacing))
    back = pipe.inverse(pipe({"image": src}))["image"]
    assert tuple(back.shape[1:]) == SHAPE
    np.testing.assert_allclose(back.affine.numpy(), _affine(False), atol=1e-9)
