"""Embedding cache: zarr entries and pair files, corruption detection, reuse, invalidation, size cap."""

import logging
import os

import numpy as np
import pytest
import torch
from scipy import ndimage

from alice3d.data.io import Volume
from landmark import embed_cache
from landmark.config import ModelConfig
from landmark.embed_cache import (
    MAGIC,
    CacheError,
    cache_max_bytes,
    clear_cache,
    default_cache_dir,
    evict_lru,
    is_entry,
    read_entry,
    read_group,
    read_header,
    write_entry,
    write_group,
)
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


def test_pair_file_write_read_roundtrip_and_memory_map(tmp_path):
    arrays = {"a": np.arange(24, dtype=np.float16).reshape(2, 3, 4), "b": np.ones((5,), np.float32)}
    path = write_entry(tmp_path / "x.pair", arrays, {"k": "v", "n": [1, 2]})
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
        write_entry(tmp_path / "x.pair", {"a": np.array([{"x": 1}], dtype=object)}, {})
    with pytest.raises(ValueError, match="not storable"):
        write_group(tmp_path / "x.zarr", {"a": np.array([{"x": 1}], dtype=object)}, {})
    assert not (tmp_path / "x.zarr").exists() and list(tmp_path.iterdir()) == []  # no temporary left


@pytest.mark.parametrize("damage", ["flip_data", "truncate", "magic", "header"])
def test_damaged_files_raise_cache_error(tmp_path, damage):
    path = write_entry(tmp_path / "x.pair", {"a": np.random.rand(64, 8).astype(np.float32)}, {"k": 1})
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
    path = write_entry(tmp_path / "x.pair", {"a": np.zeros(3, np.float32)}, {"model_key": "old"})
    with pytest.raises(CacheError, match="stale"):
        read_entry(path, expect_meta={"model_key": "new"})
    group = write_group(tmp_path / "x.zarr", {"a": np.zeros(3, np.float32)}, {"model_key": "old"})
    with pytest.raises(CacheError, match="stale"):
        read_group(group, expect_meta={"model_key": "new"})


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
    entries = list(tmp_path.rglob("*.zarr"))
    assert entries == [m1.cache_path(m1.image_key(vol))] and entries[0].is_dir()
    m2 = Matcher(net, cache_dir=tmp_path)  # a new process would do the same
    e2 = m2.embed(vol)
    assert {k: m2.stats[k] for k in ("computed", "disk_hits", "memory_hits", "recomputed_bad_cache")} == {
        "computed": 0, "disk_hits": 1, "memory_hits": 0, "recomputed_bad_cache": 0}
    np.testing.assert_array_equal(e2.fine.numpy(), e1.fine.numpy())
    np.testing.assert_allclose(e2.fine_affine, e1.fine_affine)
    assert e2.fine.dtype == torch.float16  # compact storage
    assert e2.body.dtype == torch.bool and torch.equal(e2.body, e1.body)
    np.testing.assert_array_equal(e2.coarse.numpy(), e1.coarse.numpy())


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
    assert len(list(tmp_path.rglob("*.zarr"))) == 4


def test_corrupt_cache_file_is_recomputed_with_warning(tmp_path, caplog):
    net, vol = _net(), _volume()
    m = Matcher(net, cache_dir=tmp_path)
    good = m.embed(vol).fine.numpy().copy()
    shard = m.cache_path(m.image_key(vol)) / "fine" / "c" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x55  # inside a chunk (the shard index sits at the end)
    shard.write_bytes(bytes(raw))
    m2 = Matcher(net, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        emb = m2.embed(vol)
    assert "recomputing" in caplog.text and "checksum" in caplog.text
    assert m2.stats["recomputed_bad_cache"] == 1 and m2.stats["computed"] == 1
    np.testing.assert_array_equal(emb.fine.numpy(), good)
    # the rewritten entry is valid again
    assert Matcher(net, cache_dir=tmp_path).embed(vol) is not None
    arrays, _ = read_group(m.cache_path(m.image_key(vol)))
    np.testing.assert_array_equal(arrays["fine"], good)


def test_use_cache_false_writes_nothing(tmp_path):
    m = Matcher(_net(), cache_dir=tmp_path, use_cache=False)
    m.embed(_volume())
    assert not list(tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- size cap (LRU)


def _entries(root, ages):
    """One entry per ``name -> mtime`` (embedding groups and pair maps, two model folders), all of
    the same size: random pair data padded up to the (compressed) size of an embedding entry."""
    paths, group_bytes = {}, None
    rng = np.random.default_rng(0)
    for name, mtime in sorted(ages.items(), key=lambda kv: not kv[0].endswith(".zarr")):
        if name.endswith(".zarr"):
            path = write_group(root / name, {"a": rng.random(1024).astype(np.float32)}, {"k": name[-9:]})
            group_bytes = embed_cache.entry_bytes(path)
        else:  # header ~200 bytes
            n = (group_bytes - 200) // 4
            path = write_entry(root / name, {"a": rng.random(n).astype(np.float32)}, {"k": name[-9:]})
        os.utime(path, (mtime, mtime))
        paths[name] = path
    return paths


AGES = {"m1/aaaa.zarr": 100, "m1/pairs/pppp.pair": 200, "m2/bbbb.zarr": 300, "m1/cccc.zarr": 400}


def _size(path):
    return embed_cache.entry_bytes(path)


def _left(root):
    """Entries (folders with a zarr.json, pair files) and other files left below ``root``."""
    out = set()
    for p in root.rglob("*"):
        if p.is_file():
            top = next((q for q in [p, *p.parents] if q.suffix == ".zarr"), p)
            out.add(str(top.relative_to(root)))
    return sorted(out)


def test_eviction_removes_least_recently_used_first(tmp_path):
    paths = _entries(tmp_path, AGES)
    size = _size(paths["m1/aaaa.zarr"])
    sizes = {n: _size(p) for n, p in paths.items()}
    assert sizes["m1/cccc.zarr"] == size and abs(sizes["m1/pairs/pppp.pair"] - size) < 0.1 * size
    # 4 entries of about one size each, room for 2.5: the two oldest go (the pair map counts and
    # goes like an embedding, an embedding's size is its whole folder)
    gone = evict_lru(tmp_path, int(2.5 * size))
    assert gone == [paths["m1/aaaa.zarr"], paths["m1/pairs/pppp.pair"]]
    assert _left(tmp_path) == ["m1/cccc.zarr", "m2/bbbb.zarr"]
    assert evict_lru(tmp_path, 2 * size) == []  # at the cap: nothing to do
    assert evict_lru(tmp_path, None) == []  # no cap


def test_eviction_never_removes_the_entry_just_written(tmp_path):
    paths = _entries(tmp_path, AGES)
    size = _size(paths["m1/aaaa.zarr"])
    gone = evict_lru(tmp_path, 2 * size, keep=(paths["m1/aaaa.zarr"],))
    assert gone == [paths["m1/pairs/pppp.pair"], paths["m2/bbbb.zarr"]]
    # a cap below one entry still keeps the written one
    assert evict_lru(tmp_path, 1, keep=(paths["m1/aaaa.zarr"],)) == [paths["m1/cccc.zarr"]]
    assert _left(tmp_path) == ["m1/aaaa.zarr"]


def test_reading_an_entry_makes_it_most_recently_used(tmp_path):
    paths = _entries(tmp_path, AGES)
    size = _size(paths["m1/aaaa.zarr"])
    read_group(paths["m1/aaaa.zarr"])  # the oldest, now used
    assert paths["m1/aaaa.zarr"].stat().st_mtime > 400
    evict_lru(tmp_path, size)
    assert _left(tmp_path) == ["m1/aaaa.zarr"]


def test_eviction_skips_foreign_files_and_tolerates_vanishing_entries(tmp_path, monkeypatch):
    paths = _entries(tmp_path, AGES)
    size = _size(paths["m1/aaaa.zarr"])
    foreign = tmp_path / "m1" / "notes.zarr"  # matches the layout, but is not one of ours
    foreign.mkdir()
    (foreign / "zarr.json").write_bytes(b"x" * size)
    os.utime(foreign, (50, 50))
    listed = embed_cache.list_entries

    def racing(root):  # another process evicts the second-oldest entry right after our listing
        out = listed(root)
        paths["m1/pairs/pppp.pair"].unlink()
        return out

    monkeypatch.setattr(embed_cache, "list_entries", racing)
    gone = evict_lru(tmp_path, 2 * size)
    # foreign file kept and not counted; the vanished entry counts as freed: only the oldest is deleted
    assert gone == [paths["m1/aaaa.zarr"]]
    assert _left(tmp_path) == ["m1/cccc.zarr", "m1/notes.zarr", "m2/bbbb.zarr"]


def test_clear_removes_only_entries(tmp_path):
    paths = _entries(tmp_path, AGES)
    keep = [tmp_path / "README.txt", tmp_path / "m1" / "fake.emb", tmp_path / "m1" / "x" / "deep.emb",
            tmp_path / "m1" / "user.zarr" / "zarr.json"]
    for k in keep:
        k.parent.mkdir(parents=True, exist_ok=True)
        k.write_bytes(MAGIC + b"not in an entry location" if k.name == "deep.emb" else b"user file")
    old = tmp_path / "m2" / "oooo.emb"  # an embedding of the older format: cleared with the entries
    write_entry(old, {"fine": np.zeros(8, np.float16)}, {"image_key": "oooo"})
    assert not is_entry(keep[-1].parent) and is_entry(paths["m1/aaaa.zarr"])
    entry_bytes = sum(_size(p) for p in paths.values()) + old.stat().st_size
    assert clear_cache(tmp_path) == (5, entry_bytes)
    assert _left(tmp_path) == ["README.txt", "m1/fake.emb", "m1/user.zarr", "m1/x/deep.emb"]
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m1" / "pairs").exists()  # emptied folders go
    assert clear_cache(tmp_path / "missing") == (0, 0)


@pytest.mark.parametrize("value,want", [(None, 20 * 10**9), ("", 20 * 10**9), ("0", None), ("none", None),
                                        ("None", None), ("1.5", 1_500_000_000), ("1e-6", 1000)])
def test_cap_from_environment(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("ALICE3D_CACHE_MAX_GB", raising=False)
    else:
        monkeypatch.setenv("ALICE3D_CACHE_MAX_GB", value)
    assert cache_max_bytes() == want


@pytest.mark.parametrize("value", ["20GB", "-1", "nan", "inf"])
def test_bad_cap_is_a_clear_error(monkeypatch, value):
    monkeypatch.setenv("ALICE3D_CACHE_MAX_GB", value)
    with pytest.raises(CacheError, match="ALICE3D_CACHE_MAX_GB.*expected a size in GB"):
        cache_max_bytes()


def test_matcher_keeps_the_cache_under_the_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE_MAX_GB", "1e-7")  # 100 bytes: less than one entry
    net, a, b = _net(), _volume(0), _volume(1)
    m = Matcher(net, cache_dir=tmp_path)
    ea = m.embed(a)
    eb = m.embed(b)
    assert [p.name for p in tmp_path.rglob("*.zarr")] == [m.cache_path(m.image_key(b)).name]
    # the evicted entry's arrays are in memory: its deletion does not touch them
    assert torch.isfinite(ea.fine.float()).all() and eb.fine.shape == ea.fine.shape
    m2 = Matcher(net, cache_dir=tmp_path)
    m2.embed(a)  # evicted: computed again, and now b's entry is the one evicted
    assert m2.stats["computed"] == 1 and m2.stats["disk_hits"] == 0
    assert [p.name for p in tmp_path.rglob("*.zarr")] == [m.cache_path(m.image_key(a)).name]


class _DictSource:
    """A second embedding source (as a volume store would be): get by image key, put keeps a copy."""

    def __init__(self, broken=False):
        self.items, self.broken, self.puts = {}, broken, 0

    def get(self, key, name):
        if self.broken:
            raise CacheError(f"{name}: broken entry")
        return self.items.get(key)

    def put(self, emb):
        self.puts += 1
        self.items[emb.key] = emb
        return emb


def test_store_asks_its_sources_in_order_and_fills_them_all(tmp_path, caplog):
    from landmark.store import EmbeddingStore

    net, vol = _net(), _volume()
    m = Matcher(net, cache_dir=tmp_path)
    first, broken = _DictSource(), _DictSource(broken=True)
    store = EmbeddingStore(m._compute, [broken, first, m.disk], memory_items=1)
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        emb = store.get(vol)
    assert "broken entry" in caplog.text and store.stats["recomputed_bad_cache"] == 1
    assert store.stats["computed"] == 1 and first.puts == 1 and broken.puts == 1
    assert m.cache_path(emb.key).exists()
    computed = first.items[emb.key]
    assert emb is computed  # every source keeps a copy; the one computed stays in memory
    store.get(_volume(1))  # pushes vol out of the one-item memory
    fresh = EmbeddingStore(m._compute, [first, m.disk])
    assert fresh.get(vol) is computed  # the first source that has it answers
    assert fresh.stats == {"computed": 0, "disk_hits": 1, "memory_hits": 0, "recomputed_bad_cache": 0}
    assert fresh.get(vol) is computed and fresh.stats["memory_hits"] == 1
