"""`alice3d-data preprocess` killed and resumed, `alice3d-landmark embed --data STORE`, and
`alice3d-pretrain --data STORE` (Alice, reference pairs) on the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alice3d.cli.data import main as data_main
from alice3d.config import load_config
from alice3d.data.phantom import generate_cohort
from alice3d.data.store import open_store
from landmark.config import LandmarkConfig
from landmark.model import build_model
from landmark.train import save_landmark_model

ROOT = Path(__file__).resolve().parents[2]
ALICE_TINY = [
    "method=alice", "alice.encoder=vit_tiny", "alice.img_size=[32,32,16]", "alice.patch_size=8",
    "alice.encoder_kwargs={num_layers: 1, hidden_size: 48, mlp_dim: 96, num_heads: 4}", "alice.decoder_dim=24",
    "alice.decoder_depth=1", "alice.decoder_heads=2", "alice.head_out_dim=32", "alice.head_hidden_dim=32",
    "alice.head_bottleneck_dim=16", "data.spacing=[8,8,8]", "train.batch_size=2", "train.warmup_steps=1",
    "train.device=cpu", "train.max_steps=2", "train.ckpt_every=0",
]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


@pytest.mark.slow
def test_killed_preprocess_resumes_to_the_uninterrupted_store(tmp_path):
    """A real SIGKILL (tests/unit/test_store.py interrupts in-process, in the default run)."""
    cohort = generate_cohort(tmp_path / "cohort", n=10, seed=0, size="tiny", shape=(96, 96, 64),
                             spacing=(4.0, 4.0, 4.0))
    args = ["--data", str(cohort / "dataset_0.json"), "--key", "training", "--key", "validation",
            "--spacing", "2,2,2", "--workers", "1"]
    assert data_main(["preprocess", *args, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "alice3d.cli.data", "preprocess", *args, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("cases/*/meta.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("cases/*/meta.json")))
    assert 0 < done < 10 and not (out / "manifest.json").exists()
    assert data_main(["preprocess", *args, "--out", str(out)]) == 0
    assert _tree(out) == _tree(tmp_path / "whole")


def test_pretrain_reads_a_preprocessed_store(tmp_path, capsys):
    cohort = generate_cohort(tmp_path / "cohort", n=4, seed=0, size="tiny", shape=(32, 32, 24),
                             spacing=(8.0, 8.0, 8.0))
    store = tmp_path / "store"
    assert data_main(["preprocess", "--data", str(cohort), "--out", str(store), "--spacing", "8,8,8"]) == 0
    assert "store complete: 3 cases, 0 bad" in capsys.readouterr().out  # a folder's datalist: its training list
    cfg = load_config(LandmarkConfig, None, ["data.spacing=[8,8,8]", "model.stem_width=4", "model.widths=[8,8,8,8]",
                                             "model.fpn_dim=8", "model.embed_dim=16"])
    torch.manual_seed(0)
    model = save_landmark_model(build_model(cfg.model), cfg, tmp_path / "landmark.pt")

    from alice3d.cli.landmark import main as landmark_main

    with pytest.raises(SystemExit) as done:
        landmark_main(["embed", "--model", str(model), "--data", str(store)])
    assert done.value.code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["embedded"] == summary["fitted"] == 3 and summary["embedding_mb_per_case"] > 0
    fits = sorted(store.glob("cases/*/landmark/*.fit.json"))
    stamps = [p.stat().st_mtime_ns for p in fits]

    from alice3d.cli.pretrain import main as pretrain_main

    env = {"ALICE3D_CACHE": str(tmp_path / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(SystemExit) as done:
            pretrain_main(["--data", str(store), "--out", str(tmp_path / "run"), *ALICE_TINY, f"landmark={model}"])
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert done.value.code == 0
    assert (tmp_path / "run" / "encoder.pt").is_file()
    assert [p.stat().st_mtime_ns for p in fits] == stamps  # the fits were read, not redone
    assert not (tmp_path / "cache" / "stores").exists()  # a STORE is used as it is
    assert len(open_store(store).cases) == 3
