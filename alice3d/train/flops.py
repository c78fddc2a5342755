"""FLOP counting of a training step and model-FLOP utilisation (MFU).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the ops that actually
run (matmuls, convolutions, fused attention), forward and backward, so a visible-only
encoder is charged for the tokens it sees and a dense one for all of them. Element-wise
work (norms, activations, the optimizer) is not counted, as usual for MFU.

    flops = count_flops(lambda: model(batch)["loss"].backward())
    mfu(flops, step_seconds, peak_tflops)   # fraction of the measured matmul peak
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_flops", "linear_flops", "achieved_tflops", "mfu", "extra_flop_formulas"]


def _cpu_sdpa_forward(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def extra_flop_formulas() -> dict:
    """Formulas for fused ops that torch's registry lacks (CPU flash attention, torch 2.x).

    Without them, fused attention on CPU would count as zero FLOPs.
    """
    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return extra


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """Run ``fn()`` once under FlopCounterMode -> (total FLOPs, FLOPs per aten op name).

    A multiply-add counts as 2 FLOPs (a linear layer ``(M, K) @ (K, N)`` = ``2 * M * N * K``).
    """
    counter = FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())
    with counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def linear_flops(m: int, n: int, k: int) -> int:
    """FLOPs of ``(M, K) @ (K, N)``: M * N dot products of length K, 2 FLOPs per multiply-add."""
    return 2 * m * n * k


def achieved_tflops(flops: float, seconds: float) -> float:
    """FLOPs done in ``seconds`` as TFLOP/s."""
    if seconds <= 0:
        raise ValueError(f"achieved_tflops: seconds must be > 0, got {seconds}")
    return flops / seconds / 1e12


def mfu(flops: float, seconds: float, peak_tflops: float) -> float:
    """Model-FLOP utilisation: achieved TFLOP/s over ``peak_tflops`` (a fraction, not %)."""
    if peak_tflops <= 0:
        raise ValueError(f"mfu: peak_tflops must be > 0, got {peak_tflops}")
    return achieved_tflops(flops, seconds) / peak_tflops
