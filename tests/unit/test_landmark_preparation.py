"""What a landmark preparation costs and keeps: the cost line before any work, no embedding
persisted for pairs.consistency=reference (only the fits), embeddings kept once for none/affine."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from alice3d.config import DataConfig, load_config
from alice3d.data.io import Volume
from alice3d.data.phantom import generate_cohort
from alice3d.data.preprocess import build_store
from alice3d.data.store import StoreSettings, open_store
from landmark.cohort import (
    case_grid,
    embed_store,
    embedding_bytes,
    fit_identity,
    fit_path,
    format_bytes,
    model_voxels,
    store_transforms,
)
from landmark.config import LandmarkConfig
from landmark.embed_cache import GROUP_SUFFIX, entry_bytes
from landmark.match import Matcher
from landmark.model import build_model, recalibrate_norms
from landmark.config import PairsConfig
from landmark.pairs import PairSampler, pair_dataset
from landmark.prepare import prepare_pairs
from landmark.store import StoreEmbeddings
from landmark.train import save_landmark_model

SPACING = (8.0, 8.0, 8.0)
TINY = ["data.spacing=[8,8,8]", "model.stem_width=4", "model.widths=[8,8,8,8]", "model.fpn_dim=8",
        "model.embed_dim=16", "model.extra_windows=[]"]
MARK = "COMPUTING AN EMBEDDING"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A finished store of 4 tiny phantoms at 8 mm (copied per test) and a tiny landmark model."""
    root = tmp_path_factory.mktemp("lmprep")
    cohort = generate_cohort(root / "cohort", n=4, seed=3, size="tiny")
    paths = sorted(str(p) for p in (cohort / "imagesTr").glob("*.nii.gz"))
    build_store(paths, root / "store", StoreSettings(SPACING), workers=1, progress=False)
    cfg = load_config(LandmarkConfig, None, TINY)
    torch.manual_seed(0)
    net = recalibrate_norms(build_model(cfg.model), [torch.rand(1, 1, 32, 32, 32)]).eval()
    return root, save_landmark_model(net, cfg, root / "landmark.pt")


@pytest.fixture
def store(built, tmp_path, monkeypatch):
    root, _ = built
    shutil.copytree(root / "store", tmp_path / "store")
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))
    return open_store(tmp_path / "store")


@pytest.fixture
def marked(monkeypatch):
    """Every embedding computed logs MARK first, so log order shows what came before the work."""
    original = Matcher._compute

    def compute(self, volume, key, name):
        logging.getLogger("alice3d.landmark").info(MARK)
        return original(self, volume, key, name)

    monkeypatch.setattr(Matcher, "_compute", compute)


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "alice3d.landmark"]


def _cost_line(messages: list[str]) -> tuple[int, str]:
    found = [(i, m) for i, m in enumerate(messages) if m.startswith("landmark preparation")]
    assert len(found) == 1, messages
    return found[0]


def test_embedding_size_estimate_by_hand(built):
    m = Matcher(built[1], use_cache=False)  # embed_dim 16, fine stride 2, coarse stride 16, 8 mm
    assert model_voxels(m, (64, 32, 10), (4.0, 8.0, 16.0)) == 32 * 32 * 20
    # 64^3: 32^3 fine voxels x (16 x 2 bytes + 1 body byte), 4^3 coarse x 16 x 4 bytes, 4 kB header
    assert embedding_bytes(m, 64**3) == 32**3 * 33 + 4**3 * 64 + 4096
    assert format_bytes(4.95e9) == "4.95 GB" and format_bytes(999) == "999 bytes"


def test_reference_preparation_writes_fits_and_no_embedding_anywhere(built, store, tmp_path, marked, caplog):
    _, model = built
    data = DataConfig(data=str(store.root), spacing=SPACING)
    pairs = PairsConfig(min_score=-1.0, consistency="reference")
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        prepare_pairs(data, pairs, (16, 16, 8), landmark=str(model))
        ds, _ = pair_dataset(data, pairs, (16, 16, 8), landmark=str(model))
    assert ds.sampler.transforms is not None and ds[0]["q"].shape == (1, 16, 16, 8)
    assert sorted(tmp_path.rglob(f"*{GROUP_SUFFIX}")) == []  # neither in the store nor in $ALICE3D_CACHE/embeddings
    m = Matcher(model, use_cache=False)
    assert all(fit_path(store, c, m.model_key).is_file() for c in store.cases)
    assert len(store_transforms(m.model_key, fit_identity(m, store), store, store.cases)) == 4
    messages = _messages(caplog)
    at, line = _cost_line(messages)
    assert at < messages.index(MARK) and messages.count(MARK) == 4  # the cost before the first embedding
    assert "4 volume(s) to embed" in line and "3 reference fit(s)" in line  # the reference's own is the identity
    assert f"~4.00 kB into {store.root}/cases/*/landmark/ (fits)" in line
    assert "no embeddings are kept" in line and "time: estimated after the first volume" in line
    assert any(msg.startswith("reference fits: the first volume took") and "remaining 2" in msg
               for msg in messages[messages.index(MARK):])


def test_reference_preparation_reuses_kept_embeddings_and_writes_none(built, store, caplog):
    _, model = built
    keep = Matcher(model, use_cache=False)
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        embed_store(keep, store, fits=False, show_progress=False)
    _, line = _cost_line(_messages(caplog))
    emb_files = sorted(store.root.rglob(f"*{GROUP_SUFFIX}"))
    assert len(emb_files) == 4 and "4 volume(s) to embed" in line and "0 reference fit(s)" in line
    estimate = sum(embedding_bytes(keep, model_voxels(keep, *case_grid(store, c))) for c in store.cases)
    assert f"~{format_bytes(estimate)} into {store.root}/cases/*/landmark/ (embeddings" in line
    actual = sum(entry_bytes(p) for p in emb_files)
    assert 0.6 < estimate / actual < 1.4  # ceil of small grids, header padding
    caplog.clear()
    stamps = {p: (p.stat().st_ino, p.stat().st_size) for p in emb_files}  # a rewrite renames a new file in
    m = Matcher(model, use_cache=False)
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        counts = embed_store(m, store, fits=True, keep_embeddings=False, show_progress=False)
    assert counts["fitted"] == 4 and m.store.stats["computed"] == 0  # read from the store, not recomputed
    assert "0 volume(s) to embed" in _cost_line(_messages(caplog))[1]
    assert {p: (p.stat().st_ino, p.stat().st_size) for p in store.root.rglob(f"*{GROUP_SUFFIX}")} == stamps


def test_none_preparation_keeps_embeddings_in_the_store_only(built, store, tmp_path):
    _, model = built
    data = DataConfig(data=str(store.root), spacing=SPACING)
    pairs = PairsConfig(min_score=-1.0, consistency="none")
    ds, _ = pair_dataset(data, pairs, (16, 16, 8), landmark=str(model),
                         prepared=prepare_pairs(data, pairs, (16, 16, 8), landmark=str(model)))
    m = Matcher(model, use_cache=False)
    source = StoreEmbeddings(store.root, m.model_key)
    assert all(source.case_exists(c["name"]) for c in store.cases)
    assert sorted((tmp_path / "cache").rglob(f"*{GROUP_SUFFIX}")) == []  # the store copy is the one read
    assert np.isfinite(ds.sampler.sample(0)["meta"]["score"])


def test_in_memory_reference_fits_hold_and_write_no_embedding(built, store, tmp_path, marked, caplog):
    _, model = built
    hu = [v.path for v in store.volumes((-125, 255))]
    vols = [Volume(v.read_hu().astype(np.float32) / 400.0 + 0.5, v.affine, v.path) for v in store.volumes((-125, 255))]
    m = Matcher(model, cache_dir=tmp_path / "lmcache")
    held = []
    original = m.store.get_keyed

    def get_keyed(key, name, load):
        emb = original(key, name, load)
        held.append(len(m.store._memory))
        return emb

    m.store.get_keyed = get_keyed
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        sampler = PairSampler(vols, m, crop_size=(8, 8, 4), consistency="reference", sources=hu)
    assert len(sampler.transforms) == 4 and sampler.matcher is None
    assert sorted(tmp_path.rglob(f"*{GROUP_SUFFIX}")) == [] and max(held) <= 2  # the reference and one other at a time
    assert m.disk.writable  # read-only only while preparing
    messages = _messages(caplog)
    at, line = _cost_line(messages)
    assert at < messages.index(MARK) and "4 volume(s) to embed" in line and "3 reference fit(s)" in line
    assert f"writes ~3.00 kB into {m.pairs.folder} (fits)" in line
    assert len(list(m.pairs.folder.glob("*.pair"))) == 3


def test_in_memory_none_embeddings_say_what_they_write(built, store, tmp_path, caplog):
    _, model = built
    hu = [v.path for v in store.volumes((-125, 255))][:2]
    vols = [Volume(v.read_hu().astype(np.float32) / 400.0 + 0.5, v.affine, v.path)
            for v in store.volumes((-125, 255))][:2]
    m = Matcher(model, cache_dir=tmp_path / "lmcache")
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        PairSampler(vols, m, crop_size=(8, 8, 4), consistency="none", sources=hu)
    _, line = _cost_line(_messages(caplog))
    assert "2 volume(s) to embed" in line and f"into the embedding cache {tmp_path / 'lmcache'}" in line
    assert len(list((tmp_path / "lmcache").rglob(f"*{GROUP_SUFFIX}"))) == 2  # none/affine keep theirs
