#!/usr/bin/env python
"""Few-label transfer on phantoms: does pretraining help, and which part of Alice does it?

Protocol (every number it prints is measured by this script):

1. a labelled phantom cohort for evaluation (BTCV layout, seed --phantom-seed, default 1) is
   generated, or --data-root is used; pretraining never sees it (it runs on the embedded
   cohort, seed 0);
2. for every seed, one encoder per pretrained arm with ``alice3d-pretrain`` (train.seed = the
   seed) on the embedded cohort, the same ViT-tiny and step budget for all, so the seed spread
   covers pretraining as well as fine-tuning (--one-pretraining: one encoder per arm):
     mae                MAE (batch 2x Alice's, so both see the same number of crops per step)
     alice              Alice, the embedded default
     alice_same_volume  Alice with Q and K from the same volume (pairs.source=same_volume): no
                        inter-volume alignment (the paper's Table 5 ablation)
     alice_no_casa      Alice without CASA (alice.use_casa=false)
   plus ``random`` (random init, same architecture); ``alice_casa_ema`` (the teacher side of CASA
   from an EMA copy, alice.casa_target=ema) can be added with --arms;
3. frozen-feature probes: linear (logistic regression) and kNN on mean-pooled final tokens of
   organ-centre crops of the evaluation cohort (probe train/test = different subjects), one
   crop draw and encoder per seed (for random init, one random encoder per seed);
4. few-label fine-tuning: ``alice3d-finetune`` (UNETR around the encoder) on 2 and 6 labelled
   training cases (--n-labeled), one run per seed (the seed picks the cases and the training
   randomness, and the encoder of that seed), validated on the cohort's held-out validation cases;
5. OUT/fewlabel_summary.{json,md} (mean +- std over seeds, per organ, the verdicts, every
   command and the wall time of each phase; with train.eval_every > 0 in --finetune-args also
   the validation Dice at each validation step) and OUT/fewlabel_dice.png (Dice vs labelled
   cases per arm).

Settings (--setting): ``cpu`` (default; about 40 minutes on 2 CPU cores: two runs in
parallel, one thread each, fine-tuning in bf16), ``frozen`` (2 CPU cores, about 80 minutes: random
init, MAE and Alice at 2 labelled cases, the ViT frozen and 1,000 fine-tuning steps) and
``gpu`` (longer pretraining and fine-tuning, a bigger cohort and 5 seeds, one run at a time on
the GPU). Any value can be overridden by its flag.

    python scripts/experiments/fewlabel_transfer.py --out runs/fewlabel
    python scripts/experiments/fewlabel_transfer.py --out runs/fewlabel_frozen --setting frozen
    python scripts/experiments/fewlabel_transfer.py --out runs/fewlabel_gpu --setting gpu
    python scripts/experiments/fewlabel_transfer.py --out runs/fl --arms random alice --n-labeled 2 --seeds 0
    python scripts/experiments/fewlabel_transfer.py --out runs/fl --encoder alice=RUN/encoder.pt   # bring your own
    python scripts/experiments/fewlabel_transfer.py --cohort openkbp --data OPENKBP/dataset.json --out runs/fl_kbp

``--cohort openkbp`` runs the protocol on real head-and-neck CT (fewlabel_openkbp.py).

Runs whose outputs exist are reused, so an interrupted protocol continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from frozen_probe import first_labeled_volumes, probe_encoder, random_encoder_like

from alice3d.analysis.probing import encoder_from_file, organ_center_task
from alice3d.encoders.files import load_encoder
from alice3d.viz.plots import draw_lines, new_figure, save_figure


@dataclass(frozen=True)
class Arm:
    label: str
    pretrain: tuple[str, ...] | None  # alice3d-pretrain overrides; None = random init


ARMS: dict[str, Arm] = {
    "random": Arm("random init", None),
    "mae": Arm("MAE", ("method=mae", "train.batch_size=8")),
    "alice": Arm("Alice", ()),
    "alice_same_volume": Arm("Alice, same-volume pairs", ("pairs.source=same_volume",)),
    "alice_no_casa": Arm("Alice without CASA", ("alice.use_casa=false",)),
    # Not in the default protocol: the teacher side of CASA from an EMA copy instead of the live weights.
    "alice_casa_ema": Arm("Alice, EMA copy of CASA for the teacher", ("alice.casa_target=ema",)),
}
DEFAULT_ARMS = ["random", "mae", "alice", "alice_same_volume", "alice_no_casa"]

SETTINGS: dict[str, dict] = {
    # 2 CPU cores: two single-threaded runs side by side; fine-tuning in bf16 (train.cpu_amp).
    "cpu": dict(pretrain_steps=300, finetune_steps=150, n_phantoms=24, phantom_size="small", seeds=[0, 1, 2],
                jobs=2, threads=1, device="cpu", probe_volumes=12, probe_per_class=8,
                finetune_args=["eval.sw_overlap=0.25", "eval.n_previews=0", "train.eval_every=0", "train.cpu_amp=true"]),
    # 2 CPU cores, about 80 minutes: random init vs MAE vs Alice at 2 labelled cases with the ViT frozen
    # (optim.encoder_lr_scale=0: only the UNETR's convolutional path and decoder train), 1,000 steps,
    # where the features show (docs/results/fewlabel_phantoms.md).
    "frozen": dict(pretrain_steps=600, finetune_steps=1000, n_phantoms=24, phantom_size="small", seeds=[0, 1, 2],
                   jobs=2, threads=1, device="cpu", probe_volumes=12, probe_per_class=8,
                   arms=["random", "mae", "alice"], n_labeled=[2],
                   finetune_args=["eval.sw_overlap=0.25", "eval.n_previews=0", "train.eval_every=250",
                                  "train.cpu_amp=true", "optim.encoder_lr_scale=0"]),
    # One GPU: longer runs, a bigger pretraining and evaluation cohort, 5 seeds.
    "gpu": dict(pretrain_steps=5000, finetune_steps=2000, n_phantoms=48, phantom_size="small", seeds=[0, 1, 2, 3, 4],
                jobs=1, threads=8, device="cuda", probe_volumes=24, probe_per_class=16,
                pretrain_args=["data.phantom_n=64", "train.num_workers=4"],
                finetune_args=["eval.n_previews=0", "train.eval_every=0", "train.num_workers=4"]),
}


def quoted(cmd: list) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def tool(name: str) -> list[str]:
    """The console script ``name``, or ``python -m alice3d.cli.<module>`` when only the module exists."""
    path = shutil.which(name)
    if path is not None and Path(path).parent == Path(sys.executable).parent:
        return [path]
    return [sys.executable, "-m", "alice3d.cli." + name.split("-", 1)[1]]


class Runner:
    """Runs commands (in parallel lanes), logs every command line, each to its own log file."""

    def __init__(self, out: Path, threads: int, dry: bool) -> None:
        self.out, self.threads, self.dry = out, threads, dry
        self.commands: list[str] = []
        self.n_reused = 0
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def reused(self, cmd: list) -> None:
        """Log the command whose outputs are already there, so the summary lists every run it uses."""
        self.commands.append(quoted(cmd))
        self.n_reused += 1
        print(f"(done) {quoted(cmd)}\n", end="", flush=True)

    def __call__(self, cmd: list, name: str) -> None:
        line = quoted(cmd)
        self.commands.append(line)
        print(f"$ {line}\n", end="", flush=True)  # one write: lines of parallel lanes do not merge
        if self.dry:
            return
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            done = subprocess.run([str(c) for c in cmd], env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"error: {name} failed (exit {done.returncode}); see {self.out / 'logs' / (name + '.log')}")

    def parallel(self, jobs: list, lanes: int) -> None:
        """Each job is (command, name), or a list of them (and of callables) that runs in order in one lane."""
        def one(job) -> None:
            for step in (job if isinstance(job, list) else [job]):
                step() if callable(step) else self(*step)

        with ThreadPoolExecutor(max_workers=max(1, lanes)) as pool:
            list(pool.map(one, jobs))


# ----------------------------------------------------------------------------- phases


def evaluation_cohort(args, runner: Runner) -> Path:
    if args.data_root is not None:
        return args.data_root
    data = args.out / "phantoms"
    cmd = [*tool("alice3d-data"), "phantoms", "--out", data, "--n", args.n_phantoms, "--seed", args.phantom_seed,
           "--size", args.phantom_size]
    if (data / "dataset_0.json").exists():
        runner.reused(cmd)
    else:
        runner(cmd, "phantoms")
    return data


def pretrain_all(args, runner: Runner) -> dict[str, dict[int, Path]]:
    """arm -> seed -> encoder.pt. By default seed s pretrains its own encoder (train.seed=s), so the
    seed spread includes the spread of pretraining; with --one-pretraining every seed shares one
    encoder per arm (train.seed=--pretrain-seed). --encoder files serve every seed."""
    encoders = {name: {s: path for s in args.seeds} for name, path in args.encoder_files.items()}
    pretrain_seeds = args.seeds if args.pretrain_per_seed else [args.pretrain_seed]
    jobs = []
    for name in args.arms:
        arm = ARMS[name]
        if arm.pretrain is None or name in encoders:
            continue
        files = {}
        for pseed in pretrain_seeds:
            run = args.out / "pretrain" / (f"{name}_seed{pseed}" if args.pretrain_per_seed else name)
            files[pseed] = run / "encoder.pt"
            cmd = [*tool("alice3d-pretrain"), "--out", run, f"train.max_steps={args.pretrain_steps}",
                   f"train.device={args.device}", f"train.seed={pseed}", *arm.pretrain, *args.pretrain_args]
            if files[pseed].exists():
                runner.reused(cmd)
            elif run.exists():  # an interrupted run: the same command continues it
                jobs.append(([*cmd, "--resume"], f"pretrain_{run.name}"))
            else:
                jobs.append((cmd, f"pretrain_{run.name}"))
        encoders[name] = {s: files[s if args.pretrain_per_seed else args.pretrain_seed] for s in args.seeds}
    runner.parallel(jobs, args.jobs)
    return encoders


def reference_encoder(encoders: dict[str, dict[int, Path]], seed: int) -> Path:
    """The file whose architecture the random-init arm takes at `seed` (all arms share one architecture)."""
    files = encoders.get("alice") or next(iter(encoders.values()))
    return files[seed]


def geometry(encoder: Path) -> list[str]:
    """task.roi / spacing / hu_window of the encoder's pretraining, so fine-tuning sees the same
    voxel size, intensities and token grid."""
    _, meta = load_encoder(encoder)
    fmt = lambda v: "[" + ",".join(f"{float(s):g}" for s in v) + "]"  # noqa: E731
    return [f"task.roi=[{','.join(str(int(s)) for s in meta['crop_size'])}]", f"task.spacing={fmt(meta['spacing'])}",
            f"task.hu_window={fmt(meta['hu_window'])}"]


def probe_all(args, data: Path, encoders: dict[str, dict[int, Path]]) -> dict[str, dict]:
    """Linear / kNN accuracy per arm and seed on organ-centre crops of the evaluation cohort."""
    torch.set_num_threads(max(1, args.threads * args.jobs))
    meta = load_encoder(reference_encoder(encoders, args.seeds[0]))[1]
    vols = first_labeled_volumes(data, args.probe_volumes, args.out / "probe", meta["spacing"], meta["hu_window"])
    results: dict[str, dict] = {name: {"linear": [], "knn": [], "per_class": []} for name in args.arms}
    for seed in args.seeds:
        task = organ_center_task(vols, meta["crop_size"], per_class=args.probe_per_class, margin=1, seed=seed)
        print(f"probe task (seed {seed}): {task.describe()}", flush=True)
        for name in args.arms:
            if ARMS[name].pretrain is None:
                enc = random_encoder_like(reference_encoder(encoders, seed), seed)
            else:
                enc = encoder_from_file(encoders[name][seed])[0]
            res = probe_encoder(enc, task)
            results[name]["linear"].append(res["linear"])
            results[name]["knn"].append(res["knn"])
            results[name]["per_class"].append(res["linear_per_class"])
        del task
    return results


def finetune_all(args, runner: Runner, data: Path, encoders: dict[str, dict[int, Path]]) -> dict[str, dict[int, list[dict]]]:
    geo = [] if args.dry_run else geometry(reference_encoder(encoders, args.seeds[0]))
    jobs, runs = [], []
    for seed in args.seeds:
        for n in args.n_labeled:
            for name in args.arms:
                arm = ARMS[name]
                run = args.out / "finetune" / f"{name}_n{n}_seed{seed}"
                runs.append((name, n, run))
                enc = reference_encoder(encoders, seed) if arm.pretrain is None else encoders[name][seed]
                cmd = [*tool("alice3d-finetune"), "--task", "btcv", "--data-root", data, "--pretrained", enc,
                       "--out", run, f"model.init={'random' if arm.pretrain is None else 'pretrained'}",
                       f"data.n_labeled={n}", f"train.seed={seed}", f"data.split_seed={seed}",
                       f"train.max_steps={args.finetune_steps}", f"train.device={args.device}", *geo,
                       *args.finetune_args]
                if (run / "results.json").exists():
                    runner.reused(cmd)
                    continue
                if run.exists():
                    shutil.rmtree(run)  # an interrupted fine-tuning run is short: redo it
                jobs.append((cmd, run.name))
    runner.parallel(jobs, args.jobs)
    out: dict[str, dict[int, list[dict]]] = {name: {n: [] for n in args.n_labeled} for name in args.arms}
    if args.dry_run:
        return out
    for name, n, run in runs:
        res = json.loads((run / "results.json").read_text())
        res["curve"] = validation_curve(run / "metrics.jsonl")
        out[name][n].append(res)
    return out


def validation_curve(metrics_file: Path) -> dict[int, float]:
    """step -> validation mean Dice of one fine-tuning run, from its metrics.jsonl (empty if it never validated)."""
    curve: dict[int, float] = {}
    if not metrics_file.exists():
        return curve
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "val_mean_dice" in row:
            curve[int(row["step"])] = row["val_mean_dice"]  # a resumed run re-validates a step: the last one counts
    return curve


# ----------------------------------------------------------------------------- summary


def mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v is not None]
    return {"mean": statistics.mean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "values": vals}


def summarize(args, probes: dict, finetunes: dict) -> dict:
    summary: dict = {"arms": {}, "verdicts": {}}
    for name in args.arms:
        ft = {}
        for n, runs in finetunes[name].items():
            organs = list(runs[0]["metrics"]["per_organ"]) if runs else []
            ft[n] = {
                "dice": mean_std([r["metrics"]["mean_dice"] for r in runs]),
                "nsd": mean_std([r["metrics"]["mean_nsd"] for r in runs]),
                "per_organ_dice": {o: mean_std([r["metrics"]["per_organ"][o]["dice"]["mean"] for r in runs])["mean"]
                                   for o in organs},
                "curve": curve_over_seeds([r.get("curve", {}) for r in runs]),
            }
        summary["arms"][name] = {"label": ARMS[name].label, "finetune": ft,
                                 "probe_linear": mean_std(probes[name]["linear"]) if probes else None,
                                 "probe_knn": mean_std(probes[name]["knn"]) if probes else None}
    summary["verdicts"] = verdicts(args, summary["arms"])
    return summary


def curve_over_seeds(curves: list[dict[int, float]]) -> dict[int, dict]:
    """Validation Dice per step, mean/std over the runs; only steps every run validated at."""
    steps = set.intersection(*(set(c) for c in curves)) if curves else set()
    return {s: mean_std([c[s] for c in curves]) for s in sorted(steps)}


def _compare(a: dict, b: dict) -> dict:
    """a vs b (each mean/std/values): difference in points and whether it exceeds the seed spread."""
    diff = a["mean"] - b["mean"]
    spread = max(a["std"], b["std"])
    return {"diff": diff, "spread": spread, "beyond_spread": abs(diff) > spread}


def verdicts(args, arms: dict) -> dict:
    out: dict = {}
    n0 = min(args.n_labeled)
    have = lambda name: name in arms  # noqa: E731
    if have("alice") and have("random"):
        c = _compare(arms["alice"]["finetune"][n0]["dice"], arms["random"]["finetune"][n0]["dice"])
        c["target_met"] = c["diff"] >= 0.05 and c["diff"] > c["spread"]
        out[f"alice_vs_random_dice_n{n0}"] = c
        if arms["alice"]["probe_linear"]:
            out["alice_vs_random_probe_linear"] = _compare(arms["alice"]["probe_linear"], arms["random"]["probe_linear"])
            out["alice_vs_random_probe_knn"] = _compare(arms["alice"]["probe_knn"], arms["random"]["probe_knn"])
    if have("alice") and have("mae"):
        for n in args.n_labeled:
            out[f"alice_vs_mae_dice_n{n}"] = _compare(arms["alice"]["finetune"][n]["dice"], arms["mae"]["finetune"][n]["dice"])
        if arms["alice"]["probe_linear"]:
            out["alice_vs_mae_probe_linear"] = _compare(arms["alice"]["probe_linear"], arms["mae"]["probe_linear"])
    return out


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def markdown(args, summary: dict, timings: dict, commands: list[str], reused: int = 0) -> str:
    """The summary page. `reused`: runs whose outputs an earlier invocation made; their time is not in `timings`."""
    arms = summary["arms"]
    not_timed = (f" ({reused} run{'s' if reused > 1 else ''} reused from an earlier invocation"
                 f" {'are' if reused > 1 else 'is'} not in these times)") if reused else ""
    lines = ["# Few-label transfer on phantoms", "",
             f"Setting `{args.setting}`: pretraining {args.pretrain_steps} steps per arm "
             + ("and seed" if args.pretrain_per_seed else f"(seed {args.pretrain_seed})") + " on the embedded cohort; "
             f"fine-tuning {args.finetune_steps} steps on {' and '.join(map(str, args.n_labeled))} labelled cases of a "
             f"held-out cohort, seeds {args.seeds}; mean ± std over seeds (%). Wall time: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + not_timed + ".", "",
             "| arm | " + " | ".join(f"Dice n={n}" for n in args.n_labeled) + " | "
             + " | ".join(f"NSD n={n}" for n in args.n_labeled) + " | linear probe | kNN probe |",
             "|---|" + "---:|" * (2 * len(args.n_labeled) + 2)]
    for a in arms.values():
        ft = a["finetune"]
        cells = [f"{pct(ft[n]['dice']['mean'])} ± {pct(ft[n]['dice']['std'])}" for n in args.n_labeled]
        cells += [f"{pct(ft[n]['nsd']['mean'])} ± {pct(ft[n]['nsd']['std'])}" for n in args.n_labeled]
        for key in ("probe_linear", "probe_knn"):
            p = a[key]
            cells.append("n/a" if not p else f"{pct(p['mean'])} ± {pct(p['std'])}")
        lines.append(f"| {a['label']} | " + " | ".join(cells) + " |")
    lines += ["", "Verdicts (difference in points; spread = the larger seed std of the two):", ""]
    for key, v in summary["verdicts"].items():
        extra = f", target (>= 5 points and > spread) {'met' if v['target_met'] else 'missed'}" if "target_met" in v else ""
        lines.append(f"- {key}: {100 * v['diff']:+.2f} (spread {100 * v['spread']:.2f}; "
                     f"{'beyond' if v['beyond_spread'] else 'within'} the spread{extra})")
    for n in args.n_labeled:
        organs = list(next(iter(arms.values()))["finetune"][n]["per_organ_dice"])
        lines += ["", f"Per-organ Dice (%), n={n}, mean over seeds:", "",
                  "| organ | " + " | ".join(a["label"] for a in arms.values()) + " |", "|---|" + "---:|" * len(arms)]
        for o in organs:
            lines.append(f"| {o} | " + " | ".join(pct(a["finetune"][n]["per_organ_dice"][o]) for a in arms.values()) + " |")
    lines += curve_tables(args, arms)
    lines += ["", "Commands (OUT = the `--out` folder):", "", "```"] + [display(c, args.out) for c in commands] + ["```"]
    return "\n".join(lines) + "\n"


def curve_tables(args, arms: dict) -> list[str]:
    """Validation Dice during fine-tuning (train.eval_every > 0), one table per label count."""
    lines: list[str] = []
    for n in args.n_labeled:
        steps = sorted(set.intersection(*(set(a["finetune"][n]["curve"]) for a in arms.values())))
        if len(steps) < 2:  # a single validation is the main table's figure already
            continue
        lines += ["", f"Validation Dice (%) during fine-tuning, n={n}, mean ± std over seeds (last validation = the "
                  "last weights; the table above is each run's best checkpoint):", "",
                  "| step | " + " | ".join(a["label"] for a in arms.values()) + " |", "|---:|" + "---:|" * len(arms)]
        for s in steps:
            cells = [f"{pct(c['mean'])} ± {pct(c['std'])}" for c in (a["finetune"][n]["curve"][s] for a in arms.values())]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def display(line: str, out: Path) -> str:
    """A logged command as a user would type it: console script names, paths relative to OUT."""
    line = re.sub(r"^\S*/(alice3d-\w+) ", r"\1 ", line)
    line = re.sub(r"^\S*python\S* -m alice3d\.cli\.(\w+) ", r"alice3d-\1 ", line)
    return line.replace(str(out), "OUT")


def plot(args, summary: dict, path: Path) -> None:
    """Mean Dice vs labelled cases, one line per arm, error bars = std over seeds."""
    fig, axes = new_figure((420, 640))
    ax = axes[0, 0]
    series, errors = {}, {}
    for a in summary["arms"].values():
        ns = [n for n in args.n_labeled if a["finetune"][n]["dice"]["mean"] is not None]
        series[a["label"]] = (ns, [100 * a["finetune"][n]["dice"]["mean"] for n in ns])
        errors[a["label"]] = [100 * a["finetune"][n]["dice"]["std"] for n in ns]
    draw_lines(ax, series, title="Few-label fine-tuning on held-out phantoms", xlabel="labelled training cases",
               ylabel="mean Dice (%)", integer_x=True)
    for line, (label, (xs, ys)) in zip(ax.get_lines(), series.items()):
        ax.errorbar(xs, ys, yerr=errors[label], fmt="none", capsize=3, ecolor=line.get_color())
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def add_run_options(p: argparse.ArgumentParser, dry_run_help: str) -> None:
    """The options every protocol shares: how many runs at once, threads, device, dry run."""
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel")
    p.add_argument("--threads", type=int, default=None, help="threads per run")
    p.add_argument("--device", default=None)
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)


def apply_setting(args: argparse.Namespace, settings: dict[str, dict]) -> argparse.Namespace:
    """Fill every option left unset (None) from the chosen --setting."""
    for key, value in settings[args.setting].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def cohort_of(argv: list[str]) -> str:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--cohort", choices=["phantoms", "openkbp"], default="phantoms")
    return p.parse_known_args(argv)[0].cohort


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", choices=["phantoms", "openkbp"], default="phantoms",
                   help="openkbp: the protocol on real CT (fewlabel_openkbp.py; its own options: "
                        "--cohort openkbp --help)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None,
                   help=f"default: the setting's, else {' '.join(DEFAULT_ARMS)}")
    p.add_argument("--n-labeled", type=int, nargs="+", default=None, help="labelled training cases (default 2 6)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--one-pretraining", action="store_true",
                   help="one encoder per arm for every seed (train.seed=--pretrain-seed) instead of one per seed")
    p.add_argument("--pretrain-seed", type=int, default=0)
    p.add_argument("--pretrain-args", nargs="*", default=None, help="key=value overrides for every alice3d-pretrain")
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--finetune-args", nargs="*", default=None, help="key=value overrides for every alice3d-finetune")
    p.add_argument("--encoder", nargs="*", default=[], metavar="ARM=PATH", help="use this encoder.pt for an arm")
    p.add_argument("--data-root", type=Path, default=None, help="BTCV-layout evaluation cohort; default: phantoms")
    p.add_argument("--n-phantoms", type=int, default=None)
    p.add_argument("--phantom-seed", type=int, default=1, help="seed of the evaluation cohort (0 = the pretraining one)")
    p.add_argument("--phantom-size", default=None)
    p.add_argument("--probe-volumes", type=int, default=None, help="evaluation cases the probes use")
    p.add_argument("--probe-per-class", type=int, default=None)
    p.add_argument("--no-probe", action="store_true")
    add_run_options(p, dry_run_help="print the commands only")
    args = apply_setting(p.parse_args(argv), SETTINGS)
    args.arms = args.arms or list(DEFAULT_ARMS)
    args.n_labeled = args.n_labeled or [2, 6]
    args.pretrain_per_seed = not args.one_pretraining
    args.pretrain_args = args.pretrain_args or []
    args.finetune_args = args.finetune_args or []
    args.encoder_files = {}
    for item in args.encoder:
        arm, sep, path = item.partition("=")
        if not sep or arm not in ARMS or ARMS[arm].pretrain is None:
            p.error(f"--encoder {item!r}: expected ARM=PATH with ARM one of {[a for a in ARMS if ARMS[a].pretrain is not None]}")
        args.encoder_files[arm] = Path(path).resolve()
    if len(args.seeds) < 2:
        print("note: one seed gives no spread; the protocol uses at least 3", flush=True)
    args.out = args.out.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if cohort_of(argv) == "openkbp":
        import fewlabel_openkbp

        return fewlabel_openkbp.main(argv)
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.out, args.threads, args.dry_run)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = evaluation_cohort(args, runner)
    encoders = pretrain_all(args, runner)
    timings["pretraining"] = time.perf_counter() - t0
    if not encoders:
        raise SystemExit("error: every arm is random init; add a pretrained arm (its file gives the architecture)")
    probes: dict = {}
    if not args.no_probe and not args.dry_run:
        t1 = time.perf_counter()
        probes = probe_all(args, data, encoders)
        timings["probes"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    finetunes = finetune_all(args, runner, data, encoders)
    timings["fine-tuning"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    if args.dry_run:
        return 0
    summary = summarize(args, probes, finetunes)
    (args.out / "fewlabel_summary.json").write_text(json.dumps(
        {"setting": args.setting, "summary": summary, "probes": probes, "timings_s": timings,
         "commands": runner.commands, "n_labeled": args.n_labeled, "seeds": args.seeds,
         "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
         "encoders": {k: {str(s): str(p) for s, p in v.items()} for k, v in encoders.items()}}, indent=2))
    md = markdown(args, summary, timings, runner.commands, runner.n_reused)
    (args.out / "fewlabel_summary.md").write_text(md)
    plot(args, summary, args.out / "fewlabel_dice.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
