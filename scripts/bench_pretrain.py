"""Pretraining step benchmark: step time, samples/s, peak memory, FLOPs, TFLOP/s and MFU.

    python scripts/bench_pretrain.py --preset paper --device cuda --dtype bf16 --json bench_pretrain.json
    python scripts/bench_pretrain.py --preset cpu --device cpu
    python scripts/bench_pretrain.py --preset paper --variants fp32,bf16,bf16+flash,bf16+flash+compile
    python scripts/bench_pretrain.py --encoder-only --encoders vit_s,vit_b --crop 192,192,64 --batch 2

One step is the trainer's own step, ``Trainer.train_step`` (alice3d/train/trainer.py): zero
grads, forward under the trainer's bf16 autocast (train.amp, with --dtype bf16; on a CPU, where
the trainer's AMP does not apply, the step is wrapped in CPU autocast), backward, grad-norm
clipping, the finiteness check (one host sync), AdamW step, LR-schedule step, EMA update of the
target; --compile sets train.compile. The batch is made once on the device (model-only
throughput; the data path is bench_data.py's job).

FLOPs per step are counted with FlopCounterMode on the same forward+backward (matmuls,
convolutions, attention; see alice3d/train/flops.py). MFU = achieved TFLOP/s over the
MEASURED matmul peak of this device in the step's dtype (a large matmul loop), not a datasheet.

--dense makes the online ViT encoder run all tokens with mask tokens in place of the masked
patches (SimMIM style) and keep the visible outputs, instead of encoding the visible tokens
only; everything else in the step is unchanged. --encoder-only times the ViT encoder alone,
visible-only vs dense, forward+backward, and prints the dense/visible ratio.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import multiprocessing
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

import bench_common as bc
import torch
import torch.nn as nn

from alice3d.config import ConfigError, TrainConfig
from alice3d.core.masking import gather_tokens, random_masking
from alice3d.train.optim import build_optimizer, build_scheduler
from alice3d.train.trainer import Trainer

PAPER_CROP = (192, 192, 64)
CPU_CROP = (64, 64, 32)
METHODS = ("alice_vit", "alice_swin", "mae", "cae")

# Tiny model sizes of the cpu preset: a step takes well under a second on 2 cores.
_CPU_DECODER = dict(decoder_dim=48, decoder_depth=2, decoder_heads=4)
CPU_OVERRIDES: dict[str, dict[str, Any]] = {
    "alice_vit": dict(encoder="vit_tiny", head_out_dim=64, head_hidden_dim=128, head_bottleneck_dim=32, **_CPU_DECODER),
    "alice_swin": dict(head_out_dim=64, head_hidden_dim=128, head_bottleneck_dim=32, **_CPU_DECODER),
    "mae": dict(encoder="vit_tiny", **_CPU_DECODER),
    "cae": dict(encoder="vit_tiny", regressor_depth=2, **_CPU_DECODER),
}
# The smoke preset: the cpu sizes with 2-layer ViTs and one block per Swin stage, so that
# every path runs in about a second per step on 2 cores (scripts/gpu_check.py --smoke).
_SMOKE_ENCODERS = {"alice_vit": {"num_layers": 2}, "alice_swin": {"depths": (1, 1, 1, 1)},
                   "mae": {"num_layers": 2}, "cae": {"num_layers": 2}}
SMOKE_OVERRIDES: dict[str, dict[str, Any]] = {
    name: dict(CPU_OVERRIDES[name], encoder_kwargs=_SMOKE_ENCODERS[name]) for name in METHODS
}
PRESET_OVERRIDES = {"cpu": CPU_OVERRIDES, "smoke": SMOKE_OVERRIDES}
SWIN_ENCODER = {"paper": "swin_b", "cpu": "swin_tiny", "smoke": "swin_tiny"}
SMOKE_CROP = (64, 32, 32)  # Swin needs two 32-voxel mask units


class Unavailable(Exception):
    """A method or encoder that this checkout cannot build yet (the row is skipped)."""


@dataclass(frozen=True)
class Variant:
    dtype: str = "fp32"
    flash: bool = True
    compile: bool = False
    ckpt: bool = False
    dense: bool = False

    def label(self) -> str:
        parts = [self.dtype] + [n for n in ("flash", "compile", "ckpt", "dense") if getattr(self, n)]
        return "+".join(parts)


def parse_variant(text: str, base: Variant) -> Variant:
    """``"bf16+flash+compile"`` -> Variant; tokens: fp32 bf16 flash noflash compile ckpt dense."""
    v = replace(base, flash=False, compile=False, ckpt=False, dense=False)
    for tok in filter(None, text.split("+")):
        if tok in bc.DTYPES:
            v = replace(v, dtype=tok)
        elif tok in ("flash", "compile", "ckpt", "dense"):
            v = replace(v, **{tok: True})
        elif tok == "noflash":
            v = replace(v, flash=False)
        else:
            raise SystemExit(f"--variants: unknown token {tok!r} in {text!r}; expected fp32 bf16 flash noflash compile ckpt dense")
    return v


# ----------------------------------------------------------------------------- models


def method_classes(name: str) -> tuple[type, type, str]:
    """(config class, model class, batch layout "qk" or "image"); Unavailable if not importable."""
    try:
        if name in ("alice_vit", "alice_swin"):
            from alice3d.methods.alice import Alice, AliceConfig

            return AliceConfig, Alice, "qk"
        if name == "mae":
            from alice3d.methods.mae import MAE, MAEConfig

            return MAEConfig, MAE, "image"
        if name == "cae":
            from alice3d.methods.cae import CAE, CAEConfig

            return CAEConfig, CAE, "image"
    except ImportError as e:
        raise Unavailable(f"{name}: not importable in this checkout ({e})") from None
    raise SystemExit(f"--methods: unknown method {name!r}; expected some of {', '.join(METHODS)}")


def build_method(name: str, preset: str, crop: tuple[int, ...], mask: float | None, v: Variant) -> nn.Module:
    """The method at the preset's sizes; raises Unavailable when this checkout cannot build it."""
    config_cls, model_cls, _ = method_classes(name)
    kwargs: dict[str, Any] = dict(
        img_size=crop, spatial_dims=len(crop), use_flash_attention=v.flash, grad_checkpointing=v.ckpt
    )
    if mask is not None:
        kwargs["mask_ratio"] = mask
    kwargs.update(PRESET_OVERRIDES.get(preset, {}).get(name, {}))
    if name == "alice_swin":
        kwargs["encoder"] = SWIN_ENCODER[preset]
    try:
        return model_cls(config_cls(**kwargs))
    except (ConfigError, TypeError) as e:
        raise Unavailable(f"{name}: this checkout cannot build it: {e}") from None


def warm_libraries(device: torch.device) -> None:
    """First matmul/conv/attention calls initialise thread pools and kernels libraries; do that
    before a memory meter starts so that it sees the model, not the library."""
    x = torch.randn(1, 1, 8, 8, 8, device=device, requires_grad=True)
    w = torch.randn(4, 1, 2, 2, 2, device=device, requires_grad=True)
    y = torch.nn.functional.conv3d(x, w, stride=2).flatten(1)
    q = (y @ y.t()).reshape(1, 1, 1, 1).expand(1, 1, 4, 8)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()


def online_vit(model: nn.Module) -> nn.Module:
    """The online encoder whose visible-only call --dense replaces."""
    from alice3d.encoders.vit import ViTEncoder

    enc = getattr(model, "encoder", None)
    if not isinstance(enc, ViTEncoder):
        raise Unavailable(f"--dense needs a ViT online encoder, {type(model).__name__} has {type(enc).__name__}")
    return enc


def use_dense_encoding(encoder: nn.Module) -> nn.Parameter:
    """Make ``encoder(x, ids_keep=...)`` encode all L tokens with a mask token in place of the
    masked patches and return the visible outputs ``(B, L_keep, D)``, so the method around it is
    unchanged. Only this instance is patched (the EMA target, a copy made earlier, is not).
    Returns the mask token, which the caller adds to the optimizer."""
    token = nn.Parameter(torch.zeros(1, 1, encoder.hidden_size, device=encoder.norm.weight.device))
    nn.init.normal_(token, std=0.02)
    visible_only = encoder.forward

    def dense_forward(x: torch.Tensor, ids_keep: torch.Tensor | None = None, **kwargs: Any):
        if ids_keep is None:
            return visible_only(x, **kwargs)
        mask = torch.ones(x.shape[0], encoder.num_tokens, dtype=torch.bool, device=x.device)
        mask.scatter_(1, ids_keep, False)
        return gather_tokens(visible_only(x, mask=mask, mask_token=token, **kwargs), ids_keep)

    encoder.forward = dense_forward
    return token


def make_batch(layout: str, batch: int, crop: tuple[int, ...], device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shape = (batch, 1, *crop)
    keys = ("q", "k") if layout == "qk" else ("image",)
    return {k: torch.rand(shape, generator=gen).to(device) for k in keys}


# ----------------------------------------------------------------------------- the step


def trainer_for(model: nn.Module, device: torch.device, v: Variant, batch: int) -> Trainer:
    """The real Trainer around ``model`` for variant ``v`` (one process, grad_accum 1); with ``v.dense``
    the mask token that ``use_dense_encoding`` adds is trained too."""
    model.to(device)
    tcfg = TrainConfig(max_steps=100_000, batch_size=batch, device=str(device), amp=v.dtype == "bf16",
                       compile=v.compile)
    optimizer = build_optimizer(model, tcfg)
    if v.dense:
        optimizer.add_param_group({"params": [use_dense_encoding(online_vit(model))], "weight_decay": 0.0})
    return bc.bench_trainer(model, tcfg, optimizer, build_scheduler(optimizer, tcfg))


def forward_backward_flops(model: nn.Module, amp: Callable[[], Any], batch: dict, seed: int) -> tuple[int, dict]:
    """FLOPs of one forward+backward of the eager model (the optimizer is not counted)."""
    torch.manual_seed(seed)
    model.train()

    def run() -> None:
        with amp():
            out = model(batch)
        out["loss"].backward()

    total, by_op = bc.count_flops(run)
    model.zero_grad(set_to_none=True)
    return total, by_op


def bench_method(name: str, args: argparse.Namespace, v: Variant, device: torch.device, peaks: dict) -> dict[str, Any]:
    row: dict[str, Any] = dict(
        method=name, device=bc.short_device(device), variant=v.label(), dtype=v.dtype, flash=v.flash,
        compile=v.compile, ckpt=v.ckpt, dense=v.dense, crop="x".join(map(str, args.crop)), batch=args.batch,
    )
    layout = method_classes(name)[2]
    if v.dense and name == "cae":
        # CAE calls the same encoder again on the masked patches for its alignment target; patching
        # the call would change that target too, so a dense CAE needs a switch inside cae.py.
        raise Unavailable("cae: --dense is not supported (the encoder call also makes the alignment target)")
    warm_libraries(device)
    meter = bc.MemoryMeter(device)
    meter.start()
    model = build_method(name, args.preset, args.crop, args.mask, v)
    row.update(
        encoder=model.cfg.encoder, mask=getattr(model.cfg, "mask_ratio", None),
        params_M=sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
    )
    trainer = trainer_for(model, device, v, args.batch)
    batch = make_batch(layout, args.batch, args.crop, device)
    amp = lambda: bc.autocast(device, v.dtype)  # noqa: E731

    flops, by_op = forward_backward_flops(model, amp, batch, trainer.cfg.seed)
    timing, skipped = bc.time_train_steps(trainer, itertools.repeat(batch), device, v.dtype, args.warmup, args.steps)
    step_s = timing["median_s"]
    peak = peaks[v.dtype]["tflops"]
    row.update(
        step_ms=step_s * 1e3, samples_s=args.batch / step_s, mem_MiB=meter.peak_mib(), mem_kind=meter.kind,
        GFLOP_step=flops / 1e9, TFLOPs=bc.achieved_tflops(flops, step_s), peak_TFLOPs=peak,
        MFU_pct=100 * bc.mfu(flops, step_s, peak), skipped_steps=skipped,
        timing=timing, flops_by_op={k: v_ / 1e9 for k, v_ in sorted(by_op.items())}, status="ok",
    )
    del model, trainer, batch
    return row


# ----------------------------------------------------------------------------- encoder-only


def bench_encoder(name: str, args: argparse.Namespace, v: Variant, device: torch.device, peaks: dict) -> dict[str, Any]:
    """ViT forward+backward at `args.mask`: visible tokens only vs all tokens with mask tokens."""
    from alice3d.encoders.vit import build_vit

    torch.manual_seed(0)
    depth = {"num_layers": args.encoder_layers} if args.encoder_layers else {}
    enc = build_vit(name, args.crop, spatial_dims=len(args.crop), use_flash_attention=v.flash, grad_checkpointing=v.ckpt,
                    **depth)
    enc.to(device).train()
    token = nn.Parameter(torch.zeros(1, 1, enc.hidden_size, device=device))
    x = make_batch("image", args.batch, args.crop, device)["image"]
    masking = random_masking(args.batch, enc.num_tokens, args.mask, device=device, generator=None)
    amp = lambda: bc.autocast(device, v.dtype)  # noqa: E731

    def visible() -> None:
        with amp():
            out = enc(x, ids_keep=masking.ids_keep)
        out.float().square().mean().backward()

    def dense() -> None:
        with amp():
            out = enc(x, mask=masking.mask, mask_token=token)
        out.float().square().mean().backward()

    row: dict[str, Any] = dict(
        encoder=name, device=bc.short_device(device), variant=v.label(), crop="x".join(map(str, args.crop)),
        batch=args.batch, mask=args.mask, tokens=enc.num_tokens, visible_tokens=masking.num_keep,
    )
    peak = peaks[v.dtype]["tflops"]
    fns, steps = {"visible": visible, "dense": dense}, {}
    # Counted first: the counting pass also warms both paths up (hence 0 warm-up steps by default).
    flops = {mode: bc.count_flops(fn)[0] for mode, fn in fns.items()}
    for mode, fn in fns.items():
        run = torch.compile(fn) if v.compile else fn

        def step(i: int, run=run) -> None:
            enc.zero_grad(set_to_none=True)
            token.grad = None
            run()

        steps[mode] = step
    warmup = max(args.warmup, 1) if v.compile else args.warmup  # compilation happens in the first call
    timings = bc.time_interleaved(steps, device, warmup, args.steps)
    for mode in fns:
        t = timings[mode]["median_s"]
        row[f"{mode}_ms"] = t * 1e3
        row[f"{mode}_GFLOP"] = flops[mode] / 1e9
        row[f"{mode}_TFLOPs"] = bc.achieved_tflops(flops[mode], t)
        row[f"{mode}_MFU_pct"] = 100 * bc.mfu(flops[mode], t, peak)
        row[f"{mode}_timing"] = timings[mode]
    row["speedup"] = row["dense_ms"] / row["visible_ms"]
    row["flop_ratio"] = row["dense_GFLOP"] / row["visible_GFLOP"]
    return row


# ----------------------------------------------------------------------------- main


def run_row(name: str, args: argparse.Namespace, v: Variant, device: torch.device, peaks: dict) -> dict[str, Any]:
    """One table row; raises Unavailable when the model cannot be built in this checkout."""
    if args.encoder_only:
        return bench_encoder(name, args, v, device, peaks)
    return bench_method(name, args, v, device, peaks)


def run_row_isolated(name: str, args: argparse.Namespace, v: Variant, device: torch.device, peaks: dict) -> dict[str, Any]:
    """The row in a fresh process, so that no row inherits another's allocator caches, RSS peak,
    compiled graphs or CUDA fragmentation."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_row, name, args, v, device, peaks).result()


def measure_peaks(device: torch.device, dtypes, n: int | None = None, iters: int | None = None) -> dict:
    """{dtype: measured matmul peak} (the MFU denominators), printed as they are measured."""
    peaks = {}
    for dtype in sorted(dtypes):
        peaks[dtype] = bc.matmul_peak_tflops(device, dtype, n=n, iters=iters)
        print(f"measured {dtype} matmul peak: {peaks[dtype]['tflops']:.3f} TFLOP/s "
              f"({peaks[dtype]['iters']} x mm {peaks[dtype]['n']}^2)", flush=True)
    return peaks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=("paper", "cpu", "smoke"), default="paper",
                   help="paper: ViT-B/Swin-B at crop 192x192x64, batch 8; cpu: tiny models at 64x64x32, batch 2; "
                        "smoke: the cpu models with 2-layer ViTs / 1-block Swin stages at 64x32x32, batch 2")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", choices=tuple(bc.DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the method's forward")
    p.add_argument("--flash", action=argparse.BooleanOptionalAction, default=True,
                   help="fused scaled_dot_product_attention in the MONAI blocks (default on)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder blocks in backward")
    p.add_argument("--dense", action="store_true", help="online ViT encodes all tokens with mask tokens")
    p.add_argument("--variants", default="", help="comma list run in one process for before/after, e.g. "
                   "fp32,bf16,bf16+flash,bf16+flash+compile,bf16+flash+dense (overrides the flags above)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--batch", type=int, default=None, help="default: 8 (paper) or 2 (cpu, encoder-only)")
    p.add_argument("--crop", default=None, help="e.g. 192,192,64; default from the preset")
    p.add_argument("--mask", type=float, default=None,
                   help="mask ratio; default each method's own (Alice/MAE 0.75, CAE 0.5), 0.75 for --encoder-only")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 paper, 5 cpu, 3 encoder-only)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 paper, 2 cpu, "
                   "0 encoder-only, whose FLOP-counting pass warms up)")
    p.add_argument("--encoder-only", action="store_true", help="ViT visible-only vs dense mask-token encoder")
    p.add_argument("--encoders", default="vit_s,vit_b", help="ViT presets for --encoder-only")
    p.add_argument("--encoder-layers", type=int, default=None, help="--encoder-only: blocks (default: the preset's)")
    p.add_argument("--peak-n", type=int, default=None, help="matmul size for the peak (default 8192 GPU, 1024 CPU)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                   help="run each row in a fresh process (default on; needed for honest CPU memory figures)")
    p.add_argument("--json", default=None, help="write all figures here")
    args = p.parse_args(argv)
    cpu = args.preset in ("cpu", "smoke")
    if args.crop:
        try:
            args.crop = tuple(int(s) for s in args.crop.split(","))
        except ValueError:
            p.error(f"--crop: expected comma-separated ints like 192,192,64, got {args.crop!r}")
    else:
        args.crop = PAPER_CROP if (args.encoder_only or not cpu) else (SMOKE_CROP if args.preset == "smoke" else CPU_CROP)
    if args.batch is None:
        args.batch = 2 if (cpu or args.encoder_only) else 8
    if args.encoder_only:
        args.mask = 0.75 if args.mask is None else args.mask
        args.steps = args.steps or 3
        args.warmup = 0 if args.warmup is None else args.warmup
    else:
        args.steps = args.steps or (5 if cpu else 10)
        args.warmup = (2 if cpu else 3) if args.warmup is None else args.warmup
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = bc.resolve_device(args.device)
    base = Variant(dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"), flash=args.flash,
                   compile=args.compile, ckpt=args.grad_checkpointing, dense=args.dense)
    variants = [parse_variant(t, base) for t in args.variants.split(",") if t] or [base]
    info = bc.machine_info(device)
    print(f"device: {info['device']} | torch {info['torch']} | load {info.get('loadavg_1_5_15')} | "
          f"threads {info['torch_threads']} (OMP_NUM_THREADS={info['omp_num_threads'] or 'unset'})")
    peaks = measure_peaks(device, {v.dtype for v in variants}, n=args.peak_n)
    rows, skipped, failed = [], [], 0
    names = [n for n in args.encoders.split(",") if n] if args.encoder_only else [n for n in args.methods.split(",") if n]
    for v in variants:
        for name in names:
            print(f"-- {name} [{v.label()}] crop {args.crop} batch {args.batch}", flush=True)
            try:
                rows.append((run_row_isolated if args.isolate else run_row)(name, args, v, device, peaks))
            except Unavailable as e:
                print(f"   skipped: {e}")
                skipped.append({"name": name, "variant": v.label(), "reason": str(e)})
            except torch.cuda.OutOfMemoryError:
                print("   out of memory")
                rows.append(dict(method=name, device=bc.short_device(device), variant=v.label(), status="OOM"))
            except Exception as e:  # keep the sweep going, but make the run fail
                traceback.print_exc()
                failed += 1
                rows.append(dict(method=name, device=bc.short_device(device), variant=v.label(), status=f"error: {e}"))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    if args.encoder_only:
        bc.print_table(rows, ["encoder", "device", "variant", "crop", "batch", "mask", "tokens", "visible_tokens",
                              "visible_ms", "dense_ms", "speedup", "flop_ratio", "visible_TFLOPs", "dense_TFLOPs"])
    else:
        bc.print_table(rows, ["method", "encoder", "device", "variant", "crop", "batch", "mask", "params_M", "step_ms",
                              "samples_s", "mem_MiB", "GFLOP_step", "TFLOPs", "MFU_pct", "status"])
    for s in skipped:
        print(f"skipped {s['name']} [{s['variant']}]: {s['reason']}")
    if args.encoder_only:
        print(f"forward+backward of the encoder alone; median of {args.steps}, visible and dense alternating; "
              "speedup = dense_ms / visible_ms")
    else:
        mem = "peak CUDA max_memory_allocated" if device.type == "cuda" else "growth of the resident set (RSS)"
        print(f"mem_MiB = {mem} from model build to the last step; MFU against the measured matmul peak above; "
              f"step = median of {args.steps} after {args.warmup} warm-up")
    bc.write_json(args.json, {
        "command": " ".join(sys.argv), "mode": "encoder-only" if args.encoder_only else "train-step",
        "machine": info, "loadavg_end": bc.machine_info(device).get("loadavg_1_5_15"), "matmul_peak": peaks,
        "preset": args.preset, "rows": rows, "skipped": skipped,
    })
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
