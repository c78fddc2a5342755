"""Fixtures of the fault-injection suite (issue [R]): a tiny phantom cohort, a tiny landmark
model and a finished tiny pretraining run. Helpers (commands, run-folder readers) are in faults.py.

Run the default part with ``pytest tests/robustness`` and the slow part with
``pytest -m slow tests/robustness``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from faults import LANDMARK_TINY, PRETRAIN


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """In-process runs use one thread like the subprocess runs (OMP_NUM_THREADS=1): on a shared
    2-core machine, more threads make each tiny step orders of magnitude slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """4 tiny phantoms (32 x 32 x 24 voxels of 8 mm; 3 training, 1 validation) in the BTCV layout."""
    from alice3d.data.phantom import generate_cohort

    return generate_cohort(tmp_path_factory.mktemp("cohort"), n=4, seed=0, size="tiny", shape=(32, 32, 24),
                           spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="session")
def tiny_landmark_model(tmp_path_factory) -> Path:
    """An untrained but complete landmark.pt of the tiny landmark size."""
    from alice3d.config import load_config
    from landmark.config import LandmarkConfig
    from landmark.model import build_model
    from landmark.train import save_landmark_model

    cfg = load_config(LandmarkConfig, None, LANDMARK_TINY)
    torch.manual_seed(0)
    return save_landmark_model(build_model(cfg.model), cfg, tmp_path_factory.mktemp("lm") / "landmark.pt")


@pytest.fixture(scope="session")
def pretrain_run(cohort, tmp_path_factory) -> Path:
    """A finished 2-step pretraining run (checkpoints/last.pt and encoder.pt)."""
    out = tmp_path_factory.mktemp("pre") / "run"
    code = PRETRAIN.call(out, cohort, "train.max_steps=2", "train.ckpt_every=1")
    assert code == 0
    return out


