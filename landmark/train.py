"""Self-supervised training of the landmark model with the shared alice3d trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alice3d.config import save_config, to_dict
from alice3d.data.volumes import load_volume_set, resolve_image_paths
from alice3d.train.checkpoint import atomic_save
from alice3d.train.module import TrainModule
from alice3d.train.trainer import Trainer
from landmark.config import LandmarkConfig
from landmark.loss import landmark_loss
from landmark.match import window_channels
from landmark.model import LandmarkNet, build_model
from landmark.sampling import TrainVolume, ViewPairDataset, make_train_volume

log = logging.getLogger("alice3d.landmark")

MODEL_KIND = "alice3d-landmark"


class LandmarkModule(TrainModule):
    """Trainer-facing method: ``forward(batch) -> {"loss", "loss_fine", "loss_coarse", ...}``."""

    def __init__(self, cfg: LandmarkConfig):
        super().__init__()
        self.cfg = cfg
        self.net: LandmarkNet = build_model(cfg.model)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        v1, v2 = batch["view1"], batch["view2"]
        fine, coarse = self.net(torch.cat([v1, v2]).float())
        b = v1.shape[0]
        seed = int(batch["seed"]) if "seed" in batch else 0
        return landmark_loss(fine[:b].float(), coarse[:b].float(), batch["affine1"],
                             fine[b:].float(), coarse[b:].float(), batch["affine2"], self.cfg.loss, seed)

    def metadata(self) -> dict:
        return model_metadata(self.cfg)


def model_metadata(cfg: LandmarkConfig) -> dict:
    """What a matcher needs to rebuild and feed the network (stored in landmark.pt)."""
    return {
        "kind": MODEL_KIND,
        "format": 1,
        "model": to_dict(cfg.model),
        "spacing": list(cfg.data.spacing),
        "hu_window": list(cfg.data.hu_window),
        "match": to_dict(cfg.match),
    }


def save_landmark_model(net: LandmarkNet, cfg: LandmarkConfig, path: str | Path) -> Path:
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return atomic_save({"state_dict": state, "metadata": model_metadata(cfg)}, path)


def train_landmark(cfg: LandmarkConfig, volumes: Sequence[TrainVolume], run_dir: str | Path,
                   resume: bool = False) -> Path | None:
    """Train on in-memory volumes; writes RUN/config.yaml, RUN/metrics.jsonl, RUN/landmark.pt.

    Returns the path of landmark.pt, or None when a signal interrupted the run: its checkpoint is
    saved for ``--resume`` and no model is written from the partial weights.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    module = LandmarkModule(cfg)
    dataset = ViewPairDataset(volumes, cfg.crop, cfg.train.batch_size, seed=cfg.train.seed,
                              fine_stride=cfg.model.fine_stride)
    trainer = Trainer(module, cfg.train, run_dir, full_config=cfg)
    result = trainer.fit(dataset, resume=resume)
    if result.interrupted:
        log.warning("training interrupted by %s at step %d; continue with the same command plus --resume",
                    result.signal_name, result.step)
        return None
    out = save_landmark_model(module.net, cfg, run_dir / "landmark.pt")
    log.info("landmark model written: %s (step %d)", out, result.step)
    return out


def load_train_volumes(cfg: LandmarkConfig, bad: list | None = None) -> list[TrainVolume]:
    """Read every volume once (RAS, model spacing, input windows) and keep it in memory.

    Volumes smaller than the training crop are bad data like unreadable ones (quarantined or
    fatal per ``data.on_bad_data``); ``bad``, when given, receives their ``(path, reason)``.
    """
    paths = resolve_image_paths(cfg.data.data, cfg.data.phantom_n, cfg.data.phantom_seed)
    vset = load_volume_set(paths, cfg.data.spacing, cfg.data.hu_window, cfg.data.on_bad_data,
                           min_shape=cfg.crop.size, min_volumes=1)
    log.info("%s", vset.summary())
    if bad is not None:
        bad.extend(vset.bad)
    lo, hi = cfg.data.hu_window
    out = []
    for i, v in enumerate(vset.volumes):
        # Extra windows lie inside the primary one, so HU is recovered exactly where they need it.
        hu = v.array.astype(np.float32) * (hi - lo) + lo
        image = window_channels(hu, cfg.data.hu_window, cfg.model.extra_windows)
        out.append(make_train_volume(image, v.affine, cfg.crop.body_threshold, name=Path(v.path).name, seed=i))
    return out
