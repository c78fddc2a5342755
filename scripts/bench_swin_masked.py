"""Dense vs visible-only Swin encoder: forward and forward+backward time at a masking ratio.

    python scripts/bench_swin_masked.py [--sizes swin_tiny,swin_small] [--shape 96,96,96]
        [--batch 2] [--ratio 0.75] [--steps 3] [--device auto] [--threads 0]
        [--json bench_swin_masked.json]

The dense run is MONAI's SwinTransformer forward on the whole volume; the masked run is
``SwinEncoder.forward_masked`` with a random unit mask that hides ``ratio`` of the mask units
of every sample (MAE style). Dense and masked calls alternate so that changes in machine
load hit both alike. On CPU the table shows process CPU seconds (steadier than the wall
clock on a shared machine); both clocks go to the JSON file. Peak memory is the CUDA
allocator peak on a GPU; on CPU it is resident-set growth, which memory the allocator kept
from earlier calls hides, so it only shows large differences.
"""

from __future__ import annotations

import argparse
import time

import bench_common as bc
import torch

from alice3d.encoders.swin import build_swin


def random_unit_mask(batch: int, units: tuple[int, ...], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``(B, *units)`` bool, True = masked, ``round(ratio * N)`` masked units per sample."""
    total = 1
    for u in units:
        total *= u
    num_masked = min(total - 1, round(ratio * total))
    ranks = torch.rand(batch, total, generator=generator).argsort(1).argsort(1)
    return (ranks < num_masked).reshape(batch, *units)


def bench_one(name: str, shape: tuple[int, ...], batch: int, ratio: float, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    enc = build_swin(name, spatial_dims=len(shape)).to(device).train()
    x = torch.randn(batch, 1, *shape, device=device)
    mask = random_unit_mask(batch, enc.unit_grid(shape), ratio, torch.Generator().manual_seed(0)).to(device)

    def outputs(masked: bool) -> list[torch.Tensor]:
        return enc.forward_masked(x, mask).hidden_states if masked else enc(x)

    def forward(masked: bool) -> None:
        with torch.no_grad():
            outputs(masked)

    def forward_backward(masked: bool) -> None:
        enc.zero_grad(set_to_none=True)
        sum(h.float().square().mean() for h in outputs(masked)).backward()

    cpu: dict[str, list[float]] = {}

    def timed(key, fn, masked):
        def run(_step):
            start = time.process_time()
            fn(masked)
            bc.synchronize(device)
            cpu.setdefault(key, []).append(time.process_time() - start)

        return run

    fns = {
        "dense_fwd": timed("dense_fwd", forward, False),
        "masked_fwd": timed("masked_fwd", forward, True),
        "dense_fwd_bwd": timed("dense_fwd_bwd", forward_backward, False),
        "masked_fwd_bwd": timed("masked_fwd_bwd", forward_backward, True),
    }
    wall = bc.time_interleaved(fns, device, warmup=1, steps=steps)
    row = {
        "model": name,
        "params_M": round(sum(p.numel() for p in enc.parameters()) / 1e6, 3),
        "shape": "x".join(map(str, shape)),
        "batch": batch,
        "mask_ratio": float(mask.float().mean()),
        "device": bc.short_device(device),
    }
    for key in fns:
        row[f"{key}_wall_s"] = wall[key]["median_s"]
        row[f"{key}_cpu_s"] = sorted(cpu[key][1:])[len(cpu[key][1:]) // 2]  # median, warm-up dropped
    clock = "wall" if device.type == "cuda" else "cpu"
    row["clock"] = clock
    row["speedup_fwd"] = row[f"dense_fwd_{clock}_s"] / row[f"masked_fwd_{clock}_s"]
    row["speedup_fwd_bwd"] = row[f"dense_fwd_bwd_{clock}_s"] / row[f"masked_fwd_bwd_{clock}_s"]

    meter = bc.MemoryMeter(device)
    # masked first: on CPU the meter sees resident-set growth, and memory the allocator kept
    # from a larger dense run would hide the masked run's needs
    for masked in (True, False):
        meter.start()
        forward_backward(masked)
        row[f"{'masked' if masked else 'dense'}_fwd_bwd_peak_mib"] = meter.peak_mib()
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="swin_tiny,swin_small", help="comma-separated swin_configs presets")
    parser.add_argument("--shape", default="96,96,96", help="input spatial shape, 2 or 3 axes, multiples of 32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.75, help="fraction of mask units hidden")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations (after one warm-up)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--json", default="bench_swin_masked.json", help="output file ('' = none)")
    args = parser.parse_args(argv)

    device = bc.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(int(s) for s in args.shape.split(","))
    rows = [bench_one(n, shape, args.batch, args.ratio, args.steps, device) for n in args.sizes.split(",")]

    clock = rows[0]["clock"]
    print(f"{bc.short_device(device)}  shape={args.shape} batch={args.batch} ratio={args.ratio} "
          f"median of {args.steps}, {clock} seconds")
    columns = ["model", "params_M", "mask_ratio", f"dense_fwd_{clock}_s", f"masked_fwd_{clock}_s", "speedup_fwd",
               f"dense_fwd_bwd_{clock}_s", f"masked_fwd_bwd_{clock}_s", "speedup_fwd_bwd",
               "dense_fwd_bwd_peak_mib", "masked_fwd_bwd_peak_mib"]
    bc.print_table(rows, columns)
    bc.write_json(args.json, {"machine": bc.machine_info(device), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
