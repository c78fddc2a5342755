"""CPU threads (issue B): the automatic thread count, the start-up load check and the step-time
slowdown monitor as pure functions of numbers, and the trainer applying and reporting them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from alice3d.config import ConfigError, TrainConfig, section
from alice3d.runtime import (
    StepTimeMonitor,
    auto_num_threads,
    cpu_oversubscription,
    local_processes,
    slowdown_message,
    usable_cores,
)
from alice3d.train import trainer as trainer_mod
from alice3d.train.module import TrainModule
from alice3d.train.trainer import Trainer


@pytest.mark.parametrize("cores,procs,workers,current,expected", [
    (16, 1, 0, None, 16),   # one process, no workers: every usable core
    (16, 2, 3, None, 2),    # 16 // (2 x (1 + 3))
    (16, 8, 0, None, 2),    # torchrun with 8 processes on the node
    (2, 4, 1, None, 1),     # never below one thread
    (24, 1, 2, None, 8),
    (16, 1, 0, 4, 4),       # OMP_NUM_THREADS=4 (what torch would use) is lower: it wins
    (16, 2, 3, 64, 2),      # a higher torch default does not raise the share
    (16, 1, 0, 0, 1),
])
def test_auto_num_threads_is_the_process_share_of_the_cores(cores, procs, workers, current, expected):
    assert auto_num_threads(cores, procs, workers, current) == expected


@pytest.mark.parametrize("load,cores,own,busy", [
    (0.5, 8, 4, False),
    (4.0, 8, 4, False),   # exactly the cores left: not yet competing
    (4.1, 8, 4, True),
    (3.0, 2, 2, True),    # the reported case: 2 threads + another job on 2 shared cores
    (None, 2, 2, False),  # no load average on this OS
])
def test_cpu_oversubscription_compares_load_with_the_cores_left(load, cores, own, busy):
    msg = cpu_oversubscription(load, cores, own)
    assert bool(msg) is busy
    if busy:
        assert f"load average is {load:.1f} on {cores} usable cores" in msg and f"needs {own} of them" in msg
        assert "train.num_threads" in msg and "OMP_NUM_THREADS" in msg


def _feed(monitor, times, t0=0.0, dt=1.0):
    return [monitor.observe(s, t0 + k * dt) for k, s in enumerate(times)]


def test_monitor_warns_once_when_the_recent_median_exceeds_3x_the_steady_reference():
    m = StepTimeMonitor(warmup=3, baseline=10, recent=10, factor=3.0, interval_s=900.0)
    # warm-up steps are slow (ignored); the steady reference is the median of the next 10 = 1.15
    out = _feed(m, [9.0, 5.0, 4.0] + [1.1, 1.2] * 5)
    assert out == [None] * 13 and m.reference == pytest.approx(1.15)
    out = _feed(m, [11.0] * 9, t0=13.0)  # the recent window is not full yet
    assert out == [None] * 9
    assert m.observe(10.5, 22.0) == (pytest.approx(11.0), pytest.approx(1.15))
    assert _feed(m, [12.0] * 20, t0=23.0) == [None] * 20  # rate-limited: once per 900 s
    assert m.observe(12.0, 22.0 + 900.0) == (pytest.approx(12.0), pytest.approx(1.15))


def test_monitor_ignores_jitter_and_isolated_slow_steps():
    m = StepTimeMonitor(warmup=3, baseline=10, recent=10, factor=3.0)
    _feed(m, [1.0] * 13)
    assert _feed(m, [2.9] * 30, t0=13) == [None] * 30  # 2.9x: below the factor
    m = StepTimeMonitor(warmup=3, baseline=10, recent=10, factor=3.0)
    _feed(m, [1.0] * 13)
    # 4 checkpoint-sized spikes among 10 steps leave the median at 1.0
    assert _feed(m, [1.0, 30.0, 1.0, 30.0, 1.0, 30.0, 1.0, 30.0, 1.0, 1.0] * 3, t0=13) == [None] * 30


def test_slowdown_message_names_the_numbers_the_cause_and_the_fix():
    msg = slowdown_message(11.0, 1.15, 3.4, 2, 2, 1, 0)
    assert "9.6x slower" in msg and "11.00 s/step" in msg and "1.15 s/step" in msg
    assert "load average is 3.4 on 2 usable cores" in msg and "1 process(es) x (1 + 0 workers) x 2 torch thread" in msg
    assert "oversubscribed" in msg and "train.num_threads" in msg and "OMP_NUM_THREADS" in msg
    assert "load average" not in slowdown_message(11.0, 1.15, None, 2, 2, 1, 0)


def test_usable_cores_and_local_processes_read_the_environment(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5})
    assert usable_cores() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert local_processes() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_processes() == 1


# ----------------------------------------------------------------------------- through the trainer


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(3, generator=g)}


class Probe(TrainModule):
    """Records the torch thread count inside each step; sleeps ``slow_s`` from step ``slow_from`` on."""

    def __init__(self, slow_from: int | None = None, slow_s: float = 0.0):
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.threads: list[int] = []
        self.slow_from, self.slow_s = slow_from, slow_s

    def forward(self, batch):
        self.threads.append(torch.get_num_threads())
        if self.slow_from is not None and len(self.threads) >= self.slow_from:
            time.sleep(self.slow_s)
        return {"loss": self.lin(batch["x"]).pow(2).mean()}


@dataclass
class Cfg:
    train: TrainConfig = section(TrainConfig)


def _cfg(**kw):
    cfg = Cfg()
    for k, v in {**dict(max_steps=3, batch_size=2, warmup_steps=0, ckpt_every=0, device="cpu"), **kw}.items():
        setattr(cfg.train, k, v)
    return cfg


def test_train_num_threads_is_applied_logged_and_restored(tmp_path, caplog, one_thread, monkeypatch):
    monkeypatch.setattr(trainer_mod, "load_average", lambda: 0.0)
    caplog.set_level(logging.INFO, logger="alice3d.train")
    cfg = _cfg(num_threads=2)
    model = Probe()
    Trainer(model, cfg.train, tmp_path, full_config=cfg).fit(Data())
    assert model.threads == [2, 2, 2] and torch.get_num_threads() == 1
    assert "torch threads per process: 2 (train.num_threads)" in caplog.text
    assert "load average" not in caplog.text


def test_automatic_threads_share_the_cores_and_a_busy_node_is_reported(tmp_path, caplog, monkeypatch):
    old = torch.get_num_threads()
    torch.set_num_threads(8)  # what torch would use on its own here
    try:
        monkeypatch.setattr(trainer_mod, "usable_cores", lambda: 8)
        monkeypatch.setattr(trainer_mod, "load_average", lambda: 7.5)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        caplog.set_level(logging.INFO, logger="alice3d.train")
        cfg = _cfg()  # num_threads=0: automatic
        model = Probe()
        Trainer(model, cfg.train, tmp_path, full_config=cfg).fit(Data())
        assert model.threads == [4, 4, 4]  # 8 cores / (2 processes x (1 + 0 workers))
    finally:
        torch.set_num_threads(old)
    assert "torch threads per process: 4 (automatic: 8 usable cores / (2 process(es)" in caplog.text
    busy = [r for r in caplog.records if r.levelno == logging.WARNING and "load average" in r.getMessage()]
    assert len(busy) == 1 and "7.5 on 8 usable cores" in busy[0].getMessage()
    assert "needs 8 of them" in busy[0].getMessage()  # 2 processes x 4 threads


def test_negative_num_threads_is_refused(tmp_path, one_thread):
    cfg = _cfg(num_threads=-1)
    with pytest.raises(ConfigError, match="train.num_threads"):
        Trainer(Probe(), cfg.train, tmp_path, full_config=cfg).fit(Data())


def test_a_step_time_jump_is_warned_once_during_training(tmp_path, caplog, one_thread, monkeypatch):
    monkeypatch.setattr(trainer_mod, "load_average", lambda: 0.0)
    monkeypatch.setattr(trainer_mod, "StepTimeMonitor",
                        lambda: StepTimeMonitor(warmup=1, baseline=3, recent=3, factor=3.0, interval_s=3600))
    caplog.set_level(logging.INFO, logger="alice3d.train")
    cfg = _cfg(max_steps=12, num_threads=1)
    Trainer(Probe(slow_from=6, slow_s=0.15), cfg.train, tmp_path, full_config=cfg).fit(Data())
    warned = [r.getMessage() for r in caplog.records if "slower" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "oversubscribed" in warned[0] and "train.num_threads" in warned[0]
