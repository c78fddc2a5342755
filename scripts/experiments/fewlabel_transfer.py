#!/usr/bin/env python
"""Few-label transfer on phantoms: Alice-pretrained encoder vs random init, same budget.

1. a labeled phantom cohort (BTCV layout, seed --phantom-seed, default 1) is generated for
   fine-tuning, or --data-root is used;
2. an encoder is pretrained with ``alice3d-pretrain`` (or --encoder PATH is used as is): by
   default on the embedded phantom cohort (seed 0, so no fine-tuning subject is seen in
   pretraining) with its cached landmark matcher; with --pretrain-data on that data, with
   --landmark or a matcher trained by ``alice3d-landmark train``;
3. ``alice3d-finetune`` runs twice per seed with identical settings on ``--n-labeled``
   training cases: ``--pretrained ENC`` (weights loaded) and ``--pretrained ENC
   model.init=random`` (the same architecture, random weights);
4. mean Dice / NSD of both arms on the validation cases are printed and written to
   OUT/fewlabel_summary.{json,md}, with every command that was run.

The fine-tuning task takes the encoder's spacing, HU window and crop size (as the ROI) from
its metadata (so the encoder sees the scale, intensities and token grid it was pretrained
on) unless --keep-task-geometry.

    python scripts/experiments/fewlabel_transfer.py --out runs/fewlabel --n-labeled 3 \
        --pretrain-steps 2000 --finetune-steps 300 --seeds 0 1 2
    python scripts/experiments/fewlabel_transfer.py --out runs/fewlabel --encoder RUN/encoder.pt
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], log: list[str], dry: bool) -> None:
    line = " ".join(shlex.quote(str(c)) for c in cmd)
    log.append(line)
    print(f"$ {line}", flush=True)
    if not dry:
        subprocess.run([str(c) for c in cmd], check=True)


def tool(name: str) -> list[str]:
    """The console script ``name``, or ``python -m alice3d.cli.<module>`` when only the module exists."""
    import importlib.util

    path = shutil.which(name)
    if path is not None:
        return [path]
    module = "alice3d.cli." + name.split("-", 1)[1]
    if importlib.util.find_spec(module) is not None:
        return [sys.executable, "-m", module]
    raise SystemExit(f"error: neither {name} nor {module} is available (pip install -e . in the repository)"
                     + ("; or pass --encoder PATH to skip pretraining" if name == "alice3d-pretrain" else ""))


def encoder_geometry(encoder: Path) -> list[str]:
    """task.spacing / task.hu_window / task.roi overrides from the encoder's metadata (when it
    has them): fine-tuning then sees the voxel size, intensities and token grid of pretraining."""
    from alice3d.encoders.files import load_encoder

    _, meta = load_encoder(encoder)
    out = []
    if meta.get("crop_size"):
        out.append("task.roi=[" + ",".join(str(int(s)) for s in meta["crop_size"]) + "]")
    if meta.get("spacing"):
        out.append("task.spacing=[" + ",".join(f"{float(s):g}" for s in meta["spacing"]) + "]")
    if meta.get("hu_window"):
        out.append("task.hu_window=[" + ",".join(f"{float(s):g}" for s in meta["hu_window"]) + "]")
    return out


def summarize(results: dict[str, list[dict]]) -> dict:
    out = {}
    for arm, runs in results.items():
        dice = [r["metrics"]["mean_dice"] for r in runs if r["metrics"]["mean_dice"] is not None]
        nsd = [r["metrics"]["mean_nsd"] for r in runs if r["metrics"]["mean_nsd"] is not None]
        out[arm] = {
            "mean_dice": statistics.mean(dice) if dice else None,
            "std_dice": statistics.pstdev(dice) if len(dice) > 1 else 0.0,
            "mean_nsd": statistics.mean(nsd) if nsd else None,
            "per_seed_dice": dice,
            "per_organ_dice": {o: statistics.mean(v for v in [r["metrics"]["per_organ"][o]["dice"]["mean"] for r in runs]
                                                   if v is not None) if any(r["metrics"]["per_organ"][o]["dice"]["mean"]
                                                                            is not None for r in runs) else None
                               for o in runs[0]["metrics"]["per_organ"]},
        }
    return out


def markdown(summary: dict, args: argparse.Namespace, commands: list[str]) -> str:
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"  # noqa: E731
    lines = ["# Few-label transfer on phantoms", "",
             f"{args.n_labeled} labeled training cases, {args.finetune_steps} fine-tuning steps, seeds {args.seeds}; "
             f"encoder {args.encoder_used}.", "",
             "| init | mean Dice (%) | ± std over seeds | mean NSD (%) |", "|---|---:|---:|---:|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {fmt(s['mean_dice'])} | {fmt(s['std_dice'])} | {fmt(s['mean_nsd'])} |")
    organs = list(next(iter(summary.values()))["per_organ_dice"])
    lines += ["", "| organ | " + " | ".join(summary) + " |", "|---|" + "---:|" * len(summary)]
    for o in organs:
        lines.append(f"| {o} | " + " | ".join(fmt(s["per_organ_dice"][o]) for s in summary.values()) + " |")
    lines += ["", "Commands:", "", "```"] + commands + ["```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=None, help="BTCV-layout folder; default: a generated phantom cohort")
    p.add_argument("--n-phantoms", type=int, default=24)
    p.add_argument("--phantom-seed", type=int, default=1, help="seed of the fine-tuning cohort (0 = the pretraining one)")
    p.add_argument("--phantom-size", default="small", help="phantom size preset (tiny, small, btcv)")
    p.add_argument("--encoder", type=Path, default=None, help="use this encoder.pt instead of pretraining")
    p.add_argument("--pretrain-data", type=Path, default=None,
                   help="unlabeled data for pretraining (default: alice3d-pretrain's embedded phantom cohort)")
    p.add_argument("--landmark", type=Path, default=None, help="landmark.pt for --pretrain-data (default: train one)")
    p.add_argument("--pretrain-config", type=Path, default=None, help="--config for alice3d-pretrain")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-args", nargs="*", default=[], help="extra key=value overrides for alice3d-pretrain")
    p.add_argument("--finetune-config", type=Path, default=None, help="--config for alice3d-finetune")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--finetune-args", nargs="*", default=[], help="extra key=value overrides for alice3d-finetune")
    p.add_argument("--n-labeled", type=int, default=3, help="labeled training cases used for fine-tuning")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--keep-task-geometry", action="store_true",
                   help="keep the task's spacing/HU window instead of the encoder's")
    p.add_argument("--device", default="auto")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    commands: list[str] = []

    data = args.data_root
    if data is None:
        data = out / "phantoms"
        if not (data / "dataset_0.json").exists():
            run([*tool("alice3d-data"), "phantoms", "--out", data, "--n", args.n_phantoms,
                 "--seed", args.phantom_seed, "--size", args.phantom_size], commands, args.dry_run)

    encoder = args.encoder
    if encoder is None:
        pre = out / "pretrain"
        encoder = pre / "encoder.pt"
        if not encoder.exists():
            cmd = [*tool("alice3d-pretrain"), "--out", pre, f"train.max_steps={args.pretrain_steps}",
                   f"train.device={args.device}", *args.pretrain_args]
            if args.pretrain_data is not None:
                landmark = args.landmark
                if landmark is None:
                    landmark = out / "landmark" / "landmark.pt"
                    if not landmark.exists():
                        run([*tool("alice3d-landmark"), "train", "--data", args.pretrain_data, "--out", landmark.parent,
                             f"train.device={args.device}"], commands, args.dry_run)
                cmd += ["--data", args.pretrain_data, "--landmark", landmark]
            if args.pretrain_config:
                cmd += ["--config", args.pretrain_config]
            run(cmd, commands, args.dry_run)
    geometry = [] if args.keep_task_geometry or args.dry_run else encoder_geometry(encoder)

    finetune = tool("alice3d-finetune")
    results: dict[str, list[dict]] = {"alice (pretrained)": [], "random init": []}
    for seed in args.seeds:
        for arm, init in (("alice (pretrained)", "pretrained"), ("random init", "random")):
            run_dir = out / f"{init}_seed{seed}"
            if not (run_dir / "results.json").exists():
                cmd = [*finetune, "--task", "btcv", "--data-root", data, "--pretrained", encoder, "--out", run_dir,
                       f"model.init={init}", f"data.n_labeled={args.n_labeled}", f"train.seed={seed}",
                       f"data.split_seed={seed}", f"train.max_steps={args.finetune_steps}",
                       f"train.device={args.device}", *geometry, *args.finetune_args]
                if args.finetune_config:
                    cmd += ["--config", args.finetune_config]
                run(cmd, commands, args.dry_run)
            if not args.dry_run:
                results[arm].append(json.loads((run_dir / "results.json").read_text()))
    if args.dry_run:
        return 0
    summary = summarize(results)
    args.encoder_used = encoder
    (out / "fewlabel_summary.json").write_text(json.dumps({"summary": summary, "commands": commands, "encoder": str(encoder),
                                                            "n_labeled": args.n_labeled, "seeds": args.seeds}, indent=2))
    md = markdown(summary, args, commands)
    (out / "fewlabel_summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
