"""``alice3d-pretrain``: self-supervised pretraining (Alice and the MIM family).

    alice3d-pretrain --out runs/alice                      # embedded default: tiny Alice on phantoms, CPU
    alice3d-pretrain --config configs/pretrain/alice_vit_b.yaml --data my_ct/ --landmark lm/landmark.pt --out runs/a
    torchrun --nproc_per_node 8 -m alice3d.cli.pretrain --config ... --out runs/a

Writes RUN/config.yaml, RUN/metrics.jsonl, RUN/checkpoints/last.pt, RUN/encoder.pt, RUN/previews/*.png.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset

from alice3d.config import ConfigError, DataConfig, TrainConfig, check_choice, section
from alice3d.methods.alice import Alice, AliceConfig
from alice3d.data.slices import SliceConfig
from alice3d.methods.cae import CAE, CAEConfig
from alice3d.methods.ccmim import CCMIM, CCMIMConfig
from alice3d.methods.convmim import ConvMIM, ConvMIMConfig
from alice3d.methods.mae import MAE, MAEConfig
from alice3d.methods.rmae import CMAE, RMAE, CMAEConfig, RMAEConfig

log = logging.getLogger("alice3d.pretrain")


@dataclass
class PairsConfig:
    """Where Alice's (Q, K) crop pairs come from.

    ``landmark``: the landmark matcher finds the point in K that matches a random body
    point in Q (the method as published). ``same_position``: a baseline without a matcher
    that takes the same normalised position in the two volumes' bounding boxes.
    """

    source: str = "landmark"
    min_score: float = 0.3
    max_retries: int = 8
    # Matcher consistency for pairs. "affine" is far more accurate (README, landmark table) but
    # fits one affine per new volume pair first (about 1 s on CPU; then cached on disk), which
    # dominates short runs; crops are wide enough that the per-point argmax's misses overlap.
    consistency: str = "none"


def _cpu_data() -> DataConfig:
    return DataConfig(spacing=(3.0, 3.0, 3.0))


def _cpu_train() -> TrainConfig:
    return TrainConfig(max_steps=150, batch_size=4, lr=5e-4, warmup_steps=15, ckpt_every=50, preview_every=0)


def _cpu_alice() -> AliceConfig:
    return AliceConfig(encoder="vit_tiny", img_size=(64, 64, 32), decoder_dim=96, decoder_depth=2,
                       decoder_heads=4, head_out_dim=128, head_hidden_dim=256, head_bottleneck_dim=64)


def _cpu_mae() -> MAEConfig:
    return MAEConfig(encoder="vit_tiny", img_size=(64, 64, 32), decoder_dim=96, decoder_depth=2, decoder_heads=4)


def _cpu_mim(cls: type, **kw: Any) -> Callable[[], Any]:
    """CPU-sized defaults of a ViT-based MIM method (the MAE section's sizes)."""
    return lambda: cls(encoder="vit_tiny", img_size=(64, 64, 32), **kw)


_CPU_DECODER = dict(decoder_dim=96, decoder_depth=2, decoder_heads=4)


@dataclass
class PretrainConfig:
    """Defaults = the embedded CPU-sized run; configs/pretrain/*.yaml carry the paper settings."""

    method: str = "alice"
    landmark: str = ""  # RUN/landmark.pt; "" with the embedded cohort = a cached default matcher
    train: TrainConfig = section(_cpu_train)
    data: DataConfig = section(_cpu_data)
    pairs: PairsConfig = section(PairsConfig)
    alice: AliceConfig = section(_cpu_alice)
    mae: MAEConfig = section(_cpu_mae)
    slices: SliceConfig = section(SliceConfig)  # 2D methods: which slices of the volumes
    cae: CAEConfig = section(_cpu_mim(CAEConfig, **_CPU_DECODER))
    ccmim: CCMIMConfig = section(_cpu_mim(CCMIMConfig, **_CPU_DECODER, proj_hidden_dim=256, proj_dim=64))
    rmae: RMAEConfig = section(_cpu_mim(RMAEConfig, **_CPU_DECODER))
    cmae: CMAEConfig = section(_cpu_mim(CMAEConfig, proj_hidden_dim=256, proj_dim=64))
    convmim: ConvMIMConfig = section(lambda: ConvMIMConfig(backbone="resnet18_tiny", img_size=(64, 64, 32)))

    def validate(self) -> None:
        check_choice("method", self.method, sorted(METHODS))
        check_choice("pairs.source", self.pairs.source, ["landmark", "same_position"])
        check_choice("pairs.consistency", self.pairs.consistency, ["none", "affine"])
        check_choice("data.on_bad_data", self.data.on_bad_data, ["skip", "fail"])
        method_cfg = getattr(self, self.method)
        if hasattr(method_cfg, "validate"):
            method_cfg.validate(self.method)


@dataclass
class MethodEntry:
    build: Callable[[Any], Any]
    dataset: Callable[["PretrainConfig", Any], Dataset]
    volumes_needed: int = 1


# ---------------------------------------------------------------- data per method


def load_volumes(cfg: PretrainConfig, crop_size, min_volumes: int):
    from alice3d.data.volumes import load_volume_set, resolve_image_paths

    paths = resolve_image_paths(cfg.data.data, cfg.data.phantom_n, cfg.data.phantom_seed)
    vset = load_volume_set(paths, cfg.data.spacing, cfg.data.hu_window, cfg.data.on_bad_data,
                           min_shape=crop_size, min_volumes=min_volumes)
    log.info("%s", vset.summary())
    return vset


def crop_dataset(cfg: PretrainConfig, mcfg: Any) -> Dataset:
    from alice3d.data.crops import RandomCropDataset

    vset = load_volumes(cfg, mcfg.img_size, 1)
    ds = RandomCropDataset(vset.volumes, mcfg.img_size, seed=cfg.train.seed)
    ds.bad = vset.bad  # listed again in the end-of-run summary
    return ds


def image_dataset(cfg: PretrainConfig, mcfg: Any) -> Dataset:
    """MIM methods: 2D slices (or PNG/TIFF images) when img_size has 2 entries, else 3D random crops."""
    if len(mcfg.img_size) == 2:
        from alice3d.data.slices import slice_dataset

        return slice_dataset(cfg.data, cfg.slices, mcfg.img_size, seed=cfg.train.seed, channels=mcfg.in_channels)
    return crop_dataset(cfg, mcfg)


def default_landmark_model(cfg: PretrainConfig) -> Path:
    """The matcher used with the embedded cohort when no --landmark is given (trained once, cached)."""
    from landmark.defaults import default_landmark_model as build

    return build(n=cfg.data.phantom_n, seed=cfg.data.phantom_seed)


def pair_dataset(cfg: PretrainConfig, mcfg: AliceConfig) -> Dataset:
    from landmark.pairs import PairDataset, build_pair_sampler

    if len(mcfg.img_size) != 3:
        raise ConfigError("alice.img_size: Alice pairs are 3D crops; expected 3 sizes")
    vset = load_volumes(cfg, mcfg.img_size, 2)
    landmark = cfg.landmark
    if cfg.pairs.source == "landmark" and not landmark:
        if cfg.data.data:
            raise ConfigError(
                "Alice pairs need a landmark model for your data: train one with "
                "`alice3d-landmark train --data <same data> --out LM` and pass --landmark LM/landmark.pt "
                "(or set pairs.source=same_position for the matcher-free baseline)"
            )
        landmark = str(default_landmark_model(cfg))
        log.info("using the default phantom landmark model %s", landmark)
    sampler = build_pair_sampler(
        vset.volumes, landmark if cfg.pairs.source == "landmark" else None, crop_size=mcfg.img_size,
        min_score=cfg.pairs.min_score, max_retries=cfg.pairs.max_retries, device=cfg.train.device,
        consistency=cfg.pairs.consistency,
    )
    ds = PairDataset(sampler, seed=cfg.train.seed)
    ds.bad = vset.bad  # listed again in the end-of-run summary
    return ds


METHODS: dict[str, MethodEntry] = {
    "alice": MethodEntry(Alice, pair_dataset, volumes_needed=2),
    "mae": MethodEntry(MAE, image_dataset),
    "cae": MethodEntry(CAE, image_dataset),
    "ccmim": MethodEntry(CCMIM, image_dataset),
    "convmim": MethodEntry(ConvMIM, image_dataset),
    "rmae": MethodEntry(RMAE, image_dataset),
    "cmae": MethodEntry(CMAE, image_dataset),
}


# ---------------------------------------------------------------- main


def pretrain(cfg: PretrainConfig, out: Path, resume: bool = False) -> dict:
    import torch

    from alice3d.encoders.files import encoder_file_metadata, save_encoder
    from alice3d.train.trainer import Trainer

    entry = METHODS[cfg.method]
    mcfg = getattr(cfg, cfg.method)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = entry.build(mcfg)
    dataset = entry.dataset(cfg, mcfg)
    trainer = Trainer(model, cfg.train, out, full_config=cfg,
                      find_unused_parameters=bool(getattr(model, "has_unused_parameters", False)))
    result = trainer.fit(dataset, resume=resume)
    summary = {"step": result.step, "interrupted": result.interrupted, "skipped_steps": result.skipped_steps,
               "last": result.last_metrics}
    if result.interrupted:
        return summary
    if trainer.dist.is_main:
        state, meta = model.encoder_state()
        file_meta = encoder_file_metadata(meta, crop_size=list(mcfg.img_size), spacing=list(cfg.data.spacing),
                                          hu_window=list(cfg.data.hu_window), steps=result.step)
        save_encoder(out / "encoder.pt", state, file_meta)
        log.info("encoder weights: %s", out / "encoder.pt")
    bad = getattr(dataset, "bad", None)
    if bad:
        summary["quarantined"] = bad
    return summary


def build_parser() -> argparse.ArgumentParser:
    from alice3d.cli.common import add_config_args

    p = argparse.ArgumentParser(prog="alice3d-pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="datalist JSON or folder of volumes (default: phantom cohort)")
    p.add_argument("--landmark", default=None, help="landmark model (RUN/landmark.pt) for Alice's pairs")
    p.add_argument("--out", type=Path, required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_args(p, PretrainConfig)
    return p


def main(argv: list[str] | None = None) -> None:
    from alice3d.cli.common import prepare_run_dir, resolve_config, run_main, setup_logging, write_resolved_config

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def body() -> int:
        cfg = resolve_config(PretrainConfig, args)
        if args.data is not None:
            cfg.data.data = str(args.data)
        if args.landmark is not None:
            cfg.landmark = str(args.landmark)
        out = prepare_run_dir(args.out, args.resume)
        write_resolved_config(cfg, out) if not args.resume else None
        from landmark.embed_cache import CacheError
        from landmark.match import MatchError
        from landmark.pairs import PairError

        try:
            summary = pretrain(cfg, out, resume=args.resume)
        except (MatchError, CacheError, PairError) as e:  # Alice's landmark model or crop pairs
            print(f"error: {e}", file=sys.stderr)
            return 2
        if summary["interrupted"]:
            log.warning("stopped at step %d; continue with the same command plus --resume", summary["step"])
            return 3
        log.info("done: %d steps, final loss %.4f; outputs in %s", summary["step"],
                 summary["last"].get("loss", float("nan")), out)
        if summary.get("quarantined"):
            log.warning("%d bad volume(s) were left out of this run (data.on_bad_data=skip):\n  %s",
                        len(summary["quarantined"]), "\n  ".join(f"{p}: {r}" for p, r in summary["quarantined"]))
        return 0

    run_main(body)


if __name__ == "__main__":
    main()
