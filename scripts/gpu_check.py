"""One command that measures every GPU target of alice3d, in under 8 minutes on one GPU.

    python scripts/gpu_check.py --out DIR                      # one CUDA GPU (H100/H200 class)
    python scripts/gpu_check.py --smoke --out DIR              # every section, tiny sizes, CPU
    python scripts/gpu_check.py --out DIR --sections alice_vit_b,data_path --device cuda:1

Writes DIR/gpu_check.json and DIR/gpu_check.md (device, torch/CUDA/cuDNN/MONAI versions,
and for every target: measured, target, met) after every section and every row, so a run
that is killed keeps what it finished. Each section calls the code of the bench scripts
(bench_pretrain, bench_finetune, bench_landmark, bench_data), and every training step is
the real ``Trainer.train_step``.

Sections (full preset; --smoke runs the same code at tiny sizes):
  bf16_correctness     one training step of every registered method (``METHODS``, at the
                       CPU-sized sections of ``PretrainConfig``, on phantom crops) in bf16
                       autocast vs fp32 from the same weights and seed: loss and gradient
                       norm agree within BF16_RTOL
  alice_vit_b          Alice at the paper setting (ViT-B, 192x192x64, batch 8, mask 0.75, bf16,
                       fused attention) and with Swin-B, eager and torch.compile: step time,
                       samples/s, peak memory, FLOPs/step, MFU against the bf16 matmul peak
                       measured in this run                        target: ViT-B MFU >= 40 %
  visible_vs_dense     ViT-B encoder forward+backward at the same setting, visible tokens
                       only vs all tokens with mask tokens         target: >= 3x
  swin_unetr_finetune  Swin UNETR and UNETR training step: the alice3d-finetune loop
                       (Trainer.train_step, bf16, channels-last) vs a plain fp32 MONAI loop
                                                                   target: Swin UNETR >= 2x
  sliding_window_512   sliding-window inference of a 512x512x200 volume (ROI 96^3, overlap
                       0.5), UNETR and Swin UNETR, as predict (fp32) and validation (bf16)
                       run it                                      target: < 5 s
  landmark             embedding of one abdomen-sized phantom, one query and 100 batched
                       queries with the default matching, on the device
                                                                   targets: < 50 ms, < 1 s
  data_path            Alice ViT-B (configs/pretrain/alice_vit_b.yaml) trained on real
                       landmark-matched pairs through DataLoader workers vs the same pairs
                       replayed from GPU memory                    target: >= 90 %

Budget of the full preset on an H100 (seconds; a section past its budget is stopped and
reported with the rows it finished, and the whole run stops at TOTAL_BUDGET_S = 470):
  bf16_correctness 35 | alice_vit_b 190 (eager ViT-B 25, eager Swin-B 30, compiled ViT-B 65,
  compiled Swin-B 70; includes the bf16 matmul peak, ~1 s) | visible_vs_dense 25 |
  swin_unetr_finetune 45 | sliding_window_512 50 | landmark 30 | data_path 80 (phantom cohort
  of 4, volume loading and CPU embedding ~40 s on a cold cache, then 2 x 15 steps);
  + start-up (imports, CUDA context) ~10.
The smoke preset (CPU, 2 cores) takes about a minute; its figures only show that every
section runs. Exit status: 0 when every section and row ran (targets met or not), 1 when one
failed.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import bench_data as bd  # noqa: E402
import bench_finetune as bf  # noqa: E402
import bench_landmark as bl  # noqa: E402
import bench_pretrain as bp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 470.0  # the full preset must stay under 8 minutes
BF16_RTOL = {"loss": 0.02, "grad_norm": 0.05}  # |bf16 - fp32| / |fp32| after one step


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    name: str
    budgets: dict[str, float]  # seconds per section
    total_budget_s: float
    peak_n: int | None = None  # matmul size of the measured peak (None: bench_common's default)
    peak_iters: int | None = None
    cohort_n: int = 4  # phantom subjects for crops, the landmark volumes and the pairs
    # bf16_correctness: PretrainConfig's sections, optionally shrunk
    correct_batch: int = 2
    correct_shrink: dict[str, Any] = field(default_factory=dict)  # img_size, ViT patch and layers
    correct_spacing: tuple[float, ...] = (3.0, 3.0, 3.0)
    # alice_vit_b and visible_vs_dense (bench_pretrain presets)
    alice_preset: str = "paper"
    alice_crop: tuple[int, ...] = (192, 192, 64)
    alice_batch: int = 8
    alice_dtype: str = "bf16"
    alice_warmup: int = 3
    alice_steps: int = 10
    alice_compile: str | None = None  # None: compile where possible; else why the rows are skipped
    alice_row_budgets: dict[str, float] = field(default_factory=dict)
    vvd_encoder: str = "vit_b"
    vvd_crop: tuple[int, ...] = (192, 192, 64)
    vvd_steps: int = 5
    vvd_layers: int | None = None  # None: the preset's depth
    # fine-tuning and inference (bench_finetune sizes)
    ft_size: str = "paper"
    ft_roi: dict[str, tuple[int, ...] | None] = field(default_factory=lambda: {"swin_unetr": None, "unetr": None})
    ft_batch: int = 2
    ft_warmup: int = 3
    ft_steps: int = 8
    sw_volume: tuple[int, ...] = (512, 512, 200)
    # landmark
    lm_spacing: tuple[float, ...] | None = None  # None: the model's own
    lm_queries: int = 100
    # data_path
    data_config: str | None = str(REPO / "configs" / "pretrain" / "alice_vit_b.yaml")
    data_crop: tuple[int, ...] = (192, 192, 64)
    data_spacing: tuple[float, ...] = (1.5, 1.5, 2.0)
    data_batch: int = 8
    data_workers: int = 8
    data_warmup: int = 3
    data_steps: int = 15


FULL = Preset(
    name="gpu",
    budgets={"bf16_correctness": 35, "alice_vit_b": 190, "visible_vs_dense": 25, "swin_unetr_finetune": 45,
             "sliding_window_512": 50, "landmark": 30, "data_path": 80},
    total_budget_s=TOTAL_BUDGET_S,
    alice_row_budgets={"eager_alice_vit": 25, "eager_alice_swin": 30, "compile_alice_vit": 65,
                       "compile_alice_swin": 70},
)

SMOKE = Preset(
    name="smoke",
    # Generous: these are safety nets against a hang, not the time the smoke run takes.
    budgets={"bf16_correctness": 90, "alice_vit_b": 120, "visible_vs_dense": 60, "swin_unetr_finetune": 90,
             "sliding_window_512": 60, "landmark": 90, "data_path": 120},
    total_budget_s=600,
    peak_n=256, peak_iters=4,
    cohort_n=2,
    correct_shrink={"img_size": (32, 32, 32), "vit_img_size": (32, 32, 16), "vit_patch": 8, "vit_layers": 2},
    correct_spacing=(4.0, 4.0, 4.0),
    alice_preset="smoke", alice_crop=bp.SMOKE_CROP, alice_batch=2, alice_dtype="fp32", alice_warmup=0,
    alice_steps=1, alice_compile="--smoke does not compile: compiling takes minutes on a CPU (run the GPU preset)",
    vvd_encoder="vit_tiny", vvd_crop=(32, 32, 32), vvd_steps=1, vvd_layers=2,
    ft_size="cpu", ft_roi={"swin_unetr": (64, 32, 32), "unetr": (32, 32, 32)}, ft_batch=1, ft_warmup=0,
    ft_steps=1, sw_volume=(64, 48, 40),
    lm_spacing=(4.0, 4.0, 4.0),
    data_config=None, data_crop=(32, 32, 32), data_spacing=(4.0, 4.0, 4.0), data_batch=2, data_workers=1,
    data_warmup=1, data_steps=2,
)


# ----------------------------------------------------------------------------- budgets


class BudgetExceeded(BaseException):
    """A time limit has passed. A BaseException, like KeyboardInterrupt, so that no library's
    ``except Exception`` swallows it."""

    def __init__(self, label: str, seconds: float):
        super().__init__(f"ran past its budget of {seconds:.3g} s ({label})")
        self.label = label


class SectionSkipped(Exception):
    """The whole section cannot run here; the message says why."""


class Deadlines:
    """Nested time limits enforced with SIGALRM: the outermost limit that has passed raises
    BudgetExceeded in the main thread. Without SIGALRM (not the main thread, Windows) the
    limits are not enforced."""

    def __init__(self) -> None:
        self.stack: list[tuple[float, str, float]] = []
        self.enabled = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signal.SIGALRM, self._expired) if self.enabled else None

    def close(self) -> None:
        """Stop the timer and give SIGALRM back to its previous handler."""
        if self.enabled:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self.enabled = False

    def _arm(self) -> None:
        if not self.enabled:
            return
        if not self.stack:
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        left = min(end for end, _, _ in self.stack) - time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, max(left, 0.001))

    def _expired(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        for end, label, seconds in self.stack:
            if end <= now + 0.005:
                raise BudgetExceeded(label, seconds)
        self._arm()  # a timer from a limit that has been left since

    @contextmanager
    def limit(self, seconds: float, label: str):
        self.stack.append((time.monotonic() + seconds, label, seconds))
        self._arm()
        try:
            yield
        finally:
            self.stack.pop()
            self._arm()


# ----------------------------------------------------------------------------- context and output


def check(name: str, measured: float | None, op: str, goal: float, unit: str = "") -> dict[str, Any]:
    """A target: ``measured op goal`` (op ">=" or "<"); an unmeasured value is not met."""
    met = None if measured is None else (measured >= goal if op == ">=" else measured < goal)
    return {"name": name, "measured": measured, "target": f"{op} {goal:g}{unit}", "unit": unit, "met": bool(met)}


class Context:
    def __init__(self, preset: Preset, device: torch.device, out: Path, argv: list[str]):
        self.preset, self.device, self.out = preset, device, out
        self.deadlines = Deadlines()
        self.start = time.monotonic()
        self.report: dict[str, Any] = {
            "command": " ".join(["python", "scripts/gpu_check.py", *argv]), "preset": preset.name,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "budget_s": preset.total_budget_s, "machine": bc.machine_info(device), "versions": bc.versions(),
            "bf16_tolerance": {"loss_rel": BF16_RTOL["loss"], "grad_norm_rel": BF16_RTOL["grad_norm"]},
            "matmul_peak": {}, "sections": {}, "elapsed_s": 0.0, "finished": False,
        }

    def peak(self, dtype: str) -> dict[str, Any]:
        """The measured matmul peak of this run (measured once per dtype)."""
        peaks = self.report["matmul_peak"]
        if dtype not in peaks:
            peaks.update(bp.measure_peaks(self.device, {dtype}, n=self.preset.peak_n, iters=self.preset.peak_iters))
            self.save()
        return peaks[dtype]

    def save(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.report, indent=2, default=str) + "\n"),
                           ("gpu_check.md", render_markdown(self.report))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            tmp.replace(self.out / name)  # a kill mid-write never leaves half a file

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f} s] {text}", flush=True)


def _rows(res: dict) -> list[dict]:
    return res.setdefault("rows", [])


def _run_row(ctx: Context, res: dict, row: dict, fn: Callable[[], dict], budget: float | None = None,
             label: str = "") -> dict:
    """``row`` updated with ``fn()``'s figures, or with why it was skipped or failed; the section
    goes on either way (its own budget still stops it)."""
    _rows(res).append(row)
    ctx.log(f"  {row}")
    start = time.monotonic()
    try:
        if budget:
            with ctx.deadlines.limit(budget, label):
                row.update(fn())
        else:
            row.update(fn())
        row.setdefault("status", "ok")
    except BudgetExceeded as e:
        if e.label != label:
            raise
        row["status"] = f"error: {e}"
    except bp.Unavailable as e:
        row["status"] = f"skipped: {e}"
    except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
        row["status"] = f"error: {type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=8)
    finally:
        row["elapsed_s"] = round(time.monotonic() - start, 1)
        _free(ctx.device)
        ctx.save()
    ctx.log(f"  -> {row['status']} ({row['elapsed_s']} s)")
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- sections


def _shrunk(cfg: Any, shrink: dict[str, Any]) -> Any:
    """``cfg`` at the preset's smaller size: ViTs get fewer layers, a smaller patch and crop;
    other encoders the smallest crop their downsampling allows."""
    if not shrink:
        return cfg
    if cfg.family().kind != "vit":
        return replace(cfg, img_size=shrink["img_size"])
    return replace(cfg, img_size=shrink["vit_img_size"], patch_size=shrink["vit_patch"],
                   encoder_kwargs={**cfg.encoder_kwargs, "num_layers": shrink["vit_layers"]})


def _phantom_batches(ctx: Context, img_size: tuple[int, ...], batch: int) -> tuple[dict, dict]:
    """Real phantom crops through ``image_dataset``: ``{"image"}`` for the image methods and
    ``{"q", "k", "view_seed"}`` (two random crops; matching is data_path's business) for Alice."""
    from alice3d.config import DataConfig
    from alice3d.data.builders import image_dataset
    from alice3d.data.slices import SliceConfig

    data = DataConfig(spacing=ctx.preset.correct_spacing, phantom_n=ctx.preset.cohort_n)
    dataset, _ = image_dataset(data, SliceConfig(), img_size, seed=0)
    crops = torch.stack([dataset[i]["image"] for i in range(2 * batch)])
    images = {"image": crops[:batch]}
    pairs = {"q": crops[:batch], "k": crops[batch:], "view_seed": torch.arange(batch)}
    return images, pairs


def _one_step(model: torch.nn.Module, batch: dict, device: torch.device, dtype: str, size: int) -> dict:
    from alice3d.config import TrainConfig

    trainer = bc.bench_trainer(model, TrainConfig(max_steps=100, batch_size=size, device=str(device),
                                                  amp=dtype == "bf16"))
    with bc.step_autocast(device, dtype):
        out = trainer.train_step(itertools.repeat(batch), 0)
    return {"terms": {k: float(v) for k, v in out.terms.items()}, "grad_norm": float(out.grad_norm),
            "finite": out.finite}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def bf16_correctness(ctx: Context, res: dict) -> None:
    """Every registered method, one step from identical weights and seed, bf16 vs fp32."""
    from alice3d.methods import METHODS
    from alice3d.pretrain.config import PretrainConfig

    p, pc = ctx.preset, PretrainConfig()
    res["tolerance"] = {"loss_rel": BF16_RTOL["loss"], "grad_norm_rel": BF16_RTOL["grad_norm"]}
    res["autocast"] = ("the trainer's own bf16 AMP (train.amp); the fp32 reference uses torch's default "
                       "math (cuDNN convolutions may use TF32)" if ctx.device.type == "cuda" else
                       "CPU autocast around Trainer.train_step (the trainer's AMP is CUDA-only)")
    batches: dict[tuple, tuple[dict, dict]] = {}
    ok = 0
    for name, entry in METHODS.items():
        cfg = _shrunk(getattr(pc, name), p.correct_shrink)
        row = {"method": name, "encoder": cfg.encoder, "img_size": "x".join(map(str, cfg.img_size)),
               "batch": p.correct_batch}

        def measure(cfg=cfg, entry=entry, name=name) -> dict:
            cfg.validate(name)
            key = tuple(cfg.img_size)
            if key not in batches:
                batches[key] = _phantom_batches(ctx, key, p.correct_batch)
            batch = batches[key][1 if entry.dataset == "pairs" else 0]
            torch.manual_seed(0)
            model = entry.method(cfg)
            fp32 = _one_step(copy.deepcopy(model), batch, ctx.device, "fp32", p.correct_batch)
            bf16 = _one_step(model, batch, ctx.device, "bf16", p.correct_batch)
            loss_rel = _rel(bf16["terms"]["loss"], fp32["terms"]["loss"])
            gn_rel = _rel(bf16["grad_norm"], fp32["grad_norm"])
            finite = fp32["finite"] and bf16["finite"]
            within = finite and loss_rel <= BF16_RTOL["loss"] and gn_rel <= BF16_RTOL["grad_norm"]
            terms = {k: _rel(bf16["terms"][k], v) for k, v in fp32["terms"].items() if k in bf16["terms"]}
            return {"loss_fp32": fp32["terms"]["loss"], "loss_bf16": bf16["terms"]["loss"], "loss_rel": loss_rel,
                    "grad_norm_fp32": fp32["grad_norm"], "grad_norm_bf16": bf16["grad_norm"], "grad_norm_rel": gn_rel,
                    "finite": finite, "within_tolerance": within, "max_term_rel": max(terms.values(), default=0.0)}

        _run_row(ctx, res, row, measure)
        ok += bool(row.get("within_tolerance"))
    res["targets"] = [check(f"methods with loss and grad norm within tolerance (of {len(METHODS)})",
                            float(ok), ">=", float(len(METHODS)))]


def _alice_args(p: Preset) -> argparse.Namespace:
    return bp.parse_args(["--preset", p.alice_preset, "--crop", ",".join(map(str, p.alice_crop)),
                          "--batch", str(p.alice_batch), "--mask", "0.75", "--warmup", str(p.alice_warmup),
                          "--steps", str(p.alice_steps), "--no-isolate"])


def alice_vit_b(ctx: Context, res: dict) -> None:
    """Alice ViT-B and Swin-B at the paper setting, eager and compiled."""
    p = ctx.preset
    args = _alice_args(p)
    peak = {p.alice_dtype: ctx.peak(p.alice_dtype)}
    no_compile = p.alice_compile or bc.compile_unavailable(ctx.device)
    for compiled in (False, True):
        for method in ("alice_vit", "alice_swin"):
            v = bp.Variant(dtype=p.alice_dtype, flash=True, compile=compiled)
            row = {"method": method, "variant": v.label(), "crop": "x".join(map(str, args.crop)), "batch": args.batch}
            if compiled and no_compile:
                _rows(res).append({**row, "status": f"skipped: {no_compile}"})
                ctx.save()
                continue
            label = f"{'compile' if compiled else 'eager'}_{method}"
            _run_row(ctx, res, row, lambda method=method, v=v: _pretrain_row(method, args, v, ctx.device, peak),
                     p.alice_row_budgets.get(label), label)
    vit = [r for r in _rows(res) if r["method"] == "alice_vit" and r.get("MFU_pct") is not None]
    best = max(vit, key=lambda r: r["MFU_pct"], default={})
    res["targets"] = [check(f"Alice {best.get('encoder', 'ViT')} MFU of the measured {p.alice_dtype} matmul peak "
                            f"(best row: {best.get('variant', 'none')})", best.get("MFU_pct"), ">=", 40.0, " %")]


_PRETRAIN_KEYS = ("encoder", "params_M", "step_ms", "samples_s", "mem_MiB", "mem_kind", "GFLOP_step", "TFLOPs",
                  "peak_TFLOPs", "MFU_pct", "skipped_steps", "timing")


def _pretrain_row(method: str, args: argparse.Namespace, v: bp.Variant, device: torch.device, peaks: dict) -> dict:
    row = bp.bench_method(method, args, v, device, peaks)
    return {k: row[k] for k in _PRETRAIN_KEYS}


def visible_vs_dense(ctx: Context, res: dict) -> None:
    """ViT encoder forward+backward: visible tokens only vs all tokens with mask tokens."""
    p = ctx.preset
    args = bp.parse_args(["--encoder-only", "--crop", ",".join(map(str, p.vvd_crop)), "--batch", str(p.alice_batch),
                          "--mask", "0.75", "--steps", str(p.vvd_steps), "--warmup", "0", "--no-isolate"]
                         + (["--encoder-layers", str(p.vvd_layers)] if p.vvd_layers else []))
    v = bp.Variant(dtype=p.alice_dtype, flash=True)
    peak = {p.alice_dtype: ctx.peak(p.alice_dtype)}
    keep = ("tokens", "visible_tokens", "visible_ms", "dense_ms", "speedup", "flop_ratio", "visible_MFU_pct",
            "dense_MFU_pct")
    row = {"encoder": p.vvd_encoder, "variant": v.label(), "crop": "x".join(map(str, args.crop)), "batch": args.batch,
           "mask": 0.75}
    _run_row(ctx, res, row, lambda: {k: bp.bench_encoder(p.vvd_encoder, args, v, ctx.device, peak)[k] for k in keep})
    res["targets"] = [check(f"{p.vvd_encoder} visible-only speed-up over dense", row.get("speedup"), ">=", 3.0, "x")]


def swin_unetr_finetune(ctx: Context, res: dict) -> None:
    """Fine-tuning step: the alice3d-finetune loop vs the plain fp32 MONAI loop, same process."""
    p = ctx.preset
    keep = ("params_M", "roi", "train_step_ms", "train_samples_per_s", "train_peak_GiB", "skipped_steps")
    for model in ("swin_unetr", "unetr"):
        for mode in bf.MODES:
            row = {"model": model, "mode": "ours" if mode == "optimized" else "plain fp32 MONAI", "batch": p.ft_batch}
            _run_row(ctx, res, row, lambda model=model, mode=mode: {k: v for k, v in bf.train_row(
                model, p.ft_size, mode, ctx.device, p.ft_batch, p.ft_warmup, p.ft_steps, p.ft_roi[model]).items()
                if k in keep})
    speed = {(r["model"], r["mode"]): r.get("train_samples_per_s") for r in _rows(res)}
    res["speedup"] = {}
    for model in ("swin_unetr", "unetr"):
        ours, plain = speed.get((model, "ours")), speed.get((model, "plain fp32 MONAI"))
        res["speedup"][model] = ours / plain if ours and plain else None
    res["targets"] = [check("Swin UNETR: our fine-tuning loop over the plain fp32 loop (samples/s)",
                            res["speedup"]["swin_unetr"], ">=", 2.0, "x")]


def sliding_window_512(ctx: Context, res: dict) -> None:
    """Sliding-window inference of one CT-sized volume (the network's input grid)."""
    p = ctx.preset
    keep = ("roi", "sw_batch", "overlap", "precision", "infer_volume_s", "infer_peak_GiB")
    targets = []
    for model in ("unetr", "swin_unetr"):
        for mode, path in (("plain", "predict (fp32)"), ("optimized", "validation (trainer autocast)")):
            row = {"model": model, "path": path, "volume": "x".join(map(str, p.sw_volume))}
            _run_row(ctx, res, row, lambda model=model, mode=mode: {k: v for k, v in bf.infer_row(
                model, p.ft_size, mode, ctx.device, p.sw_volume, 1, p.ft_roi[model]).items() if k in keep})
            targets.append(check(f"{model}, {path}: {row['volume']} inference", row.get("infer_volume_s"), "<", 5.0,
                                 " s"))
    res["targets"] = targets


def _landmark_model() -> Path:
    """The default phantom landmark model, unless getting it would mean training it (minutes)."""
    from landmark.defaults import default_landmark_model, default_model_dir, shipped_model

    if shipped_model(16, 0) is None and not (default_model_dir(16, 0) / "landmark.pt").is_file():
        raise SectionSkipped("the shipped default landmark model is not current and none is cached; training it "
                             "takes minutes (`alice3d-pretrain --out RUN` does it once), so it is not done here")
    return default_landmark_model()


def _queries(matcher: Any, ea: Any, eb: Any, pts: Any) -> dict:
    """Query figures; with the affine consistency, the one-time fit per volume pair first, timed apart."""
    fit = {}
    if matcher.consistency == "affine":
        start = time.perf_counter()
        matcher.pair_transform(ea, eb)
        fit = {"pair_fit_s": round(time.perf_counter() - start, 3)}
    return {**fit, **bl.time_queries(matcher, ea, eb, pts)[0]}


def landmark(ctx: Context, res: dict) -> None:
    """Embedding of one abdomen-sized phantom and 100 batched queries with the shipped default model."""
    import numpy as np

    from alice3d.analysis.landmark_accuracy import sample_body_points
    from landmark.match import Matcher

    p = ctx.preset
    model = _landmark_model()
    vols = bl.phantom_pair(n=p.cohort_n)
    kw = {} if p.lm_spacing is None else {"spacing": p.lm_spacing}
    device = str(ctx.device)
    res.update(model=str(model.name), volume_shape=list(vols[0].shape),
               volume_spacing=[round(s, 2) for s in vols[0].spacing])
    pts = sample_body_points(vols[0], p.lm_queries, np.random.default_rng(0))
    with tempfile.TemporaryDirectory(prefix="alice3d-gpu-check-") as cache:
        embs: list = []

        def embed() -> dict:
            figures, done = bl.time_embedding(model, vols, cache, device, **kw)
            embs.extend(done)
            return figures

        row = _run_row(ctx, res, {"what": "embedding (cold cache), per volume"}, embed)
        if not embs:
            raise RuntimeError(f"no embeddings to query: {row['status']}")
        ea, eb = embs
        for consistency in ("none", None):  # None: the model's default matching (what pair sampling uses)
            m = Matcher(model, cache_dir=cache, device=device, consistency=consistency, **kw)
            what = "per-point argmax" if consistency == "none" else f"default matching ({m.consistency})"
            _run_row(ctx, res, {"what": f"{what}, search {m.search}"}, lambda m=m: _queries(m, ea, eb, pts))
    default = _rows(res)[-1]
    res["targets"] = [check("default matching, one query", default.get("ms_per_query"), "<", 50.0, " ms"),
                      check(f"default matching, {p.lm_queries} batched queries", default.get("s_per_batch"), "<", 1.0,
                            " s")]


def data_path(ctx: Context, res: dict) -> None:
    """End-to-end Alice training on landmark-matched pairs vs the same pairs replayed from device memory."""
    p = ctx.preset
    extra = (f"train.device={ctx.device}", f"train.batch_size={p.data_batch}", f"data.phantom_n={p.cohort_n}")
    cfg = bd.pretrain_config(p.data_crop, p.data_spacing, "landmark", 0, None, str(_landmark_model()),
                             p.data_config, extra)
    matcher = bd.matcher_device(str(ctx.device), p.data_workers)
    config = Path(p.data_config).relative_to(REPO).as_posix() if p.data_config else "built-in defaults"
    res.update(config=config, matcher_device=matcher, cohort=p.cohort_n)
    dataset, report, setup_s = bd.build_dataset(cfg, matcher)
    res.update(volumes=report.used, setup_s=round(setup_s, 1))
    ctx.save()
    row = {"workers": p.data_workers, "batch": p.data_batch, "crop": "x".join(map(str, p.data_crop))}
    keep = ("encoder", "amp", "end_to_end_samples_per_s", "model_only_samples_per_s", "ratio", "skipped_steps")
    _run_row(ctx, res, row, lambda: {k: v for k, v in bd.time_training(
        dataset, cfg, p.data_steps, p.data_workers, p.data_warmup).items() if k in keep})
    ratio = row.get("ratio")
    res["targets"] = [check("end-to-end throughput as % of model-only", None if ratio is None else 100 * ratio,
                            ">=", 90.0, " %")]


SECTIONS: dict[str, Callable[[Context, dict], None]] = {
    "bf16_correctness": bf16_correctness,
    "alice_vit_b": alice_vit_b,
    "visible_vs_dense": visible_vs_dense,
    "swin_unetr_finetune": swin_unetr_finetune,
    "sliding_window_512": sliding_window_512,
    "landmark": landmark,
    "data_path": data_path,
}


def run_section(ctx: Context, name: str) -> dict:
    """The section's dict: its figures, targets and status ("ok", "skipped: why", "error: what")."""
    budget = ctx.preset.budgets[name]
    res: dict[str, Any] = {"status": "running", "budget_s": budget}
    ctx.report["sections"][name] = res
    ctx.save()
    ctx.log(f"{name} (budget {budget:.3g} s)")
    start = time.monotonic()
    try:
        with ctx.deadlines.limit(budget, name):
            SECTIONS[name](ctx, res)
        res["status"] = "ok"
    except SectionSkipped as e:
        res["status"] = f"skipped: {e}"
    except BudgetExceeded as e:
        if e.label == "run":
            raise
        res["status"] = f"error: {e}; the rows finished before are kept"
    except Exception as e:  # noqa: BLE001 - reported, and the next section still runs
        res["status"] = f"error: {type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc(limit=8)
    finally:
        res["elapsed_s"] = round(time.monotonic() - start, 1)
        _free(ctx.device)
        ctx.save()
    ctx.log(f"{name}: {res['status']} ({res['elapsed_s']} s)")
    return res


def run(ctx: Context, names: list[str]) -> int:
    pending = list(names)
    try:
        with ctx.deadlines.limit(ctx.preset.total_budget_s, "run"):
            while pending:
                run_section(ctx, pending[0])
                pending.pop(0)
    except BudgetExceeded:
        ctx.report["sections"].setdefault(pending.pop(0), {})["status"] = \
            "error: the run's budget was spent during this section"
    for name in pending:
        ctx.report["sections"][name] = {"status": f"skipped: the run's budget of {ctx.preset.total_budget_s:.3g} s "
                                                  "was spent before this section"}
    ctx.report["finished"] = True
    ctx.save()
    failed = [n for n, r in ctx.report["sections"].items()
              if any(str(x.get("status", "")).startswith("error") for x in [r, *r.get("rows", [])])]
    return 1 if failed else 0


# ----------------------------------------------------------------------------- Markdown


_COLUMNS = {
    "bf16_correctness": ["method", "encoder", "img_size", "loss_fp32", "loss_bf16", "loss_rel", "grad_norm_fp32",
                         "grad_norm_bf16", "grad_norm_rel", "within_tolerance", "status"],
    "alice_vit_b": ["method", "encoder", "variant", "crop", "batch", "params_M", "step_ms", "samples_s", "mem_MiB",
                    "GFLOP_step", "TFLOPs", "MFU_pct", "status"],
    "visible_vs_dense": ["encoder", "variant", "crop", "batch", "tokens", "visible_tokens", "visible_ms", "dense_ms",
                         "speedup", "flop_ratio", "status"],
    "swin_unetr_finetune": ["model", "mode", "roi", "batch", "train_step_ms", "train_samples_per_s", "train_peak_GiB",
                            "status"],
    "sliding_window_512": ["model", "path", "volume", "roi", "sw_batch", "precision", "infer_volume_s",
                           "infer_peak_GiB", "status"],
    "landmark": ["what", "embed_s_per_volume", "fine_grid", "pair_fit_s", "ms_per_query", "s_per_batch", "batch",
                 "status"],
    "data_path": ["workers", "batch", "crop", "encoder", "end_to_end_samples_per_s", "model_only_samples_per_s",
                  "ratio", "status"],
}


def _md_cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(map(str, v)) if all(isinstance(x, int) for x in v) else ", ".join(map(_md_cell, v))
    return "n/a" if v is None else str(v).replace("|", "/").replace("\n", " ")


def _row_keys(rows: list[dict]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict) and k != "traceback")
    return [k for k in keys if k not in ("elapsed_s", "status")] + ["status"]


def _md_table(rows: list[dict], columns: list[str]) -> list[str]:
    cols = [c for c in columns if any(c in r for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return out + ["| " + " | ".join(_md_cell(r.get(c)) for c in cols) + " |" for r in rows]


def render_markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    tol = report["bf16_tolerance"]
    lines = [
        "# alice3d GPU check", "",
        f"- device: {m['device']}" + (f" ({m['gpu_memory_gb']} GiB, compute capability {m['compute_capability']})"
                                       if "gpu" in m else ""),
        f"- torch {v['torch']}, CUDA {v['cuda'] or 'none'}, cuDNN {v['cudnn'] or 'none'}, MONAI {v['monai']}, "
        f"Python {v['python']}",
        f"- preset: {report['preset']}; command: `{report['command']}`",
        f"- started {report['started']}; elapsed {report['elapsed_s']} s (budget {report['budget_s']:.0f} s); "
        f"finished: {'yes' if report['finished'] else 'no (still running, or killed)'}",
        f"- bf16 tolerance (one step, bf16 vs fp32): loss within {100 * tol['loss_rel']:g} %, gradient norm within "
        f"{100 * tol['grad_norm_rel']:g} % (relative)",
    ]
    for dtype, peak in report["matmul_peak"].items():
        lines.append(f"- measured {dtype} matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak['iters']} x mm {peak['n']}^2)")
    if report["preset"] == "smoke":
        lines.append("- smoke preset: tiny sizes; the figures show that every section runs, not whether a GPU "
                     "target is met")
    lines += ["", "## Targets", "", "| section | target | measured | goal | met |", "|---|---|---|---|---|"]
    for name, res in report["sections"].items():
        for t in res.get("targets", []):
            measured = "n/a" if t["measured"] is None else f"{t['measured']:.4g}{t['unit']}"
            lines.append(f"| {name} | {t['name']} | {measured} | {t['target']} | {'yes' if t['met'] else 'no'} |")
        if not res.get("targets"):
            lines.append(f"| {name} | (none measured) | n/a | | no: {_md_cell(res.get('status'))} |")
    for name, res in report["sections"].items():
        elapsed = f", {res['elapsed_s']} s of {res['budget_s']:.3g} s" if "elapsed_s" in res else ""
        lines += ["", f"## {name}", "", f"status: {_md_cell(res.get('status'))}{elapsed}"]
        notes = {k: res[k] for k in ("autocast", "matcher_device", "volumes", "setup_s", "config", "model",
                                     "volume_shape", "volume_spacing", "speedup") if k in res}
        if notes:
            lines += [""] + [f"- {k}: {_md_cell(v_) if not isinstance(v_, dict) else json.dumps(v_)}"
                             for k, v_ in notes.items()]
        if res.get("rows"):
            lines += [""] + _md_table(res["rows"], _COLUMNS.get(name) or _row_keys(res["rows"]))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--smoke", action="store_true", help="every section at tiny sizes (CPU by default), about a minute")
    p.add_argument("--sections", default="", help=f"comma list, default all: {','.join(SECTIONS)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (--smoke: cpu)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s] or list(SECTIONS)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"--sections: unknown {', '.join(unknown)}; expected some of {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cpu" if args.smoke else ("cuda" if torch.cuda.is_available() else "")
    if not args.device:
        raise SystemExit("gpu_check: no CUDA device here; the full preset needs one. Use --smoke for the CPU check "
                         "(or --device cpu to run the full sizes on the CPU anyway, cut short by the budgets)")
    device = bc.resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    ctx = Context(SMOKE if args.smoke else FULL, device, args.out, argv)
    ctx.log(f"{ctx.report['machine']['device']} | preset {ctx.preset.name} | sections {','.join(args.sections)} | "
            f"writing {args.out / 'gpu_check.md'}")
    try:
        status = run(ctx, args.sections)
    finally:
        ctx.deadlines.close()
    ctx.log(f"done: {args.out / 'gpu_check.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
