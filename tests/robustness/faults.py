"""Helpers of the fault-injection suite (issue [R]); the fixtures live in conftest.py.

Every test drives one of the three training commands through its real CLI, either in
this process (``Command.call``: fast, allows monkeypatching) or as a subprocess
(``Command.popen``: needed for SIGKILL/SIGTERM and for two-process runs), always on a
tiny phantom cohort with tiny models, ``train.deterministic=true`` and one thread.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

# Sizes chosen so one training step takes tens of milliseconds on one CPU thread.
PRETRAIN_TINY = [
    "method=mae", "mae.img_size=[32,32,16]", "mae.patch_size=8", "mae.decoder_dim=48", "mae.decoder_depth=1",
    "mae.decoder_heads=4", "mae.encoder_kwargs={num_layers: 1, hidden_size: 48, mlp_dim: 96, num_heads: 4}",
    "data.spacing=[8,8,8]", "train.batch_size=2", "train.warmup_steps=1",
]
LANDMARK_TINY = [
    "data.spacing=[8,8,8]", "crop.size=[32,32,16]", "model.stem_width=4", "model.widths=[8,8,8,8]",
    "model.fpn_dim=8", "model.embed_dim=16", "train.batch_size=2", "loss.anchors=32", "loss.hard_pool=64",
    "loss.negatives=16", "loss.random_negatives=16", "loss.coarse_negatives=16", "train.warmup_steps=1",
]
FINETUNE_TINY = [
    "task.spacing=[12,12,12]", "task.roi=[32,32,16]", "model.hidden_size=48", "model.mlp_dim=96",
    "model.num_heads=4", "model.feature_size=12", "train.batch_size=1", "eval.n_previews=0",
    "eval.sw_overlap=0.25", "train.warmup_steps=1",
]
COMMON = ["train.device=cpu", "train.deterministic=true", "train.num_workers=0", "train.log_every=1"]


def _main(module: str) -> Callable[[list[str]], None]:
    import importlib

    return importlib.import_module(module).main


@dataclass(frozen=True)
class Command:
    """One training command: how to call it on a run folder and a datalist/cohort."""

    name: str
    module: str
    prefix: tuple[str, ...]  # arguments before --out
    data_flag: str
    tiny: tuple[str, ...]
    config_type: str  # the config class whose runs it writes
    artifact: str  # the file a finished run leaves in RUN/
    env: dict = field(default_factory=dict)

    def argv(self, out: Path, data: Path | str, *extra: str) -> list[str]:
        return [*self.prefix, "--out", str(out), self.data_flag, str(data), *self.tiny, *COMMON, *extra]

    def call(self, out: Path, data: Path | str, *extra: str) -> int:
        """Run the command in this process; returns its exit status (output goes to capsys)."""
        try:
            _main(self.module)(self.argv(out, data, *extra))
        except SystemExit as e:
            code = e.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        return 0

    def popen(self, out: Path, data: Path | str, *extra: str, env: dict | None = None,
              log: Path | None = None) -> subprocess.Popen:
        """Start the command as a subprocess (one thread); stdout+stderr go to ``log``."""
        log = log or out.parent / f"{out.name}.log"
        penv = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        with open(log, "w") as fh:
            return subprocess.Popen([sys.executable, "-m", self.module, *self.argv(out, data, *extra)],
                                    stdout=fh, stderr=subprocess.STDOUT, env=penv)


PRETRAIN = Command("pretrain", "alice3d.cli.pretrain", (), "--data", tuple(PRETRAIN_TINY), "PretrainConfig",
                   "encoder.pt")
LANDMARK = Command("landmark", "alice3d.cli.landmark", ("train",), "--data", tuple(LANDMARK_TINY), "LandmarkConfig",
                   "landmark.pt")
FINETUNE = Command("finetune", "alice3d.cli.finetune", ("--task", "btcv"), "--data-root", tuple(FINETUNE_TINY),
                   "FinetuneConfig", "results.json")
COMMANDS = {c.name: c for c in (PRETRAIN, LANDMARK, FINETUNE)}
# Alice itself (landmark-matched pairs, EMA target, CASA); pass landmark=PATH when calling it.
ALICE_TINY = [
    "method=alice", "alice.encoder=vit_tiny", "alice.img_size=[32,32,16]", "alice.patch_size=8",
    "alice.encoder_kwargs={num_layers: 1, hidden_size: 48, mlp_dim: 96, num_heads: 4}", "alice.decoder_dim=24",
    "alice.decoder_depth=1", "alice.decoder_heads=2", "alice.head_out_dim=32", "alice.head_hidden_dim=32",
    "alice.head_bottleneck_dim=16", "data.spacing=[8,8,8]", "train.batch_size=2", "train.warmup_steps=1",
]
ALICE = Command("alice", "alice3d.cli.pretrain", (), "--data", tuple(ALICE_TINY), "PretrainConfig", "encoder.pt")


# ----------------------------------------------------------------------------- data


def cohort_entries(cohort: Path) -> dict[str, list[dict]]:
    """The cohort's datalist with absolute paths."""
    doc = json.loads((cohort / "dataset_0.json").read_text())
    return {k: [{kk: str(cohort / vv) for kk, vv in e.items()} for e in doc[k]] for k in ("training", "validation")}


def write_datalist(path: Path, training: Sequence[dict], validation: Sequence[dict]) -> Path:
    path.write_text(json.dumps({"training": list(training), "validation": list(validation)}, indent=1))
    return path


# ----------------------------------------------------------------------------- run folders


def metrics(run: Path) -> list[dict]:
    """Complete lines of RUN/metrics.jsonl (a line cut by a kill is ignored)."""
    p = run / "metrics.jsonl"
    out = []
    if p.exists():
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def step_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]


def wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 180.0) -> int:
    """Block until ``n`` training steps are logged; returns the last logged step."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        logged = step_losses(run)
        if len(logged) >= n:
            return logged[-1][0]
        if proc.poll() is not None:
            raise AssertionError(f"{run} exited ({proc.returncode}) after {len(logged)} steps, before step {n}")
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"{run}: step {n} not reached within {timeout} s")


def checkpoint_step(run: Path) -> int:
    """Step of RUN/checkpoints/last.pt, read the safe way (fails the test if it is unreadable)."""
    from alice3d.train.checkpoint import load_checkpoint

    return int(load_checkpoint(run / "checkpoints" / "last.pt", expect_kind="alice3d-checkpoint")["step"])


def log_text(proc_log: Path) -> str:
    return proc_log.read_text(encoding="utf-8", errors="replace") if proc_log.exists() else ""


# ----------------------------------------------------------------------------- model files


class _Payload:
    """Unpickling this object opens (creates) ``marker``: stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious(path: Path, marker: Path, kind: str | None = None) -> Path:
    """A torch file that looks like an alice3d file (metadata kind) but carries a code payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"metadata": {"kind": kind}, "state_dict": {"weight": _Payload(marker)},
                "model": {"weight": _Payload(marker)}, "step": 1}, path)
    return path


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest
