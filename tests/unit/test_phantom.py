"""Synthetic phantom cohort: determinism, anatomy, HU, orientation and exact correspondence."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from alice3d.data.io import load_volume, reorient_array
from alice3d.data.phantom import cohort as phantom
from alice3d.data.phantom import (
    correspond,
    default_cohort,
    generate_cohort,
    held_out_phantom,
    load_cohort_maps,
    render_case,
    resolve_size,
    split_counts,
)
from alice3d.data.phantom.maps import (
    SubjectMap,
    landmarks_in_subject,
    load_maps_file,
    min_monotonicity,
    sample_subject_map,
)
from alice3d.data.phantom.template import TISSUES, tissue_to_label

FINE = dict(shape=(96, 72, 64), spacing=(4.0, 4.0, 5.0))  # coarse enough to be fast, fine enough for organs


@pytest.fixture(autouse=True, scope="module")
def _cache(tmp_path_factory):
    old = os.environ.get("ALICE3D_CACHE")
    os.environ["ALICE3D_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("ALICE3D_CACHE", None)
    else:
        os.environ["ALICE3D_CACHE"] = old


def _spec():
    return resolve_size("tiny", FINE["spacing"])


def _world_centroid(label, affine, k):
    ijk = np.argwhere(label == k)
    return nib.affines.apply_affine(affine, ijk.mean(0)), ijk


def test_render_is_deterministic_and_seed_dependent():
    a = render_case(3, 1, resolve_size("tiny"))
    b = render_case(3, 1, resolve_size("tiny"))
    c = render_case(4, 1, resolve_size("tiny"))
    assert a[0].dtype == np.int16 and a[1].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert a[0].shape != c[0].shape or not np.array_equal(a[0], c[0])


def test_typical_subject_has_all_btcv_labels_and_plausible_hu():
    img, lab, aff, m = render_case(0, 2, _spec(), **FINE)
    from scipy import ndimage

    assert set(np.unique(lab).tolist()) == set(range(14))
    inplane = np.zeros((3, 3, 3), bool)
    inplane[:, :, 1] = ndimage.generate_binary_structure(2, 1)

    def interior(k):  # away from partial-volume edges where the organ is big enough to have an inside
        core = ndimage.binary_erosion(lab == k, inplane)
        return core if core.sum() >= 5 else lab == k

    mean = {k: float(img[interior(k)].mean()) for k in range(1, 14)}
    liver = mean[6]
    assert 40.0 < liver < 100.0
    assert 80.0 < mean[1] < 150.0  # spleen
    for vessel in (8, 9, 10):  # aorta, IVC, portal/splenic veins: contrast-enhanced
        assert mean[vessel] > liver + 30.0, (vessel, mean[vessel], liver)
    assert mean[8] > 130.0
    assert mean[2] > liver and mean[3] > liver  # enhancing kidneys
    assert mean[4] < 40.0  # bile
    assert img.max() > 300  # bone
    assert img.min() <= -900  # air (lungs, bowel gas, outside the body)
    # air at the cranial end: the lungs
    ras, _ = reorient_array(img, aff, "RAS")
    top, bottom = ras[:, :, -3:], ras[:, :, :3]
    inside = lambda a: a[24:-24, 18:-18]  # noqa: E731  central block of the body
    assert (inside(top) < -700).mean() > (inside(bottom) < -700).mean()


def test_organs_on_the_correct_side():
    img, lab, aff, m = render_case(0, 5, _spec(), **FINE)
    x = {k: _world_centroid(lab, aff, k)[0][0] for k in (1, 2, 3, 6, 12, 13)}
    # RAS+: +x is the patient's right -> liver, right kidney, right adrenal at larger x
    assert x[6] > x[1] and x[2] > x[3] and x[12] > x[13]


def test_lps_storage_keeps_world_positions():
    spec = _spec()
    ras = render_case(1, 0, spec, orientation="RAS", **FINE)
    lps = render_case(1, 0, spec, orientation="LPS", **FINE)
    assert np.all(np.diag(lps[2])[:2] < 0) and np.all(np.diag(ras[2])[:3] > 0)
    assert not np.array_equal(ras[1], lps[1])  # the stored arrays really differ
    back, aff = reorient_array(lps[1], lps[2], "RAS")
    assert np.array_equal(back, ras[1]) and np.allclose(aff, ras[2])
    for k in (1, 6, 8, 11):
        assert np.allclose(_world_centroid(ras[1], ras[2], k)[0], _world_centroid(lps[1], lps[2], k)[0], atol=1e-6)


def test_forward_inverts_backward():
    rng = np.random.default_rng(0)
    for s in range(3):
        m = sample_subject_map(np.random.default_rng([7, s, 0]))
        assert min_monotonicity(m) > 0.3
        p = rng.uniform([-200, -150, -300], [200, 150, 300], size=(500, 3)) + m.u_to_world(np.zeros((1, 3)))
        assert np.abs(m.forward(m.backward(p)) - p).max() < 0.1
        q = rng.uniform([-150, -90, -250], [150, 110, 220], size=(500, 3))
        assert np.abs(m.backward(m.forward(q)) - q).max() < 0.1
        # the map is not just an affine: the displacement is a few mm somewhere
        assert np.abs(m.displacement(q)).max() > 1.0
        m2 = SubjectMap.from_dict(json.loads(json.dumps(m.to_dict())))
        assert np.allclose(m2.backward(p), m.backward(p))


def test_jacobian_matches_finite_differences():
    m = sample_subject_map(np.random.default_rng(3))
    u = np.random.default_rng(4).uniform(-120, 120, size=(20, 3))
    eps = 1e-4
    num = np.stack([(m.displacement(u + eps * d) - m.displacement(u - eps * d)) / (2 * eps) for d in np.eye(3)], -1)
    assert np.allclose(num, m.jacobian(u), atol=1e-7)


def test_organ_centroids_correspond_between_subjects():
    spec = _spec()
    subjects = [render_case(0, i, spec, **FINE) for i in (0, 1)]
    (ia, la, aa, ma), (ib, lb, ab, mb) = subjects
    checked = 0
    for k in (1, 2, 3, 4, 11):  # organs that lie well inside the field of view
        ca, ijk_a = _world_centroid(la, aa, k)
        cb, ijk_b = _world_centroid(lb, ab, k)
        cut = any(ijk[:, 2].min() == 0 or ijk[:, 2].max() == lab.shape[2] - 1 for ijk, lab in ((ijk_a, la), (ijk_b, lb)))
        if cut:
            continue
        mapped = correspond(ma, mb, ca[None])[0]
        # the subjects differ by several cm, the mapped centroid lands within a few mm
        assert np.linalg.norm(mapped - cb) < 6.0, (k, mapped, cb)
        checked += 1
    assert checked >= 3
    assert np.linalg.norm(_world_centroid(la, aa, 2)[0] - _world_centroid(lb, ab, 2)[0]) > 10.0


def test_landmarks_map_into_their_organ():
    img, lab, aff, m = render_case(2, 3, _spec(), **FINE)
    lm = landmarks_in_subject(m)
    inv = np.linalg.inv(aff)
    hits = 0
    for name, k in (("right_kidney_centre", 2), ("left_kidney_centre", 3), ("spleen_centre", 1), ("liver_right_lobe", 6)):
        ijk = np.rint(nib.affines.apply_affine(inv, lm[name])).astype(int)
        if np.all(ijk >= 0) and np.all(ijk < lab.shape):
            assert lab[tuple(ijk)] == k, name
            hits += 1
    assert hits >= 3


def test_tissue_table_covers_btcv():
    lut = tissue_to_label()
    assert set(lut[list(TISSUES)].tolist()) == set(range(14))


def test_split_counts():
    assert split_counts(30) == (24, 6)
    assert split_counts(10) == (8, 2)
    assert split_counts(2) == (1, 1)
    assert split_counts(1) == (1, 0)


def test_generate_cohort_layout_and_file_determinism(tmp_path):
    a = generate_cohort(tmp_path / "a", n=5, seed=11, size="tiny")
    b = generate_cohort(tmp_path / "b", n=2, seed=11, size="tiny", preview=True)
    doc = json.loads((a / "dataset_0.json").read_text())
    for key in ("description", "labels", "modality", "numTraining", "numTest", "tensorImageSize", "training", "validation"):
        assert key in doc
    assert doc["modality"] == {"0": "CT"} and doc["tensorImageSize"] == "3D"
    assert doc["labels"]["0"] == "background" and doc["labels"]["1"] == "spleen" and len(doc["labels"]) == 14
    assert len(doc["training"]) == 4 and len(doc["validation"]) == 1 and doc["numTraining"] == 5
    assert doc["training"][0] == {"image": "imagesTr/img0001.nii.gz", "label": "labelsTr/label0001.nii.gz"}
    for e in doc["training"] + doc["validation"]:
        vol = load_volume(a / e["image"], a / e["label"])
        assert vol.label.max() <= 13
    # same seed -> byte-identical files; previews written on request
    for rel in ("imagesTr/img0002.nii.gz", "labelsTr/label0002.nii.gz"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert (b / "previews" / "img0001.png").is_file()
    maps = load_cohort_maps(a)
    assert sorted(maps) == [f"img{i:04d}" for i in range(1, 6)]
    assert maps["img0003"].meta["image"] == "imagesTr/img0003.nii.gz"
    vol = load_volume(a / "imagesTr/img0003.nii.gz")
    assert np.allclose(np.asarray(maps["img0003"].meta["affine"]), vol.affine)


def test_default_cohort_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path))
    first = default_cohort(n=2, seed=5, size="tiny")
    stamp = (first / "imagesTr" / "img0001.nii.gz").stat().st_mtime_ns
    second = default_cohort(n=2, seed=5, size="tiny")
    assert first == second == tmp_path / "phantoms" / f"tiny-n2-s5-v{phantom.PHANTOM_VERSION}"
    assert (second / "imagesTr" / "img0001.nii.gz").stat().st_mtime_ns == stamp  # reused, not regenerated
    assert not [p for p in (tmp_path / "phantoms").iterdir() if p.name.startswith(".")]


def test_default_cohort_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path))

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(phantom, "generate_cohort", boom)
    with pytest.raises(RuntimeError):
        default_cohort(n=2, seed=6, size="tiny")
    assert list((tmp_path / "phantoms").iterdir()) == []


def test_held_out_phantom(tmp_path):
    m = held_out_phantom(tmp_path / "extra.nii.gz", seed=0, index=0, size="tiny", label_path=tmp_path / "extra_label.nii.gz")
    vol = load_volume(tmp_path / "extra.nii.gz", tmp_path / "extra_label.nii.gz")
    cohort0 = render_case(0, 0, resolve_size("tiny"))
    assert vol.shape != cohort0[0].shape or not np.array_equal(vol.array, cohort0[0])
    loaded = load_maps_file(tmp_path / "extra.map.json")["extra"]
    p = vol.voxel_to_world(np.array([[10.0, 20.0, 5.0]]))
    assert np.allclose(loaded.backward(p), m.backward(p))


def test_build_cache_dir_publishes_whole_folders_only(tmp_path):
    from alice3d.data.phantom import build_cache_dir

    done = lambda d: (d / "ok").is_file()  # noqa: E731

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache_dir(tmp_path / "c" / "final", broken, done)
    assert list((tmp_path / "c").iterdir()) == []  # neither a half folder nor a temporary one
    final = build_cache_dir(tmp_path / "c" / "final", lambda t: (t / "ok").write_text("1"), done)
    assert (final / "ok").read_text() == "1"
    # A second builder finishing later keeps the first finished folder.
    build_cache_dir(final, lambda t: (t / "ok").write_text("2"), done)
    assert (final / "ok").read_text() == "1" and [p.name for p in final.parent.iterdir()] == ["final"]
