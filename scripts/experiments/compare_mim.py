"""Brief pretraining of every MIM method on the same phantom data, then the same evaluation for each.

    python scripts/experiments/compare_mim.py --out runs/compare_mim               # 2D and 3D, 200 steps each
    python scripts/experiments/compare_mim.py --out /tmp/cmp --dims 2 --steps 10   # smoke run

Per dimensionality (2D: 64x64 axial slice windows; 3D: 32^3 crops; phantom cohort at 3 mm):
MAE, CAE, ccMIM, R-MAE, C-MAE (the same 6-block ViT, patch 8, 64 tokens) and ConvMIM (small
ResNet-18) train with the shared trainer for `--steps` steps; random-init encoders are the
reference rows. Evaluation on frozen encoders: linear and attentive probes on the
organ-at-centre task (train and test crops from different subjects) and CKA between
masked- and full-input features per block at mask ratios 0.1..0.9.

Writes OUT/results.csv and OUT/results.md (one table: loss curve summary, probe accuracy,
CKA at 0.75), OUT/compare_mim.png (one plot: loss curves and CKA at 0.75 per block, per
dimensionality), OUT/<dims>d/<method>/ (the run: metrics.jsonl, checkpoints, cka.csv).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from alice3d.analysis.cka import DEFAULT_RATIOS, occlusion_invariance, write_cka_csv
from alice3d.analysis.probing import load_labeled_volumes, organ_center_task, run_probes
from alice3d.config import TrainConfig
from alice3d.encoders.resnet import ResNetEncoder
from alice3d.methods.cae import CAE, CAEConfig
from alice3d.methods.ccmim import CCMIM, CCMIMConfig
from alice3d.methods.convmim import ConvMIM, ConvMIMConfig
from alice3d.methods.mae import MAE, MAEConfig
from alice3d.methods.cmae import CMAE, CMAEConfig
from alice3d.methods.rmae import RMAE, RMAEConfig
from alice3d.train.trainer import Trainer
from alice3d.viz.plots import PALETTE, draw_lines, new_figure, save_figure

log = logging.getLogger("compare_mim")

SPACING = (3.0, 3.0, 3.0)
HU_WINDOW = (-125.0, 255.0)
SIZES = {2: (64, 64), 3: (32, 32, 32)}
VIT = dict(encoder="vit_tiny", encoder_kwargs=dict(num_layers=6, hidden_size=96, mlp_dim=384, num_heads=4),
           patch_size=8)
DECODER = dict(decoder_dim=96, decoder_depth=2, decoder_heads=4)
METHODS = ("mae", "cae", "ccmim", "rmae", "cmae", "convmim")


def method_model(name: str, nd: int) -> torch.nn.Module:
    size = SIZES[nd]
    common = dict(VIT, img_size=size, spatial_dims=nd)
    if name == "mae":
        return MAE(MAEConfig(**common, **DECODER))
    if name == "cae":
        return CAE(CAEConfig(**common, **DECODER, regressor_depth=2, min_block=4))
    if name == "ccmim":
        return CCMIM(CCMIMConfig(**common, **DECODER, proj_hidden_dim=256, proj_dim=64))
    if name == "rmae":
        return RMAE(RMAEConfig(**common, **DECODER))
    if name == "cmae":
        return CMAE(CMAEConfig(**common, proj_hidden_dim=256, proj_dim=64))
    if name == "convmim":
        return ConvMIM(ConvMIMConfig(encoder="resnet18_tiny", img_size=size, spatial_dims=nd,
                                     mask_patch=16 if nd == 2 else 8, feature_dim=64, decoder_dim=32))
    raise ValueError(f"unknown method {name!r}; expected one of {METHODS}")


def frozen_encoder(model: torch.nn.Module) -> torch.nn.Module:
    return model.encoder


def random_encoder(kind: str, nd: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return frozen_encoder(method_model("mae" if kind == "vit" else "convmim", nd))


def pretrain_dataset(nd: int, seed: int):
    from alice3d.data.crops import RandomCropDataset
    from alice3d.data.slices import VolumeSliceDataset
    from alice3d.data.volumes import load_volume_set, resolve_image_paths

    vset = load_volume_set(resolve_image_paths(""), SPACING, HU_WINDOW, "skip")
    if nd == 2:
        return VolumeSliceDataset(vset.volumes, SIZES[2], axis=2, seed=seed)
    return RandomCropDataset(vset.volumes, SIZES[3], seed=seed)


def loss_curve(run: Path) -> tuple[np.ndarray, np.ndarray]:
    steps, losses = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    return np.asarray(steps), np.asarray(losses)


def evaluate(encoder: torch.nn.Module, task, ratios, seed: int, out: Path, label: str) -> dict:
    t0 = time.perf_counter()
    probes = run_probes(encoder, task, seed=seed)
    test = ~task.train
    # Conv encoders are occluded with the ViT's 8-voxel patches, so every encoder loses the same cells.
    patch = 8 if isinstance(encoder, ResNetEncoder) else None
    cka = occlusion_invariance(encoder, task.images[test], ratios=ratios, seed=seed, mask_patch=patch)
    write_cka_csv(cka, out / "cka.csv", label=label)
    c75 = cka[0.75]
    return {
        "linear_acc": probes["linear"].test_acc,
        "attentive_acc": probes["attentive"].test_acc,
        "cka075_mean": float(np.mean(c75)),
        "cka075_last": float(c75[-1]),
        "cka075_blocks": c75,
        "eval_s": time.perf_counter() - t0,
    }


def run_dims(nd: int, args: argparse.Namespace, ratios) -> list[dict]:
    out = args.out / f"{nd}d"
    vols = load_labeled_volumes("", spacing=SPACING, hu_window=HU_WINDOW)
    task = organ_center_task(vols, SIZES[nd], per_class=args.per_class, axis=2, seed=args.seed)
    log.info("%dD probe task: %s", nd, task.describe())
    dataset = pretrain_dataset(nd, args.seed)
    rows = []
    for kind in ("vit", "resnet"):
        label = f"random_{kind}"
        res = evaluate(random_encoder(kind, nd, args.seed), task, ratios, args.seed, out / label, label)
        rows.append({"dims": nd, "method": label, "steps": 0, **res})
        log.info("%dD %s: %s", nd, label, {k: v for k, v in res.items() if k != "cka075_blocks"})
    for name in args.methods:
        run = out / name
        torch.manual_seed(args.seed)
        model = method_model(name, nd)
        cfg = replace(TrainConfig(), max_steps=args.steps, batch_size=args.batch, lr=args.lr,
                      warmup_steps=max(1, args.steps // 10), ckpt_every=0, log_every=1, preview_every=0,
                      device=args.device, seed=args.seed)
        if (run / "checkpoints" / "last.pt").exists():
            log.info("%s exists: reusing its run (delete it to retrain)", run)
            from alice3d.train.checkpoint import load_checkpoint

            model.load_state_dict(load_checkpoint(run / "checkpoints" / "last.pt")["model"])
            train_s = float("nan")
        else:
            t0 = time.perf_counter()
            Trainer(model, cfg, run).fit(dataset)
            train_s = time.perf_counter() - t0
        model.cpu()
        steps, losses = loss_curve(run)
        k = max(1, len(losses) // 10)
        res = evaluate(frozen_encoder(model), task, ratios, args.seed, run, name)
        rows.append({
            "dims": nd, "method": name, "steps": int(steps[-1]) if len(steps) else 0,
            "loss_first": float(losses[:k].mean()), "loss_final": float(losses[-k:].mean()),
            "loss_ratio": float(losses[-k:].mean() / losses[:k].mean()), "train_s": train_s,
            "curve_steps": steps.tolist(), "curve_loss": losses.tolist(), **res,
        })
        log.info("%dD %s: %s", nd, name, {k: v for k, v in rows[-1].items() if not k.startswith(("curve", "cka075_b"))})
    return rows


def write_table(rows: list[dict], out: Path) -> None:
    cols = ["dims", "method", "steps", "loss_first", "loss_final", "loss_ratio", "linear_acc", "attentive_acc",
            "cka075_mean", "cka075_last", "train_s"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_fmt(r.get(c, "")) for c in cols])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_plot(rows: list[dict], out: Path) -> Path:
    names = list(dict.fromkeys(r["method"] for r in rows))
    colors = {n: PALETTE[k % len(PALETTE)] for k, n in enumerate(names)}  # one colour per method everywhere
    dims = sorted({r["dims"] for r in rows})
    fig, axes = new_figure((360 * len(dims), 1120), nrows=len(dims), ncols=2)
    for (left, right), nd in zip(axes, dims):
        rs = [r for r in rows if r["dims"] == nd]
        curves = {r["method"]: (np.asarray(r["curve_steps"]), np.asarray(r["curve_loss"]) / max(r["loss_first"], 1e-12))
                  for r in rs if "curve_loss" in r}
        cka = {r["method"]: (np.arange(1, len(r["cka075_blocks"]) + 1) / len(r["cka075_blocks"]),
                             np.asarray(r["cka075_blocks"])) for r in rs}
        draw_lines(left, curves, title=f"{nd}D: loss / initial loss", xlabel="step", ylabel="relative loss",
                   markers=False, line_width=1.5, colors=colors)
        draw_lines(right, cka, title=f"{nd}D: CKA masked 0.75 vs full", xlabel="depth (block / blocks)",
                   ylabel="CKA", ylim=(min(0.0, min(min(v[1]) for v in cka.values())), 1.02), colors=colors)
    return save_figure(fig, out / "compare_mim.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    p.add_argument("--methods", default=",".join(METHODS), type=lambda s: [m for m in s.split(",") if m])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--per-class", type=int, default=8, help="probe crops per class and subject")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--plot-only", action="store_true", help="redraw OUT/compare_mim.png from OUT/results.json")
    args = p.parse_args(argv)
    if args.plot_only:
        write_plot(json.loads((args.out / "results.json").read_text()), args.out)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ratios = DEFAULT_RATIOS
    rows = []
    for nd in args.dims:
        rows += run_dims(nd, args, ratios)
        write_table(rows, args.out)
    write_plot(rows, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
