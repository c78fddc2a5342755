"""Data-path throughput for Alice pretraining: registered crop pairs per second, and augmentation.

    python scripts/bench_data.py [--landmark RUN/landmark.pt] [--workers 0 1 2] [--json out.json]

Pairs come from the real pretraining data path (``landmark.prepare.prepare_pairs``, then
``landmark.pairs.pair_dataset``:
volumes loaded once into memory, landmark embeddings cached on disk, one match per pair,
crops cut in memory), read through a ``DataLoader`` with the trainer's settings, once per
worker count. Per-worker figure = total / workers (the main process counts as one worker
when ``--workers 0``). Augmentation (the masked/intact views and the strong augmentation of
``make_alice_views``, batched ``grid_sample``) is timed on the CPU and, when there is one,
on the GPU: the step loop runs it on the training device, not in the workers.

Without ``--landmark`` on the embedded phantom cohort the default landmark model is used
(trained once and cached, as ``alice3d-pretrain`` does); ``--pairs same_position`` times
the matcher-free baseline instead. The matcher runs on the training device, except with
DataLoader workers on CUDA: workers are forked and cannot use CUDA, so it runs on the CPU.

``--train-steps N`` trains the run's Alice (``--config``, default the built-in one) with the
real ``Trainer.train_step``: end-to-end on pairs through the DataLoader vs model-only on two
batches of the same pairs replayed from device memory (no matching, cropping or copying).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from dataclasses import replace

import bench_common as bc
import torch
from torch.utils.data import DataLoader


def pretrain_config(crop, spacing, pairs: str = "landmark", seed: int = 0, data: str | None = None,
                    landmark: str | None = None, config: str | None = None, extra: tuple[str, ...] = ()):
    """The ``alice3d-pretrain`` config (defaults, or the YAML ``config``) at this crop and spacing."""
    from alice3d.config import load_config
    from alice3d.pretrain.config import PretrainConfig

    overrides = [f"alice.img_size={list(crop)}", f"data.spacing={list(spacing)}",
                 f"pairs.source={pairs}", f"train.seed={seed}"]
    if data:
        overrides.append(f"data.data={data}")
    if landmark:
        overrides.append(f"landmark={landmark}")
    return load_config(PretrainConfig, config, overrides + list(extra))


def build_config(args):
    return pretrain_config(args.crop, args.spacing, args.pairs, args.seed, args.data, args.landmark, args.config)


def matcher_device(train_device: str, workers: int) -> str:
    """Where the matcher runs: the training device, except with DataLoader workers on CUDA, which
    are forked processes and cannot use CUDA once the main process has (the CPU matcher then)."""
    device = train_device if train_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return "cpu" if workers > 0 and device.startswith("cuda") else device


def build_dataset(cfg, device: str | None = None):
    """(pairs dataset, its data report, setup seconds) through ``landmark.pairs.pair_dataset``."""
    from landmark.pairs import pair_dataset
    from landmark.prepare import prepare_pairs

    start = time.perf_counter()
    device = device or cfg.train.device
    prepared = prepare_pairs(cfg.data, cfg.pairs, cfg.alice.img_size, landmark=cfg.landmark, device=device)
    dataset, report = pair_dataset(cfg.data, cfg.pairs, cfg.alice.img_size, landmark=cfg.landmark,
                                   device=device, seed=cfg.train.seed, prepared=prepared)
    return dataset, report, time.perf_counter() - start


def trainer_loader(dataset, workers: int, batch: int, pin: bool) -> DataLoader:
    """A DataLoader with the trainer's settings: consecutive samples per batch (step s reads
    samples [s*B, (s+1)*B) on one process), prefetch 4 per worker, pinned memory for CUDA."""
    kw: dict = dict(batch_size=batch, num_workers=workers, pin_memory=pin,
                    generator=torch.Generator().manual_seed(0))
    if workers > 0:
        kw.update(prefetch_factor=4)
    return DataLoader(dataset, **kw)


def time_loader(dataset, workers: int, batch: int, batches: int, warmup: int, pin: bool) -> dict:
    loader = iter(trainer_loader(dataset, workers, batch, pin))
    for _ in range(warmup):  # worker start-up and the first prefetch are not steady state
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - start
    total = batch * batches / seconds
    return {"workers": workers, "pairs_per_s": total, "pairs_per_s_per_worker": total / max(workers, 1),
            "batch": batch, "batches": batches}


def time_augmentation(device: torch.device, batch: int, crop, patch: int, mask_ratio: float, steps: int) -> dict:
    from alice3d.methods.views import StrongAugConfig, make_alice_views

    q = torch.rand(batch, 1, *crop, device=device)
    k = torch.rand(batch, 1, *crop, device=device)
    tokens = 1
    for c in crop:
        tokens *= c // patch
    gen = torch.Generator(device=device).manual_seed(0)
    timing = bc.time_steps(lambda i: make_alice_views(q, k, tokens, mask_ratio, StrongAugConfig(), gen),
                           device, warmup=2, steps=steps)
    return {"device": bc.short_device(device), "batch": batch, "median_s": timing["median_s"],
            "pairs_per_s": batch / timing["median_s"]}


def replayed_batches(loader, n: int, device: torch.device) -> list[dict]:
    """The first ``n`` batches of ``loader`` moved to ``device``: the model-only reference (no
    matching, no cropping, no host-to-device copy) for the same trainer and the same tensors."""
    from alice3d.train.trainer import move_to

    it = iter(loader)
    return [move_to(next(it), device) for _ in range(n)]


def time_training(dataset, cfg, steps: int, workers: int, warmup: int = 3, replay: int = 2) -> dict:
    """The run's method (``METHODS[cfg.method]``, built from ``cfg``) trained by the real
    ``Trainer.train_step``: ``warmup`` + ``steps`` steps on pairs from ``dataset`` through a
    DataLoader with ``workers`` (end-to-end), then as many on ``replay`` batches of the same
    pairs cycled from device memory (model-only) -> samples/s of both (medians) and their ratio."""
    from alice3d.methods import METHODS

    torch.manual_seed(cfg.train.seed)
    model = METHODS[cfg.method].method(cfg.method_config())
    tcfg = replace(cfg.train, max_steps=100_000, num_workers=workers)
    trainer = bc.bench_trainer(model, tcfg)
    device, batch = trainer.device, tcfg.batch_size
    pin = device.type == "cuda"
    pairs = iter(trainer_loader(dataset, workers, batch, pin))
    end_to_end, skipped = bc.time_train_steps(trainer, pairs, device, "fp32", warmup, steps)
    del pairs  # stops the workers, which would otherwise go on prefetching during the model-only steps
    cached = replayed_batches(trainer_loader(dataset, 0, batch, pin), replay, device)
    model_only, skipped_replay = bc.time_train_steps(trainer, itertools.cycle(cached), device, "fp32", warmup, steps)
    real, ref = batch / end_to_end["median_s"], batch / model_only["median_s"]
    return {"method": cfg.method, "encoder": cfg.method_config().encoder, "crop": list(cfg.method_config().img_size),
            "batch": batch, "steps": steps, "warmup": warmup, "workers": workers, "device": bc.short_device(device),
            "amp": tcfg.amp and device.type == "cuda", "end_to_end_samples_per_s": real,
            "model_only_samples_per_s": ref, "ratio": real / ref, "replayed_batches": replay,
            "skipped_steps": skipped + skipped_replay, "end_to_end_timing": end_to_end, "model_only_timing": model_only}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder or datalist (default: embedded phantom cohort)")
    p.add_argument("--landmark", default=None, help="landmark.pt (default: the cached phantom model)")
    p.add_argument("--config", default=None, help="alice3d-pretrain YAML config (default: the built-in defaults)")
    p.add_argument("--pairs", default="landmark", choices=["landmark", "same_position"])
    p.add_argument("--crop", type=int, nargs=3, default=[64, 64, 32], help="crop size in voxels")
    p.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0], help="crop spacing in mm")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--patch", type=int, default=16, help="token size for the masks drawn with the views")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0,
                   help="also train the run's Alice this many steps (after 3 warm-up steps) on the real pairs "
                        "(with the most --workers) and on 2 batches of them replayed from device memory "
                        "(model-only): end-to-end throughput as a fraction of model-only")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    cfg = build_config(args)
    dataset, report, setup_s = build_dataset(cfg, matcher_device(cfg.train.device, max(args.workers)))
    cuda = torch.cuda.is_available()
    cpu = torch.device("cpu")
    settings = (f"crop {tuple(args.crop)} @ {tuple(args.spacing)} mm, pairs={args.pairs}, "
                f"batch {args.batch}, {report.used} volumes")
    loader_rows = []
    for w in args.workers:
        r = time_loader(dataset, w, args.batch, args.batches, args.warmup, pin=cuda)
        loader_rows.append(r)
    stats = dict(getattr(getattr(dataset, "sampler", None), "stats", {}))
    aug_rows = [time_augmentation(cpu, args.batch, args.crop, args.patch, args.mask_ratio, steps=10)]
    if cuda:
        aug_rows.append(time_augmentation(torch.device("cuda"), args.batch, args.crop, args.patch,
                                          args.mask_ratio, steps=50))

    print(f"# data path ({bc.short_device(cpu)}; {settings}); setup (load + embed) {setup_s:.1f} s")
    bc.print_table(loader_rows, ["workers", "pairs_per_s", "pairs_per_s_per_worker"])
    print(f"# augmentation (make_alice_views: masks + strong augmentation of 2 x batch {args.batch})")
    bc.print_table(aug_rows, ["device", "batch", "median_s", "pairs_per_s"])
    print(f"# matcher (main-process pairs only): {stats}")
    training = None
    if args.train_steps:
        workers = max(args.workers)
        cfg.train.batch_size = args.batch
        training = time_training(dataset, cfg, args.train_steps, workers)
        print(f"# training Alice ({training['encoder']}), batch {args.batch}, {args.train_steps} steps: end-to-end "
              f"{training['end_to_end_samples_per_s']:.2f} samples/s ({workers} workers) vs model-only "
              f"{training['model_only_samples_per_s']:.2f} samples/s (pairs replayed from device memory): "
              f"{100 * training['ratio']:.0f} %")
    if args.json:
        bc.write_json(args.json, {"machine": bc.machine_info(torch.device("cuda") if cuda else cpu),
                                  "settings": vars(args), "setup_s": setup_s, "loader": loader_rows,
                                  "augmentation": aug_rows, "matcher_stats": stats, "training": training})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
