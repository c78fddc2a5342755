"""`pretrain(cfg, out)`: prepare the data, build the method and its dataset from the registry, train,
export the encoder.

    join the process group (torchrun)     before anything is prepared, so the preparation can shard
    prepare_data(cfg)                     "pairs": landmark.prepare.prepare_pairs (embeddings, reference
                                          fits; sharded, then a barrier) | "images": nothing
    method  = METHODS[cfg.method].method(cfg.<method>)
    dataset = "images" -> data.builders.image_dataset | "pairs" -> landmark.pairs.pair_dataset (reads)
    Trainer(method).fit(dataset) -> RUN/checkpoints, RUN/metrics.jsonl, RUN/previews
    method.encoder_state() -> RUN/encoder.pt (loads strict into the MONAI network of its family)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from alice3d.core.dist import comm_failure_message, init_distributed, is_comm_failure, rank, resolve_device
from alice3d.data.builders import image_dataset
from alice3d.data.report import DataReport
from alice3d.encoders.files import encoder_file_metadata, save_encoder
from alice3d.errors import PeerFailure
from alice3d.methods import METHODS
from alice3d.pretrain.config import PretrainConfig
from alice3d.train.trainer import Trainer, TrainResult
from landmark.pairs import pair_dataset
from landmark.prepare import PairPreparation, prepare_pairs

log = logging.getLogger("alice3d.pretrain")

__all__ = ["PretrainSummary", "build_dataset", "prepare_data", "pretrain"]


@dataclass
class PretrainSummary:
    result: TrainResult
    report: DataReport
    encoder: Path | None = None  # written on the main process of a finished run


def _pair_device(cfg: PretrainConfig) -> str:
    # DataLoader workers are forked processes, where CUDA cannot be used: the matcher then runs on CPU.
    return "cpu" if cfg.train.num_workers > 0 else cfg.train.device


def join_process_group(cfg: PretrainConfig) -> None:
    """Join torchrun's process group now (the trainer finds it joined), so that the preparation
    can shard its work and wait at a barrier; nothing when not distributed."""
    try:
        init_distributed(resolve_device(cfg.train.device), cfg.train.dist_timeout_s)
    except (RuntimeError, ValueError) as e:
        if not is_comm_failure(e):
            raise
        raise PeerFailure(comm_failure_message(e, rank(), cfg.train.dist_timeout_s)) from e


def prepare_data(cfg: PretrainConfig) -> PairPreparation | None:
    """The data preparation of the chosen method, on every process, before any dataset is built:
    Alice's pairs (:func:`landmark.prepare.prepare_pairs`); None for image datasets (nothing to prepare)."""
    if METHODS[cfg.method].dataset != "pairs":
        return None
    return prepare_pairs(cfg.data, cfg.pairs, cfg.method_config().img_size, landmark=cfg.landmark,
                         device=_pair_device(cfg))


def build_dataset(cfg: PretrainConfig, prepared: PairPreparation | None = None) -> tuple[Dataset, DataReport]:
    """The chosen method's dataset (by its registered kind) and what it left out; pairs read
    ``prepared`` (:func:`prepare_data`). Without it, :func:`prepare_data` runs here first, in this
    one process (callers outside a training run: alice3d-analyze, the benchmarks)."""
    kind = METHODS[cfg.method].dataset
    mcfg = cfg.method_config()
    if kind == "pairs":
        if prepared is None:
            prepared = prepare_data(cfg)
        return pair_dataset(cfg.data, cfg.pairs, mcfg.img_size, landmark=cfg.landmark, device=_pair_device(cfg),
                            seed=cfg.train.seed, prepared=prepared)
    return image_dataset(cfg.data, cfg.slices, mcfg.img_size, in_channels=mcfg.in_channels, seed=cfg.train.seed)


def pretrain(cfg: PretrainConfig, out: Path, resume: bool = False) -> PretrainSummary:
    mcfg = cfg.method_config()
    join_process_group(cfg)
    prepared = prepare_data(cfg)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = METHODS[cfg.method].method(mcfg)
    dataset, report = build_dataset(cfg, prepared)
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
