"""Volume loading (nibabel / SimpleITK), geometry helpers and loader errors."""

import gzip
import locale

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from alice3d.data import io as dio
from alice3d.data import validate
from alice3d.data.io import DataError, Volume, load_volume, reorient_to_ras, resample_to_spacing, save_nifti


def _affine(spacing=(1.5, 2.0, 3.0), origin=(-10.0, 20.0, 5.0), flips=(1, 1, 1)):
    a = np.diag([s * f for s, f in zip(spacing, flips)] + [1.0])
    a[:3, 3] = origin
    return a


def _vol(shape=(8, 9, 7)):
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_data_error_is_value_error_and_shared():
    assert issubclass(DataError, ValueError)
    assert validate.DataError is DataError


def test_nifti_round_trip_and_world_coordinates(tmp_path):
    arr, aff = _vol(), _affine(flips=(-1, -1, 1))
    save_nifti(arr, aff, tmp_path / "a.nii.gz")
    save_nifti((arr % 3).astype(np.uint8), aff, tmp_path / "l.nii.gz")
    v = load_volume(tmp_path / "a.nii.gz", tmp_path / "l.nii.gz")
    assert v.array.dtype == np.float32 and v.label.dtype == np.int16
    assert np.array_equal(v.array, arr) and v.shape == arr.shape
    assert np.allclose(v.spacing, (1.5, 2.0, 3.0))
    ijk = np.array([[0, 0, 0], [2, 3, 4]], dtype=float)
    xyz = v.voxel_to_world(ijk)
    assert np.allclose(xyz[1], [-10 - 3.0, 20 - 6.0, 5 + 12.0])  # hand-computed
    assert np.allclose(v.world_to_voxel(xyz), ijk)


def test_mha_gives_same_world_coordinates_as_nifti(tmp_path):
    arr = _vol((6, 5, 4))
    # SimpleITK image with LPS geometry: x axis flipped relative to LPS (i.e. voxels run to patient right)
    img = sitk.GetImageFromArray(arr.transpose(2, 1, 0))
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((30.0, -40.0, 100.0))
    img.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(img, str(tmp_path / "a.mha"))
    # the same data as NIfTI, RAS affine derived by hand: RAS = diag(-1, -1, 1) @ LPS
    ras = np.array([[0.8, 0, 0, -30.0], [0, -0.9, 0, 40.0], [0, 0, 2.5, 100.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(arr, ras), str(tmp_path / "a.nii.gz"))
    a, b = load_volume(tmp_path / "a.mha"), load_volume(tmp_path / "a.nii.gz")
    assert np.array_equal(a.array, b.array)
    ijk = np.array([[0, 0, 0], [5, 4, 3], [1, 2, 3]], dtype=float)
    assert np.allclose(a.voxel_to_world(ijk), b.voxel_to_world(ijk))
    # SimpleITK's own physical point (LPS) of voxel (5, 4, 3), mirrored in x and y
    lps = np.array(img.TransformIndexToPhysicalPoint((5, 4, 3)))
    assert np.allclose(a.voxel_to_world(ijk[1:2])[0], lps * [-1, -1, 1])


def test_save_image_mha_round_trip(tmp_path):
    arr, aff = _vol(), _affine(flips=(-1, 1, -1))
    dio.save_image(arr, aff, tmp_path / "x.nrrd")
    v = load_volume(tmp_path / "x.nrrd")
    assert np.array_equal(v.array, arr) and np.allclose(v.affine, aff)


def test_truncated_gzip(tmp_path):
    save_nifti(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32), _affine(), tmp_path / "t.nii.gz")
    data = (tmp_path / "t.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.nii.gz"):
        load_volume(tmp_path / "t.nii.gz")
    problems = validate.validate_case(tmp_path / "t.nii.gz", full=False)  # header-only check catches it too
    assert problems and "t.nii.gz" in problems[0]


def test_text_file_with_image_extension(tmp_path):
    (tmp_path / "notes.nii.gz").write_text("this is not an image\n")
    with pytest.raises(DataError, match="notes.nii.gz"):
        load_volume(tmp_path / "notes.nii.gz")
    (tmp_path / "plain.nii").write_text("neither is this\n" * 40)
    with pytest.raises(DataError, match="plain.nii"):
        load_volume(tmp_path / "plain.nii")
    (tmp_path / "junk.mha").write_text("junk")
    with pytest.raises(DataError, match="junk.mha"):
        load_volume(tmp_path / "junk.mha")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz")


def test_wrong_dimensionality(tmp_path):
    save_nifti(np.zeros((5, 6), np.float32), np.eye(4), tmp_path / "two.nii.gz")
    with pytest.raises(DataError, match="3-D"):
        load_volume(tmp_path / "two.nii.gz")
    save_nifti(np.zeros((5, 6, 4, 2), np.float32), np.eye(4), tmp_path / "four.nii.gz")
    with pytest.raises(DataError, match="3-D"):
        load_volume(tmp_path / "four.nii.gz")
    save_nifti(np.ones((5, 6, 4, 1), np.float32), np.eye(4), tmp_path / "single.nii.gz")
    assert load_volume(tmp_path / "single.nii.gz").shape == (5, 6, 4)  # trailing singleton squeezed
    assert load_volume(tmp_path / "two.nii.gz", expect_ndim=2).shape == (5, 6)


def test_non_finite_and_constant(tmp_path):
    arr = _vol()
    arr[1, 2, 3] = np.nan
    save_nifti(arr, _affine(), tmp_path / "nan.nii.gz")
    with pytest.raises(DataError, match="non-finite"):
        load_volume(tmp_path / "nan.nii.gz")
    save_nifti(np.full((4, 4, 4), 7.0, np.float32), _affine(), tmp_path / "c.nii.gz")
    assert load_volume(tmp_path / "c.nii.gz").array.max() == 7.0
    with pytest.raises(DataError, match="constant"):
        load_volume(tmp_path / "c.nii.gz", reject_constant=True)


def test_label_shape_and_affine_mismatch(tmp_path):
    save_nifti(_vol(), _affine(), tmp_path / "img.nii.gz")
    save_nifti(np.zeros((8, 9, 6), np.uint8), _affine(), tmp_path / "short.nii.gz")
    save_nifti(np.zeros((8, 9, 7), np.uint8), _affine(origin=(0, 0, 0)), tmp_path / "shifted.nii.gz")
    with pytest.raises(DataError, match="short.nii.gz.*shape"):
        load_volume(tmp_path / "img.nii.gz", tmp_path / "short.nii.gz")
    with pytest.raises(DataError, match="shifted.nii.gz.*affine"):
        load_volume(tmp_path / "img.nii.gz", tmp_path / "shifted.nii.gz")
    save_nifti(np.full((8, 9, 7), 1.5, np.float32), _affine(), tmp_path / "frac.nii.gz")
    with pytest.raises(DataError, match="non-integer"):
        load_volume(tmp_path / "img.nii.gz", tmp_path / "frac.nii.gz")


def test_reorient_to_ras_preserves_world_positions():
    arr = _vol()
    v = Volume(arr, _affine(flips=(-1, -1, -1)), label=(arr > 100).astype(np.int16))
    r = reorient_to_ras(v)
    assert np.all(np.diag(r.affine)[:3] > 0)
    # every voxel value sits at the same world position
    ijk = np.argwhere(np.ones(arr.shape, bool))
    world = v.voxel_to_world(ijk)
    back = np.rint(r.world_to_voxel(world)).astype(int)
    assert np.array_equal(r.array[tuple(back.T)], arr[tuple(ijk.T)])
    assert np.array_equal(r.label[tuple(back.T)], v.label[tuple(ijk.T)])
    assert reorient_to_ras(r) is r


def test_resample_to_spacing_keeps_geometry():
    shape = (40, 30, 20)
    aff = _affine(spacing=(1.0, 1.0, 2.0), flips=(-1, 1, 1))
    arr = np.zeros(shape, np.float32)
    arr[25:31, 10:14, 8:12] = 100.0
    lab = (arr > 0).astype(np.int16)
    v = Volume(arr, aff, label=lab)
    r = resample_to_spacing(v, (2.0, 2.0, 2.0), order=1)
    assert r.shape == (20, 15, 20) and np.allclose(r.spacing, (2, 2, 2))
    assert set(np.unique(r.label).tolist()) <= {0, 1}
    def centroid(vol, w):
        ijk = np.argwhere(np.ones(vol.shape, bool))
        return vol.voxel_to_world((ijk * w.reshape(-1, 1)).sum(0)[None] / w.sum())[0]

    assert np.linalg.norm(centroid(v, v.array.ravel()) - centroid(r, r.array.ravel())) < 0.3
    # nearest-neighbour labels may move by at most half an output voxel
    assert np.linalg.norm(centroid(v, lab.ravel().astype(float)) - centroid(r, r.label.ravel().astype(float))) <= 1.0 + 1e-6
    # the physical extent (corner to corner) is unchanged
    for vol in (v, r):
        lo = vol.voxel_to_world(np.array([[-0.5, -0.5, -0.5]]))[0]
        hi = vol.voxel_to_world(np.array(vol.shape, float)[None] - 0.5)[0]
        if vol is v:
            ref = (lo, hi)
    assert np.allclose(lo, ref[0]) and np.allclose(hi, ref[1])


def test_gzip_module_errors_are_wrapped(tmp_path):
    with gzip.open(tmp_path / "x.nii.gz", "wb") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(DataError, match="x.nii.gz"):
        load_volume(tmp_path / "x.nii.gz")


def test_dicom_series_directory(tmp_path, request):
    from alice3d.data.datalists import load_datalist

    series = tmp_path / "case1"
    series.mkdir()
    arr = np.arange(4 * 6 * 5, dtype=np.int16).reshape(4, 6, 5)  # (z, y, x) as SimpleITK sees it
    uid = "1.2.826.0.1.3680043.2.1125.1.7"
    # GDCM's writer sets the process locale to "C" (ASCII text I/O for every later test): restore it.
    saved_locale = locale.setlocale(locale.LC_ALL)
    request.addfinalizer(lambda: locale.setlocale(locale.LC_ALL, saved_locale))
    for k in range(4):
        sl = sitk.GetImageFromArray(arr[k])
        sl.SetSpacing((0.7, 0.8))
        tags = {"0008|0060": "CT", "0020|000e": uid, "0020|000d": uid + ".0", "0020|0013": str(k + 1),
                "0020|0032": f"10\\-20\\{30 + 2.5 * k}", "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "2.5"}
        for tag, val in tags.items():
            sl.SetMetaData(tag, val)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(series / f"slice{k}.dcm"))
        w.Execute(sl)
    assert dio.is_dicom_dir(series)
    v = load_volume(series)
    assert v.shape == (5, 6, 4) and np.array_equal(v.array, arr.transpose(2, 1, 0))
    # DICOM patient position (LPS) of voxel (0, 0, 0) is (10, -20, 30): in RAS (-10, 20, 30)
    assert np.allclose(v.voxel_to_world(np.array([[0, 0, 0], [1, 2, 3]], float)), [[-10, 20, 30], [-10.7, 18.4, 37.5]])
    assert validate.validate_case(series, full=False) == []
    assert [e["image"] for e in load_datalist(tmp_path)] == [str(series.resolve())]


def test_resample_exact_spacing_is_exact_and_keeps_world_positions():
    aff = _affine(spacing=(0.7, 0.9, 2.5), flips=(-1, 1, 1))
    arr = np.random.default_rng(0).random((37, 29, 11)).astype(np.float32)
    r = resample_to_spacing(Volume(arr, aff), (2.0, 2.0, 2.0), exact=True)
    assert np.array_equal(np.asarray(r.spacing), np.array([2.0, 2.0, 2.0]))
    # the grid is centred on the old one: the world centre is unchanged
    c_old = Volume(arr, aff).voxel_to_world((np.array(arr.shape)[None] - 1) / 2)
    c_new = r.voxel_to_world((np.array(r.shape)[None] - 1) / 2)
    assert np.allclose(c_old, c_new, atol=1e-9)


def test_nifti_whose_name_and_compression_disagree(tmp_path):
    arr = _vol((6, 5, 4))
    save_nifti(arr, _affine(), tmp_path / "plain.nii")
    renamed = tmp_path / "renamed.nii.gz"
    renamed.write_bytes((tmp_path / "plain.nii").read_bytes())  # a plain NIfTI with a .gz name
    expected = f"{renamed}: this NIfTI file is not gzip-compressed; rename it to .nii"
    with pytest.raises(DataError) as e:
        load_volume(renamed)
    assert str(e.value) == expected
    assert validate.validate_case(renamed, full=False) == [expected]
    assert validate.validate_case(renamed) == [expected]
    zipped = tmp_path / "zipped.nii"
    zipped.write_bytes(gzip.compress((tmp_path / "plain.nii").read_bytes()))
    with pytest.raises(DataError, match=r"zipped.nii: this file is gzip-compressed; rename it to .nii.gz"):
        load_volume(zipped)
    # renamed the way the messages say, both load
    renamed.rename(tmp_path / "fixed.nii")
    zipped.rename(tmp_path / "fixed.nii.gz")
    for name in ("fixed.nii", "fixed.nii.gz"):
        assert np.array_equal(load_volume(tmp_path / name).array, arr)
