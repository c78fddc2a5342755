"""Embeddings as zarr v3 groups: round trip, checksums, stale and interrupted entries, the older
``.emb`` files, the size cap by entry folder, store embeddings and the memory bound."""

import json
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from landmark import embed_cache
from landmark.embed_cache import CacheError, cache_info, clear_cache, read_group, read_group_meta, write_entry
from landmark.store import DiskEmbeddingCache, Embedding, EmbeddingStore, StoreEmbeddings

MODEL = "m" * 24
D = 8


def _embedding(seed: int, fine_shape=(6, 5, 4)) -> Embedding:
    rng = np.random.default_rng(seed)
    fine = rng.normal(size=(*fine_shape, D)).astype(np.float16)
    coarse = rng.normal(size=(3, 3, 2, D)).astype(np.float32)
    fine_aff = np.diag([4.0, 4.0, 4.0, 1.0])
    fine_aff[:3, 3] = [-10.5, 3.25, seed]
    coarse_aff = fine_aff @ np.diag([2.0, 2.0, 2.0, 1.0])
    src = np.array([[0.0, -1, 0, 5], [1, 0, 0, -7], [0, 0, 2.5, 1], [0, 0, 0, 1]])
    return Embedding(fine=torch.from_numpy(fine), coarse=torch.from_numpy(coarse), fine_affine=fine_aff,
                     coarse_affine=coarse_aff, source_shape=(24, 20, 8), source_affine=src, key=f"key{seed:04d}",
                     name=f"case{seed}", body=torch.from_numpy(rng.random(fine_shape) > 0.5))


class Counter:
    """A compute function that embeds a key by its seed, counting its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, volume, key, name):
        self.calls.append(key)
        return _embedding(int(key[3:]))


def _same(a: Embedding, b: Embedding) -> None:
    assert torch.equal(a.fine, b.fine) and a.fine.dtype == torch.float16
    assert torch.equal(a.coarse, b.coarse) and b.coarse.dtype == torch.float32
    assert torch.equal(a.body, b.body) and b.body.dtype == torch.bool
    np.testing.assert_array_equal(a.fine_affine, b.fine_affine)
    np.testing.assert_array_equal(a.coarse_affine, b.coarse_affine)
    np.testing.assert_array_equal(a.source_affine, b.source_affine)
    assert (a.source_shape, a.key, a.name) == (b.source_shape, b.key, b.name)


def _shard(entry, name):
    ndim = {"fine": 4, "coarse": 4, "body": 3}[name]
    return entry.joinpath(name, "c", *["0"] * ndim)


def test_round_trip_and_layout(tmp_path):
    disk = DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None)
    emb = _embedding(1)
    assert disk.get(emb.key, emb.name) is None and not disk.exists(emb.key)
    assert disk.put(emb) is emb
    entry = tmp_path / MODEL[:20] / "key0001.zarr"
    assert disk.path(emb.key) == entry and entry.is_dir() and disk.exists(emb.key)
    assert sorted(p.name for p in entry.iterdir()) == ["body", "coarse", "fine", "zarr.json"]
    assert [p.name for p in tmp_path.joinpath(MODEL[:20]).iterdir()] == ["key0001.zarr"]  # no temporary left
    attrs = json.loads((entry / "zarr.json").read_text())["attributes"]
    assert attrs["meta"]["image_key"] == emb.key and attrs["meta"]["model_key"] == MODEL
    assert attrs["arrays"]["fine"]["shape"] == [6, 5, 4, D] and attrs["arrays"]["body"]["dtype"] == "uint8"
    for name in ("fine", "coarse", "body"):
        codecs = json.loads((entry / name / "zarr.json").read_text())["codecs"]
        assert codecs[0]["name"] == "sharding_indexed"  # one shard file per array
        inner = [c["name"] for c in codecs[0]["configuration"]["codecs"]]
        assert inner[-2:] == ["blosc", "crc32c"]
        assert _shard(entry, name).stat().st_size == attrs["arrays"][name]["shard_bytes"]
    assert read_group_meta(entry) == attrs["meta"]  # the cheap check: no chunk read
    back = DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None).get(emb.key, "")
    _same(emb, back)
    assert isinstance(back.fine, torch.Tensor) and not isinstance(back.fine.numpy(), np.memmap)


@pytest.mark.parametrize("array", ["fine", "coarse", "body"])
def test_flipped_byte_in_a_chunk_is_recomputed_with_a_warning(tmp_path, caplog, array):
    disk = DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None)
    disk.put(_embedding(2))
    shard = _shard(disk.path("key0002"), array)
    raw = bytearray(shard.read_bytes())
    raw[20] ^= 0x01  # inside the first chunk (the shard index is at the end)
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match=f"array '{array}' failed its checksum"):
        read_group(disk.path("key0002"))
    compute = Counter()
    store = EmbeddingStore(compute, [disk])
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        emb = store.get_keyed("key0002", "case2", lambda: None)
    assert "recomputing" in caplog.text and "checksum" in caplog.text
    assert compute.calls == ["key0002"] and store.stats["recomputed_bad_cache"] == 1
    _same(emb, _embedding(2))
    _same(_embedding(2), DiskEmbeddingCache(tmp_path, MODEL, None).get("key0002", ""))  # rewritten whole


@pytest.mark.parametrize("damage", ["delete_shard", "truncate_shard", "no_meta", "bad_meta", "pickle_file"])
def test_damaged_entries_are_never_misread(tmp_path, damage):
    disk = DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None)
    disk.put(_embedding(3))
    entry = disk.path("key0003")
    if damage == "delete_shard":  # zarr alone would read the missing shard as zeros
        _shard(entry, "fine").unlink()
    elif damage == "truncate_shard":
        shard = _shard(entry, "coarse")
        shard.write_bytes(shard.read_bytes()[:-9])
    elif damage == "no_meta":  # e.g. a folder copied without its commit marker
        (entry / "zarr.json").unlink()
    elif damage == "bad_meta":
        (entry / "zarr.json").write_text('{"attributes": {"format": "alice3d-embedding", "ver')
    else:  # a foreign file at the entry's name (e.g. a pickle): never loaded, replaced
        shutil.rmtree(entry)
        entry.write_bytes(pickle.dumps({"fine": 1}))
    with pytest.raises(CacheError):
        disk.get("key0003", "")
    if damage.endswith("meta"):
        with pytest.raises(CacheError):
            read_group_meta(entry)
    compute = Counter()
    store = EmbeddingStore(compute, [disk])
    _same(store.get_keyed("key0003", "case3", lambda: None), _embedding(3))
    assert compute.calls == ["key0003"] and store.stats["recomputed_bad_cache"] == 1
    assert disk.exists("key0003") and [p.name for p in entry.parent.iterdir()] == [entry.name]  # nothing aside
    _same(_embedding(3), disk.get("key0003", ""))


@pytest.mark.parametrize("field,value", [("image_key", "key9999"), ("model_key", "another model")])
def test_stale_meta_is_recomputed(tmp_path, caplog, field, value):
    disk = DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None)
    disk.put(_embedding(4))
    meta_file = disk.path("key0004") / "zarr.json"
    doc = json.loads(meta_file.read_text())
    doc["attributes"]["meta"][field] = value
    meta_file.write_text(json.dumps(doc))
    compute = Counter()
    store = EmbeddingStore(compute, [disk])
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        store.get_keyed("key0004", "case4", lambda: None)
    assert "stale" in caplog.text and f"{field}={value!r}" in caplog.text
    assert compute.calls == ["key0004"]
    assert json.loads(meta_file.read_text())["attributes"]["meta"][field] != value  # replaced


def test_size_cap_evicts_least_recently_used_entry_folders(tmp_path):
    probe = DiskEmbeddingCache(tmp_path / "probe", MODEL, None)
    probe.put(_embedding(0))
    one = embed_cache.entry_bytes(probe.path("key0000"))  # every entry here has this size (same shapes)
    disk = DiskEmbeddingCache(tmp_path / "c", MODEL, max_bytes=int(3.5 * one))
    for seed in (10, 11, 12):
        disk.put(_embedding(seed))
        os.utime(disk.path(f"key{seed:04d}"), (1000 + seed, 1000 + seed))
    assert disk.get("key0010", "") is not None  # the oldest, now the most recently used
    disk.put(_embedding(13))  # 4 entries of ~3.5: one goes, the least recently used
    disk.put(_embedding(14))
    left = sorted(p.name for p in (tmp_path / "c" / MODEL[:20]).iterdir())
    assert left == ["key0010.zarr", "key0013.zarr", "key0014.zarr"]
    info = cache_info(tmp_path / "c")
    assert info["embeddings"] == 3 and info["bytes"] == sum(embed_cache.entry_bytes(p) for _, _, p in info["entries"])
    assert info["bytes"] <= 3.5 * one


def test_old_emb_files_are_ignored_with_one_message(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(embed_cache, "_OLD_NOTED", set())
    old = write_entry(tmp_path / MODEL[:20] / "key0005.emb", {"fine": np.ones((2, 2, 2, D), np.float16)},
                      {"image_key": "key0005", "model_key": MODEL})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.emb").write_text("not ours")  # no magic: neither counted nor deleted
    disk = DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None)
    compute = Counter()
    store = EmbeddingStore(compute, [disk])
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        emb = store.get_keyed("key0005", "case5", lambda: None)
        store.get_keyed("key0006", "case6", lambda: None)
        DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None).get("key0007", "")
    notes = [r.getMessage() for r in caplog.records if "older alice3d format" in r.getMessage()]
    assert len(notes) == 1 and "1 embedding file(s)" in notes[0] and "cache --clear" in notes[0]
    assert compute.calls == ["key0005", "key0006"] and store.stats["recomputed_bad_cache"] == 0
    _same(emb, _embedding(5))  # the computed one, not the old file's ones
    assert old.is_file() and disk.exists("key0005")
    info = cache_info(tmp_path)
    assert (info["embeddings"], info["old_embeddings"], info["old_bytes"]) == (2, 1, old.stat().st_size)
    assert [p for _, p in info["old"]] == [old]
    n, freed = clear_cache(tmp_path)
    assert n == 3 and freed == info["bytes"] + info["old_bytes"]
    assert not old.exists() and (tmp_path / "other" / "notes.emb").is_file()


def test_store_embeddings_round_trip_and_old_files(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(embed_cache, "_OLD_NOTED", set())
    old = write_entry(tmp_path / "cases" / "c1" / "landmark" / f"{MODEL[:20]}.emb", {"a": np.zeros(4, np.uint8)},
                      {"image_key": "key0008"})
    source = StoreEmbeddings(tmp_path, MODEL)
    source.register("key0008", "c1")
    assert not source.case_exists("c1") and not source.exists("key0008")
    with caplog.at_level(logging.WARNING, logger="alice3d.landmark"):
        assert source.get("key0008", "c1") is None  # the old file is not an entry
    assert "older alice3d format" in caplog.text and f"rm {tmp_path}/cases/*/landmark/*.emb" in caplog.text
    emb = _embedding(8)
    assert source.put(emb) is emb
    assert source.path("c1") == tmp_path / "cases" / "c1" / "landmark" / f"{MODEL[:20]}.zarr"
    assert source.case_exists("c1") and source.exists("key0008") and old.is_file()
    fresh = StoreEmbeddings(tmp_path, MODEL, writable=False)
    fresh.register("key0008", "c1")
    _same(emb, fresh.get("key0008", "c1"))
    assert fresh.put(_embedding(9)) is not None and fresh.get("key0009", "") is None  # unregistered, read-only
    other_model = StoreEmbeddings(tmp_path, "x" * 24)
    other_model.register("key0008", "c1")
    assert other_model.get("key0008", "c1") is None  # another model's file name


def test_memory_is_bounded_by_the_lru_in_bytes(tmp_path):
    disk = DiskEmbeddingCache(tmp_path, MODEL, max_bytes=None)
    for seed in range(20, 24):
        disk.put(_embedding(seed))
    one = _embedding(20)
    nbytes = one.fine.nelement() * 2 + one.coarse.nelement() * 4 + one.body.nelement()
    compute = Counter()
    store = EmbeddingStore(compute, [disk], memory_items=100, memory_mb=2.5 * nbytes / 1e6)
    for seed in range(20, 24):
        store.get_keyed(f"key{seed:04d}", "", lambda: None)
    assert list(store._memory) == ["key0022", "key0023"] and compute.calls == []
    assert EmbeddingStore(compute).memory_mb == 4096.0  # bounded by default
