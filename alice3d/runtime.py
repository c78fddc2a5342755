"""Progress reporting, worker-process and CPU-thread set-up and atomic file writes every layer may use
(the rank lives in `alice3d.core.dist`).

Bottom layer: imports only the standard library, tqdm and `alice3d.core.dist`.

:class:`Progress` reports a loop of ``total`` items in one of two ways. On a terminal
(stderr is a TTY) it is a tqdm bar. Otherwise (a log file, a cluster job, a pipe) tqdm
would print nothing, so it writes ``logging`` lines instead, each with done/total,
rate and ETA, e.g. ``train: 40/100 (40%), 2.51 it/s, ETA 0:00:24, loss=0.1234``: one
line per 10 % of the total, but at most one every ``MIN_INTERVAL_S`` and at least one
every ``MAX_INTERVAL_S``, plus a closing line for a loop that took that long. Only the
main process (``RANK`` 0) reports; the others stay silent.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, TextIO

from tqdm import tqdm

from alice3d.core.dist import is_main_process

MIN_INTERVAL_S = 10.0  # no two log lines closer than this (a fast loop does not flood the log)
MAX_INTERVAL_S = 120.0  # a slow loop still says it is alive this often
FRACTION = 0.1  # otherwise one line per this fraction of the total

_log = logging.getLogger("alice3d.progress")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_rate(rate: float, unit: str) -> str:
    """``2.51 it/s``; below one per second ``3.98 s/it`` (easier to read for slow steps)."""
    if not math.isfinite(rate) or rate <= 0:
        return f"? {unit}/s"
    return f"{rate:.2f} {unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{unit}"


class Progress:
    """Progress of ``total`` items (``None``: unknown): ``update(n)`` after each, ``close()`` at the end
    (or use it as a context manager, or iterate over it when built with ``iterable``).

    initial: items already done (a resumed run); the rate counts only the items done here.
    enabled: False silences it (besides the non-main processes, which are always silent).
    tty: force the bar (True) or the log lines (False); default: whether ``file`` is a TTY.
    min_interval_s / max_interval_s / fraction: the log-line schedule (module defaults).
    clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, unit: str = "it",
                 logger: logging.Logger | None = None, enabled: bool = True, tty: bool | None = None,
                 leave: bool = True, min_interval_s: float | None = None, max_interval_s: float | None = None,
                 fraction: float | None = None, clock: Callable[[], float] = time.monotonic,
                 file: TextIO | None = None, iterable: Iterable[Any] | None = None):
        self.total = None if total is None else int(total)
        self.desc, self.unit, self.initial, self.n = desc, unit, int(initial), int(initial)
        self.enabled = bool(enabled) and is_main_process()
        self.log = logger or _log
        self.min_interval_s = MIN_INTERVAL_S if min_interval_s is None else float(min_interval_s)
        self.max_interval_s = MAX_INTERVAL_S if max_interval_s is None else float(max_interval_s)
        self.fraction = FRACTION if fraction is None else float(fraction)
        self.clock = clock
        self.postfix: dict[str, str] = {}
        self.lines = 0  # log lines written so far
        self._iterable = iterable
        self._closed = False
        self._t0 = self._last_t = clock()
        self._last_mark = self._mark(self.n)
        file = sys.stderr if file is None else file
        self._bar = None
        if self.enabled and (_isatty(file) if tty is None else tty):
            self._bar = tqdm(total=self.total, initial=self.initial, desc=desc, unit=unit, file=file,
                             leave=leave, dynamic_ncols=True)

    # ------------------------------------------------------------- reporting

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and not (self.total is not None and self.n >= self.total):  # close() reports the end
            self._maybe_log()

    def set_postfix(self, **values: Any) -> None:
        """Shown after the bar, and appended to the log lines as ``key=value``."""
        self.postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        elapsed = self.clock() - self._t0
        if self.enabled and (self.lines or elapsed >= self.min_interval_s):
            self._emit(self._end_line(elapsed))

    # ------------------------------------------------------------- log lines

    def _mark(self, n: int) -> int:
        if not self.total:
            return 0
        return n // max(1, math.ceil(self.total * self.fraction))

    def _rate(self, elapsed: float) -> float:
        done = self.n - self.initial
        return done / elapsed if elapsed > 0 and done > 0 else float("nan")

    def _maybe_log(self) -> None:
        now = self.clock()
        since = now - self._last_t
        mark = self._mark(self.n)
        if since < self.min_interval_s or (mark <= self._last_mark and since < self.max_interval_s):
            return
        self._last_t, self._last_mark = now, mark
        self._emit(self._line(now - self._t0))

    def _line(self, elapsed: float) -> str:
        rate = self._rate(elapsed)
        parts = [format_rate(rate, self.unit)]
        if self.total:
            head = f"{self.desc}: {self.n}/{self.total} ({100 * self.n // self.total}%)"
            parts.append(f"ETA {format_duration((self.total - self.n) / rate if rate > 0 else float('nan'))}")
        else:
            head = f"{self.desc}: {self.n} {self.unit}"
        return ", ".join([head, *parts, *self._postfix_parts()])

    def _end_line(self, elapsed: float) -> str:
        total = "" if self.total is None else f"/{self.total}"
        if self.total is not None and self.n < self.total:
            head = f"{self.desc}: stopped at {self.n}{total} after {format_duration(elapsed)}"
        else:
            head = f"{self.desc}: {self.n}{total} done in {format_duration(elapsed)}"
        return ", ".join([head, format_rate(self._rate(elapsed), self.unit), *self._postfix_parts()])

    def _postfix_parts(self) -> list[str]:
        return [" ".join(f"{k}={v}" for k, v in self.postfix.items())] if self.postfix else []

    def _emit(self, line: str) -> None:
        self.lines += 1
        self.log.info("%s", line)

    # ------------------------------------------------------------- protocols

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self._iterable is None:
            raise TypeError(f"progress {self.desc!r} was built without an iterable; call update() instead")
        try:
            for item in self._iterable:
                yield item
                self.update(1)
        finally:
            self.close()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             **kwargs: Any) -> Progress:
    """A :class:`Progress`; ``total`` defaults to ``len(iterable)``.

    ``for case in progress(cases, desc="preparing"): ...`` or
    ``with progress(total=n, desc="train") as p: ... p.update()``.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    return Progress(total, desc, iterable=iterable, **kwargs)


THREAD_ENV_KEYS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLOSC_NTHREADS")


@contextmanager
def single_threaded_children() -> Iterator[None]:
    """Within the block, processes spawned now start with one BLAS/OpenMP/blosc thread each.

    A pool of N workers that each use every core would oversubscribe the machine N-fold; the
    environment is what spawned children inherit, so it is set here and restored afterwards.
    """
    with environment({k: "1" for k in THREAD_ENV_KEYS}):
        yield


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Within the block, ``os.environ`` holds ``values``; the previous values (or their absence) come back after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", fsync: bool = False,
                 file_mode: int | None = None) -> Iterator[IO]:
    """Write `path` through a temporary sibling that is renamed over it when the block succeeds.

    Readers see the old file or the new one, never half of one; on any error (a full disk, a
    kill signal raised as an exception) the temporary file is removed and `path` is untouched.
    fsync: flush the data to disk before the rename (checkpoints). file_mode: chmod before the
    rename (mkstemp creates files private to the user).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if file_mode is not None:
            os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- CPU threads

THREADS_FIX = ("set train.num_threads=N (or OMP_NUM_THREADS=N) so that processes x (1 + train.num_workers) x N "
               "stays within the free cores, or run when the other jobs are done")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: taskset, cgroup cpusets), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average (runnable threads, all users), None where the OS has none."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def local_processes() -> int:
    """Training processes of this run on this node (torchrun's ``LOCAL_WORLD_SIZE``, else 1)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def auto_num_threads(cores: int, processes: int, workers: int, current: int | None = None) -> int:
    """Torch threads of one training process for ``train.num_threads=0``.

    Each of the node's ``processes`` runs itself plus ``workers`` DataLoader workers, so it gets
    ``cores // (processes * (1 + workers))`` cores (at least one thread); never more than
    ``current`` (what torch would use on its own: ``OMP_NUM_THREADS`` or an earlier
    ``torch.set_num_threads``), so an explicit lower setting wins.
    """
    share = max(1, int(cores) // (max(1, int(processes)) * (1 + max(0, int(workers)))))
    return share if current is None else max(1, min(share, int(current)))


def cpu_oversubscription(load1: float | None, cores: int, own_threads: int) -> str:
    """Why this run will compete for the CPU ('' when it will not): the 1-minute load average
    ``load1`` (what already runs) exceeds the ``cores`` left once the run's ``own_threads``
    (all its processes, workers and threads on this node) are taken off."""
    if load1 is None:
        return ""
    free = int(cores) - int(own_threads)
    if load1 <= free:
        return ""
    return (f"the 1-minute load average is {load1:.1f} on {cores} usable cores, and this run needs {own_threads} of "
            f"them, so it will compete for the CPU (steps can get many times slower); {THREADS_FIX}")


class StepTimeMonitor:
    """Warns once (then at most every ``interval_s``) when training steps become much slower.

    The reference is the median step time of ``baseline`` steps after ``warmup`` steps: the first
    steps pay one-off costs (lazy initialisation, memory allocation, worker start, compilation)
    and would make the reference too slow. A slowdown is the median of the last ``recent`` steps
    exceeding ``factor`` x the reference. Medians of 10 ignore up to 4 odd steps (a garbage
    collection, a slow read, a neighbour's burst), so only a lasting change counts; 3x is well
    above the jitter of a step on a busy node (< 2x) and well below what oversubscribed threads
    do (the reported case went from 1.15 to 10-12 s per step). Step times should exclude
    checkpoints, evaluations and previews.
    """

    def __init__(self, warmup: int = 3, baseline: int = 10, recent: int = 10, factor: float = 3.0,
                 interval_s: float = 900.0):
        self.warmup, self.baseline_n, self.recent_n = int(warmup), int(baseline), int(recent)
        self.factor, self.interval_s = float(factor), float(interval_s)
        self.seen = 0
        self.reference: float | None = None
        self._first: list[float] = []
        self._recent: list[float] = []
        self._warned_at: float | None = None

    def observe(self, step_time_s: float, now: float) -> tuple[float, float] | None:
        """Record one step's time (``now``: a monotonic clock, for the rate limit); returns
        ``(recent median, reference)`` when a warning is due, else None."""
        self.seen += 1
        if self.seen <= self.warmup:
            return None
        if self.reference is None:
            self._first.append(float(step_time_s))
            if len(self._first) == self.baseline_n:
                self.reference = _median(self._first)
            return None
        self._recent.append(float(step_time_s))
        del self._recent[:-self.recent_n]
        if len(self._recent) < self.recent_n:
            return None
        recent = _median(self._recent)
        if recent <= self.factor * self.reference:
            return None
        if self._warned_at is not None and now - self._warned_at < self.interval_s:
            return None
        self._warned_at = now
        return recent, self.reference


def _median(values: list[float]) -> float:
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def slowdown_message(recent: float, reference: float, load1: float | None, cores: int, threads: int,
                     processes: int, workers: int) -> str:
    """The warning for a slowdown found by :class:`StepTimeMonitor`, with the likely cause and the fix."""
    load = f"the 1-minute load average is {load1:.1f} on {cores} usable cores" if load1 is not None else \
        f"{cores} usable cores"
    return (f"training steps got {recent / reference:.1f}x slower (median {recent:.2f} s/step over the last steps, "
            f"{reference:.2f} s/step after warm-up); {load}, and this run uses {processes} process(es) x "
            f"(1 + {workers} workers) x {threads} torch thread(s). Most likely other jobs now share these cores "
            f"(oversubscribed CPU threads); {THREADS_FIX}")
