"""Landmark training views cut from HU sources (a volume store read per view, or int16 HU in
memory): the same views as from the windowed volume, the same batches from a store as from
memory, nothing of the volumes kept but seed points, and deterministic, resumable training."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from alice3d.config import load_config
from alice3d.data.phantom import generate_cohort
from alice3d.data.store import StoreVolume
from landmark.config import CropConfig, LandmarkConfig
from landmark.sampling import (
    HUArray,
    HUTrainVolume,
    ViewPairDataset,
    body_seeds,
    crop_grid,
    make_hu_train_volume,
    make_train_volume,
    sample_crop,
)
from landmark.train import load_train_volumes, train_landmark

AFF = np.array([[0.0, -2.0, 0, 40], [2.0, 0, 0, -40], [0, 0, 2.5, -30], [0, 0, 0, 1]])  # rotated axes
WINDOW, SOFT = (-1024.0, 3071.0), (-250.0, 350.0)
TINY = ["data.spacing=[8,8,8]", "crop.size=[16,16,16]", "model.stem_width=4", "model.widths=[8,8,8,8]",
        "model.fpn_dim=8", "model.embed_dim=16", "train.batch_size=2", "train.device=cpu", "train.ckpt_every=1",
        "train.warmup_steps=1", "loss.anchors=16", "loss.hard_pool=32", "loss.negatives=8",
        "loss.random_negatives=8", "loss.coarse_negatives=8", "train.num_workers=0"]


def _hu(shape=(30, 28, 22), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0, 700, shape), -2000, 3500).astype(np.int16)


def _channel0(hu: np.ndarray) -> np.ndarray:
    return np.clip((hu.astype(np.float32) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)


def test_body_seeds_are_the_argwhere_sample_as_int32():
    mask = np.random.default_rng(1).random((20, 18, 16)) > 0.6
    seeds = body_seeds(mask, 300, seed=5)
    expect = np.argwhere(mask)[np.random.default_rng(5).choice(int(mask.sum()), 300, replace=False)]
    assert seeds.dtype == np.int32 and np.array_equal(seeds, expect)
    assert np.array_equal(body_seeds(mask, 10**6, 0), np.argwhere(mask))  # all of them under the cap
    assert len(body_seeds(np.zeros((3, 4, 5), bool), 100, 0)) == 60  # no body: seeds anywhere


def test_hu_views_equal_views_of_the_windowed_volume_and_read_only_their_region():
    hu = _hu()
    reads = []

    class Recording(HUArray):
        def read_hu(self, region=None):
            reads.append(region)
            return super().read_hu(region)

    ref = make_train_volume(_channel0(hu), AFF, 0.15, seed=3)  # channel 0 windowed per volume (the old way)
    vol = make_hu_train_volume(Recording(hu), AFF, [WINDOW, SOFT], 0.15, seed=3)
    assert np.array_equal(vol.body, ref.body) and reads == [None]  # seeds from one whole read
    clipped = torch.from_numpy(np.clip(hu.astype(np.float32), *WINDOW))[None]
    size = (12, 12, 8)
    for s in range(12):
        r = np.random.default_rng(s)
        m = crop_grid(r.uniform(0, hu.shape), float(r.uniform(0.8, 1.2)), size)  # some reach outside
        reads.clear()
        view = vol.view(m, size)
        assert view.shape == (2, *size)
        torch.testing.assert_close(view[0], ref.view(m, size)[0], atol=1e-5, rtol=0)
        soft = ((sample_crop(clipped, m, size, pad_value=WINDOW[0])[0] - SOFT[0]) / (SOFT[1] - SOFT[0])).clamp(0, 1)
        torch.testing.assert_close(view[1], soft, atol=2e-5, rtol=0)  # 0.01 HU of float32 rounding
        (region,) = reads
        assert np.prod([sl.stop - sl.start for sl in region]) < hu.size  # a view reads its box, not the volume
    outside = crop_grid(np.array([200.0, 0, 0]), 1.0, size)
    reads.clear()
    assert torch.equal(vol.view(outside, size), torch.zeros(2, *size)) and reads == []


def test_view_at_the_last_voxel_blends_with_the_outside_as_the_whole_volume_does():
    hu = _hu((10, 10, 10), seed=2)
    hu[9, 9, 0] = 1000
    vol = HUTrainVolume(HUArray(hu), np.eye(4), np.zeros((1, 3), np.int32), [WINDOW])
    ref = make_train_volume(_channel0(hu), np.eye(4), 0.15)
    m = np.eye(4)
    m[:3, 3] = [9.5, 9.2, -0.5]  # one view voxel; of its 8 neighbours only (9, 9, 0) is inside
    view = vol.view(m, (1, 1, 1))
    torch.testing.assert_close(view, ref.view(m, (1, 1, 1)), atol=2e-6, rtol=0)
    assert view.item() == pytest.approx(0.5 * 0.8 * 0.5 * (1000 + 1024) / 4095, abs=1e-6)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("lmtrain"), n=4, seed=1, size="tiny", shape=(32, 32, 24),
                           spacing=(8.0, 8.0, 8.0))


def _cfg(cohort, *extra):
    return load_config(LandmarkConfig, None, [*TINY, f"data.data={cohort}", *extra])


def test_store_and_memory_training_volumes_give_the_same_batches(cohort, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="alice3d.landmark"):
        stored = load_train_volumes(_cfg(cohort, "data.store=always"))
    assert "views read from the volume store" in caplog.text
    memory = load_train_volumes(_cfg(cohort, "data.store=never"))
    assert len(stored) == len(memory) >= 2
    for a, b in zip(stored, memory):
        assert isinstance(a.source, StoreVolume) and isinstance(b.source, HUArray)
        assert b.source.hu.dtype == np.int16 and a.shape == b.shape
        assert np.array_equal(a.body, b.body) and a.body.dtype == np.int32
        # nothing of the volume is held besides the seeds: no voxel array on the training volume
        assert not any(isinstance(v, (np.ndarray, torch.Tensor)) and v.size > a.body.size
                       for v in vars(a).values() if v is not a.body)
    crop = CropConfig(size=(16, 16, 16))
    for i in (0, 7):
        x, y = ViewPairDataset(stored, crop, 2, seed=3)[i], ViewPairDataset(memory, crop, 2, seed=3)[i]
        assert x["view1"].shape == (2, 2, 16, 16, 16)  # primary + soft-tissue window, per view
        for k in x:
            torch.testing.assert_close(x[k].float(), y[k].float(), atol=1e-5, rtol=0)


def test_training_from_a_store_is_deterministic_and_resumes(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("ALICE3D_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(cohort, "data.store=always", "train.max_steps=2")
    vols = load_train_volumes(cfg)
    a = train_landmark(cfg, vols, tmp_path / "a")
    b = train_landmark(cfg, load_train_volumes(cfg), tmp_path / "b")
    wa, wb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count("\n") == 2
    more = _cfg(cohort, "data.store=always", "train.max_steps=3")
    assert train_landmark(more, vols, tmp_path / "a", resume=True) is not None
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
