"""The shared training loop on a toy regression problem (CPU, seconds)."""

import json
import os
import signal

import pytest
import torch
from torch import nn

from alice3d.config import TrainConfig, section
from alice3d.core.dist import cleanup_distributed
from alice3d.train.checkpoint import CheckpointError, atomic_save, load_checkpoint
from alice3d.train.module import TrainModule
from alice3d.train.trainer import Trainer, TrainingError

W_TRUE = torch.tensor([1.0, -2.0, 0.5])


class ToyData(torch.utils.data.Dataset):
    """Sample i is a fixed function of i: the contract the trainer relies on."""

    def __len__(self):
        return 10**9

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(3, generator=g)
        return {"x": x, "y": (x * W_TRUE).sum(0, keepdim=True)}


class Toy(TrainModule):
    def __init__(self, dropout=0.0, nan_at=(), stop_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 1)
        self.drop = nn.Dropout(dropout)
        self.calls = 0
        self.nan_at, self.stop_at = set(nan_at), stop_at

    def forward(self, batch):
        self.calls += 1
        pred = self.lin(self.drop(batch["x"]))
        loss = ((pred - batch["y"]) ** 2).mean()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        if self.stop_at == self.calls:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"loss": loss, "mae": (pred - batch["y"]).abs().mean().detach()}


from dataclasses import dataclass


@dataclass
class Cfg:
    train: TrainConfig = section(TrainConfig)


def make_cfg(**kw):
    cfg = Cfg()
    base = dict(max_steps=12, batch_size=4, lr=0.05, warmup_steps=0, ckpt_every=4, device="cpu", weight_decay=0.0, log_every=1)
    base.update(kw)
    for k, v in base.items():
        setattr(cfg.train, k, v)
    return cfg


def losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]


def test_loss_decreases_and_files_written(tmp_path):
    cfg = make_cfg(max_steps=60, lr=0.2)
    res = Trainer(Toy(), cfg.train, tmp_path, full_config=cfg).fit(ToyData())
    ls = losses(tmp_path)
    assert res.step == 60 and len(ls) == 60
    assert sum(ls[-5:]) < 0.05 * sum(ls[:5])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt", expect_kind="alice3d-checkpoint")
    assert ckpt["step"] == 60 and ckpt["config"]["train"]["max_steps"] == 60


def test_progress_is_logged_with_the_loss_when_not_a_terminal(tmp_path, caplog, monkeypatch):
    import re

    import alice3d.runtime

    monkeypatch.setattr(alice3d.runtime, "MIN_INTERVAL_S", 0.0)  # every 10 % (2 steps of 12), however fast
    caplog.set_level("INFO", logger="alice3d.train")
    cfg = make_cfg(max_steps=12)
    Trainer(Toy(), cfg.train, tmp_path, full_config=cfg).fit(ToyData())  # pytest's stderr is no TTY
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    pattern = r"train: (\d+)/12 \(\d+%\), [0-9.]+ (step/s|s/step), ETA \d+:\d\d:\d\d, loss=([0-9.]+)"
    matches = [re.fullmatch(pattern, l) for l in lines[:-1]]
    assert all(matches), lines
    ls = losses(tmp_path)
    assert [int(m.group(1)) for m in matches] == [2, 4, 6, 8, 10]
    assert [m.group(3) for m in matches] == [f"{ls[k - 1]:.4f}" for k in (2, 4, 6, 8, 10)]
    assert lines[-1].startswith("train: 12/12 done in ") and lines[-1].endswith(f"loss={ls[-1]:.4f}")


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = make_cfg()
    Trainer(Toy(dropout=0.3), cfg.train, full, full_config=cfg).fit(ToyData())
    # Interrupted (SIGTERM) during step 7 of the same config, then resumed.
    res = Trainer(Toy(dropout=0.3, stop_at=7), cfg.train, part, full_config=cfg).fit(ToyData())
    assert res.interrupted and res.step == 7
    Trainer(Toy(dropout=0.3), cfg.train, part, full_config=cfg).fit(ToyData(), resume=True)
    assert losses(part) == pytest.approx(losses(full), rel=1e-6, abs=1e-7)


def test_killed_run_metrics_are_trimmed_to_the_checkpoint(tmp_path):
    cfg = make_cfg(max_steps=6, ckpt_every=4)
    Trainer(Toy(), cfg.train, tmp_path, full_config=cfg).fit(ToyData())
    # Simulate a kill after step 6 whose checkpoint is the one at step 4.
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    ck["step"] = 4
    atomic_save(ck, tmp_path / "checkpoints" / "last.pt")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line cut mid-write
    t = Trainer(Toy(), cfg.train, tmp_path, full_config=cfg)
    t.fit(ToyData(), resume=True)
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_refuses_to_overwrite_or_resume_with_other_config(tmp_path):
    cfg = make_cfg(max_steps=4)
    Trainer(Toy(), cfg.train, tmp_path, full_config=cfg).fit(ToyData())
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(Toy(), cfg.train, tmp_path, full_config=cfg).fit(ToyData())
    other = make_cfg(max_steps=8, lr=0.5)
    with pytest.raises(TrainingError, match="train.lr"):
        Trainer(Toy(), other.train, tmp_path, full_config=other).fit(ToyData(), resume=True)
    longer = make_cfg(max_steps=8)  # only max_steps changed: allowed
    assert Trainer(Toy(), longer.train, tmp_path, full_config=longer).fit(ToyData(), resume=True).step == 8


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    a, b = make_cfg(max_steps=3, batch_size=4), make_cfg(max_steps=3, batch_size=2, grad_accum=2)
    ma, mb = Toy(), Toy()
    Trainer(ma, a.train, tmp_path / "a", full_config=a).fit(ToyData())
    Trainer(mb, b.train, tmp_path / "b", full_config=b).fit(ToyData())
    assert torch.allclose(ma.lin.weight, mb.lin.weight, atol=1e-6)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path):
    cfg = make_cfg(max_steps=6)
    model = Toy(nan_at={2, 3})
    res = Trainer(model, cfg.train, tmp_path / "skip", full_config=cfg).fit(ToyData())
    assert res.skipped_steps == 2 and res.step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rec = [json.loads(l) for l in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert rec[-1]["skipped_steps"] == 2
    cfg = make_cfg(max_steps=20, max_bad_steps=3, ckpt_every=2)
    with pytest.raises(TrainingError, match="3 consecutive"):
        Trainer(Toy(nan_at=set(range(5, 30))), cfg.train, tmp_path / "stop", full_config=cfg).fit(ToyData())
    # The last good checkpoint (step 4) survives.
    assert load_checkpoint(tmp_path / "stop" / "checkpoints" / "last.pt")["step"] == 4


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cfg = make_cfg(max_steps=50, ckpt_every=100)
    res = Trainer(Toy(stop_at=3), cfg.train, tmp_path, full_config=cfg).fit(ToyData())
    assert res.interrupted and res.signal_name == "SIGTERM" and res.step == 3
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 3


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.pt"
    atomic_save({"a": torch.ones(2)}, p)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="disk is full.*previous file is intact"):
        atomic_save({"a": torch.zeros(2)}, p)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(p)["a"], torch.ones(2))
    assert [f.name for f in tmp_path.iterdir()] == ["x.pt"]


def test_malicious_pickle_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(p)
    atomic_save({"metadata": {"kind": "alice3d-landmark"}}, tmp_path / "lm.pt")
    with pytest.raises(CheckpointError, match="alice3d-encoder"):
        load_checkpoint(tmp_path / "lm.pt", expect_kind="alice3d-encoder")



def _ddp_worker(rank, world, port, run, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = make_cfg(max_steps=5, batch_size=2)
    model = Toy()
    Trainer(model, cfg.train, run, full_config=cfg).fit(ToyData())
    if rank == 0:
        torch.save(model.lin.weight.detach().clone(), out)
    cleanup_distributed()  # all ranks leave together; see its docstring


def test_two_process_gloo_matches_single_process(tmp_path, free_port):
    single = make_cfg(max_steps=5, batch_size=4)
    model = Toy()
    Trainer(model, single.train, tmp_path / "single", full_config=single).fit(ToyData())
    out = tmp_path / "w.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, free_port, tmp_path / "ddp", out), nprocs=2)
    assert torch.allclose(torch.load(out, weights_only=True), model.lin.weight, atol=1e-5)
    assert losses(tmp_path / "ddp")  # rank 0 logged


def test_trainer_only_takes_train_modules(tmp_path):
    """The trainer calls the TrainModule hooks directly; a bare nn.Module is refused up front."""
    cfg = make_cfg()
    with pytest.raises(TypeError, match="TrainModule"):
        Trainer(nn.Linear(3, 1), cfg.train, tmp_path, full_config=cfg)


class AutocastProbe(Toy):
    """Records, at every forward, whether CPU autocast is on and the dtype a Linear computes in."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, batch):
        self.seen.append((torch.is_autocast_enabled("cpu"), self.lin(batch["x"]).dtype))
        return super().forward(batch)


@pytest.mark.parametrize("cpu_amp, expected", [(False, (False, torch.float32)), (True, (True, torch.bfloat16))])
def test_cpu_amp_runs_the_forward_under_bf16_autocast_only_when_asked(tmp_path, cpu_amp, expected):
    cfg = make_cfg(max_steps=3, cpu_amp=cpu_amp)
    model = AutocastProbe()
    Trainer(model, cfg.train, tmp_path, full_config=cfg).fit(ToyData())
    assert model.seen and set(model.seen) == {expected}
    assert model.lin.weight.dtype == torch.float32  # autocast leaves the weights (and the optimizer) in fp32
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))
