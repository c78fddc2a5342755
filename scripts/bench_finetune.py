#!/usr/bin/env python
"""Benchmark fine-tuning networks: training step and sliding-window inference.

For each network (UNETR, Swin UNETR, nnFormer) and mode it times
  - a training step (forward, DiceCE loss, backward, AdamW step) on random ROI-sized crops, and
  - sliding-window inference over one synthetic CT-sized volume at the task ROI,
and prints a table plus JSON (``--json FILE`` also writes it), naming the device.

Modes:
  plain      the plain fp32 MONAI loop: the MONAI network, MONAI's DiceCELoss on its
             full-resolution output, torch.optim.AdamW, no AMP, default memory format;
             inference: fp32 sliding-window inference of the bare network, as
             ``alice3d-finetune predict`` runs it
  optimized  the alice3d-finetune loop: ``Trainer.train_step`` on the ``SegmentationTask``
             objective (deep supervision where the network has it) in channels-last-3d,
             the trainer's bf16 autocast on CUDA (fp32 on a CPU), its AdamW, grad clipping and
             schedule, and train.compile with --compile; inference as validation runs it
             (bf16 autocast on CUDA, channels-last windows)
No global backend flag (TF32, cuDNN benchmark) is changed: the fine-tuning command sets none.

Examples:
  python scripts/bench_finetune.py --size cpu --steps 3                 # CPU-sized networks
  python scripts/bench_finetune.py --size paper --mode both --compile   # paper-sized, on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, when imported from elsewhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_common as bc  # noqa: E402

from alice3d.finetune.config import EvalConfig, FinetuneConfig, ModelConfig  # noqa: E402
from alice3d.finetune.evaluate import sliding_window_logits  # noqa: E402
from alice3d.finetune.models import build_network, count_parameters, network_spec  # noqa: E402
from alice3d.finetune.objectives import SegmentationTask  # noqa: E402
from alice3d.finetune.tasks import TaskSpec, resolve_task  # noqa: E402

MODES = ("plain", "optimized")

# Paper-sized: Table 8 networks at the recipe crops; cpu: the phantom defaults.
SIZES = {
    "paper": {
        "unetr": (ModelConfig(name="unetr", feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12), (96, 96, 96)),
        "swin_unetr": (ModelConfig(name="swin_unetr", feature_size=48), (96, 96, 96)),
        "nnformer": (ModelConfig(name="nnformer", nnformer_preset="nnformer"), (128, 128, 96)),
    },
    "cpu": {
        "unetr": (ModelConfig(name="unetr"), (64, 64, 32)),
        "swin_unetr": (ModelConfig(name="swin_unetr", feature_size=12, swin_window=4), (64, 64, 32)),
        "nnformer": (ModelConfig(name="nnformer", nnformer_preset="nnformer_tiny"), (64, 64, 32)),
    },
}


def device_name(device: torch.device) -> str:
    return bc.short_device(device)


def network_setup(name: str, size: str, roi: Sequence[int] | None = None) -> tuple[dict[str, Any], TaskSpec]:
    """(network spec, BTCV task at the ROI): the network of ``SIZES[size][name]``."""
    mcfg, default_roi = SIZES[size][name]
    task = resolve_task("btcv", roi=tuple(roi or default_roi), spacing=(1.5, 1.5, 2.0))
    return network_spec(mcfg, task), task


def random_batch(task: TaskSpec, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``{"image": (B, 1, *roi) in [0, 1], "label": (B, 1, *roi) float ids}`` as TrainSamples gives them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, *task.roi, generator=gen)
    y = torch.randint(0, task.num_classes, (batch, 1, *task.roi), generator=gen).float()
    return {"image": x.to(device), "label": y.to(device)}


def full_resolution(out: Any) -> torch.Tensor:
    """A deep-supervision list's first (full-resolution) output, or the output itself."""
    return out[0] if isinstance(out, (list, tuple)) else out


def plain_loop(spec: dict[str, Any], device: torch.device) -> tuple[torch.nn.Module, Callable[[dict], None]]:
    """(network, step): the fp32 MONAI tutorial loop, nothing of alice3d but the network choice."""
    from monai.losses import DiceCELoss

    net = build_network(spec).to(device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-5)

    def step(batch: dict) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(full_resolution(net(batch["image"])), batch["label"])
        loss.backward()
        opt.step()

    return net, step


def our_objective(spec: dict[str, Any], task: TaskSpec) -> SegmentationTask:
    """The objective ``alice3d-finetune`` trains (channels-last-3d when ``model.channels_last``)."""
    objective = SegmentationTask(build_network(spec), spec, task)
    if FinetuneConfig().model.channels_last:
        objective.use_channels_last()
    return objective


def our_trainer(spec: dict[str, Any], task: TaskSpec, device: torch.device, batch: int, compile_: bool):
    """The Trainer ``alice3d-finetune`` builds, with its default train settings (AMP on)."""
    tcfg = replace(FinetuneConfig().train, max_steps=100_000, batch_size=batch, device=str(device), compile=compile_)
    return bc.bench_trainer(our_objective(spec, task), tcfg)


def train_row(name: str, size: str, mode: str, device: torch.device, batch: int, warmup: int, steps: int,
              roi: Sequence[int] | None = None, compile_: bool = False) -> dict[str, Any]:
    """Training-step figures of one network in one mode (see the module docstring)."""
    spec, task = network_setup(name, size, roi)
    torch.manual_seed(0)
    meter = bc.MemoryMeter(device)
    meter.start()
    data = random_batch(task, batch, device)
    if mode == "plain":
        net, step = plain_loop(spec, device)
        timing = bc.time_steps(lambda i: step(data), device, warmup, steps)
        skipped = 0
    else:
        trainer = our_trainer(spec, task, device, batch, compile_)
        net = trainer.model.network
        # fp32 here: on CUDA the trainer's own AMP makes the step bf16; on a CPU it runs fp32.
        timing, skipped = bc.time_train_steps(trainer, itertools.repeat(data), device, "fp32", warmup, steps)
    med = timing["median_s"]
    peak = meter.peak_mib()
    return {
        "model": name, "size": size, "mode": mode + ("+compile" if mode != "plain" and compile_ else ""),
        "device": bc.short_device(device), "params_M": round(count_parameters(net) / 1e6, 2), "roi": list(task.roi),
        "batch": batch, "train_step_ms": round(1000 * med, 1), "train_samples_per_s": round(batch / med, 3),
        "train_peak_GiB": None if peak is None else round(peak / 1024, 2), "mem_kind": meter.kind,
        "skipped_steps": skipped, "train_timing": timing,
    }


def infer_row(name: str, size: str, mode: str, device: torch.device, volume: Sequence[int], repeats: int = 1,
              roi: Sequence[int] | None = None, ecfg: EvalConfig | None = None) -> dict[str, Any]:
    """Sliding-window inference of one ``volume``-sized image (plain: fp32 bare network as predict
    runs it; optimized: the objective's logits under the trainer's autocast, as validation runs it).
    Warm-up: one call of the predictor on a full window batch, so kernels are loaded but the
    volume is not run twice."""
    spec, task = network_setup(name, size, roi)
    ecfg = ecfg or EvalConfig()
    torch.manual_seed(0)
    if mode == "plain":
        model = build_network(spec).to(device).eval()
        predictor, amp = (lambda t: full_resolution(model(t))), "fp32"
    else:
        model = our_objective(spec, task).to(device).eval()
        predictor, amp = model.logits, "bf16" if device.type == "cuda" else "fp32"
    image = torch.rand(1, 1, *volume, generator=torch.Generator().manual_seed(0)).to(device)
    meter = bc.MemoryMeter(device)

    def run(window_batch_only: bool) -> None:
        with torch.no_grad(), bc.autocast(device, amp):
            if window_batch_only:
                predictor(torch.zeros(ecfg.sw_batch_size, 1, *task.roi, device=device))
            else:
                sliding_window_logits(predictor, image, task.roi, ecfg)

    run(True)
    bc.synchronize(device)
    meter.start()
    timing = bc.time_steps(lambda i: run(False), device, 0, max(1, repeats))
    peak = meter.peak_mib()
    return {
        "model": name, "size": size, "mode": mode, "device": bc.short_device(device), "volume": list(volume),
        "roi": list(task.roi), "sw_batch": ecfg.sw_batch_size, "overlap": ecfg.sw_overlap,
        "precision": amp, "infer_volume_s": round(timing["median_s"], 3),
        "infer_peak_GiB": None if peak is None else round(peak / 1024, 2), "infer_timing": timing,
    }


def bench_one(name: str, size: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    train = train_row(name, size, mode, device, args.batch, args.warmup, args.steps, args.roi, args.compile)
    ecfg = EvalConfig(sw_batch_size=args.sw_batch, sw_overlap=args.overlap)
    infer = infer_row(name, size, mode, device, args.volume, args.infer_repeats, args.roi, ecfg)
    return {**train, **{k: infer[k] for k in ("volume", "infer_volume_s", "infer_peak_GiB", "precision")}}


def print_table(rows: list[dict], device: str) -> None:
    cols = ["model", "mode", "params_M", "roi", "batch", "train_step_ms", "train_samples_per_s", "train_peak_GiB",
            "infer_volume_s", "infer_peak_GiB"]
    print(f"\nfine-tuning benchmark on {device}")
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["unetr", "swin_unetr", "nnformer"], choices=["unetr", "swin_unetr", "nnformer"])
    p.add_argument("--size", default="cpu", choices=sorted(SIZES), help="network sizes and default ROI")
    p.add_argument("--mode", default="plain", choices=["plain", "optimized", "both"])
    p.add_argument("--compile", action="store_true", help="torch.compile in optimized mode")
    p.add_argument("--roi", type=int, nargs=3, default=None, help="override the ROI (X Y Z)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, cuDNN autotuning)")
    p.add_argument("--volume", type=int, nargs=3, default=None,
                   help="sliding-window volume (X Y Z); default 2x the ROI in-plane, 1.5x through-plane")
    p.add_argument("--sw-batch", type=int, default=4)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--infer-repeats", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    dev = bc.resolve_device(args.device)
    modes = ["plain", "optimized"] if args.mode == "both" else [args.mode]
    rows = []
    user_volume = args.volume
    for name in args.models:
        roi = tuple(args.roi) if args.roi else SIZES[args.size][name][1]
        args.volume = user_volume or [2 * roi[0], 2 * roi[1], int(1.5 * roi[2])]
        for mode in modes:
            print(f"benchmarking {name} ({mode}) ...", file=sys.stderr, flush=True)
            rows.append(bench_one(name, args.size, mode, args, dev))
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    name = device_name(dev)
    print_table(rows, name)
    report = {"device": name, **bc.versions(), "machine": bc.machine_info(dev), "results": rows}
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        bc.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
