"""1 process vs N processes (torchrun, gloo on CPU or NCCL on GPUs) for the same global batch.

    python scripts/experiments/scaling_gloo.py --out runs/scaling [--procs 1 2] [--steps 8] [--global-batch 4]

Runs ``alice3d-pretrain`` (the embedded default: tiny Alice, landmark-matched pairs on the
phantom cohort) once per process count with ``train.batch_size = global batch / processes``
and the same ``train.lr``, then prints per-step losses side by side, their largest
difference, wall time and samples/s, and writes OUT/scaling.json. What it demonstrates: the
global batch is ``train.batch_size x processes x train.grad_accum``; every pair, mask and
augmentation depends on the pair's global index, not on the process that draws it; logged
losses are averaged over processes; so the losses of the N-process run equal the
one-process run's up to float reduction order. ``train.lr`` is not rescaled with the
process count: keep the global batch and the run is the same run.

Each run gets ``--threads`` CPU threads per process in total divided by the process count,
so the 1- and N-process runs use the same cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(procs: int, args, out: Path) -> dict:
    run_dir = out / f"np{procs}"
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists; choose a new --out")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={procs}", "-m", "alice3d.cli.pretrain",
           "--out", str(run_dir), f"train.max_steps={args.steps}", f"train.batch_size={args.global_batch // procs}",
           "train.log_every=1", "train.ckpt_every=0", "train.deterministic=true", "train.device=cpu",
           "train.preview_every=0", *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // procs)))
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    return {"procs": procs, "batch_per_process": args.global_batch // procs, "wall_s": wall,
            "losses": [r["loss"] for r in records], "samples_per_s": [r["samples_per_s"] for r in records]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="CPU threads shared by the processes of one run")
    p.add_argument("overrides", nargs="*", help="extra key=value settings for alice3d-pretrain")
    args = p.parse_args(argv)
    bad = [n for n in args.procs if args.global_batch % n]
    if bad:
        raise SystemExit(f"--global-batch {args.global_batch} is not divisible by process count(s) {bad}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [run(n, args, args.out) for n in args.procs]

    ref = runs[0]["losses"]
    header = "step  " + "  ".join(f"loss np={r['procs']:<3}" for r in runs)
    print("\n" + header)
    for i in range(len(ref)):
        print(f"{i + 1:<5} " + "  ".join(f"{r['losses'][i]:<12.6f}" for r in runs))
    for r in runs:
        r["max_abs_loss_diff_vs_first"] = max(abs(a - b) for a, b in zip(r["losses"], ref))
        steady = r["samples_per_s"][1:] or r["samples_per_s"]
        r["median_samples_per_s"] = sorted(steady)[len(steady) // 2]
        print(f"np={r['procs']}: batch/process {r['batch_per_process']}, wall {r['wall_s']:.1f} s, "
              f"median {r['median_samples_per_s']:.2f} samples/s, max |loss - np={runs[0]['procs']}| "
              f"{r['max_abs_loss_diff_vs_first']:.2e}")
    (args.out / "scaling.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                                       "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out / 'scaling.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
