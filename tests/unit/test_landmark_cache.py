"""Embedding cache: pickle-free file format, corruption detection, reuse and invalidation."""

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from alice3d.data.io import Volume
from landmark.config import ModelConfig
from landmark.embed_cache import CacheError, MAGIC, default_cache_dir, read_entry, read_header, write_entry
from landmark.match import Matcher
from landmark.model import build_model, recalibrate_norms

TINY = ModelConfig(stem_width=4, widths=(8, 8, 8, 8), fpn_dim=8, embed_dim=16, extra_windows=())


def _volume(seed=0, shape=(40, 36, 24)):
    rng = np.random.default_rng(seed)
    arr = (ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 8000).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-40, -36, -24]
    return Volume(arr, aff, f"vol{seed}.nii.gz")


def _net(seed=0):
    torch.manual_seed(seed)
    return recalibrate_norms(build_model(TINY), [torch.rand(1, 1, 32, 32, 32)]).eval()


def test_write_read_roundtrip_and_memory_map(tmp_path):
    arrays = {"a": np.arange(24, dtype=np.float16).reshape(2, 3, 4), "b": np.ones((5,), np.float32)}
    path = write_entry(tmp_path / "x.emb", arrays, {"k": "v", "n": [1, 2]})
    assert path.read_bytes()[:8] == MAGIC
    out, meta = read_entry(path, mmap=True)
    assert meta == {"k": "v", "n": [1, 2]}
    np.testing.assert_array_equal(out["a"], arrays["a"])
    assert isinstance(out["a"], np.memmap) and out["a"].dtype == np.float16
    out2, _ = read_entry(path, mmap=False)
    np.testing.assert_array_equal(out2["b"], arrays["b"])
    header, base = read_header(path)
    assert base % 64 == 0 and header["arrays"]["a"]["shape"] == [2, 3, 4]


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not storable"):
        write_entry(tmp_path / "x.emb", {"a": np.array([{"x": 1}], dtype=object)}, {})


@pytest.mark.parametrize("damage", ["flip_data", "truncate", "magic", "header"])
def test_damaged_files_raise_cache_error(tmp_path, damage):
    path = write_entry(tmp_path / "x.emb", {"a": np.random.rand(64, 8).astype(np.float32)}, {"k": 1})
    raw = bytearray(path.read_bytes())
    if damage == "flip_data":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[:-100]
    elif damage == "magic":
        raw[:8] = b"NOTMAGIC"
    else:
        raw[20:30] = b"{{{{{{{{{{"
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheError):
        read_entry(path)


def test_stale_entry_raises(tmp_path):
    path = write_entry(tmp_path / "x.emb", {"a": np.zeros(3, np.float32)}, {"model_key": "old"})
    with pytest.raises(CacheError, match="stale"):
        read_entry(path, expect_meta={"model_key": "new"})


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "embeddings"
    monkeypatch.delenv("ALICE3D_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "alice3d", "embeddings")


def test_matcher_reuses_cache_across_instances(tmp_path):
    net, vol = _net(), _volume()
    m1 = Matcher(net, cache_dir=tmp_path)
    e1 = m1.embed(vol)
    assert m1.stats["computed"] == 1
    assert m1.embed(vol) is e1 and m1.stats["memory_hits"] == 1
    files = list(tmp_path.rglob("*.emb"))
    assert len(files) == 1
    m2 = Matcher(net, cache_dir=tmp_path)  # a new process would do the same
    e2 = m2.embed(vol)
    assert {k: m2.stats[k] for k in ("computed", "disk_hits", "memory_hits", "recomputed_bad_cache")} == {
        "computed": 0, "disk_hits": 1, "memory_hits": 0, "recomputed_bad_cache": 0}
    np.testing.assert_array_equal(e2.fine.numpy(), e1.fine.numpy())
    np.testing.assert_allclose(e2.fine_affine, e1.fine_affine)
    assert e2.fine.dtype == torch.float16  # compact storage


def test_cache_key_depends_on_image_affine_and_weights(tmp_path):
    vol = _volume()
    m = Matcher(_net(0), cache_dir=tmp_path)
    m.embed(vol)
    moved = vol.affine.copy()
    moved[0, 3] += 1.0
    m.embed(Volume(vol.array, moved, vol.path))
    changed = Volume(vol.array + 1.0, vol.affine, vol.path)
    m.embed(changed)
    assert m.stats["computed"] == 3
    other = Matcher(_net(1), cache_dir=tmp_path)  # other weights: other model key, other folder
    other.embed(vol)
    assert other.stats["computed"] == 1 and other.model_key != m.model_key
    assert len(list(tmp_path.rglob("*.emb"))) == 4


def test_corrupt_cache_file_is_recomputed_with_warning(tmp_path, caplog):
    net, vol = _net(), _volume()
    m = Matcher(net, cache_dir=tmp_path)
    good = m.embed(vol).fine.numpy().copy()
    path = m.cache_path(m.image_key(vol))
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x55
    path.write_bytes(bytes(raw))
    m2 = Matcher(net, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        emb = m2.embed(vol)
    assert "recomputing" in caplog.text and "checksum" in caplog.text
    assert m2.stats["recomputed_bad_cache"] == 1 and m2.stats["computed"] == 1
    np.testing.assert_array_equal(emb.fine.numpy(), good)
    # the rewritten entry is valid again
    assert Matcher(net, cache_dir=tmp_path).embed(vol) is not None
    read_entry(path)


def test_use_cache_false_writes_nothing(tmp_path):
    m = Matcher(_net(), cache_dir=tmp_path, use_cache=False)
    m.embed(_volume())
    assert not list(tmp_path.rglob("*.emb"))
