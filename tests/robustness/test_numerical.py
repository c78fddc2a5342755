"""Numerical safety: non-finite losses/gradients are skipped and counted; too many in a row stop the run."""

from __future__ import annotations

import math

import pytest
import torch
from faults import COMMANDS, checkpoint_step, metrics


def _method_class(name: str) -> type:
    """The module whose forward the trainer calls for each command (tiny configs)."""
    if name == "pretrain":
        from alice3d.methods.mae import MAE

        return MAE
    if name == "landmark":
        from landmark.train import LandmarkModule

        return LandmarkModule
    from alice3d.finetune.objectives import SegmentationTask

    return SegmentationTask


def poison(monkeypatch, cls: type, bad: dict[int, str]) -> None:
    """Training call ``k`` (1-based) returns a NaN loss (``bad[k] == "loss"``) or a finite loss
    whose gradient is NaN (``"grad"``: d sqrt(x)/dx at 0 is inf, times 0 is NaN)."""
    real = cls.forward
    calls = [0]

    def forward(self, batch):
        out = dict(real(self, batch))
        if self.training:
            calls[0] += 1
            kind = bad.get(calls[0])
            if kind == "loss":
                out["loss"] = out["loss"] * float("nan")
            elif kind == "grad":
                p = next(q for q in self.parameters() if q.requires_grad)
                out["loss"] = out["loss"] + torch.sqrt(p.sum() * 0.0)
        return out

    monkeypatch.setattr(cls, "forward", forward)


def _final_weights(run, name):
    from alice3d.train.checkpoint import load_checkpoint

    if name == "finetune":
        return load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    return load_checkpoint(run / COMMANDS[name].artifact)["state_dict"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_non_finite_steps_are_skipped_and_counted(name, cohort, tmp_path, monkeypatch, capsys):
    cmd = COMMANDS[name]
    poison(monkeypatch, _method_class(name), {3: "loss", 4: "grad"})
    code = cmd.call(tmp_path / "run", cohort, "train.max_steps=6", "train.ckpt_every=2", "train.eval_every=0")
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    rec = {r["step"]: r for r in metrics(tmp_path / "run") if "loss" in r}
    assert [rec[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 2, 2, 2]
    assert math.isnan(rec[3]["loss"]) and math.isfinite(rec[4]["loss"]) and math.isnan(rec[4]["grad_norm"])
    assert all(math.isfinite(rec[s]["loss"]) for s in (1, 2, 5, 6))
    # the warning names the step as metrics.jsonl and checkpoints count it
    assert "step 3: non-finite loss or gradient" in err and "step 4: non-finite loss or gradient" in err
    assert all(torch.isfinite(v).all() for v in _final_weights(tmp_path / "run", name).values()
               if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("name", list(COMMANDS))
def test_too_many_bad_steps_stop_the_run_keeping_the_last_good_checkpoint(name, cohort, tmp_path, monkeypatch,
                                                                           capsys):
    cmd = COMMANDS[name]
    poison(monkeypatch, _method_class(name), {k: "loss" for k in range(5, 100)})
    run = tmp_path / "run"
    code = cmd.call(run, cohort, "train.max_steps=20", "train.ckpt_every=2", "train.max_bad_steps=3",
                    "train.eval_every=0")
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "3 consecutive steps with a non-finite loss or gradient (last at step 7)" in err
    assert "last good checkpoint is intact" in err and str(run / "checkpoints" / "last.pt") in err
    assert "Traceback" not in err
    assert checkpoint_step(run) == 4  # step 6 was bad, so no checkpoint was written then
    assert max(r["step"] for r in metrics(run)) == 6  # the step that stopped the run is not logged
    assert not (run / cmd.artifact).exists()
