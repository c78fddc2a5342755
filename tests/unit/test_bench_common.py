"""FLOP counting and MFU arithmetic of the benchmarks (alice3d/train/flops.py, scripts/bench_common.py).

No timing is asserted: only counts, arithmetic and table/JSON plumbing.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from alice3d.train.flops import achieved_tflops, count_flops, linear_flops, mfu

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load_bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", SCRIPTS / "bench_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bc = _load_bench_common()


def test_linear_flops_formula():
    assert linear_flops(3, 5, 7) == 2 * 3 * 5 * 7
    assert linear_flops(1, 1, 1) == 2


def test_matmul_count_is_2mnk():
    a, b = torch.randn(6, 10), torch.randn(10, 4)
    total, by_op = count_flops(lambda: a @ b)
    assert total == 2 * 6 * 4 * 10 == 480
    assert by_op == {"aten.mm": 480}


def test_linear_forward_and_backward_counts():
    torch.manual_seed(0)
    m, k, n = 8, 16, 32
    layer = nn.Linear(k, n)
    x = torch.randn(m, k, requires_grad=True)
    fwd, _ = count_flops(lambda: layer(x))
    assert fwd == 2 * m * n * k
    # Backward: grad wrt input (M x N @ N x K) and wrt weight (N x M @ M x K), 2*M*N*K each.
    both, _ = count_flops(lambda: layer(x).sum().backward())
    assert both == 3 * 2 * m * n * k


def test_batched_3d_tokens_count():
    """A linear on (B, L, D) tokens is B*L rows of a matmul."""
    b, l, d_in, d_out = 2, 12, 8, 5
    layer = nn.Linear(d_in, d_out, bias=False)
    x = torch.randn(b, l, d_in)
    total, _ = count_flops(lambda: layer(x))
    assert total == 2 * b * l * d_in * d_out


def test_fused_attention_counted_on_cpu():
    """CPU flash attention is missing from torch's registry; alice3d/train/flops.py adds it."""
    b, h, lq, lk, e = 2, 3, 10, 7, 4
    q = torch.randn(b, h, lq, e, requires_grad=True)
    k = torch.randn(b, h, lk, e, requires_grad=True)
    v = torch.randn(b, h, lk, e, requires_grad=True)
    one_bmm = 2 * b * h * lq * lk * e
    fwd, _ = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert fwd == 2 * one_bmm  # QK^T and AV
    # Backward: recomputed QK^T, dA = dO V^T, dV = A^T dO, dQ = dS K, dK = dS^T Q.
    both, by_op = count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward())
    assert both == 7 * one_bmm
    assert all("attention" in name for name in by_op)


def test_conv3d_patch_embedding_count():
    """A stride-p conv with kernel p is one linear per patch: 2 * patches * (C_in * p^3) * C_out."""
    conv = nn.Conv3d(1, 6, kernel_size=4, stride=4, bias=False)
    x = torch.randn(2, 1, 8, 8, 4)
    total, _ = count_flops(lambda: conv(x))
    patches = 2 * (2 * 2 * 1)  # batch * grid
    assert total == 2 * patches * (1 * 4**3) * 6 == 6144


def _vit_forward_flops(batch: int, tokens: int, encoded: int, patch_voxels: int, d: int, mlp: int, layers: int) -> int:
    """Hand count: patch embedding on all `tokens`; per block on `encoded` tokens the qkv, output
    and two MLP linears (2*n*(4*D*D + 2*D*M)) and attention QK^T + AV (2 * 2*n*n*D over all heads)."""
    embed = 2 * tokens * patch_voxels * d
    block = 2 * encoded * (4 * d * d + 2 * d * mlp) + 2 * 2 * encoded * encoded * d
    return batch * (embed + layers * block)


@pytest.mark.parametrize("flash", [True, False])
def test_visible_only_and_dense_vit_counts_match_hand_count(flash):
    from alice3d.core.masking import random_masking
    from alice3d.encoders.vit import build_vit

    torch.manual_seed(0)
    enc = build_vit("vit_tiny", (32, 32, 16), patch_size=8, num_layers=2, use_flash_attention=flash)
    x = torch.rand(2, 1, 32, 32, 16)
    masking = random_masking(2, enc.num_tokens, 0.75)  # 32 tokens, 8 visible
    token = torch.zeros(1, 1, enc.hidden_size)
    vis, _ = count_flops(lambda: enc(x, ids_keep=masking.ids_keep))
    dense, _ = count_flops(lambda: enc(x, mask=masking.mask, mask_token=token))
    kw = dict(batch=2, tokens=32, patch_voxels=8**3, d=96, mlp=384, layers=2)
    assert vis == _vit_forward_flops(encoded=8, **kw) == 13_467_648
    assert dense == _vit_forward_flops(encoded=32, **kw) == 36_175_872


def test_achieved_tflops_and_mfu_arithmetic():
    assert achieved_tflops(2e12, 0.5) == pytest.approx(4.0)
    assert mfu(2e12, 0.5, 10.0) == pytest.approx(0.4)
    # 40% MFU on a 800 TFLOP/s peak for a 10 TFLOP step means a step of 31.25 ms.
    assert mfu(10e12, 10e12 / (0.4 * 800e12), 800.0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="seconds"):
        achieved_tflops(1.0, 0.0)
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu(1.0, 1.0, 0.0)


def test_bench_common_reexports_and_peak_fields():
    assert bc.linear_flops(2, 3, 4) == 48
    peak = bc.matmul_peak_tflops(torch.device("cpu"), "fp32", n=64, iters=2, repeats=1)
    assert peak["n"] == 64 and peak["iters"] == 2 and peak["dtype"] == "fp32"
    assert math.isfinite(peak["tflops"]) and peak["tflops"] > 0


def test_time_interleaved_calls_each_function_in_turn():
    calls = []
    fns = {"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}
    out = bc.time_interleaved(fns, torch.device("cpu"), warmup=1, steps=2)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert set(out) == {"a", "b"} and len(out["a"]["times_s"]) == 2
    assert out["a"]["min_s"] <= out["a"]["median_s"]


def test_format_table_and_json(tmp_path):
    rows = [{"model": "vit_b", "ms": 12.3456, "mem": None}, {"model": "mae", "ms": 1234.5}]
    text = bc.format_table(rows, ["model", "ms", "mem"])
    lines = text.splitlines()
    assert lines[0].split() == ["model", "ms", "mem"]
    assert lines[2].split() == ["vit_b", "12.3", "n/a"]
    assert lines[3].split() == ["mae", "1234", "n/a"]
    path = tmp_path / "sub" / "out.json"
    bc.write_json(path, {"rows": rows})
    assert json.loads(path.read_text())["rows"][0]["model"] == "vit_b"


def test_device_description_names_cpu():
    label = bc.short_device(torch.device("cpu"))
    assert label.startswith("cpu:") and f"x{torch.get_num_threads()}thr" in label
    info = bc.machine_info(torch.device("cpu"))
    assert info["device"] == label and info["torch"] == torch.__version__


def _toy_module():
    """A TrainModule whose loss is non-finite for a batch with an infinite ``scale``."""
    from alice3d.train.module import TrainModule

    class Toy(TrainModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.updates = 0

        def forward(self, batch):
            loss = (self.w * batch["x"]).sum() * batch["scale"]
            return {"loss": loss, "w_sum": self.w.detach().sum()}

        def update_target(self, step, max_steps):
            self.updates += 1

    return Toy()


def test_bench_trainer_steps_count_skipped_updates():
    """bench_trainer is the real Trainer: a finite batch changes the weights and calls the target
    update, a non-finite one is skipped (and counted) instead of failing outside Trainer.fit."""
    from alice3d.config import TrainConfig

    model = _toy_module()
    trainer = bc.bench_trainer(model, TrainConfig(max_steps=100, batch_size=1, device="cpu", warmup_steps=0, lr=0.1))
    good = {"x": torch.ones(3), "scale": torch.tensor(1.0)}
    bad = {"x": torch.ones(3), "scale": torch.tensor(float("inf"))}
    batches = iter([good, good, bad, good])
    timing, skipped = bc.time_train_steps(trainer, batches, torch.device("cpu"), "fp32", warmup=1, steps=3)
    assert skipped == 1 and len(timing["times_s"]) == 3
    assert model.updates == 3  # every applied step, none for the skipped one
    assert float(model.w.detach().sum()) < 3.0  # AdamW moved the weights down the gradient
    assert not (Path(bc.tempfile.gettempdir()) / "alice3d-bench-no-run").exists()


def test_step_autocast_only_on_cpu_bf16():
    cpu = torch.device("cpu")
    with bc.step_autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with bc.step_autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")


def test_versions_name_torch_and_monai():
    import monai

    v = bc.versions()
    assert v["torch"] == torch.__version__ and v["monai"] == monai.__version__
    assert set(v) == {"torch", "cuda", "cudnn", "monai", "python"}
