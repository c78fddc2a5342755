"""Scale of the pretraining data path: cohorts of N phantoms, the volume store vs volumes in memory.

    python scripts/bench_scale.py [--cohorts 8:btcv,32:btcv,128:small] [--work DIR] [--json out.json]

Per cohort: generate the phantoms (kept in ``--work``), preprocess them into a volume store
(``alice3d.data.preprocess.build_store``, ``--prep-workers`` processes): seconds per volume,
store size vs the raw ``.nii.gz``. Then, for each data path, a fresh process does what
``alice3d-pretrain`` does with the embedded CPU-sized Alice (crop 64x64x32 at 3 mm, batch 4):

    store   ``--data STORE`` (crops read from the store; whole cohort cached per process when it
            fits ``data.store_cache_mb``)
    memory  ``data.store=never``: today's path, every volume loaded, resampled and windowed into
            RAM as float32 at start

and reports its start-up (dataset built: volumes loaded or store opened, pair sampler ready),
pairs/s through a DataLoader with the trainer's settings, a short Alice run (``--steps``
trainer steps) and the process's peak RSS. ``--pairs`` chooses how pairs are matched:
``same_position`` (default: no landmark matcher, so the figures are the data path's own),
or ``landmark`` with the shipped phantom landmark model (store: ``pairs.consistency=reference``,
memory: today's per-point argmax; embedding N volumes takes ~3 s and ~190 MB of cache each).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_LANDMARK = ROOT / "landmark" / "resources" / "default_phantom_n16_s0.pt"


def parse_cohorts(text: str) -> list[tuple[int, str]]:
    out = []
    for part in text.split(","):
        n, _, size = part.partition(":")
        out.append((int(n), size or "btcv"))
    return out


def cohort_paths(root: Path) -> list[str]:
    from alice3d.data.datalists import load_datalist

    # the training list, as alice3d-pretrain reads a datalist
    return [str(e["image"]) for e in load_datalist(root / "dataset_0.json", key="training")]


def make_cohort(work: Path, n: int, size: str, workers: int) -> tuple[Path, float]:
    from alice3d.data.phantom import generate_cohort

    root = work / f"cohort-{size}-n{n}"
    if (root / "dataset_0.json").is_file():
        return root, 0.0
    t0 = time.perf_counter()
    generate_cohort(root, n=n, seed=5, size=size, workers=workers)
    return root, time.perf_counter() - t0


def preprocess(cohort: Path, store: Path, spacing, workers: int) -> dict:
    from alice3d.data.preprocess import build_store
    from alice3d.data.store import StoreSettings, body_hu_of_window

    paths = cohort_paths(cohort)
    fresh = not (store / "manifest.json").is_file()
    t0 = time.perf_counter()
    result = build_store(paths, store, StoreSettings(tuple(spacing), body_hu_of_window((-125.0, 255.0))),
                         workers=workers, progress=False)
    seconds = time.perf_counter() - t0
    totals = json.loads((store / "manifest.json").read_text())["totals"]
    return {"volumes": len(paths), "preprocess_s_per_volume": round(seconds / len(paths), 3) if fresh else None,
            "store_mb": round(totals["store_bytes"] / 1e6, 1), "raw_mb": round(totals["source_bytes"] / 1e6, 1),
            "store_vs_raw": round(totals["store_bytes"] / totals["source_bytes"], 3),
            "mvoxels_per_volume": round(totals["voxels"] / len(paths) / 1e6, 2), "bad": totals["bad"],
            "resumed": not fresh or result.skipped > 0}


# ----------------------------------------------------------------------------- one run (child process)


def child(spec: dict) -> dict:
    """Start-up, pairs/s and a short Alice run in this (fresh) process; peak RSS at the end."""
    import torch
    from torch.utils.data import DataLoader

    from alice3d.config import load_config
    from alice3d.methods import METHODS
    from alice3d.pretrain.config import PretrainConfig
    from alice3d.pretrain.run import build_dataset

    torch.set_num_threads(spec["threads"])
    overrides = [f"data.spacing={spec['spacing']}", f"pairs.source={spec['pairs']}", "train.device=cpu",
                 f"train.num_workers={spec['workers']}"]
    if spec["path"] == "store":
        overrides.append(f"data.data={spec['store']}")
        if spec.get("cache_mb") is not None:
            overrides.append(f"data.store_cache_mb={spec['cache_mb']}")
    else:
        overrides += [f"data.data={spec['cohort']}/dataset_0.json", "data.store=never"]
    if spec["pairs"] == "landmark":
        overrides.append(f"landmark={SHIPPED_LANDMARK}")
    cfg = load_config(PretrainConfig, None, overrides)
    t0 = time.perf_counter()
    dataset, report = build_dataset(cfg)
    startup = time.perf_counter() - t0
    rss_ready = _rss_mb()

    def pairs_per_s(batches: int) -> float:
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=spec["workers"],
                            **({"prefetch_factor": 4} if spec["workers"] else {}))
        it = iter(loader)
        next(it)  # worker start-up is not part of the rate
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * cfg.train.batch_size / (time.perf_counter() - t0)

    first = pairs_per_s(5)  # the first batches of a run: volumes not read before
    for source in dataset.sampler.entries:  # steady state of a long run: every volume read once
        source.read_crop(source.body_voxels()[0], (8, 8, 8))
    pairs_s = pairs_per_s(spec["batches"])

    torch.manual_seed(0)
    model = METHODS[cfg.method].method(cfg.method_config())
    trainer = bc.bench_trainer(model, cfg.train)
    batches = iter(DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=0))
    timing, _ = bc.time_train_steps(trainer, batches, torch.device("cpu"), "fp32", 1, spec["steps"])
    return {"path": spec["path"], "volumes": report.used, "startup_s": round(startup, 2),
            "pairs_per_s_first": round(first, 1), "pairs_per_s": round(pairs_s, 1),
            "alice_step_s": round(timing["median_s"], 3), "cache": spec["path"] == "store" and _cached(dataset),
            "rss_ready_mb": round(rss_ready, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _cached(dataset) -> bool:
    """Whether the store volumes keep their decoded arrays (the cohort fits data.store_cache_mb)."""
    return bool(getattr(dataset.sampler.entries[0], "cache_bytes", 0))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    """Peak RSS of this process (and of its DataLoader workers, if larger), MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return max(own, kids)


def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed ({spec['path']}, {spec['cohort']}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohorts", type=parse_cohorts, default=parse_cohorts("8:btcv,32:btcv,128:small"),
                   help="N:size list (size: btcv, small or tiny)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "alice3d_bench_scale",
                   help="cohorts and stores (kept between runs)")
    p.add_argument("--spacing", default="[3,3,3]", help="data.spacing of the run (the CPU default)")
    p.add_argument("--pairs", choices=["same_position", "landmark"], default="same_position")
    p.add_argument("--prep-workers", type=int, default=2)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the runs")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--paths", default="store,memory")
    p.add_argument("--cache-mb", type=float, default=None, help="data.store_cache_mb of the store runs")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    spacing = json.loads(args.spacing)
    rows, cohorts = [], []
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    for n, size in args.cohorts:
        cohort, gen_s = make_cohort(args.work, n, size, args.prep_workers)
        store = args.work / f"store-{size}-n{n}-{'x'.join(str(s) for s in spacing)}"
        info = {"n": n, "size": size, "generate_s": round(gen_s, 1), **preprocess(cohort, store, spacing,
                                                                                   args.prep_workers)}
        cohorts.append(info)
        print(json.dumps(info), flush=True)
        for path in args.paths.split(","):
            spec = {"path": path, "cohort": str(cohort), "store": str(store), "spacing": args.spacing,
                    "pairs": args.pairs, "workers": args.workers, "threads": args.threads,
                    "batches": args.batches, "steps": args.steps, "cache_mb": args.cache_mb}
            if args.pairs == "landmark":
                run_child(spec)  # warm the embedding cache / the store's fits: measured runs are warm
            row = {"n": n, "size": size, **run_child(spec)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open("/proc/loadavg") as f:
        load_after = f.read().split()[:3]
    bc.print_table(cohorts, ["n", "size", "volumes", "mvoxels_per_volume", "preprocess_s_per_volume", "raw_mb",
                             "store_mb", "store_vs_raw"])
    bc.print_table(rows, ["n", "size", "path", "volumes", "startup_s", "pairs_per_s_first", "pairs_per_s", "cache",
                          "alice_step_s", "rss_ready_mb", "peak_rss_mb"])
    import torch

    bc.write_json(args.json, {"machine": bc.machine_info(torch.device("cpu")), "load_before": load_before,
                              "load_after": load_after, "args": {k: str(v) for k, v in vars(args).items()},
                              "cohorts": cohorts, "runs": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
