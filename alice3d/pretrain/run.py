"""`pretrain(cfg, out)`: build the method and its dataset from the registry, train, export the encoder.

    method  = METHODS[cfg.method].method(cfg.<method>)
    dataset = "images" -> data.builders.image_dataset | "pairs" -> landmark.pairs.pair_dataset
    Trainer(method).fit(dataset) -> RUN/checkpoints, RUN/metrics.jsonl, RUN/previews
    method.encoder_state() -> RUN/encoder.pt (loads strict into the MONAI network of its family)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from alice3d.data.builders import image_dataset
from alice3d.data.report import DataReport
from alice3d.encoders.files import encoder_file_metadata, save_encoder
from alice3d.methods import METHODS
from alice3d.pretrain.config import PretrainConfig
from alice3d.train.trainer import Trainer, TrainResult
from landmark.pairs import pair_dataset

log = logging.getLogger("alice3d.pretrain")

__all__ = ["PretrainSummary", "build_dataset", "pretrain"]


@dataclass
class PretrainSummary:
    result: TrainResult
    report: DataReport
    encoder: Path | None = None  # written on the main process of a finished run


def build_dataset(cfg: PretrainConfig) -> tuple[Dataset, DataReport]:
    """The chosen method's dataset (by its registered kind) and what it left out."""
    kind = METHODS[cfg.method].dataset
    mcfg = cfg.method_config()
    if kind == "pairs":
        # DataLoader workers are forked processes, where CUDA cannot be used: the matcher then runs on CPU.
        device = "cpu" if cfg.train.num_workers > 0 else cfg.train.device
        return pair_dataset(cfg.data, cfg.pairs, mcfg.img_size, landmark=cfg.landmark, device=device,
                            seed=cfg.train.seed)
    return image_dataset(cfg.data, cfg.slices, mcfg.img_size, in_channels=mcfg.in_channels, seed=cfg.train.seed)


def pretrain(cfg: PretrainConfig, out: Path, resume: bool = False) -> PretrainSummary:
    mcfg = cfg.method_config()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = METHODS[cfg.method].method(mcfg)
    dataset, report = build_dataset(cfg)
    trainer = Trainer(model, cfg.train, out, full_config=cfg)
    result = trainer.fit(dataset, resume=resume)
    summary = PretrainSummary(result, report)
    if result.interrupted or not trainer.dist.is_main:
        return summary
    state, meta = model.encoder_state()
    file_meta = encoder_file_metadata(meta, crop_size=list(mcfg.img_size), spacing=list(cfg.data.spacing),
                                      hu_window=list(cfg.data.hu_window), steps=result.step)
    summary.encoder = save_encoder(out / "encoder.pt", state, file_meta)
    log.info("encoder weights: %s", summary.encoder)
    return summary
