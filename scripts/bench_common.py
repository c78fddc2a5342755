"""Shared helpers of the bench_*.py scripts: device description, timing, memory, peak, output.

Imported as ``import bench_common`` by scripts run as ``python scripts/bench_X.py`` (the
script's folder is on ``sys.path``). Every figure a script prints should carry
``short_device(device)`` and its settings, and every JSON file ``machine_info(device)``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from alice3d.train.flops import achieved_tflops, count_flops, linear_flops, mfu
from alice3d.train.trainer import Trainer

__all__ = [
    "DTYPES", "resolve_device", "autocast", "step_autocast", "synchronize", "cpu_model_name", "short_device",
    "versions", "machine_info", "time_steps", "time_interleaved", "bench_trainer", "time_train_steps",
    "compile_unavailable", "MemoryMeter", "matmul_peak_tflops", "count_flops", "linear_flops",
    "achieved_tflops", "mfu", "write_json", "format_table", "print_table",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def autocast(device: torch.device, dtype: str):
    """bf16 autocast as the trainer uses it on CUDA (also applied on CPU when asked for); fp32: none."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def step_autocast(device: torch.device, dtype: str):
    """What to wrap ``Trainer.train_step`` in: nothing on CUDA, where the trainer's own bf16 AMP
    (``train.amp``) applies, or for fp32; CPU autocast for bf16 on a CPU, where the trainer runs
    fp32 (its AMP is CUDA-only), so that the bf16 path can be exercised without a GPU."""
    if dtype == "bf16" and device.type != "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def short_device(device: torch.device) -> str:
    """One short label per row, e.g. ``cuda:NVIDIA H100 80GB HBM3`` or ``cpu:AMD EPYC x2thr``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{cpu_model_name()} x{torch.get_num_threads()}thr"


def versions() -> dict[str, Any]:
    """torch, CUDA, cuDNN and MONAI versions (None where not built in)."""
    import monai

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn, "monai": monai.__version__,
            "python": platform.python_version()}


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on (goes into every JSON file)."""
    info: dict[str, Any] = {
        "device": short_device(device),
        "torch": torch.__version__,
        "monai": versions()["monai"],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def _summary(times: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "times_s": [round(t, 6) for t in times],
    }


def time_steps(fn: Callable[[int], Any], device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Call ``fn(i)`` for ``warmup`` untimed then ``steps`` timed iterations, synchronising the
    device around each timed call -> seconds: median, mean, min, and the list."""
    return time_interleaved({"fn": fn}, device, warmup, steps)["fn"]


def time_interleaved(
    fns: dict[str, Callable[[int], Any]], device: torch.device, warmup: int, steps: int
) -> dict[str, dict[str, Any]]:
    """Like ``time_steps`` for several functions, alternating them at every iteration so that a
    change in machine load (a shared CPU) hits each of them alike -> {name: timing}."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup, warmup + steps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(i)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: _summary(t) for name, t in times.items()}


def bench_trainer(model: torch.nn.Module, tcfg: Any, optimizer: torch.optim.Optimizer | None = None,
                  scheduler: Any = None) -> Trainer:
    """The real ``Trainer`` for timing ``train_step`` alone; ``train_step`` writes nothing, so the
    run directory it is given is never created."""
    trainer = Trainer(model, tcfg, Path(tempfile.gettempdir()) / "alice3d-bench-no-run",
                      optimizer=optimizer, scheduler=scheduler)
    # Trainer.fit sets this counter before its first step; without it a non-finite step (an update
    # the trainer skips) would fail inside train_step instead of being counted.
    if not hasattr(trainer, "_consecutive_bad"):
        trainer._consecutive_bad = 0
    return trainer


def time_train_steps(trainer: Trainer, batches: Iterator, device: torch.device, dtype: str, warmup: int,
                     steps: int) -> tuple[dict[str, Any], int]:
    """``warmup`` + ``steps`` calls of ``trainer.train_step(batches, i)`` (timed as ``time_steps``)
    -> (timing, number of steps whose update was skipped as non-finite)."""
    applied: list[bool] = []

    def step(i: int) -> None:
        with step_autocast(device, dtype):
            applied.append(trainer.train_step(batches, i).finite)

    return time_steps(step, device, warmup, steps), applied.count(False)


def compile_unavailable(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile needs Linux or macOS"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "torch.compile on CUDA needs Triton, which this torch cannot import"
        if not has_triton():
            return "torch.compile on CUDA needs Triton (pip install triton)"
        return None
    import shutil

    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        return "torch.compile on CPU needs a C++ compiler (none found on PATH)"
    return None


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class MemoryMeter:
    """Peak memory of a stretch of work, in MiB.

    CUDA: ``max_memory_allocated`` since ``start()`` (allocator peak, not the process). CPU
    (Linux): growth of the resident set over the stretch, via resetting the kernel's peak-RSS
    mark (``/proc/self/clear_refs``) and reading ``VmHWM``; ``None`` where that is unavailable.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_kb: int | None = None
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_growth"

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.base_kb = None
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS to the current RSS
        except OSError:
            return
        self.base_kb = _proc_status_kb("VmRSS")

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = _proc_status_kb("VmHWM")
        if self.base_kb is None or peak is None:
            return None
        return max(0, peak - self.base_kb) / 1024


def matmul_peak_tflops(
    device: torch.device, dtype: str, n: int | None = None, iters: int | None = None, repeats: int = 3
) -> dict[str, Any]:
    """Measured matmul throughput of the device: best of ``repeats`` loops of ``iters`` square
    ``n x n`` matmuls in ``dtype`` -> {"tflops", "n", "iters", "dtype"}.

    This is the denominator of MFU: what this device, library and dtype really reach, not the
    datasheet figure.
    """
    gpu = device.type == "cuda"
    n = n or (8192 if gpu else 1024)
    iters = iters or (50 if gpu else 8)
    a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
    c = torch.empty(n, n, device=device, dtype=DTYPES[dtype])
    torch.mm(a, b, out=c)  # warm-up (library init, cuBLAS heuristics)
    synchronize(device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        synchronize(device)
        best = max(best, achieved_tflops(iters * linear_flops(n, n, n), time.perf_counter() - start))
    return {"tflops": best, "n": n, "iters": iters, "dtype": dtype}


def write_json(path: str | Path | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {path}")


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table of ``rows`` (dicts) restricted to ``columns``; missing values print n/a."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    out = [line(columns), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    return "\n".join(out)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    print(format_table(rows, columns))
    sys.stdout.flush()
