"""Peak memory of ``alice3d-landmark train`` at two (or more) cohort sizes.

    python scripts/bench_landmark_memory.py [--cohorts 16,90] [--phantom small] [--steps 3]
        [--store always|never|auto] [--preset default|tiny] [--work DIR] [--json out.json]

Per cohort size N: N phantoms are generated (kept in ``--work``; the training split of their
datalist is what trains), preprocessed once into the run's volume store (``data.store=always``,
as ``data.store=auto`` does for 32 volumes or more; timed apart, in this process, so the figure
is the training's own), and then a fresh ``python -m alice3d.cli.landmark train`` process runs
``--steps`` steps on them. Its peak resident set (``ru_maxrss`` of that process, from ``wait4``),
wall time and exit status are printed, one row per size. ``--store never`` measures the in-memory
path instead (every volume decoded into RAM as int16 HU): its peak grows with N.

``--preset tiny`` (tiny phantoms at 8 mm, a tiny model, crop 16^3) checks the script in seconds;
the default preset is the CPU default landmark configuration (2 mm, crop 64x64x48) on
``--phantom small`` phantoms (~192x192x130 voxels at 2 mm). Run big cohorts on a machine with
CPU to spare: generating 90 small phantoms takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# alice3d/landmark are imported inside the functions: --help answers without loading torch

PRESETS = {
    "default": [],
    "tiny": ["data.spacing=[8,8,8]", "crop.size=[16,16,16]", "model.stem_width=4", "model.widths=[8,8,8,8]",
             "model.fpn_dim=8", "model.embed_dim=16", "loss.anchors=32", "loss.hard_pool=64",
             "loss.negatives=16", "loss.random_negatives=16", "loss.coarse_negatives=16"],
}
PHANTOM_GRIDS = {"tiny": {"shape": (40, 40, 32), "spacing": (8.0, 8.0, 8.0)}}


def make_cohort(work: Path, n: int, phantom: str) -> Path:
    from alice3d.data.phantom import generate_cohort

    out = work / f"cohort-{phantom}-n{n}"
    if not (out / "dataset_0.json").is_file():
        generate_cohort(out, n=n, seed=0, size=phantom, **PHANTOM_GRIDS.get(phantom, {}))
    return out


def overrides(args, cohort: Path) -> list[str]:
    return [f"data.data={cohort}", f"data.store={args.store}", f"train.max_steps={args.steps}",
            "train.num_workers=0", "train.device=cpu", f"train.ckpt_every={max(args.steps, 1)}",
            "train.warmup_steps=1", *PRESETS[args.preset]]


def preprocess(cfg_overrides: list[str], env: dict) -> float:
    """Build the run's volume store as ``alice3d-landmark train`` would (once), in this process."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from alice3d.config import load_config
        from alice3d.data.loading import run_store
        from landmark.config import LandmarkConfig

        t0 = time.perf_counter()
        run_store(load_config(LandmarkConfig, None, cfg_overrides).data)
        return time.perf_counter() - t0
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train_peak(cfg_overrides: list[str], out: Path, env: dict, log: Path) -> dict:
    """Run ``alice3d.cli.landmark train`` in a fresh process: ``{"peak_rss_mb", "seconds", "returncode"}``."""
    cmd = [sys.executable, "-m", "alice3d.cli.landmark", "train", "--out", str(out), *cfg_overrides]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.perf_counter() - t0, 1),
            "returncode": proc.returncode}


def count_training(cohort: Path) -> int:
    from alice3d.data.volumes import resolve_image_paths

    return len(resolve_image_paths(str(cohort)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cohorts", default="16,90", help="comma-separated cohort sizes (phantoms generated)")
    p.add_argument("--phantom", default=None, help="phantom size preset (default: small; tiny with --preset tiny)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="training configuration")
    p.add_argument("--steps", type=int, default=3, help="training steps per run")
    p.add_argument("--store", choices=["always", "never", "auto"], default="always",
                   help="data.store of the runs (always: views read from the volume store)")
    p.add_argument("--work", type=Path, default=None, help="folder for cohorts, stores and runs (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args()
    phantom = args.phantom or ("tiny" if args.preset == "tiny" else "small")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_landmark_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {"ALICE3D_CACHE": str(work / "cache"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONUNBUFFERED": "1"}
    rows = []
    for n in (int(v) for v in args.cohorts.split(",")):
        cohort = make_cohort(work, n, phantom)
        cfg = overrides(args, cohort)
        prep = preprocess(cfg, env) if args.store != "never" else 0.0
        run = work / f"run-{phantom}-n{n}-{args.store}-{time.strftime('%H%M%S')}"
        res = train_peak(cfg, run, env, work / f"{run.name}.log")
        rows.append({"phantoms": n, "training_volumes": count_training(cohort), "store": args.store,
                     "preset": args.preset, "phantom": phantom, "steps": args.steps, "preprocess_s": round(prep, 1),
                     **res, "log": str(work / f"{run.name}.log")})
        r = rows[-1]
        print(f"{r['phantoms']:>5} phantoms ({r['training_volumes']} training volumes, {phantom}, data.store="
              f"{args.store}, preset {args.preset}): peak RSS {r['peak_rss_mb']:.0f} MB, {args.steps} steps in "
              f"{r['seconds']:.1f} s (store built in {r['preprocess_s']:.1f} s), exit {r['returncode']}", flush=True)
        if r["returncode"] != 0:
            print(f"      training failed; see {r['log']}", flush=True)
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"peak RSS {a['peak_rss_mb']:.0f} MB at {a['training_volumes']} volumes -> {b['peak_rss_mb']:.0f} MB at "
              f"{b['training_volumes']} ({b['peak_rss_mb'] - a['peak_rss_mb']:+.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cpu_threads": env["OMP_NUM_THREADS"]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
