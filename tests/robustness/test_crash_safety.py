"""Crash safety of the three training commands: SIGKILL + --resume, SIGTERM, full disk."""

from __future__ import annotations

import errno
import random
import signal

import pytest
import torch
from faults import ALICE, COMMANDS, checkpoint_step, log_text, metrics, step_losses, wait_for_steps

# (max_steps, ckpt_every) per command: long enough that a kill lands mid-run, short enough for CI.
KILL_RUN = {"pretrain": (40, 3), "landmark": (30, 3), "finetune": (24, 3)}


def _params(default: set[str]):
    return [pytest.param(name, marks=() if name in default else pytest.mark.slow) for name in COMMANDS]


@pytest.mark.parametrize("name", _params({"pretrain"}))
def test_sigkill_then_resume_repeats_the_uninterrupted_run(name, cohort, tmp_path):
    """SIGKILL at a seeded random step after the first checkpoint; --resume ends with the same per-step losses."""
    max_steps, every = KILL_RUN[name]
    _kill_and_resume(COMMANDS[name], cohort, tmp_path, max_steps, every)


def test_alice_sigkill_then_resume_repeats_the_uninterrupted_run(cohort, tiny_landmark_model, tmp_path):
    """The same for Alice with landmark-matched pairs: pairs, masks, augmentations and the EMA
    target all continue exactly where the checkpoint left them."""
    _kill_and_resume(ALICE, cohort, tmp_path, 30, 3, f"landmark={tiny_landmark_model}", "pairs.min_score=-1")


def _kill_and_resume(cmd, cohort, tmp_path, max_steps: int, every: int, *more: str) -> None:
    extra = [f"train.max_steps={max_steps}", f"train.ckpt_every={every}", "train.eval_every=0", *more]
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    p_ref = cmd.popen(ref, cohort, *extra)
    p_victim = cmd.popen(victim, cohort, *extra)
    procs = [p_ref, p_victim]
    try:
        kill_after = random.Random(f"kill-{cmd.name}").randint(every + 1, max_steps - 10)
        wait_for_steps(victim, kill_after, p_victim)
        p_victim.send_signal(signal.SIGKILL)
        assert p_victim.wait(timeout=30) == -signal.SIGKILL  # really killed mid-run, not finished
        logged = step_losses(victim)[-1][0]
        saved = checkpoint_step(victim)  # loadable whatever moment the kill hit
        assert saved % every == 0 and every <= saved <= logged < max_steps
        # what a kill in the middle of a save leaves next to the intact last.pt
        (victim / "checkpoints" / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
        p_resume = cmd.popen(victim, cohort, *extra, "--resume", log=tmp_path / "resume.log")
        procs.append(p_resume)
        assert p_resume.wait(timeout=300) == 0, log_text(tmp_path / "resume.log")[-3000:]
        assert p_ref.wait(timeout=300) == 0, log_text(tmp_path / "ref.log")[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    expected = step_losses(ref)
    assert [s for s, _ in expected] == list(range(1, max_steps + 1))
    assert step_losses(victim) == expected  # bit-identical in deterministic CPU mode
    assert checkpoint_step(victim) == max_steps and (victim / cmd.artifact).is_file()
    assert sorted(p.name for p in (victim / "checkpoints").iterdir()) == ["last.pt"]  # stale temp file removed


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("name", _params({"pretrain", "finetune"}))
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(name, sig, cohort, tmp_path):
    """SIGTERM/SIGINT mid-run: checkpoint at the step reached, a message pointing to --resume, exit status 3."""
    cmd = COMMANDS[name]
    run = tmp_path / "run"
    proc = cmd.popen(run, cohort, "train.max_steps=100000", "train.ckpt_every=2", "train.eval_every=0")
    try:
        wait_for_steps(run, 3, proc)
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log_text(tmp_path / "run.log")
    assert f"received {sig.name}" in out and "--resume" in out and "Traceback" not in out
    reached = step_losses(run)[-1][0]
    assert checkpoint_step(run) == reached >= 3
    assert code == 3
    assert not (run / cmd.artifact).exists()  # an interrupted run leaves no final model behind


def _full_disk_on_save(monkeypatch, fail_at: int) -> list[int]:
    """Make the ``fail_at``-th torch.save raise ENOSPC, as a full disk does mid-write."""
    real = torch.save
    calls = [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == fail_at:
            f.write(b"partial bytes")  # the disk filled up part-way through the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    return calls


@pytest.mark.parametrize("name", list(COMMANDS))
def test_full_disk_keeps_the_previous_checkpoint_and_stops(name, cohort, tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the 2nd checkpoint: exit 2 naming the file and 'disk is full'; step-2 checkpoint intact."""
    cmd = COMMANDS[name]
    run = tmp_path / "run"
    calls = _full_disk_on_save(monkeypatch, fail_at=2)
    code = cmd.call(run, cohort, "train.max_steps=6", "train.ckpt_every=2", "train.eval_every=0")
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert calls[0] == 2
    assert code == 2, err[-3000:]
    assert "could not save" in err and "last.pt" in err and "disk is full" in err and "previous file is intact" in err
    assert "Traceback" not in err
    assert checkpoint_step(run) == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no temp file left
    assert max(r["step"] for r in metrics(run)) == 4  # it stopped at the failed save
    assert not (run / cmd.artifact).exists()


@pytest.mark.parametrize("name", list(COMMANDS))
def test_full_disk_while_logging_stops_with_a_message(name, cohort, tmp_path, monkeypatch, capsys):
    """ENOSPC appending to metrics.jsonl: exit 2 with 'disk is full' and the file; the checkpoint is intact."""
    from alice3d.train.trainer import Trainer

    real = Trainer.log_metrics
    calls = [0]

    def log_metrics(self, record):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.metrics_path))
        return real(self, record)

    monkeypatch.setattr(Trainer, "log_metrics", log_metrics)
    run = tmp_path / "run"
    code = COMMANDS[name].call(run, cohort, "train.max_steps=6", "train.ckpt_every=2", "train.eval_every=0")
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "disk is full" in err and str(run / "metrics.jsonl") in err and "--resume" in err
    assert "Traceback" not in err
    assert checkpoint_step(run) == 2


@pytest.mark.parametrize("name", list(COMMANDS))
def test_unreadable_checkpoint_is_refused_on_resume(name, cohort, tmp_path, capsys):
    """A last.pt damaged outside alice3d (copy cut short, bad sector): --resume stops with one clear line."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 not the rest of a checkpoint")
    (run / "config.yaml").write_text("{}\n")
    code = COMMANDS[name].call(run, cohort, "train.max_steps=2", "--resume")
    err = capsys.readouterr().err
    assert code == 2 and "last.pt" in err and "truncated or corrupt" in err and "Traceback" not in err, err[-2000:]
