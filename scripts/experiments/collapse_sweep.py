#!/usr/bin/env python
"""Which setting keeps the embedded Alice default from collapsing: short runs of named variants.

Each variant is ``alice3d-pretrain --out OUT/<name>`` (the embedded default, 150 steps unless
overridden) plus its ``key=value`` overrides. Per run: ``target_std`` / ``online_std`` (spread of
the l2-normalised [cls] projections over the batch: ~1 spread out, 0 collapsed) averaged over
the last quarter of the logged steps, the reconstruction loss at the start and the end, the
wall time, and a linear probe of the frozen encoder on organ-centre crops of a phantom cohort
never seen in pretraining (seed 1); a randomly initialised encoder is the reference row.

    python scripts/experiments/collapse_sweep.py --out runs/collapse --jobs 2
    python scripts/experiments/collapse_sweep.py --out runs/collapse --only paper default

Writes OUT/collapse_sweep.{json,md}. Runs that exist are reused (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from frozen_probe import probe_encoder, probe_task, random_encoder_like

from alice3d.analysis.probing import encoder_from_file

# Every variant is the embedded default with overrides. PAPER undoes what the shipped default adds
# where the paper is silent (BatchNorm in the head, a predictor, the run-length EMA), leaving what
# the paper states: negative cosine, no predictor, EMA 0.996 -> 1, online random resized crop + flip.
PAPER = ["alice.head_bn=false", "alice.predictor_hidden_dim=0", "alice.ema_reference_steps=0"]
EMA = ["alice.ema_reference_steps=1500"]  # EMA start 0.96 at 150 steps
PRED_BN = ["alice.predictor_hidden_dim=256", "alice.predictor_norm=bn"]
VARIANTS: dict[str, list[str]] = {
    "previous_default": PAPER + ["alice.online_aug.enabled=false"],
    "paper": PAPER,
    "ema_scaled": PAPER + EMA,
    "predictor_ln": PAPER + ["alice.predictor_hidden_dim=256", "alice.predictor_norm=ln"],
    "predictor_ln_ema": PAPER + ["alice.predictor_hidden_dim=256", "alice.predictor_norm=ln"] + EMA,
    "predictor_bn_ema": PAPER + PRED_BN + EMA,
    "warmup_ema": PAPER + ["alice.align_warmup_steps=50"] + EMA,
    "dino": PAPER + ["alice.similarity=dino"],
    "dino_ema": PAPER + ["alice.similarity=dino"] + EMA,
    "infonce": PAPER + ["alice.similarity=infonce"],
    "infonce_ema": PAPER + ["alice.similarity=infonce"] + EMA,
    "patch8_ema": PAPER + ["alice.patch_size=8"] + EMA,
    "head_bn": PAPER + ["alice.head_bn=true"],
    "head_bn_ema": PAPER + ["alice.head_bn=true"] + EMA,
    "head_bn_predictor": PAPER + ["alice.head_bn=true"] + PRED_BN,
    "head_bn_infonce_ema": PAPER + ["alice.head_bn=true", "alice.similarity=infonce"] + EMA,
    "head_bn_predictor_infonce_ema": ["alice.similarity=infonce"],
    "default": [],  # head_bn + BN predictor + run-length EMA (the shipped embedded default)
}


def summarize_run(run: Path) -> dict:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "loss" in r]
    quarter = recs[-max(1, len(recs) // 4):]
    tenth = max(1, len(recs) // 10)

    def mean(key: str, rows: list[dict]) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return statistics.mean(vals) if vals else None

    return {
        "steps": recs[-1]["step"],
        "target_std_last_quarter": mean("target_std", quarter),
        "online_std_last_quarter": mean("online_std", quarter),
        "target_std_min_last_quarter": min((r["target_std"] for r in quarter if "target_std" in r), default=None),
        "loss_rec_first": mean("loss_rec", recs[:tenth]),
        "loss_rec_last": mean("loss_rec", recs[-tenth:]),
        "inter_cos_last": mean("inter_cos", quarter),
        "intra_cos_last": mean("intra_cos", quarter),
        "grad_norm_last": mean("grad_norm", quarter),
    }


def run_variant(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    run = args.out / name
    cmd = [sys.executable, "-m", "alice3d.cli.pretrain", "--out", str(run), f"train.max_steps={args.steps}",
           *overrides, *args.extra]
    wall = None
    if not (run / "encoder.pt").exists():
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=open(args.out / f"{name}.log", "w"))
        wall = time.perf_counter() - t0
    return {"name": name, "overrides": overrides, "wall_s": wall, **summarize_run(run)}


def fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], random_acc: float, args: argparse.Namespace) -> str:
    cols = ["name", "target_std_last_quarter", "online_std_last_quarter", "loss_rec_first", "loss_rec_last",
            "inter_cos_last", "probe_linear", "probe_knn", "wall_s"]
    lines = [f"# Collapse sweep ({args.steps} steps, embedded default + overrides, {args.threads} thread(s) per run)", "",
             "| " + " | ".join(cols) + " | overrides |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " | " + " ".join(r["overrides"]) + " |")
    lines += ["", "random-init encoder, same probes: linear {linear:.3f}, kNN {knn:.3f}".format(**random_acc)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--only", nargs="*", default=None, help=f"variants to run (default all: {', '.join(VARIANTS)})")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every variant")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    names = args.only or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variants {unknown}; expected some of {list(VARIANTS)}")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda n: run_variant(n, VARIANTS[n], args), names))
    torch.set_num_threads(args.threads)
    tasks: dict = {}
    for r in rows:
        enc, meta = encoder_from_file(args.out / r["name"] / "encoder.pt")
        size = tuple(meta["crop_size"])
        if size not in tasks:
            tasks[size] = probe_task(crop=size)
        res = probe_encoder(enc, tasks[size])
        r["probe_linear"], r["probe_knn"] = res["linear"], res["knn"]
    first = args.out / rows[0]["name"] / "encoder.pt"
    res = probe_encoder(random_encoder_like(first), tasks[tuple(encoder_from_file(first)[1]["crop_size"])])
    random_acc = {"linear": res["linear"], "knn": res["knn"]}
    (args.out / "collapse_sweep.json").write_text(json.dumps({"rows": rows, "random_probe_acc": random_acc}, indent=1))
    md = markdown(rows, random_acc, args)
    (args.out / "collapse_sweep.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
