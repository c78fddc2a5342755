"""Pair preparation is a step: it runs before any pair dataset (sharded, then a barrier), and the
datasets only read what it wrote; a missing or stale preparation is an error naming the command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from alice3d.config import DataConfig, load_config
from alice3d.data.phantom import generate_cohort
from alice3d.data.preprocess import build_store
from alice3d.data.store import StoreSettings, open_store
from alice3d.pretrain import run as pretrain_run
from alice3d.pretrain.config import PretrainConfig
from landmark import prepare
from landmark.cohort import CohortError, fit_identity, fit_path, shard_cases, store_reference, store_transforms
from landmark.config import LandmarkConfig, PairsConfig
from landmark.match import Matcher
from landmark.model import build_model, recalibrate_norms
from landmark.pairs import pair_dataset
from landmark.train import save_landmark_model

SPACING = (8.0, 8.0, 8.0)
CROP = (16, 16, 8)
TINY = ["data.spacing=[8,8,8]", "model.stem_width=4", "model.widths=[8,8,8,8]", "model.fpn_dim=8",
        "model.embed_dim=16", "model.extra_windows=[]"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store of 4 tiny phantoms at 8 mm (copied per test), their images, and a tiny landmark model."""
    root = tmp_path_factory.mktemp("pairprep")
    cohort = generate_cohort(root / "cohort", n=4, seed=5, size="tiny")
    paths = sorted(str(p) for p in (cohort / "imagesTr").glob("*.nii.gz"))
    build_store(paths, root / "store", StoreSettings(SPACING), workers=1, progress=False)
    cfg = load_config(LandmarkConfig, None, TINY)
    torch.manual_seed(0)
    net = recalibrate_norms(build_model(cfg.model), [torch.rand(1, 1, 32, 32, 32)]).eval()
    return root, cohort, str(save_landmark_model(net, cfg, root / "landmark.pt"))


@pytest.fixture
def store(built, tmp_path, monkeypatch):
    shutil.copytree(built[0] / "store", tmp_path / "store")
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    return open_store(tmp_path / "store")


@pytest.fixture
def no_compute(monkeypatch):
    """Fails any embedding computed after it is switched on: what a dataset may not do."""
    state = {"on": False}
    original = Matcher._compute

    def compute(self, volume, key, name):
        if state["on"]:
            raise AssertionError(f"the dataset computed an embedding ({name})")
        return original(self, volume, key, name)

    monkeypatch.setattr(Matcher, "_compute", compute)
    return state


def test_shards_of_a_two_process_world_are_disjoint_and_cover_every_case(monkeypatch):
    cases = [{"name": f"c{k}"} for k in range(7)]
    got = []
    for r in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(r))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        shard = prepare.preparation_shard()
        assert shard == (r, 2)
        got.append([c["name"] for c in shard_cases(cases, shard)])
    assert got == [["c0", "c2", "c4", "c6"], ["c1", "c3", "c5"]]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert prepare.preparation_shard() is None and shard_cases(cases, None) == cases
    with pytest.raises(CohortError, match="shard 2/2"):
        shard_cases(cases, (2, 2))


@pytest.mark.parametrize("consistency, what", [("reference", "reference fit"), ("none", "landmark embedding")])
def test_a_dataset_without_preparation_names_the_command(built, store, consistency, what):
    model = built[2]
    data = DataConfig(data=str(store.root), spacing=SPACING)
    with pytest.raises(CohortError) as e:
        pair_dataset(data, PairsConfig(consistency=consistency), CROP, landmark=model)
    msg = str(e.value)
    assert what in msg and "4 case(s)" in msg
    assert f"`alice3d-landmark embed --model {model} --data {store.root}`" in msg
    assert "alice3d-pretrain, which prepares it" in msg
    assert sorted(store.root.rglob("*.fit.json")) == []  # the dataset wrote nothing


def test_two_shards_prepare_the_store_each_its_share_then_the_dataset_only_reads(built, store, monkeypatch,
                                                                                  no_compute):
    model = built[2]
    calls = []
    monkeypatch.setattr(prepare, "barrier", lambda timeout_s=0: calls.append(
        sorted(p.parent.parent.name for p in store.root.rglob("*.fit.json"))))
    counts = []
    for r in (0, 1):  # the two processes of a fake 2-process node, one after the other
        monkeypatch.setenv("LOCAL_RANK", str(r))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        m = Matcher(model, use_cache=False)
        counts.append(prepare.prepare_store(m, store, fits=True, keep_embeddings=False,
                                            shard=prepare.preparation_shard(), show_progress=False))
    names = [c["name"] for c in store.cases]
    assert [c["mine"] for c in counts] == [2, 2] and [c["fitted"] for c in counts] == [2, 2]
    # each process: a barrier before its fits and one after them; its own share fitted in between
    assert calls == [[], names[0::2], names[0::2], names]
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    no_compute["on"] = True
    data = DataConfig(data=str(store.root), spacing=SPACING)
    ds, report = pair_dataset(data, PairsConfig(min_score=-1.0), CROP, landmark=model)
    m = Matcher(model, use_cache=False)
    expect = store_transforms(m.model_key, fit_identity(m, store), store, store.cases)
    assert report.used == 4 and ds.sampler.matcher is None
    for got, want in zip(ds.sampler.transforms, expect):
        np.testing.assert_array_equal(got, want)
    assert ds[0]["q"].shape == (1, *CROP)


def test_prepare_pairs_then_the_none_dataset_reads_the_store_embeddings(built, store, no_compute):
    model = built[2]
    data = DataConfig(data=str(store.root), spacing=SPACING)
    pairs = PairsConfig(min_score=-1.0, consistency="none")
    prep = prepare.prepare_pairs(data, pairs, CROP, landmark=model)
    assert prep.consistency == "none" and prep.store is not None and prep.counts["embedded"] == 4
    no_compute["on"] = True
    ds, _ = pair_dataset(data, pairs, CROP, landmark=model, prepared=prep)
    s = ds.sampler.sample(1)
    assert np.isfinite(s["meta"]["score"]) and ds.sampler.matcher.store.stats["computed"] == 0


def test_a_stale_fit_is_an_error_naming_the_case(built, store):
    model = built[2]
    data = DataConfig(data=str(store.root), spacing=SPACING)
    prepare.prepare_pairs(data, PairsConfig(), CROP, landmark=model)
    m = Matcher(model, use_cache=False)
    other = next(c for c in store.cases if c["name"] != store_reference(store)["name"])
    path = fit_path(store, other, m.model_key)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "reference": "someone-else"}))  # made for another reference
    with pytest.raises(CohortError, match=f"1 case\\(s\\).*stale, e.g. {other['name']}"):
        pair_dataset(data, PairsConfig(), CROP, landmark=model)


def test_volumes_in_memory_are_prepared_in_process_and_the_dataset_reads_it(built, tmp_path, monkeypatch,
                                                                           no_compute):
    _, cohort, model = built
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))
    data = DataConfig(data=str(cohort), spacing=SPACING, store="never")
    pairs = PairsConfig(min_score=-1.0, consistency="reference")
    prep = prepare.prepare_pairs(data, pairs, CROP, landmark=model)
    assert prep.store is None and len(prep.transforms) == len(prep.volumes.volumes) >= 2
    no_compute["on"] = True
    ds, _ = pair_dataset(data, pairs, CROP, landmark=model, prepared=prep)
    assert ds.sampler.transforms is not None and ds.sampler.matcher is None
    for got, want in zip(ds.sampler.transforms, prep.transforms):
        np.testing.assert_array_equal(got, want)


def test_pretrain_prepares_before_it_builds_the_dataset(monkeypatch, tmp_path):
    order = []

    class Stop(Exception):
        pass

    monkeypatch.setattr(pretrain_run, "init_distributed", lambda device, timeout: order.append("join"))
    monkeypatch.setattr(pretrain_run, "prepare_pairs", lambda *a, **k: order.append("prepare") or "PREP")

    def dataset(cfg, prepared):
        order.append(("dataset", prepared))
        raise Stop

    monkeypatch.setattr(pretrain_run, "build_dataset", dataset)
    with pytest.raises(Stop):
        pretrain_run.pretrain(load_config(PretrainConfig), tmp_path / "run")
    assert order == ["join", "prepare", ("dataset", "PREP")]
    cfg = load_config(PretrainConfig, None, ["method=mae"])
    assert pretrain_run.prepare_data(cfg) is None  # image datasets: nothing to prepare


def test_the_barrier_is_nothing_without_a_process_group():
    assert not torch.distributed.is_initialized()
    prepare.barrier(1.0)  # returns at once: one process has nobody to wait for
