"""Self-supervised training of the landmark model with the shared alice3d trainer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from alice3d.config import save_config, to_dict
from alice3d.data.loading import load_run_volumes
from alice3d.data.sources import source_names
from alice3d.runtime import progress
from alice3d.train.checkpoint import atomic_save
from alice3d.train.module import TrainModule
from alice3d.train.trainer import Trainer
from landmark.config import LandmarkConfig
from landmark.loss import landmark_loss
from landmark.model import LandmarkNet, build_model
from landmark.sampling import HUArray, HUTrainVolume, TrainVolume, ViewPairDataset, make_hu_train_volume

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


def train_landmark(cfg: LandmarkConfig, volumes: Sequence[TrainVolume | HUTrainVolume], run_dir: str | Path,
                   resume: bool = False) -> Path | None:
    """Train on ``volumes`` (:func:`load_train_volumes`); writes RUN/config.yaml, RUN/metrics.jsonl, RUN/landmark.pt.

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


def load_train_volumes(cfg: LandmarkConfig, bad: list | None = None) -> list[HUTrainVolume]:
    """The run's volumes as HU sources that training views are cut from, view by view.

    ``data.store`` decides as in pretraining (:func:`alice3d.data.loading.load_run_volumes`): a
    volume store (given as ``data.data``, or built once under ``$ALICE3D_CACHE/stores`` from the
    phantom cohort or raw data of at least ``data.store_min_volumes`` volumes) is read chunk by
    chunk, so memory does not grow with the cohort; smaller raw data is held in memory as int16 HU.
    Only the seed points (``(K, 3)`` int32, at most 20,000 per volume) are kept per volume; the
    input windows are computed per view. Volumes smaller than the training crop are bad data like
    unreadable ones (quarantined or fatal per ``data.on_bad_data``); ``bad``, when given, receives
    their ``(path, reason)``.
    """
    vset = load_run_volumes(cfg.data, min_shape=cfg.crop.size, min_volumes=1)
    log.info("%s", vset.summary())
    if bad is not None:
        bad.extend(vset.bad)
    lo, hi = (float(w) for w in cfg.data.hu_window)
    windows = [(lo, hi), *[tuple(w) for w in cfg.model.extra_windows]]
    out = []
    volumes = vset.volumes
    names = source_names(volumes)
    for i in progress(range(len(volumes)), desc="training volumes", unit="volume", logger=log,
                      enabled=vset.store is not None):
        v = volumes[i]
        if vset.store is not None:
            source = v
        else:
            # in memory, windowed to [0, 1] in data.hu_window: back to HU, where the extra windows lie
            source = HUArray(np.rint(v.array.astype(np.float32) * (hi - lo) + lo))
            volumes[i] = None  # the float32 copy goes as soon as its int16 one exists
        out.append(make_hu_train_volume(source, v.affine, windows, cfg.crop.body_threshold,
                                        name=names[i], seed=i))
    where = (f"views read from the volume store {vset.store.root}" if vset.store is not None
             else "volumes held in memory as int16 HU")
    log.info("landmark training on %d volumes: %s", len(out), where)
    return out
