#!/usr/bin/env python
"""How much does a fine-tuned segmentation network rely on its encoder?

Pretraining can only show in fine-tuning if the network's predictions depend on the encoder.
For each ``alice3d-finetune`` run given, this script re-evaluates ``RUN/best.pt`` on the run's
own validation cases twice: as trained, and with the encoder (UNETR's ViT, Swin UNETR's Swin,
nnFormer's encoder) swapped for a freshly initialised one (decoder untouched). It prints the
mean Dice of both and the share of voxels whose predicted label changes. A small drop means the
decoder's convolutional path does the work and the encoder's initialisation cannot matter much.

    python scripts/experiments/encoder_reliance.py RUN [RUN ...] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from alice3d.config import load_config
from alice3d.finetune.config import EvalConfig, FinetuneConfig
from alice3d.finetune.data import load_lists, prepare_cases
from alice3d.finetune.evaluate import predict_case
from alice3d.finetune.metrics import dice_per_class
from alice3d.finetune.models import build_network, encoder_module
from alice3d.finetune.objectives import SegmentationTask
from alice3d.finetune.predict import load_run


def validation_cases(run: Path, task):
    cfg = load_config(FinetuneConfig, run / "config.yaml")
    results = json.loads((run / "results.json").read_text())
    lists, _ = load_lists(cfg.data.data, task)
    wanted = set(results["val_cases"])
    cases = [c for part in lists.values() for c in part if c.id in wanted]
    prepared, _ = prepare_cases(cases, task, "fail", "validation")
    return prepared, EvalConfig(sw_overlap=cfg.eval.sw_overlap, sw_batch_size=cfg.eval.sw_batch_size)


@torch.no_grad()
def reliance(run: Path, seed: int = 0) -> dict:
    loaded = load_run(run)
    task, spec = loaded.task, loaded.spec
    cases, ecfg = validation_cases(run, task)
    organs = sorted(task.foreground)
    trained = SegmentationTask(loaded.network, spec, task).eval()
    torch.manual_seed(seed)
    swapped_net = build_network(spec)
    swapped_net.load_state_dict(loaded.network.state_dict())
    fresh_encoder, where = encoder_module(build_network(spec), spec)
    encoder_module(swapped_net, spec)[0].load_state_dict(fresh_encoder.state_dict())
    swapped = SegmentationTask(swapped_net, spec, task).eval()
    dice = {"trained": [], "encoder_reinitialised": []}
    changed = []
    for case in cases:
        gt = case.label[0].round().long()
        a, b = predict_case(trained, case, task, ecfg), predict_case(swapped, case, task, ecfg)
        dice["trained"].append(float(np.nanmean(dice_per_class(a, gt, organs))))
        dice["encoder_reinitialised"].append(float(np.nanmean(dice_per_class(b, gt, organs))))
        changed.append(float((a != b).float().mean()))
    mean = {k: 100 * sum(v) / len(v) for k, v in dice.items()}
    return {"run": str(run), "encoder": where, "cases": len(cases), "dice_trained": mean["trained"],
            "dice_encoder_reinitialised": mean["encoder_reinitialised"],
            "voxels_changed_pct": 100 * sum(changed) / len(changed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="alice3d-finetune run directories")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh encoder")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args()
    rows = []
    print("| run | Dice as trained | Dice, encoder re-initialised | voxels changed |\n|---|---:|---:|---:|")
    for run in args.runs:
        r = reliance(run, args.seed)
        rows.append(r)
        print(f"| {run.name} | {r['dice_trained']:.2f} | {r['dice_encoder_reinitialised']:.2f} "
              f"| {r['voxels_changed_pct']:.1f} % |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
