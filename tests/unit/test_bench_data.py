"""scripts/bench_data.py plumbing on a toy dataset (no timing is asserted, only what is reported)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))  # bench_data imports bench_common as a sibling module

import bench_data  # noqa: E402


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.seen = []

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        self.seen.append(i)
        return {"q": torch.full((1, 8, 8, 4), float(i)), "k": torch.zeros(1, 8, 8, 4)}


def test_loader_figures_count_every_timed_pair():
    data = Pairs()
    r = bench_data.time_loader(data, workers=0, batch=3, batches=4, warmup=1, pin=False)
    assert len(data.seen) == 3 * (4 + 1)  # warm-up batch + timed batches, nothing more
    assert r["workers"] == 0 and r["batch"] == 3 and r["batches"] == 4
    assert r["pairs_per_s"] > 0 and r["pairs_per_s_per_worker"] == r["pairs_per_s"]


def test_augmentation_timing_reports_the_batch_and_device():
    r = bench_data.time_augmentation(torch.device("cpu"), batch=2, crop=[16, 16, 8], patch=8, mask_ratio=0.75, steps=2)
    assert r["batch"] == 2 and r["device"].startswith("cpu:")
    assert abs(r["pairs_per_s"] - 2 / r["median_s"]) < 1e-9


def test_matcher_leaves_cuda_when_workers_are_forked():
    assert bench_data.matcher_device("cuda", 2) == "cpu"
    assert bench_data.matcher_device("cuda:1", 0) == "cuda:1"
    assert bench_data.matcher_device("cpu", 4) == "cpu"


def test_trainer_loader_reads_consecutive_samples():
    data = Pairs()
    batch = next(iter(bench_data.trainer_loader(data, workers=0, batch=3, pin=False)))
    assert data.seen == [0, 1, 2] and batch["q"][:, 0, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]


def test_replayed_batches_are_the_loaders_first_batches():
    data = Pairs()
    loader = bench_data.trainer_loader(data, workers=0, batch=2, pin=False)
    replay = bench_data.replayed_batches(loader, 2, torch.device("cpu"))
    assert [b["q"][:, 0, 0, 0, 0].tolist() for b in replay] == [[0.0, 1.0], [2.0, 3.0]]
