"""The volume store: same volumes as the in-memory path, resumable and sharded builds, settings
refused by name, corrupt entries found by their checksums and named, datasets reading from it."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from alice3d.config import DataConfig
from alice3d.data import preprocess as pre
from alice3d.data import store as store_mod
from alice3d.data.crops import RandomCropDataset
from alice3d.data.io import DataError, save_nifti
from alice3d.data.loading import load_run_volumes
from alice3d.data.phantom import generate_cohort
from alice3d.data.slices import VolumeSliceDataset
from alice3d.data.sources import crop_at
from alice3d.data.store import StoreError, StoreSettings, StoreVolume, open_store, verify_store
from alice3d.data.volumes import prepare_volume

WINDOW = (-125.0, 255.0)
SETTINGS = StoreSettings((6.0, 6.0, 6.0), -106.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[str]:
    """5 tiny phantoms in different storage orientations (RAS, LPS, ...)."""
    root = generate_cohort(tmp_path_factory.mktemp("cohort"), n=5, seed=3, size="tiny",
                           orientations=["RAS", "LPS", "LAS", "LPI", "RAI"])
    return sorted(str(p) for p in (root / "imagesTr").glob("*.nii.gz"))


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    pre.build_store(cohort, out, SETTINGS, workers=1, progress=False)
    return out


def _tree(root: Path) -> dict[str, bytes]:
    """Every file of a store (relative path -> bytes), temporaries excluded."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def test_store_volumes_are_the_in_memory_volumes(cohort, store):
    st = open_store(store, SETTINGS.spacing)
    assert [c["name"] for c in st.cases] == [Path(p).name.removesuffix(".nii.gz") for p in cohort]
    assert st.bad == [] and st.totals["cases"] == 5
    for v, path in zip(st.volumes(WINDOW), cohort):
        mem = prepare_volume(path, SETTINGS.spacing, WINDOW)
        assert v.shape == mem.shape
        np.testing.assert_allclose(v.affine, mem.affine, atol=1e-9)
        body = v.body_voxels()
        assert body.shape == (min(4096, v.case["body_voxels"]), 3)
        assert (mem.array[tuple(body.T)] > 0.05 - 1e-3).all()  # drawn inside the body
        for c in body[:5]:
            crop = v.read_crop(c, (12, 10, 8))
            ref = crop_at(mem.array, c, (12, 10, 8), 0.0)
            assert crop.dtype == np.float32 and crop.shape == (12, 10, 8)
            np.testing.assert_allclose(crop, ref, atol=0.51 / (WINDOW[1] - WINDOW[0]) + 1e-6)  # HU rounded to int


def test_manifest_records_geometry_sources_and_settings(cohort, store):
    doc = json.loads((store / "manifest.json").read_text())
    assert doc["settings"] == SETTINGS.to_dict()
    case = doc["cases"][1]
    assert case["source"] == str(Path(cohort[1]).resolve()) and len(case["source_digest"]) == 40
    assert "body_sample" not in case  # per case, in its meta.json only: the manifest stays small
    lo, hi = np.array(case["body_lo_mm"]), np.array(case["body_hi_mm"])
    assert (hi > lo).all() and case["image_nbytes"] == (store / "cases" / case["name"] / "image/c/0/0/0").stat().st_size


def test_interrupted_build_resumes_to_an_identical_store(cohort, store, tmp_path, monkeypatch):
    real, calls = pre._job, []

    def dying(args):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after two cases
        calls.append(args[1])
        return real(args)

    monkeypatch.setattr(pre, "_job", dying)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        pre.build_store(cohort, out, SETTINGS, workers=1, progress=False)
    assert not (out / "manifest.json").exists() and len(list(out.glob("cases/*/meta.json"))) == 2
    (out / "cases" / ".img0003.tmp-deadbeef0000").mkdir()  # a case the kill cut short
    monkeypatch.setattr(pre, "_job", real)
    r = pre.build_store(cohort, out, SETTINGS, workers=1, progress=False)
    assert (r.skipped, r.done_now) == (2, 3) and r.manifest is not None
    assert _tree(out) == _tree(store)  # byte for byte, manifest included
    assert not list((out / "cases").glob(".*"))


def test_shards_fill_one_store_and_the_last_writes_the_manifest(cohort, store, tmp_path):
    out = tmp_path / "s"
    first = pre.build_store(cohort, out, SETTINGS, workers=1, shard=(0, 2), progress=False)
    assert (first.mine, first.manifest) == (3, None)
    second = pre.build_store(cohort, out, SETTINGS, workers=1, shard=(1, 2), progress=False)
    assert second.mine == 2 and second.manifest is not None
    assert _tree(out) == _tree(store)


def test_other_settings_are_refused_naming_both(cohort, store):
    with pytest.raises(StoreError, match=r"spacing \(6, 6, 6\) mm.*data.spacing=\(2, 2, 2\)"):
        open_store(store, (2.0, 2.0, 2.0))
    with pytest.raises(StoreError, match=r"built with spacing \(6, 6, 6\).*asks for spacing \(4, 4, 4\)"):
        pre.build_store(cohort, store, StoreSettings((4.0, 4.0, 4.0), -106.0), progress=False)


def test_corrupt_chunk_is_found_by_its_checksum_and_named(cohort, tmp_path):
    out = tmp_path / "s"
    pre.build_store(cohort, out, SETTINGS, workers=1, progress=False)
    shard = out / "cases" / "img0002" / "image" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # inside the first chunk's compressed bytes
    shard.write_bytes(bytes(data))
    v = open_store(out).volumes(WINDOW)[1]
    with pytest.raises(StoreError, match=r"img0002.*corrupt store entry.*checksum"):
        v.read_crop((2, 2, 2), (8, 8, 8))
    bad = verify_store(out)
    assert [name for name, _ in bad] == ["img0002"] and "checksum" in bad[0][1]
    r = pre.build_store(cohort, out, SETTINGS, workers=1, verify=True, progress=False)
    assert r.done_now == 1 and verify_store(out) == []


def test_truncated_or_missing_shard_is_named(cohort, tmp_path):
    out = tmp_path / "s"
    pre.build_store(cohort, out, SETTINGS, workers=1, progress=False)
    shard = out / "cases" / "img0004" / "image" / "c" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"img0004.*truncated"):
        open_store(out).volumes(WINDOW)[3].read_crop((2, 2, 2), (4, 4, 4))
    shard.unlink()
    with pytest.raises(StoreError, match=r"img0004.*missing"):
        open_store(out).volumes(WINDOW)[3].read_crop((2, 2, 2), (4, 4, 4))


def test_bad_cases_are_listed_with_reasons_and_fail_runs_that_ask(cohort, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    flat = tmp_path / "flat.nii.gz"
    save_nifti(np.full((8, 8, 8), 40, np.int16), np.eye(4), flat)
    out = tmp_path / "s"
    r = pre.build_store([*cohort[:2], str(broken), str(flat)], out, SETTINGS, workers=1, progress=False)
    assert [Path(p).name for p, _ in r.bad] == ["broken.nii.gz", "flat.nii.gz"]
    st = open_store(out)
    assert [b["name"] for b in st.bad] == ["broken", "flat"] and "constant image" in st.bad[1]["reason"]
    again = pre.build_store([*cohort[:2], str(broken), str(flat)], out, SETTINGS, workers=1, progress=False)
    assert again.done_now == 0 and again.skipped == 4  # known bad, unchanged: not retried
    cfg = DataConfig(data=str(out), spacing=SETTINGS.spacing, on_bad_data="fail")
    with pytest.raises(DataError, match="broken.nii.gz"):
        load_run_volumes(cfg)
    vset = load_run_volumes(DataConfig(data=str(out), spacing=SETTINGS.spacing), min_shape=(4, 4, 4))
    assert len(vset.volumes) == 2 and len(vset.bad) == 2 and vset.store is not None


def test_store_volumes_pickle_without_arrays_and_datasets_read_them(store):
    st = open_store(store)
    vols = st.volumes(WINDOW)
    vols[0].read_crop((3, 3, 3), (4, 4, 4))  # opens the zarr array in this process
    blob = pickle.dumps(vols[0])
    assert len(blob) < 20_000 and pickle.loads(blob)._z is None
    ds = RandomCropDataset(vols, (16, 16, 8), seed=2)
    a = ds[7]["image"]
    assert a.shape == (1, 16, 16, 8) and torch.equal(ds[7]["image"], a) and not torch.equal(ds[8]["image"], a)
    sl = VolumeSliceDataset(vols, (12, 10), axis=1, seed=0)
    assert sl[3]["image"].shape == (1, 12, 10) and "label" not in sl[3]
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_whole_cohort_is_cached_only_within_the_cap(store):
    case = open_store(store).cases[0]
    nbytes = 2 * int(np.prod(case["shape"]))
    store_mod._VOLUMES.items.clear()
    store_mod._VOLUMES.total = 0.0
    StoreVolume(store, case, WINDOW, cache_bytes=0).read_crop((2, 2, 2), (4, 4, 4))
    assert store_mod._VOLUMES.total == 0  # chunk reads, nothing kept
    cached = StoreVolume(store, case, WINDOW, cache_bytes=10 * nbytes)
    crop = cached.read_crop((2, 2, 2), (4, 4, 4))
    assert store_mod._VOLUMES.total == nbytes
    np.testing.assert_array_equal(crop, StoreVolume(store, case, WINDOW).read_crop((2, 2, 2), (4, 4, 4)))


def test_raw_data_goes_through_one_cached_store(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in cohort:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    cfg = DataConfig(data=str(folder), spacing=SETTINGS.spacing, store="always")
    first = load_run_volumes(cfg)
    assert first.store is not None and first.store.root.parent == tmp_path / "cache" / "stores"
    stamp = (first.store.root / "manifest.json").stat().st_mtime_ns
    second = load_run_volumes(cfg)
    assert second.store.root == first.store.root
    assert (second.store.root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert load_run_volumes(DataConfig(data=str(folder), spacing=SETTINGS.spacing)).store is None  # 5 < 32: memory
    (folder / Path(cohort[0]).name).write_bytes(Path(cohort[1]).read_bytes())  # a source changed: a new store
    assert load_run_volumes(cfg).store.root != first.store.root


def test_case_names_are_unique_and_shards_parse():
    names = pre.case_names(["/a/img1.nii.gz", "/b/img1.nii.gz", "/c/x y.mha", "/d/dicom_dir/"])
    assert names == ["a_img1", "b_img1", "x_y", "dicom_dir"]  # shared names: the folder that tells them apart
    assert pre.parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            pre.parse_shard(bad)
