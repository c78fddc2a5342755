"""Landmark side of the volume store: O(N) reference consistency, sharded embedding into the
store, pairs sampled from store volumes without embeddings, a bounded embedding LRU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alice3d.config import DataConfig, load_config
from alice3d.data.io import Volume
from alice3d.data.phantom import generate_cohort
from alice3d.data.preprocess import build_store
from alice3d.data.store import StoreSettings, open_store
from landmark.cohort import (
    box_affine,
    case_input,
    compose,
    embed_store,
    fit_identity,
    fit_path,
    reference_index,
    store_reference,
    store_transforms,
)
from landmark.config import LandmarkConfig
from landmark.match import Matcher
from landmark.model import build_model, recalibrate_norms
from landmark.config import PairsConfig
from landmark.pairs import PairError, PairSampler, pair_dataset
from landmark.prepare import prepare_pairs
from landmark.store import EmbeddingStore, StoreEmbeddings
from landmark.train import save_landmark_model

SPACING = (8.0, 8.0, 8.0)
TINY = ["data.spacing=[8,8,8]", "model.stem_width=4", "model.widths=[8,8,8,8]", "model.fpn_dim=8",
        "model.embed_dim=16", "model.extra_windows=[]"]


def translation(t) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def test_compose_box_affine_and_reference_by_hand():
    t_a, t_b = translation([10.0, 0, 0]), np.diag([2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(compose(t_a, t_b) @ [1.0, 2.0, 3.0, 1.0], [5.5, 2.0, 3.0, 1.0])  # (1+10)/2
    m = box_affine([0, 0, 0], [10, 20, 30], [5, 5, 5], [25, 15, 35])
    np.testing.assert_allclose(m @ [10, 20, 30, 1], [25, 15, 35, 1])
    np.testing.assert_allclose(m @ [5, 10, 15, 1], [15, 10, 20, 1])
    boxes = [(np.zeros(3), np.full(3, e)) for e in (100.0, 300.0, 210.0, 190.0, 200.0)]
    assert reference_index(boxes) == 4  # extent 200 is the median


def _volumes(n=3):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = (rng.random((20, 18, 12)) * 0.5 + 0.3).astype(np.float32)
        aff = np.diag([2.0, 2.0, 2.0, 1.0])
        aff[:3, 3] = [5.0 * i, 0.0, 0.0]
        out.append(Volume(arr, aff, f"v{i}.nii.gz"))
    return out


def test_reference_pairs_follow_the_composed_maps_without_a_matcher():
    vols = _volumes()
    transforms = [translation([3.0 * i, -1.0 * i, 0.0]) for i in range(3)]
    sampler = PairSampler(vols, None, crop_size=(8, 8, 4), consistency="reference", transforms=transforms, seed=1)
    for k in range(6):
        s = sampler.sample(k)
        a, b = s["meta"]["ids"]
        p, pb = np.array(s["meta"]["points"][0]), np.array(s["meta"]["points"][1])
        np.testing.assert_allclose(pb, p + [3.0 * (a - b), -1.0 * (a - b), 0.0], atol=1e-9)
        assert np.isnan(s["meta"]["score"]) and s["q"].shape == (1, 8, 8, 4)
    far = [translation([1000.0 * i, 0, 0]) for i in range(3)]  # every match lands outside B
    s = PairSampler(vols, None, crop_size=(8, 8, 4), consistency="reference", transforms=far, max_retries=2,
                    fallback="position").sample(0)
    assert s["meta"]["fallback"] and s["meta"]["tries"] == 3
    with pytest.raises(PairError, match="reference"):
        PairSampler(vols, None, crop_size=(8, 8, 4), consistency="reference")
    with pytest.raises(PairError, match="one per volume"):
        PairSampler(vols, None, crop_size=(8, 8, 4), consistency="reference", transforms=far[:2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A store of 4 tiny phantoms at 8 mm and a tiny landmark model (random weights, norms on data)."""
    root = tmp_path_factory.mktemp("lmstore")
    cohort = generate_cohort(root / "cohort", n=4, seed=2, size="tiny")
    paths = sorted(str(p) for p in (cohort / "imagesTr").glob("*.nii.gz"))
    build_store(paths, root / "store", StoreSettings(SPACING), workers=1, progress=False)
    cfg = load_config(LandmarkConfig, None, TINY)
    torch.manual_seed(0)
    net = recalibrate_norms(build_model(cfg.model), [torch.rand(1, 1, 32, 32, 32)]).eval()
    return root, open_store(root / "store"), save_landmark_model(net, cfg, root / "landmark.pt")


def test_embed_store_shards_never_repeat_a_volume_and_resume(tiny, tmp_path):
    _, store, model = tiny
    counts = []
    owner = store.cases.index(store_reference(store)) % 2
    for i in (owner, 1 - owner):  # one after the other, no barrier: the second reads the reference's embedding
        m = Matcher(model, use_cache=False)
        counts.append(embed_store(m, store, shard=(i, 2), show_progress=False))
        assert m.store.stats["computed"] == counts[-1]["embedded"] == counts[-1]["mine"]  # no volume twice
    assert sum(c["embedded"] for c in counts) == len(store.cases) == sum(c["fitted"] for c in counts)
    m = Matcher(model, use_cache=False)
    source = StoreEmbeddings(store.root, m.model_key)
    assert all(source.case_exists(c["name"]) for c in store.cases)
    again = embed_store(m, store, show_progress=False)
    assert (again["embedded"], again["fitted"], m.store.stats["computed"]) == (0, 0, 0)
    expect = fit_identity(m, store)
    transforms = store_transforms(m.model_key, expect, store, store.cases)
    ref = store.cases.index(store_reference(store))
    np.testing.assert_array_equal(transforms[ref], np.eye(4))
    assert all(t.shape == (4, 4) and np.isfinite(t).all() for t in transforms)
    assert fit_path(store, store.cases[0], m.model_key).stat().st_size < 2000  # a few hundred bytes per volume


def test_store_pairs_need_only_the_fits(tiny, monkeypatch):
    root, store, model = tiny
    monkeypatch.setenv("ALICE3D_CACHE", str(root / "cache"))
    data = DataConfig(data=str(store.root), spacing=SPACING)
    prep = prepare_pairs(data, PairsConfig(min_score=-1.0), (16, 16, 8), landmark=str(model))
    ds, report = pair_dataset(data, PairsConfig(min_score=-1.0), (16, 16, 8), landmark=str(model), prepared=prep)
    sampler = ds.sampler
    assert sampler.matcher is None and sampler.embeddings == [] and sampler.transforms is not None
    assert report.used == len(store.cases)
    item = ds[3]
    assert item["q"].shape == (1, 16, 16, 8) and torch.equal(ds[3]["k"], item["k"])
    none = PairsConfig(min_score=-1.0, consistency="none")
    prepare_pairs(data, none, (16, 16, 8), landmark=str(model))
    ds2, _ = pair_dataset(data, none, (16, 16, 8), landmark=str(model))  # reads the store's preparation
    s = ds2.sampler.sample(0)
    assert ds2.sampler.matcher is not None and len(ds2.sampler.embeddings) == len(store.cases)
    assert s["k"].shape == (1, 16, 16, 8) and np.isfinite(s["meta"]["score"])


def test_embedding_lru_is_bounded_in_megabytes(tiny):
    _, store, model = tiny
    m = Matcher(model, use_cache=False)
    embed_store(m, store, fits=False, show_progress=False)
    embs = [m.embed(open_store(store.root).volumes((-1024, 3071))[0].path)]
    one = embs[0].fine.nelement() * 2 + embs[0].coarse.nelement() * 4
    lru = EmbeddingStore(m._compute, [StoreEmbeddings(store.root, m.model_key)], memory_items=100,
                         memory_mb=2.5 * one / 1e6)
    for c in store.cases:
        key, load = case_input(store, c)
        lru.sources[0].register(key, c["name"])
        lru.get_keyed(key, c["name"], load)
    assert len(lru._memory) == 2 and lru.stats["computed"] == 0 and lru.stats["disk_hits"] == len(store.cases)


def test_in_memory_reference_pairs_fit_each_volume_once(tiny, tmp_path):
    _, store, model = tiny
    hu = [v.path for v in open_store(store.root).volumes((-125, 255))]
    vols = [Volume(v.read_hu().astype(np.float32) / 400.0 + 0.5, v.affine, v.path)
            for v in open_store(store.root).volumes((-125, 255))]
    m = Matcher(model, cache_dir=tmp_path)
    sampler = PairSampler(vols, m, crop_size=(8, 8, 4), consistency="reference", sources=hu)
    assert sampler.matcher is None and sampler.embeddings == [] and len(sampler.transforms) == len(vols)
    assert m.stats["pair_transforms"] + m.stats["pair_fallbacks"] == len(vols) - 1  # n - 1 fits, not n^2
    assert sum(np.allclose(t, np.eye(4)) for t in sampler.transforms) >= 1  # the reference maps to itself
    s = sampler.sample(2)
    a, b = s["meta"]["ids"]
    expect = compose(sampler.transforms[a], sampler.transforms[b]) @ np.r_[s["meta"]["points"][0], 1.0]
    np.testing.assert_allclose(s["meta"]["points"][1], expect[:3], atol=1e-6)
