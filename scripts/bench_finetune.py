#!/usr/bin/env python
"""Benchmark fine-tuning networks: training step and sliding-window inference.

For each network (UNETR, Swin UNETR, nnFormer) and mode it times
  - a training step (forward, DiceCE loss with deep supervision where the network has it,
    backward, AdamW step) on random ROI-sized crops, and
  - sliding-window inference over one synthetic CT-sized volume at the task ROI,
and prints a table plus JSON (``--json FILE`` also writes it), naming the device.

Modes:
  plain      fp32, eager, default memory format (the straightforward loop)
  optimized  bf16 autocast (CUDA), channels-last-3d memory format, TF32 matmuls/convs,
             and torch.compile with --compile

Examples:
  python scripts/bench_finetune.py --size cpu --steps 3                 # CPU-sized networks
  python scripts/bench_finetune.py --size paper --mode both --compile   # paper-sized, on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alice3d.finetune.config import ModelConfig  # noqa: E402
from alice3d.finetune.models import build_network, count_parameters, network_spec  # noqa: E402
from alice3d.finetune.objectives import SegmentationTask  # noqa: E402
from alice3d.finetune.tasks import resolve_task  # noqa: E402

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
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, optimized: bool):
    if optimized and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def prepare(model: torch.nn.Module, device: torch.device, optimized: bool, compile_: bool) -> torch.nn.Module:
    model = model.to(device)
    if optimized:
        model = model.to(memory_format=torch.channels_last_3d)
        if compile_:
            model = torch.compile(model)
    return model


def time_steps(fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_one(name: str, size: str, mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    mcfg, roi = SIZES[size][name]
    roi = tuple(args.roi) if args.roi else roi
    task = resolve_task("btcv", roi=roi, spacing=(1.5, 1.5, 2.0))
    spec = network_spec(mcfg, task)
    optimized = mode == "optimized"
    if optimized:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    net = build_network(spec)
    params = count_parameters(net)
    obj = prepare(SegmentationTask(net, spec, task), device, optimized, False)
    fwd = torch.compile(obj) if optimized and args.compile else obj
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-4, fused=device.type == "cuda")
    mf = torch.channels_last_3d if optimized else torch.contiguous_format
    x = torch.rand(args.batch, 1, *roi, device=device).contiguous(memory_format=mf)
    y = torch.randint(0, task.num_classes, (args.batch, 1, *roi), device=device).float()
    batch = {"image": x, "label": y}

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, optimized):
            loss = fwd(batch)["loss"]
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    obj.train()
    train_times = time_steps(train_step, device, args.warmup, args.steps)
    train_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    from monai.inferers import sliding_window_inference

    obj.eval()
    volume = torch.rand(1, 1, *args.volume, device=device).contiguous(memory_format=mf)

    def predictor(t: torch.Tensor) -> torch.Tensor:
        return obj.logits(t)

    def infer() -> None:
        with torch.no_grad(), autocast(device, optimized):
            sliding_window_inference(volume, roi, args.sw_batch, predictor, overlap=args.overlap, mode="gaussian")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    infer_times = time_steps(infer, device, 1 if args.warmup else 0, max(1, args.infer_repeats))
    infer_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    med = statistics.median(train_times)
    return {
        "model": name, "size": size, "mode": mode + ("+compile" if optimized and args.compile else ""),
        "params_M": round(params / 1e6, 2), "roi": list(roi), "batch": args.batch,
        "train_step_ms": round(1000 * med, 1), "train_samples_per_s": round(args.batch / med, 2),
        "train_peak_GiB": None if train_mem is None else round(train_mem, 2),
        "volume": list(args.volume), "infer_volume_s": round(statistics.median(infer_times), 3),
        "infer_peak_GiB": None if infer_mem is None else round(infer_mem, 2),
    }


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
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
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
    report = {"device": name, "torch": torch.__version__, "monai": __import__("monai").__version__, "results": rows}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
