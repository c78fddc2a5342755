"""Few-label transfer on real head-and-neck CT (OpenKBP): Alice against scratch, MAE and its own controls.

Run through ``fewlabel_transfer.py --cohort openkbp --data DATASET.json`` (DATASET.json: what
``alice3d-data import openkbp`` writes). Every number in the outputs is measured by this script.

Data (splits written to OUT/splits/, all from the challenge's own split):
- labelled pool: the first 12 train-pats of ``np.random.default_rng(0).permutation`` over the
  datalist's training order; pools of 2 and 6 are nested subsets of it, drawn per seed
  (``default_rng(seed).permutation(12)``), 12 = the whole pool;
- unlabelled: the other train-pats; the landmark model (trained here unless --landmark) and
  every pretraining see only these;
- checkpoint selection: the first --val-cases validation-pats;
- test: --test-cases test-pats (``default_rng(1234)`` permutation), scored once by
  ``alice3d-finetune evaluate`` after training, never used for any choice; the probes and the
  retrieval use the first --probe-patients of them.

Arms (``alice3d-pretrain`` overrides on top of the common ones, see ARMS): random init, MAE (with
Alice's online views and trainable position embeddings, batch 2x Alice's), Alice, and Alice's
controls: reconstruction only (w_inter = w_intra = 0), random pairs (K at a random body point of
another volume), the paper's Table-5 row (same volume, w_inter = 0) and a fair "no CASA" (token
means of H and Y per volume). Each seed pretrains every arm once (train.seed = seed), so arms
are paired by seed.

Per seed and arm: frozen probes on test patients (linear and kNN on features at random voxels
of each contoured OAR, probe-train and probe-test patients disjoint) and cross-patient
retrieval (``alice3d.analysis.correspondence``). Then fine-tuning (``--finetune-arms``, default
random init, MAE, Alice) on each pool and seed, UNETR around the encoder, best checkpoint on
the validation cases, Dice/NSD on the test cases with partial labels respected.

Every difference is a paired crossed bootstrap over seeds x test cases
(``alice3d.analysis.stats.paired_bootstrap``, 95 %). The order is seed-major (all arms of seed 0,
then seed 1, ...), pretraining and probes before fine-tuning, and OUT/fewlabel_openkbp.{json,md,png}
are rewritten after every step, so a run stopped early still reports paired, complete seeds.
Runs whose outputs exist are reused: rerunning the same command continues the protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alice3d.analysis.correspondence import retrieval_scores, retrieval_task
from alice3d.analysis.probing import encoder_from_file, frozen_tokens, knn_probe, linear_probe, organ_center_task
from alice3d.analysis.stats import paired_bootstrap
from alice3d.data.canonical import to_canonical
from alice3d.data.io import DataError, Volume, load_volume
from alice3d.data.volumes import normalize_hu
from alice3d.encoders.files import load_encoder
from alice3d.viz.plots import draw_lines, new_figure, save_figure


@dataclass(frozen=True)
class Arm:
    label: str
    pretrain: tuple[str, ...] | None  # alice3d-pretrain overrides; None = random init
    landmark: bool = False  # its pairs come from the landmark matcher


ARMS: dict[str, Arm] = {
    "random": Arm("random init", None),
    "mae": Arm("MAE", ("method=mae", "mae.online_aug.enabled=true", "mae.pos_embed_trainable=true")),
    "alice": Arm("Alice", ("method=alice",), landmark=True),
    "alice_random_pairs": Arm("Alice, random pairs", ("method=alice", "pairs.source=random")),
    "alice_same_volume": Arm("Alice, same volume, w_inter=0",
                             ("method=alice", "pairs.source=same_volume", "alice.w_inter=0")),
    "alice_recon_only": Arm("Alice, reconstruction only", ("method=alice", "alice.w_inter=0", "alice.w_intra=0"),
                            landmark=True),
    "alice_no_casa": Arm("Alice without CASA (pooled)",
                         ("method=alice", "alice.use_casa=false", "alice.intra_without_casa=pooled"), landmark=True),
    # Follow-up of the first run: the alignment terms outweighed reconstruction and the frozen features
    # lost what reconstruction alone learns; the same pipeline with both alignment weights at 0.1.
    "alice_weak_align": Arm("Alice, w_inter = w_intra = 0.1", ("method=alice", "alice.w_inter=0.1", "alice.w_intra=0.1"),
                            landmark=True),
}
DEFAULT_ARMS = list(ARMS)
DEFAULT_FINETUNE_ARMS = ["random", "mae", "alice"]
CONTROLS = ["alice_recon_only", "alice_random_pairs", "alice_same_volume", "alice_no_casa", "alice_weak_align"]
POOL_SIZE = 12

# Crop centres drawn class by class: with foreground/background centres (aug.crop=posneg) 800 steps
# learned only the two or three largest OARs (scratch, 12 patients: validation Dice 0.14); class by
# class, the parotids and the mandible too (0.32 at step 800 of 1600). See docs/PRETRAINING.md.
FINETUNE_RECIPE = ["aug.crop=classes"]

SETTINGS: dict[str, dict] = {
    # 2 CPU cores: two single-threaded runs side by side, fine-tuning in bf16.
    "cpu": dict(seeds=[0, 1, 2, 3, 4], pools=[2, 6, 12], pretrain_steps=500, finetune_steps=1000, jobs=2, threads=1,
                device="cpu", val_cases=6, test_cases=24, probe_patients=12, landmark_steps=300,
                pretrain_args=["data.spacing=[4,4,3]", "train.batch_size=4"],
                finetune_args=["eval.sw_overlap=0.25", "eval.n_previews=0", "train.eval_every=200",
                               "train.cpu_amp=true", "train.batch_size=2", *FINETUNE_RECIPE]),
    "gpu": dict(seeds=[0, 1, 2, 3, 4], pools=[2, 6, 12], pretrain_steps=3000, finetune_steps=3000, jobs=1, threads=8,
                device="cuda", val_cases=16, test_cases=83, probe_patients=24, landmark_steps=2000,
                pretrain_args=["data.spacing=[4,4,3]", "train.batch_size=8", "train.num_workers=4"],
                finetune_args=["eval.n_previews=0", "train.eval_every=500", "train.num_workers=4", *FINETUNE_RECIPE]),
}


# ----------------------------------------------------------------------------- splits


def _absolute(entry: dict, root: Path) -> dict:
    out = dict(entry)
    for key in ("image", "label"):
        if key in out and not Path(out[key]).is_absolute():
            out[key] = str((root / out[key]).resolve())
    return out


def write_splits(datalist: Path, out: Path, seeds: list[int], pools: list[int], val_cases: int,
                 test_cases: int) -> dict:
    """The protocol's datalists under `out` (see the module docstring); returns their paths and ids."""
    doc = json.loads(Path(datalist).read_text())
    for key in ("training", "validation", "test"):
        if not doc.get(key):
            raise DataError(f"{datalist}: expected a non-empty '{key}' list (the OpenKBP importer writes all three)")
    root = Path(datalist).resolve().parent
    train = [_absolute(e, root) for e in doc["training"]]
    if len(train) <= POOL_SIZE:
        raise DataError(f"{datalist}: {len(train)} training cases; the protocol needs more than {POOL_SIZE}")
    order = np.random.default_rng(0).permutation(len(train))
    pool = [train[i] for i in order[:POOL_SIZE]]
    pool_ids = {e["image"] for e in pool}
    unlabelled = [{"image": e["image"]} for e in train if e["image"] not in pool_ids]
    val = [_absolute(e, root) for e in doc["validation"]][:val_cases]
    test_all = [_absolute(e, root) for e in doc["test"]]
    test = [test_all[i] for i in np.random.default_rng(1234).permutation(len(test_all))[:test_cases]]
    base = {k: doc[k] for k in ("labels", "modality", "name") if k in doc}
    out.mkdir(parents=True, exist_ok=True)
    paths = {"unlabelled": out / "unlabelled.json", "test": out / "test.json", "pools": {}}
    _write_json(paths["unlabelled"], {**base, "training": unlabelled})
    _write_json(paths["test"], {**base, "test": test})
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(POOL_SIZE)
        for n in pools:
            if not 1 <= n <= POOL_SIZE:
                raise ValueError(f"pool size {n}: expected 1..{POOL_SIZE}")
            chosen = pool if n == POOL_SIZE else [pool[i] for i in perm[:n]]
            path = out / f"pool_n{n}_seed{seed}.json"
            _write_json(path, {**base, "training": chosen, "validation": val, "test": test})
            paths["pools"][(n, seed)] = path
    return {"paths": paths, "pool": [Path(e["image"]).name for e in pool], "n_unlabelled": len(unlabelled),
            "validation": [Path(e["image"]).name for e in val], "test": [Path(e["image"]).name for e in test],
            "test_entries": test}


def _write_json(path: Path, doc: dict) -> None:
    text = json.dumps(doc, indent=1)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# ----------------------------------------------------------------------------- pretraining


def landmark_model(args, runner, splits: dict) -> Path:
    if args.landmark is not None:
        return args.landmark
    run = args.out / "landmark"
    model = run / "landmark.pt"
    cmd = [*args.tool("alice3d-landmark"), "train", "--data", splits["paths"]["unlabelled"], "--out", run,
           f"train.max_steps={args.landmark_steps}", f"train.device={args.device}"]
    if model.exists():
        runner.reused(cmd)
    else:
        runner([*cmd, "--resume"] if run.exists() else cmd, "landmark")
    return model


def pretrain_seed(args, runner, splits: dict, seed: int, landmark: Path | None) -> dict[str, Path]:
    """arm -> encoder.pt of `seed` (pretraining the arms that do not have one yet, --jobs at a time)."""
    files, jobs = {}, []
    for name in args.arms:
        arm = ARMS[name]
        if arm.pretrain is None:
            continue
        run = args.out / "pretrain" / f"{name}_seed{seed}"
        files[name] = run / "encoder.pt"
        batch = ["train.batch_size=8"] if name == "mae" else []  # MAE sees as many crops per step as Alice's Q + K
        lm = ["--landmark", landmark] if arm.landmark and landmark is not None else []
        cmd = [*args.tool("alice3d-pretrain"), "--data", splits["paths"]["unlabelled"], *lm, "--out", run,
               f"train.max_steps={args.pretrain_steps}", f"train.device={args.device}", f"train.seed={seed}",
               f"train.num_threads={args.threads}", *args.pretrain_args, *arm.pretrain, *batch]
        if files[name].exists():
            runner.reused(cmd)
        elif run.exists():  # an interrupted run: the same command continues it
            jobs.append(([*cmd, "--resume"], f"pretrain_{run.name}"))
        else:
            jobs.append((cmd, f"pretrain_{run.name}"))
    runner.parallel(jobs, args.jobs)
    return files


def random_encoder(reference: Path, seed: int) -> torch.nn.Module:
    """The architecture of `reference` with the weights of a fresh ViT seeded by `seed`."""
    from frozen_probe import random_encoder_like

    return random_encoder_like(reference, seed)


# ----------------------------------------------------------------------------- probes


def probe_volumes(entries: list[dict], spacing, hu_window) -> tuple[list[Volume], list[list[int]]]:
    vols, contoured = [], []
    for e in entries:
        vol = to_canonical(load_volume(e["image"], e["label"]), spacing)
        vols.append(Volume(array=normalize_hu(vol.array, hu_window), affine=vol.affine, path=vol.path, label=vol.label))
        contoured.append(list(e.get("contoured") or []) or None)
    return vols, contoured


def per_subject(correct: torch.Tensor, subjects: torch.Tensor, n: int) -> list[float | None]:
    """Accuracy per subject index 0..n-1 (None where the subject has no test crop)."""
    out = []
    for j in range(n):
        sel = subjects == j
        out.append(float(correct[sel].float().mean()) if sel.any() else None)
    return out


def probe_seed(args, splits: dict, seed: int, encoders: dict[str, Path], cache: dict) -> dict[str, dict]:
    """arm -> probe and retrieval scores of `seed`, per test patient (the cases of the bootstrap)."""
    reference = encoders.get("alice") or next(iter(encoders.values()))
    meta = load_encoder(reference)[1]
    if "vols" not in cache:
        entries = splits["test_entries"][: args.probe_patients]
        cache["vols"] = probe_volumes(entries, meta["spacing"], meta["hu_window"])
        cache["names"] = [Path(e["image"]).name for e in entries]
    vols, contoured = cache["vols"]
    organs = {name: int(k) for k, name in args.labels.items() if int(k) > 0}
    n = len(vols)
    half = n // 2
    task = organ_center_task(vols, meta["crop_size"], classes={o: (i,) for o, i in organs.items()}, per_class=8,
                             train_fraction=half / n, seed=seed, contoured=contoured, other=False)
    spacing_z = float(meta["spacing"][2])
    retrieval = cache.get("retrieval")
    if retrieval is None:
        retrieval = cache["retrieval"] = retrieval_task(vols, meta["crop_size"], organs, contoured,
                                                        n_candidates=20, step=args.retrieval_step, spacing_mm=spacing_z)
    out = {}
    for name in args.arms:
        enc = random_encoder(reference, seed) if ARMS[name].pretrain is None else encoder_from_file(encoders[name])[0]
        tokens = frozen_tokens(enc, task.images)
        test_subjects = task.subjects[~task.train]
        lin, knn = linear_probe(tokens, task), knn_probe(tokens, task)
        ret = retrieval_scores(enc, retrieval)
        out[name] = {
            "linear": lin.test_acc, "knn": knn.test_acc,
            "linear_per_patient": per_subject(lin.test_correct, test_subjects, n)[half:],
            "knn_per_patient": per_subject(knn.test_correct, test_subjects, n)[half:],
            "retrieval_top1": ret["top1_mean"], "retrieval_error_mm": ret["error_mm_mean"],
            "retrieval_per_patient": _nan_to_none(ret["per_patient_top1"]),
            "retrieval_error_per_patient": _nan_to_none(ret["per_patient_error_mm"]),
            "retrieval_per_organ": ret["per_organ_top1"],
        }
        print(f"probe seed {seed} {name}: linear {lin.test_acc:.3f} kNN {knn.test_acc:.3f} "
              f"retrieval top-1 {ret['top1_mean']:.3f} ({ret['error_mm_mean']:.1f} mm)", flush=True)
    return out


def _nan_to_none(values) -> list[float | None]:
    return [None if v is None or not math.isfinite(float(v)) else float(v) for v in values]


# ----------------------------------------------------------------------------- fine-tuning


def finetune_jobs(args, runner, splits: dict, seed: int, encoders: dict[str, Path], geo: list[str],
                  on_done) -> list[list]:
    """One lane job per (pool, arm) of `seed`: fine-tune, score the test split, then `on_done()`."""
    reference = encoders.get("alice") or next(iter(encoders.values()))
    jobs = []
    for n in args.pools:
        for name in args.finetune_arms:
            arm = ARMS[name]
            run = args.out / "finetune" / f"{name}_n{n}_seed{seed}"
            data = splits["paths"]["pools"][(n, seed)]
            enc = reference if arm.pretrain is None else encoders[name]
            train = [*args.tool("alice3d-finetune"), "--task", "custom", "--data-root", data, "--pretrained", enc,
                     "--out", run, f"model.init={'random' if arm.pretrain is None else 'pretrained'}",
                     f"train.seed={seed}", f"train.max_steps={args.finetune_steps}", f"train.device={args.device}",
                     f"train.num_threads={args.threads}", *geo, *args.finetune_args]
            test = [*args.tool("alice3d-finetune"), "evaluate", "--run", run, "--data", data, "--split", "test",
                    "--device", args.device]
            stale = changed_settings(run / "config.yaml", train)
            if stale and (run / "results.json").exists():
                print(f"{run.name}: made with other settings ({'; '.join(stale)}), fine-tuned again", flush=True)
                shutil.rmtree(run)
            if (run / "test_results.json").exists():
                runner.reused(train)
                runner.reused(test)
                continue
            steps: list = []
            if (run / "results.json").exists():
                runner.reused(train)
            else:
                if run.exists():
                    shutil.rmtree(run)  # an interrupted fine-tuning run is short: redo it
                steps.append((train, run.name))
            steps += [(test, f"{run.name}_test"), on_done]
            jobs.append(steps)
    return jobs


# Settings that change where a run computes, not what it learns: a run resumed elsewhere is not stale.
PLACEMENT_KEYS = ("train.device", "train.num_threads", "train.num_workers")


def changed_settings(config: Path, cmd: list) -> list[str]:
    """The ``key=value`` overrides of `cmd` that the run's saved `config` (its config.yaml) does not
    hold, as ``"key: saved -> wanted"``; [] when it holds them all or there is no config yet."""
    if not config.exists():
        return []
    import yaml

    saved = yaml.safe_load(config.read_text()) or {}
    changed = []
    for token in map(str, cmd):
        if "=" not in token or token.startswith("-"):
            continue
        key, value = token.split("=", 1)
        if key in PLACEMENT_KEYS:
            continue
        node = saved
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        wanted = yaml.safe_load(value)
        if node is KeyError or node != wanted:
            changed.append(f"{key}: {'(none)' if node is KeyError else node} -> {wanted}")
    return changed


def test_scores(run: Path, case_names: list[str]) -> dict | None:
    """Per test case mean Dice / NSD over the organs it contours (the bootstrap's cells), and the run's
    aggregate figures; None if the run has not been tested."""
    path = run / "test_results.json"
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    cases = res["cases"]

    def case_mean(case: dict | None, kind: str) -> float | None:
        if case is None:
            return None
        vals = [v for v in case[kind].values() if v is not None]
        return float(np.mean(vals)) if vals else None

    by_name = {}
    for cid, case in cases.items():
        by_name[Path(cid).name.split(".")[0]] = case
    keyed = [by_name.get(Path(name).name.split(".")[0]) for name in case_names]
    return {"dice_per_case": [case_mean(c, "dice") for c in keyed], "nsd_per_case": [case_mean(c, "nsd") for c in keyed],
            "mean_dice": res["metrics"]["mean_dice"], "mean_nsd": res["metrics"]["mean_nsd"],
            "per_organ_dice": {o: v["dice"]["mean"] for o, v in res["metrics"]["per_organ"].items()},
            "checkpoint_step": res.get("checkpoint_step")}


# ----------------------------------------------------------------------------- summary

DIAGNOSTICS = ("loss_rec", "loss_inter", "loss_intra", "intra_cos", "online_erank", "target_erank")


def pretrain_diagnostics(run: Path, last: int = 50) -> dict[str, float]:
    """Means over the last `last` logged steps of a pretraining run's metrics.jsonl: which term
    carries the loss, and the effective rank of the online / target features (1 = collapsed)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r][-last:]
    return {k: float(np.mean([r[k] for r in rows])) for k in DIAGNOSTICS if rows and all(k in r for r in rows)}



def _matrix(per_seed: dict[int, list], seeds: list[int]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in per_seed[s]] for s in seeds], dtype=np.float64)


def compare(values: dict[str, dict[int, list]], a: str, b: str) -> dict | None:
    """Paired bootstrap of arm a - arm b over the seeds both have."""
    if a not in values or b not in values:
        return None
    seeds = sorted(set(values[a]) & set(values[b]))
    if not seeds:
        return None
    try:
        res = paired_bootstrap(_matrix(values[a], seeds), _matrix(values[b], seeds)).as_dict()
    except ValueError:
        return None
    return {**res, "seeds": seeds}


def summarize(args, splits: dict, probes: dict, finetunes: dict) -> dict:
    """probes: seed -> arm -> scores; finetunes: (arm, n, seed) -> test_scores."""
    metrics: dict[str, dict[str, dict[int, list]]] = {}
    for key, field in (("linear", "linear_per_patient"), ("knn", "knn_per_patient"),
                       ("retrieval_top1", "retrieval_per_patient"), ("retrieval_error_mm", "retrieval_error_per_patient")):
        metrics[key] = {}
        for seed, arms in probes.items():
            for arm, res in arms.items():
                metrics[key].setdefault(arm, {})[seed] = res[field]
    for (arm, n, seed), res in finetunes.items():
        if res is None:
            continue
        metrics.setdefault(f"dice_n{n}", {}).setdefault(arm, {})[seed] = res["dice_per_case"]
        metrics.setdefault(f"nsd_n{n}", {}).setdefault(arm, {})[seed] = res["nsd_per_case"]
    table: dict[str, dict[str, dict]] = {}
    for key, per_arm in metrics.items():
        table[key] = {}
        for arm, per_seed in per_arm.items():
            seed_means = [float(np.nanmean(np.array([np.nan if v is None else v for v in vals], dtype=float)))
                          for vals in per_seed.values() if any(v is not None for v in vals)]
            table[key][arm] = {"mean": float(np.mean(seed_means)) if seed_means else None,
                               "std": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else 0.0,
                               "seeds": sorted(per_seed)}
    pairs = [("mae", "random"), ("alice", "random"), ("alice", "mae")] + [("alice", c) for c in CONTROLS]
    pairs += [("alice_weak_align", "mae"), ("alice_weak_align", "alice_recon_only")]
    comparisons = {key: {f"{a} - {b}": c for a, b in pairs if (c := compare(per_arm, a, b)) is not None}
                   for key, per_arm in metrics.items()}
    targets = {}
    for n in (2, 6):
        for arm in ("mae", "alice"):
            c = comparisons.get(f"dice_n{n}", {}).get(f"{arm} - random")
            if c is not None:
                targets[f"{arm} beats scratch at {n} labels"] = c["low"] > 0
    scratch12 = [r for (arm, n, s), r in finetunes.items() if arm == "random" and n == POOL_SIZE and r]
    if scratch12:
        dice = float(np.mean([r["mean_dice"] for r in scratch12]))
        organs_above_0 = all(all((v or 0) > 0 for v in r["per_organ_dice"].values()) for r in scratch12)
        targets["scratch at 12 labels >= 0.50 mean test Dice, every OAR above 0"] = dice >= 0.5 and organs_above_0
    diagnostics = {}
    for arm in args.arms:
        if ARMS[arm].pretrain is None:
            continue
        per_seed = [d for s in sorted(probes) if (d := pretrain_diagnostics(args.out / "pretrain" / f"{arm}_seed{s}"))]
        if per_seed:
            diagnostics[arm] = {k: float(np.mean([d[k] for d in per_seed])) for k in per_seed[0]}
    return {"table": table, "comparisons": comparisons, "targets": targets, "pretraining": diagnostics}


def markdown(args, splits: dict, summary: dict, timings: dict, commands: list[str], display) -> str:
    table, comps = summary["table"], summary["comparisons"]
    labels = {name: ARMS[name].label for name in ARMS}
    lines = ["# Few-label transfer on OpenKBP head-and-neck CT", "",
             f"Setting `{args.setting}`: pretraining {args.pretrain_steps} steps per arm and seed on "
             f"{splits['n_unlabelled']} unlabelled train-pats; fine-tuning {args.finetune_steps} steps on pools of "
             f"{', '.join(map(str, args.pools))} labelled train-pats, best checkpoint on {len(splits['validation'])} "
             f"validation-pats, Dice/NSD on {len(splits['test'])} test-pats (never used for a choice); probes and "
             f"retrieval on {args.probe_patients} of those test-pats. Seeds {args.seeds}. Fine-tuning settings: "
             f"{' '.join(args.finetune_args)}. Wall time of the last invocation (runs it reused cost nothing): "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".", "",
             "Values: mean ± std over the seeds done (in brackets: how many); probe and Dice figures in %, "
             "retrieval error in mm. A patient's Dice (NSD) is its mean over the organs it contours; the tables "
             "average patients (the cells of the bootstrap), so they differ from the per-organ means in each run's "
             "test_results.md.", ""]
    keys = [k for k in ("linear", "knn", "retrieval_top1", "retrieval_error_mm") if k in table]
    keys += [f"dice_n{n}" for n in args.pools if f"dice_n{n}" in table] + [f"nsd_n{n}" for n in args.pools
                                                                             if f"nsd_n{n}" in table]
    lines += ["| arm | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for arm in args.arms:
        cells = []
        for k in keys:
            v = table[k].get(arm)
            scale = 1 if k == "retrieval_error_mm" else 100
            cells.append("" if v is None or v["mean"] is None else
                         f"{scale * v['mean']:.1f} ± {scale * v['std']:.1f} ({len(v['seeds'])})")
        lines.append(f"| {labels[arm]} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (a - b; bootstrap 95 % interval over seeds x test patients; * = excludes 0):", ""]
    for key in keys:
        if not comps.get(key):
            continue
        scale = 1 if key == "retrieval_error_mm" else 100
        lines.append(f"- {key}: " + "; ".join(
            f"{c_name} {scale * c['diff']:+.2f} [{scale * c['low']:+.2f}, {scale * c['high']:+.2f}]"
            f"{'*' if c['excludes_zero'] else ''} ({len(c['seeds'])} seed{'s' if len(c['seeds']) > 1 else ''})" for c_name, c in comps[key].items()))
    if summary.get("pretraining"):
        lines += ["", "Pretraining, last 50 steps, mean over the seeds probed (loss terms before their weights, 0 where "
                  "a term is off; loss_rec sums Q's and K's; erank: effective rank of the batch's features, 1 = "
                  "collapsed):", "",
                  "| arm | " + " | ".join(DIAGNOSTICS) + " |", "|---|" + "---:|" * len(DIAGNOSTICS)]
        for arm, d in summary["pretraining"].items():
            lines.append(f"| {labels[arm]} | " + " | ".join(f"{d[k]:.3f}" if k in d else "" for k in DIAGNOSTICS) + " |")
    if summary["targets"]:
        lines += ["", "Targets of the protocol:", ""]
        lines += [f"- {k}: {'met' if v else 'not met'}" for k, v in summary["targets"].items()]
    lines += ["", f"Labelled pool (12): {', '.join(splits['pool'])}.", f"Validation: {', '.join(splits['validation'])}.",
              f"Test: {', '.join(splits['test'])}.", "",
              "Commands (OUT = the `--out` folder, DATA = the folder of --data"
              + (", LANDMARK.pt = --landmark" if args.landmark else "") + "):", "", "```"]
    lines += [display(c) for c in commands] + ["```"]
    return "\n".join(lines) + "\n"


def plot(args, summary: dict, path: Path) -> None:
    """Mean test Dice vs labelled patients per fine-tuned arm (error bars: std over seeds)."""
    fig, axes = new_figure((420, 640))
    ax = axes[0, 0]
    series, errors = {}, {}
    for arm in args.finetune_arms:
        ns = [n for n in args.pools if (summary["table"].get(f"dice_n{n}", {}).get(arm) or {}).get("mean") is not None]
        series[ARMS[arm].label] = (ns, [100 * summary["table"][f"dice_n{n}"][arm]["mean"] for n in ns])
        errors[ARMS[arm].label] = [100 * summary["table"][f"dice_n{n}"][arm]["std"] for n in ns]
    draw_lines(ax, series, title="OpenKBP: few-label fine-tuning, test-pats", xlabel="labelled patients",
               ylabel="mean test Dice (%)", integer_x=True)
    for line, (label, (xs, ys)) in zip(ax.get_lines(), series.items()):
        ax.errorbar(xs, ys, yerr=errors[label], fmt="none", capsize=3, ecolor=line.get_color())
    save_figure(fig, path)


# ----------------------------------------------------------------------------- main


def run(args, runner, display) -> int:
    """The protocol (called by fewlabel_transfer.main for --cohort openkbp).

    display(line, out): a logged command as a user would type it, OUT for the output folder."""
    def shown(line: str) -> str:  # the published files name no folder of this machine
        line = display(line, args.out).replace(str(args.data.parent), "DATA")
        return line.replace(str(args.landmark), "LANDMARK.pt") if args.landmark else line

    if args.data is None:
        raise SystemExit("error: --cohort openkbp needs --data DATASET.json (from `alice3d-data import openkbp`)")
    args.arms = args.arms or list(DEFAULT_ARMS)
    args.finetune_arms = [a for a in (args.finetune_arms or DEFAULT_FINETUNE_ARMS) if a in args.arms]
    if not any(ARMS[a].pretrain is not None for a in args.arms):
        raise SystemExit("error: every arm is random init; add a pretrained arm (its file gives the architecture)")
    splits = write_splits(args.data, args.out / "splits", args.seeds, args.pools, args.val_cases, args.test_cases)
    args.labels = json.loads(Path(args.data).read_text()).get("labels") or {}
    if not args.labels:
        raise DataError(f"{args.data}: no 'labels' field; the protocol reads the organ names from it")
    timings = {"pretraining": 0.0, "probes": 0.0, "fine-tuning": 0.0}
    lock = threading.Lock()
    probes: dict[int, dict] = {}
    finetunes: dict[tuple, dict | None] = {}
    state_file = args.out / "probes.json"
    if state_file.exists():  # probe results of earlier invocations (cheap to recompute, but paired draws stay fixed)
        probes = {int(s): v for s, v in json.loads(state_file.read_text()).items()}

    def publish() -> None:
        if args.dry_run:
            return
        for (arm, n, seed) in list(finetunes):
            finetunes[(arm, n, seed)] = test_scores(args.out / "finetune" / f"{arm}_n{n}_seed{seed}", splits["test"])
        summary = summarize(args, splits, probes, finetunes)
        doc = {"setting": args.setting, "seeds": args.seeds, "pools": args.pools, "arms": args.arms,
               "finetune_arms": args.finetune_arms, "pretrain_steps": args.pretrain_steps,
               "finetune_steps": args.finetune_steps, "splits": {k: v for k, v in splits.items()
                                                                  if k not in ("paths", "test_entries")},
               "summary": summary, "probes_per_seed": {str(s): v for s, v in probes.items()},
               "finetune_per_run": {f"{a}_n{n}_seed{s}": r for (a, n, s), r in finetunes.items() if r},
               "timings_s": timings, "commands": [shown(c) for c in runner.commands]}
        targets = [args.out] + ([args.publish] if args.publish else [])
        for folder in targets:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "fewlabel_openkbp.json").write_text(json.dumps(doc, indent=1))
            (folder / "fewlabel_openkbp.md").write_text(markdown(args, splits, summary, timings, runner.commands, shown))
            if any(k.startswith("dice_n") for k in summary["table"]):
                plot(args, summary, folder / "fewlabel_openkbp.png")

    t0 = time.perf_counter()
    landmark = landmark_model(args, runner, splits) if any(ARMS[a].landmark for a in args.arms) else None
    timings["pretraining"] += time.perf_counter() - t0
    cache: dict = {}
    encoders_of: dict[int, dict[str, Path]] = {}
    for seed in args.seeds:
        t0 = time.perf_counter()
        encoders_of[seed] = pretrain_seed(args, runner, splits, seed, landmark)
        timings["pretraining"] += time.perf_counter() - t0
        if args.dry_run or args.no_probe:
            continue
        if seed not in probes or set(args.arms) - set(probes[seed]):
            t0 = time.perf_counter()
            torch.set_num_threads(max(1, args.threads * args.jobs))
            probes[seed] = {**probes.get(seed, {}), **probe_seed(args, splits, seed, encoders_of[seed], cache)}
            state_file.write_text(json.dumps({str(s): v for s, v in probes.items()}, indent=1))
            timings["probes"] += time.perf_counter() - t0
        publish()
    cache.clear()
    if args.no_finetune:
        return 0
    first = encoders_of[args.seeds[0]]
    geo = [] if args.dry_run else args.geometry(first.get("alice") or next(iter(first.values())))
    t_start = time.perf_counter()

    def done() -> None:
        with lock:
            timings["fine-tuning"] = time.perf_counter() - t_start
            publish()

    jobs = []
    for seed in args.seeds:  # seed-major: the lanes finish seed 0's runs before they start seed 1's
        finetunes.update({(arm, n, seed): None for n in args.pools for arm in args.finetune_arms})
        jobs += finetune_jobs(args, runner, splits, seed, encoders_of[seed], geo, done)
    runner.parallel(jobs, args.jobs)
    publish()
    if not args.dry_run:
        print((args.out / "fewlabel_openkbp.md").read_text())
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    import fewlabel_transfer as base

    p = argparse.ArgumentParser(prog="fewlabel_transfer.py --cohort openkbp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cohort", choices=["openkbp"], default="openkbp")
    p.add_argument("--data", type=Path, required=True, help="dataset.json written by `alice3d-data import openkbp`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    p.add_argument("--landmark", type=Path, default=None,
                   help="landmark model trained on the unlabelled patients only (default: train one in OUT/landmark)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=None, help=f"default: {' '.join(DEFAULT_ARMS)}")
    p.add_argument("--finetune-arms", nargs="+", choices=list(ARMS), default=None,
                   help=f"arms that are fine-tuned (default: {' '.join(DEFAULT_FINETUNE_ARMS)}); the others are "
                        "judged by the probes and the retrieval")
    p.add_argument("--pools", type=int, nargs="+", default=None, help="labelled patients per pool (default 2 6 12)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--finetune-steps", type=int, default=None)
    p.add_argument("--landmark-steps", type=int, default=None)
    p.add_argument("--pretrain-args", nargs="*", default=None, help="key=value overrides for every alice3d-pretrain")
    p.add_argument("--finetune-args", nargs="*", default=None, help="key=value overrides for every alice3d-finetune")
    p.add_argument("--val-cases", type=int, default=None, help="validation-pats used for checkpoint selection")
    p.add_argument("--test-cases", type=int, default=None, help="test-pats scored")
    p.add_argument("--probe-patients", type=int, default=None, help="test-pats the probes and the retrieval use")
    p.add_argument("--retrieval-step", type=int, default=3, help="voxels between retrieval candidates along z")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--no-finetune", action="store_true", help="pretraining, probes and retrieval only")
    p.add_argument("--publish", type=Path, default=None,
                   help="also write fewlabel_openkbp.{json,md,png} into this folder (e.g. docs/results)")
    base.add_run_options(p, dry_run_help="write the splits and print the commands only")
    args = base.apply_setting(p.parse_args(argv), SETTINGS)
    if args.probe_patients < 4:
        p.error("--probe-patients: at least 4 (half train the probe, half test it)")
    if len(args.seeds) < 5:
        print(f"note: {len(args.seeds)} seed(s); the protocol asks for at least 5", flush=True)
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    args.landmark = args.landmark.resolve() if args.landmark else None
    args.publish = args.publish.resolve() if args.publish else None
    return args


def main(argv: list[str] | None = None) -> int:
    import fewlabel_transfer as base

    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.tool, args.geometry = base.tool, base.geometry
    return run(args, base.Runner(args.out, args.threads, args.dry_run), base.display)
