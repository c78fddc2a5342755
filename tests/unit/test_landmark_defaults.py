"""The shipped default landmark model: what it is, when it is used, when it is not."""

import pytest
import torch

from alice3d.config import to_dict
from alice3d.data.phantom import PHANTOM_VERSION
from alice3d.train.checkpoint import atomic_save
from landmark import defaults
from landmark.config import LandmarkConfig
from landmark.match import load_landmark_model
from landmark.model import build_model


def test_shipped_model_is_what_the_default_training_writes_today():
    """If the default config or the phantoms change, this fails until the file is re-shipped
    (bumping DEFAULT_VERSION alone makes everyone train it instead, and fails here too: a shipped
    file that is never used is dead weight)."""
    net, meta = load_landmark_model(defaults.SHIPPED)
    cfg = LandmarkConfig()
    info = meta["shipped_default"]
    assert (info["default_version"], info["phantom_version"]) == (defaults.DEFAULT_VERSION, PHANTOM_VERSION)
    assert (info["phantom_n"], info["phantom_seed"]) == (cfg.data.phantom_n, cfg.data.phantom_seed)
    assert defaults.shipped_model(cfg.data.phantom_n, cfg.data.phantom_seed) == defaults.SHIPPED
    assert meta["model"] == to_dict(cfg.model)
    assert meta["spacing"] == list(cfg.data.spacing) and meta["hu_window"] == list(cfg.data.hu_window)
    # the default model config builds exactly the shipped network
    fresh = build_model(cfg.model)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}


def test_default_cohort_uses_the_shipped_model_without_training(monkeypatch):
    monkeypatch.setattr("landmark.train.train_landmark", lambda *a, **k: pytest.fail("trained instead of shipped"))
    assert defaults.default_landmark_model(16, 0) == defaults.SHIPPED


def test_other_cohorts_or_versions_do_not_use_it(tmp_path, monkeypatch):
    assert defaults.shipped_model(8, 0) is None and defaults.shipped_model(16, 1) is None
    stale = torch.load(defaults.SHIPPED, weights_only=True)
    stale["metadata"]["shipped_default"]["phantom_version"] = PHANTOM_VERSION - 1
    atomic_save(stale, tmp_path / "stale.pt")
    monkeypatch.setattr(defaults, "SHIPPED", tmp_path / "stale.pt")
    assert defaults.shipped_model(16, 0) is None
    monkeypatch.setattr(defaults, "SHIPPED", tmp_path / "absent.pt")
    assert defaults.shipped_model(16, 0) is None
