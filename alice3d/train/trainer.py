"""The one training loop every command uses (pretraining, landmark, fine-tuning).

What it trains is a `train.module.TrainModule`: ``forward(batch)`` returns a dict with a
scalar ``"loss"`` (plus other scalar terms, which are logged); its hooks
``update_target(step, max_steps)`` (after each optimizer step), ``param_groups``,
``preview`` and ``metadata`` are called as the contract states.

Data comes from a map-style dataset indexed by *sample*: ``dataset[i]`` is one sample
dict, deterministic in ``i``. The global batch of step ``s`` is samples
``[s*G, (s+1)*G)`` with ``G = batch_size * world_size * grad_accum``, so a run on one
process and on several sees the same global batch, and a resumed run sees exactly the
batches it would have seen. Datasets that build whole batches themselves are
`BatchDataset`s and are indexed by (step, micro-step, rank) instead.

Randomness inside the step (masks, augmentations) is re-seeded from
``(seed, step, rank)`` at every step: a resumed run repeats the uninterrupted run's
random draws without carrying RNG states around.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from alice3d.config import ConfigError, TrainConfig, save_config, to_dict
from alice3d.core.dist import DistInfo, comm_failure_message, init_distributed, is_comm_failure, rank, resolve_device
from alice3d.errors import Alice3DError, PeerFailure
from alice3d.runtime import (
    Progress,
    StepTimeMonitor,
    auto_num_threads,
    cpu_oversubscription,
    load_average,
    local_processes,
    single_threaded_children,
    slowdown_message,
    usable_cores,
)
from alice3d.train.checkpoint import CheckpointError, atomic_save, load_checkpoint
from alice3d.train.collapse import CollapseMonitor
from alice3d.train.module import BatchDataset, TrainModule
from alice3d.train.optim import build_optimizer, build_scheduler
from alice3d.viz.ortho import save_volume_panels

log = logging.getLogger("alice3d.train")

# Config keys that may change between a run and its resume without changing the result.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.ckpt_every", "train.log_every", "train.preview_every",
    "train.eval_every", "train.device", "train.num_workers", "train.dist_timeout_s",
    "train.tensorboard", "train.max_bad_steps", "train.num_threads", "data.on_bad_data", "data.cache",
}


class TrainingError(Alice3DError, RuntimeError):
    """The run cannot go on (repeated non-finite steps, incompatible resume, ...)."""


@dataclass
class StepOutput:
    terms: dict[str, torch.Tensor]  # detached scalar terms of the step, averaged over micro-batches
    grad_norm: torch.Tensor  # before clipping
    finite: bool  # False: the update was skipped
    batch: Any  # the last micro-batch (for previews)


@dataclass
class TrainResult:
    step: int
    interrupted: bool = False
    signal_name: str = ""
    skipped_steps: int = 0
    last_metrics: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919) % (2**63 - 1)


def move_to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def _unwrap_worker_error(e: Alice3DError) -> Alice3DError:
    """A DataLoader worker's error with the message the worker raised it with.

    torch re-raises a worker's exception in the main process as ``type(e)("Caught X in DataLoader
    worker process N.\nOriginal Traceback ...")``, which would put the worker's whole traceback into
    the run's one error line; the traceback goes to the debug log instead.
    """
    text = str(e)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return e
    cls = type(e)
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = text.rfind(marker)
    if at < 0:
        return e
    log.debug("%s", text)
    try:
        return cls(text[at + len(marker):].rstrip("\n"))
    except Exception:  # noqa: BLE001 - a class that takes other arguments keeps the long message
        return e


class _StepBatches(Sampler):
    """Per-rank sample indices of every micro-batch from ``start_step`` on."""

    def __init__(self, start_step: int, max_steps: int, batch: int, accum: int, dist_info: DistInfo, batched: bool):
        self.start, self.stop = start_step, max_steps
        self.batch, self.accum, self.d, self.batched = batch, accum, dist_info, batched

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum

    def __iter__(self) -> Iterator:
        w, r = self.d.world_size, self.d.rank
        for s in range(self.start, self.stop):
            for m in range(self.accum):
                micro = s * self.accum + m
                if self.batched:
                    yield micro * w + r
                else:
                    base = (micro * w + r) * self.batch
                    yield list(range(base, base + self.batch))


class _SignalGuard:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # second signal: the user insists
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: finishing this step, saving a checkpoint, then exiting",
                    signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(saved) | set(current)):
        key = prefix + k
        a, b = saved.get(k, "<missing>"), current.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, key + ".")
        elif a != b and key not in RESUMABLE_CHANGES:
            diffs.append(f"{key}: checkpoint {a!r} vs now {b!r}")
    return diffs


class Trainer:
    """Optimizer, schedule, AMP, DDP, checkpoints, logging, previews, evaluation."""

    def __init__(
        self,
        model: TrainModule,
        cfg: TrainConfig,
        run_dir: str | Path,
        full_config: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        evaluator: Callable[[nn.Module, int], dict] | None = None,
        best_metric: str | None = None,
        best_mode: str = "max",
    ):
        if not isinstance(model, TrainModule):
            raise TypeError(f"Trainer: expected an alice3d.train.module.TrainModule, got {type(model).__name__}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.full_config = full_config
        self.device = resolve_device(cfg.device)
        try:
            self.dist, self.device = init_distributed(self.device, cfg.dist_timeout_s)
        except (RuntimeError, ValueError) as e:
            if not is_comm_failure(e):
                raise
            raise PeerFailure(comm_failure_message(e, rank(), cfg.dist_timeout_s)) from e
        self.model = model.to(self.device)
        self.optimizer = optimizer or build_optimizer(self.model, cfg)
        self.scheduler = scheduler or build_scheduler(self.optimizer, cfg)
        self.evaluator, self.best_metric, self.best_mode = evaluator, best_metric, best_mode
        self.best: dict = {}
        self.skipped_steps = 0
        self.train_model: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=model.has_unused_parameters
            )
        if cfg.compile:
            # Compiles the step's forward; hooks (EMA, previews) stay on the eager module.
            self.train_model = torch.compile(self.train_model)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.collapse = CollapseMonitor()  # warns when a siamese target's `target_std` stays low
        self._consecutive_bad = 0  # non-finite steps in a row (train_step may run outside fit)
        self._t_last = time.perf_counter()
        self._saved_step = -1  # step of the last checkpoint this process wrote
        # True while the model, optimizer and logs hold exactly the state after the last completed
        # step (False from an update's start to the end of its bookkeeping): what may be saved
        # when the loop stops on an error.
        self._resumable = True
        self.num_threads = 0  # torch threads chosen by fit()
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"

    # ------------------------------------------------------------- checkpoints

    def state(self, step: int) -> dict:
        return {
            "metadata": {"kind": "alice3d-checkpoint", "run": self._run_type()},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": step,
            "skipped_steps": self.skipped_steps,
            "best": self.best,
            "config": to_dict(self.full_config) if self.full_config is not None else {},
        }

    def save_checkpoint(self, step: int) -> None:
        if self.dist.is_main:
            atomic_save(self.state(step), self.ckpt_path)
            log.info("checkpoint saved at step %d: %s", step, self.ckpt_path)
        self._saved_step = step
        self._barrier()

    def _save_after_error(self, done: int, error: BaseException) -> None:
        """Save step ``done``'s state when the loop stops on ``error`` with that state intact (the
        error came before the next update touched it); the error itself is re-raised by the caller.

        Not after a communication failure (another rank is gone; the others could not follow a
        collective), nor after non-finite steps (the last good checkpoint stays the last one).
        Only the main process writes, without a barrier: the other ranks may not have failed.
        """
        if (done < 1 or done <= self._saved_step or not self._resumable or self._consecutive_bad
                or isinstance(error, PeerFailure) or not self.dist.is_main):
            return
        try:
            atomic_save(self.state(done), self.ckpt_path)
        except Exception as e:  # noqa: BLE001 - the original error is the one to report
            log.error("could not save a checkpoint after the error (%s: %s); the last one is %s",
                      type(e).__name__, e, f"at step {self._saved_step}" if self._saved_step > 0 else "none")
            return
        self._saved_step = done
        log.warning("the run stopped on an error after step %d; checkpoint saved: %s (fix the cause, then continue "
                    "with the same command plus --resume)", done, self.ckpt_path)

    def _run_type(self) -> str:
        """Which command's config the run has (a pretraining checkpoint never resumes a fine-tuning run)."""
        return type(self.full_config).__name__ if self.full_config is not None else ""

    def _load(self) -> int:
        ckpt = load_checkpoint(self.ckpt_path, map_location=self.device, expect_kind="alice3d-checkpoint")
        saved_run = ckpt.get("metadata", {}).get("run", "")
        if saved_run and self._run_type() and saved_run != self._run_type():
            raise TrainingError(
                f"cannot resume from {self.ckpt_path}: its metadata says it was written by a {saved_run} run, "
                f"not a {self._run_type()} run; resume it with the command that wrote it, or choose a new --out"
            )
        if self.full_config is not None:
            diffs = config_differences(ckpt.get("config", {}), to_dict(self.full_config))
            if diffs:
                raise TrainingError(
                    f"cannot resume from {self.ckpt_path}: it was written with a different config:\n  "
                    + "\n  ".join(diffs)
                    + "\nUse the same config (only train.max_steps and logging/checkpoint intervals may change) or a new --out."
                )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self.best = dict(ckpt.get("best", {}))
        return int(ckpt["step"])

    def _barrier(self) -> None:
        if self.dist.enabled:
            torch.distributed.barrier()

    # ------------------------------------------------------------- logging

    def _prepare_metrics(self, start_step: int) -> None:
        """Drop lines a killed run logged after its last checkpoint (they will be redone)."""
        if not self.dist.is_main or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        self.metrics_path.write_text("".join(l + "\n" for l in kept))

    def log_metrics(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------- loop

    def _loader(self, dataset: Dataset, start_step: int) -> DataLoader:
        cfg = self.cfg
        batched = isinstance(dataset, BatchDataset)
        sampler = _StepBatches(start_step, cfg.max_steps, cfg.batch_size, cfg.grad_accum, self.dist, batched)
        kw: dict = dict(num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda")
        if cfg.num_workers > 0:
            kw.update(prefetch_factor=4, persistent_workers=False)
        # Its own generator, so creating the loader never consumes the global RNG.
        kw["generator"] = torch.Generator().manual_seed(cfg.seed)
        if batched:
            return DataLoader(dataset, sampler=sampler, batch_size=None, **kw)
        return DataLoader(dataset, batch_sampler=sampler, **kw)

    def _global_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Logged loss terms averaged over ranks (every rank holds an equal share of the global batch),
        so the figures of an N-process run read like those of one process on the same global batch."""
        if not terms:
            return {}
        if not self.dist.enabled:
            return {k: float(v) for k, v in terms.items()}
        names = sorted(terms)  # the same order on every rank
        values = torch.stack([terms[k].float().reshape(()) for k in names])
        torch.distributed.all_reduce(values)
        averaged = dict(zip(names, (values / self.dist.world_size).tolist()))
        return {k: averaged[k] for k in terms}

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.cfg.cpu_amp and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return nullcontext()

    def _begin(self, resume: bool) -> int:
        """The step to start from: 0, or the checkpoint's with ``resume``; never overwrites a run."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:  # temp files of saves that a kill cut short (last.pt itself is always whole)
            for stale in self.ckpt_path.parent.glob(f".{self.ckpt_path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        start = 0
        if resume and not self.ckpt_path.exists():
            # A start that stopped before its first checkpoint: nothing to continue, so start over
            # (with this config, which the command did not write when resuming).
            log.info("--resume: %s holds no checkpoint (%s); starting from step 0", self.run_dir, self.ckpt_path)
            if self.full_config is not None and self.dist.is_main:
                save_config(self.full_config, self.run_dir / "config.yaml")
        elif resume:
            start = self._load()
            self._saved_step = start  # already on disk: an error before the next step saves nothing new
            log.info("resuming from step %d (%s)", start, self.ckpt_path)
        elif self.ckpt_path.exists():
            raise TrainingError(
                f"{self.run_dir} already holds a run ({self.ckpt_path}); pass --resume to continue it "
                "or choose another --out (nothing was overwritten)"
            )
        self._prepare_metrics(start)
        return start

    def _set_threads(self) -> tuple[int, int]:
        """Apply ``train.num_threads`` (0: this process's share of the node's usable cores) and warn
        when the node is already too busy for it; returns ``(previous, chosen)`` torch threads."""
        cfg = self.cfg
        if cfg.num_threads < 0:
            raise ConfigError(f"train.num_threads: expected 0 (automatic) or a number of threads >= 1, "
                              f"got {cfg.num_threads}")
        cores, procs, workers = usable_cores(), local_processes(), max(0, cfg.num_workers)
        previous = torch.get_num_threads()
        if cfg.num_threads > 0:
            chosen, why = cfg.num_threads, "train.num_threads"
        else:
            share = auto_num_threads(cores, procs, workers)
            chosen = auto_num_threads(cores, procs, workers, previous)
            why = f"automatic: {cores} usable cores / ({procs} process(es) on this node x (1 + {workers} workers))"
            if chosen < share:
                why += f" = {share}, kept at the {previous} torch was set to (OMP_NUM_THREADS or torch.set_num_threads)"
        if chosen != previous:
            torch.set_num_threads(chosen)
        self.num_threads = chosen
        if self.dist.is_main:
            log.info("torch threads per process: %d (%s)%s", chosen, why,
                     "; DataLoader workers run single-threaded" if workers else "")
            busy = cpu_oversubscription(load_average(), cores, procs * (chosen + workers))
            if busy:
                log.warning("%s", busy)
        return previous, chosen

    def _watch_step_time(self, monitor: StepTimeMonitor, seconds: float) -> None:
        found = monitor.observe(seconds, time.monotonic())
        if found is not None and self.dist.is_main:
            log.warning("%s", slowdown_message(found[0], found[1], load_average(), usable_cores(), self.num_threads,
                                               local_processes(), max(0, self.cfg.num_workers)))

    def fit(self, dataset: Dataset, resume: bool = False) -> TrainResult:
        """Train from step 0 (or the last checkpoint with ``resume``) to ``train.max_steps``.

        An error in the loop after step 1 saves the last completed step's state first (when the
        error left it intact), so ``--resume`` continues from there.
        """
        cfg = self.cfg
        start = self._begin(resume)
        result = TrainResult(step=start, skipped_steps=self.skipped_steps, best=self.best)
        if start >= cfg.max_steps:
            log.info("nothing to do: step %d >= train.max_steps=%d", start, cfg.max_steps)
            return result
        previous_threads, _ = self._set_threads()
        try:
            return self._fit_loop(dataset, start, result)
        finally:
            if torch.get_num_threads() != previous_threads:
                torch.set_num_threads(previous_threads)

    def _fit_loop(self, dataset: Dataset, start: int, result: TrainResult) -> TrainResult:
        cfg = self.cfg
        bar = Progress(cfg.max_steps, "train", initial=start, unit="step", logger=log, enabled=self.dist.is_main)
        # Workers start here; each would otherwise run BLAS/OpenMP/blosc on every core.
        with single_threaded_children() if cfg.num_workers > 0 else nullcontext():
            loader = iter(self._loader(dataset, start))
        self._consecutive_bad = 0
        self._resumable = True
        self._t_last = time.perf_counter()
        monitor = StepTimeMonitor()
        last_batch = None
        with _SignalGuard() as guard:
            try:
                for step in range(start, cfg.max_steps):
                    t0 = time.perf_counter()
                    out = self.train_step(loader, step)
                    self._watch_step_time(monitor, time.perf_counter() - t0)
                    last_batch = out.batch
                    result.step = step + 1
                    self.after_step(out, result, bar)
                    self._resumable = True
                    if guard.received is not None:
                        self.save_checkpoint(result.step)
                        result.interrupted = True
                        result.signal_name = signal.Signals(guard.received).name
                        return result
                # An error from here on is the end's (evaluation, final save): a rerun redoes the tail.
                self._resumable = False
                if self.evaluator is not None:
                    self.evaluate(result.step)
                self.save_checkpoint(result.step)
                if last_batch is not None:
                    self.write_preview(self.model, last_batch, result.step)
            except Exception as e:
                ours = isinstance(e, (TrainingError, CheckpointError, PeerFailure))
                if self.dist.enabled and isinstance(e, RuntimeError) and not ours and is_comm_failure(e):
                    raise PeerFailure(comm_failure_message(e, self.dist.rank, cfg.dist_timeout_s)) from e
                self._save_after_error(result.step, e)
                raise
            finally:
                bar.close()
        result.skipped_steps = self.skipped_steps
        result.best = self.best
        return result

    def train_step(self, loader: Iterator, step: int) -> StepOutput:
        """Step ``step`` (0-based): forward/backward over ``grad_accum`` micro-batches, clipping, and
        the optimizer, schedule and target updates; a non-finite loss or gradient skips the update."""
        cfg = self.cfg
        torch.manual_seed(step_seed(cfg.seed, step, self.dist.rank))
        self.train_model.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        batch = None
        for micro in range(cfg.grad_accum):
            batch = move_to(self._next_batch(loader), self.device)
            sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
            ctx = nullcontext() if sync else self.train_model.no_sync()
            with ctx, self._autocast():
                out = self.train_model(batch)
            (out["loss"] / cfg.grad_accum).backward()
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    terms[k] = terms.get(k, 0.0) + v.detach().float() / cfg.grad_accum
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if cfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            gnorm = torch.norm(torch.stack([p.grad.detach().norm() for p in params])) if params else torch.zeros(())
        # One host sync per step: needed to decide whether to skip the update.
        finite = bool(torch.isfinite(terms["loss"]).item() and torch.isfinite(gnorm).item())
        self._resumable = False  # from here on the state is step + 1's, complete once after_step is done
        if finite:
            self.optimizer.step()
            self._consecutive_bad = 0
        else:
            self._skip_update(step + 1, terms["loss"], gnorm)
        self.scheduler.step()
        if finite:
            self.model.update_target(step + 1, cfg.max_steps)
        return StepOutput(terms, gnorm, finite, batch)

    @staticmethod
    def _next_batch(loader: Iterator) -> Any:
        try:
            return next(loader)
        except Alice3DError as e:
            clean = _unwrap_worker_error(e)
            if clean is e:
                raise
            raise clean from None

    def _skip_update(self, done: int, loss: torch.Tensor, gnorm: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        self._consecutive_bad += 1
        log.warning("step %d: non-finite loss or gradient (loss=%s, grad norm=%s); update skipped",
                    done, float(loss), float(gnorm))
        if self._consecutive_bad >= self.cfg.max_bad_steps:
            raise TrainingError(
                f"{self._consecutive_bad} consecutive steps with a non-finite loss or gradient "
                f"(last at step {done}); stopping. The last good checkpoint is intact: "
                f"{self.ckpt_path if self.ckpt_path.exists() else 'none saved yet'}. "
                "Lower train.lr, check the data report, or raise train.max_bad_steps."
            )

    def after_step(self, out: StepOutput, result: TrainResult, bar: Progress) -> None:
        """Metrics, progress, previews, evaluation and checkpoints after step ``result.step``."""
        cfg, done = self.cfg, result.step
        every = max(1, cfg.log_every)
        if done % every == 0 or done == cfg.max_steps:
            now = time.perf_counter()
            samples = cfg.batch_size * cfg.grad_accum * self.dist.world_size * every
            record = {"step": done, "lr": self.optimizer.param_groups[0]["lr"]}
            record.update(self._global_terms(out.terms))
            record.update({"grad_norm": float(out.grad_norm), "skipped_steps": self.skipped_steps,
                           "step_time_s": (now - self._t_last) / every,
                           "samples_per_s": samples / max(now - self._t_last, 1e-9)})
            self._t_last = now
            self.log_metrics(record)
            if self.dist.is_main:
                self.collapse.observe(record)
            result.last_metrics = record
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.update(1)
        if cfg.preview_every and done % cfg.preview_every == 0:
            self.write_preview(self.model, out.batch, done)
        if self.evaluator is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            self.evaluate(done)
        # Only checkpoint after a good step, so "last good checkpoint" means what it says.
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done < cfg.max_steps and self._consecutive_bad == 0:
            self.save_checkpoint(done)

    # ------------------------------------------------------------- hooks

    def evaluate(self, step: int) -> dict:
        metrics: dict = {}
        if self.dist.is_main:
            self.model.eval()
            with torch.no_grad(), self._autocast():
                metrics = self.evaluator(self.model, step) or {}
            self.model.train()
            self.log_metrics({"step": step, **{f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}})
            if self.best_metric and self.best_metric in metrics:
                value = float(metrics[self.best_metric])
                old = self.best.get("value")
                better = old is None or (value > old if self.best_mode == "max" else value < old)
                if better and math.isfinite(value):
                    self.best = {"metric": self.best_metric, "value": value, "step": step}
                    meta = self.model.metadata()
                    atomic_save({"metadata": {"kind": "alice3d-best", **meta}, "state_dict": self.model.state_dict(),
                                 "step": step, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}},
                                self.run_dir / "best.pt")
                    log.info("new best %s=%.4f at step %d", self.best_metric, value, step)
        self._barrier()
        return metrics

    def write_preview(self, model: nn.Module, batch: Any, step: int) -> None:
        if not self.dist.is_main:
            return
        model.eval()
        with torch.no_grad(), self._autocast():
            panels = model.preview(batch)
        model.train()
        if panels:
            save_volume_panels(panels, self.run_dir / "previews" / f"step_{step:07d}.png")

