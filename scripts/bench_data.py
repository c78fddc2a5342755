"""Data-path throughput for Alice pretraining: registered crop pairs per second, and augmentation.

    python scripts/bench_data.py [--landmark RUN/landmark.pt] [--workers 0 1 2] [--json out.json]

Pairs come from the real pretraining data path (``landmark.pairs.pair_dataset``:
volumes loaded once into memory, landmark embeddings cached on disk, one match per pair,
crops cut in memory), read through a ``DataLoader`` with the trainer's settings, once per
worker count. Per-worker figure = total / workers (the main process counts as one worker
when ``--workers 0``). Augmentation (the masked/intact views and the strong augmentation of
``make_alice_views``, batched ``grid_sample``) is timed on the CPU and, when there is one,
on the GPU: the step loop runs it on the training device, not in the workers.

Without ``--landmark`` on the embedded phantom cohort the default landmark model is used
(trained once and cached, as ``alice3d-pretrain`` does); ``--pairs same_position`` times
the matcher-free baseline instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from torch.utils.data import DataLoader

import bench_common as bc


def build_config(args):
    from alice3d.pretrain.config import PretrainConfig
    from alice3d.config import load_config

    overrides = [f"alice.img_size={list(args.crop)}", f"data.spacing={list(args.spacing)}",
                 f"pairs.source={args.pairs}", f"train.seed={args.seed}"]
    if args.data:
        overrides.append(f"data.data={args.data}")
    if args.landmark:
        overrides.append(f"landmark={args.landmark}")
    return load_config(PretrainConfig, None, overrides)


def build_dataset(cfg):
    from landmark.pairs import pair_dataset

    start = time.perf_counter()
    dataset, _ = pair_dataset(cfg.data, cfg.pairs, cfg.alice.img_size, landmark=cfg.landmark,
                              device=cfg.train.device, seed=cfg.train.seed)
    return dataset, time.perf_counter() - start


def time_loader(dataset, workers: int, batch: int, batches: int, warmup: int, pin: bool) -> dict:
    kw: dict = dict(batch_size=batch, num_workers=workers, pin_memory=pin,
                    generator=torch.Generator().manual_seed(0))
    if workers > 0:
        kw.update(prefetch_factor=4)
    loader = iter(DataLoader(dataset, **kw))
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


class ReplayedPairs(torch.utils.data.Dataset):
    """The first ``n`` pairs of ``dataset`` held in memory and served in a cycle: the model-only
    reference (no matching, no cropping) for the same trainer and the same tensors."""

    def __init__(self, dataset, n: int):
        self.items = [dataset[i] for i in range(n)]

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> dict:
        return self.items[i % len(self.items)]


def time_training(dataset, cfg, steps: int, workers: int) -> float:
    """Median samples/s of ``steps`` trainer steps (the first 3 excluded) of the run's method."""
    import json
    import statistics
    import tempfile
    from pathlib import Path

    from alice3d.methods import METHODS
    from alice3d.train.trainer import Trainer

    torch.manual_seed(0)
    model = METHODS[cfg.method].method(cfg.method_config())
    cfg.train.max_steps, cfg.train.log_every, cfg.train.ckpt_every = steps, 1, 0
    cfg.train.preview_every, cfg.train.num_workers = 0, workers
    with tempfile.TemporaryDirectory() as run:
        Trainer(model, cfg.train, Path(run) / "run").fit(dataset)
        lines = (Path(run) / "run" / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["samples_per_s"] for line in lines][3:]
    return statistics.median(rates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder or datalist (default: embedded phantom cohort)")
    p.add_argument("--landmark", default=None, help="landmark.pt (default: the cached phantom model)")
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
                   help="also train the default Alice this many steps on the real pairs and on pairs replayed "
                        "from memory (model-only): end-to-end throughput as a fraction of model-only")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    cfg = build_config(args)
    dataset, setup_s = build_dataset(cfg)
    cuda = torch.cuda.is_available()
    cpu = torch.device("cpu")
    settings = (f"crop {tuple(args.crop)} @ {tuple(args.spacing)} mm, pairs={args.pairs}, "
                f"batch {args.batch}, {len(dataset.sampler.entries)} volumes")
    loader_rows = []
    for w in args.workers:
        r = time_loader(dataset, w, args.batch, args.batches, args.warmup, pin=cuda)
        loader_rows.append(r)
    stats = dict(dataset.sampler.stats)
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
        real = time_training(dataset, cfg, args.train_steps, workers)
        replay = time_training(ReplayedPairs(dataset, 2 * args.batch), cfg, args.train_steps, 0)
        training = {"steps": args.train_steps, "workers": workers, "end_to_end_samples_per_s": real,
                    "model_only_samples_per_s": replay, "ratio": real / replay}
        print(f"# training the default Alice, batch {args.batch}, {args.train_steps} steps: end-to-end "
              f"{real:.2f} samples/s ({workers} workers) vs model-only {replay:.2f} samples/s "
              f"(pairs replayed from memory): {100 * real / replay:.0f} %")
    if args.json:
        bc.write_json(args.json, {"machine": bc.machine_info(torch.device("cuda") if cuda else cpu),
                                  "settings": vars(args), "setup_s": setup_s, "loader": loader_rows,
                                  "augmentation": aug_rows, "matcher_stats": stats, "training": training})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
