"""What every console script shares: logging, config resolution, run directories, errors."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from alice3d.config import ConfigError, load_config, save_config, valid_keys
from alice3d.core.dist import cleanup_distributed, is_main_process
from alice3d.errors import Alice3DError, PeerFailure

T = TypeVar("T")
log = logging.getLogger("alice3d")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else (logging.INFO if is_main_process() else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)


def add_config_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--config FILE`` plus free ``key=value`` overrides (listed in the epilog)."""
    parser.add_argument("--config", type=Path, default=None, help="YAML file overriding the defaults")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted config overrides, e.g. train.lr=1e-4 train.max_steps=500")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    keys = valid_keys(cls)
    parser.epilog = (parser.epilog or "") + "\nconfig keys: " + ", ".join(keys)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def resolve_config(cls: type[T], args: argparse.Namespace, extra: Sequence[str] = ()) -> T:
    """Defaults <- --config <- flags mapped to keys (``extra``) <- key=value overrides.

    With ``--resume`` and no ``--config``, the run's own ``config.yaml`` takes the place of
    ``--config``: ``--out RUN --resume`` alone continues the run as it was configured, instead of
    training the defaults into it; flags and overrides given with it still apply on top.
    """
    for o in args.overrides:
        if "=" not in o:
            raise ConfigError(f"unexpected argument {o!r}: overrides must look like key=value (see --help)")
    base = args.config
    saved = Path(args.out) / "config.yaml" if getattr(args, "out", None) is not None else None
    if base is None and getattr(args, "resume", False) and saved is not None and saved.is_file():
        base = saved
        log.info("--resume: the configuration of %s (flags and key=value overrides apply on top)", saved)
    return load_config(cls, base, [*extra, *args.overrides])


# What a start writes before its first checkpoint: a directory holding only these (empty, for
# the folders) is what a start that stopped on its data, its config or an error in its first
# steps left behind. Metrics lines without a checkpoint cannot be continued (the steps they log
# are redone from step 0), so they do not make a run worth keeping.
_START_FILES = ("config.yaml", "data_report.json", "metrics.jsonl")
_START_DIRS = ("checkpoints", "previews")  # checkpoints/: only temp files of an interrupted save
_FOLD_DIR = re.compile(r"fold_\d+")


def _blocker(d: Path) -> Path | None:
    """The first entry of ``d`` that belongs to a run that can be continued or has results (a
    checkpoint, best.pt, encoder.pt, landmark.pt, results, previews) or to something else; None if
    ``d`` holds only what a failed start leaves (config, data report, metrics lines of steps never
    checkpointed; fold_k folders are looked into)."""
    for p in sorted(d.iterdir()):
        if p.is_file() and p.name in _START_FILES:
            continue
        if p.is_dir() and not p.is_symlink() and p.name in _START_DIRS:
            files = sorted(q for q in p.rglob("*") if not q.is_dir())
            kept = [q for q in files if not (p.name == "checkpoints" and q.name.endswith(".tmp"))]
            if kept:
                return kept[0]
            continue
        if p.is_dir() and not p.is_symlink() and _FOLD_DIR.fullmatch(p.name):
            inner = _blocker(p)
            if inner is not None:
                return inner
            continue
        return p
    return None


def _is_run_output(rel: Path) -> bool:
    """Whether ``rel`` (a :func:`_blocker` path relative to the run directory) is a training output."""
    names = ("metrics.jsonl", "best.pt", "encoder.pt", "landmark.pt", "results.json", "results.md")
    return rel.name in names or rel.suffix == ".pt" or any(part in _START_DIRS for part in rel.parts)


_CHECKPOINT = "checkpoints/last.pt"


def prepare_run_dir(out: Path, resume: bool, marker: str = _CHECKPOINT) -> Path:
    """Refuse to write into a directory holding another run unless resuming it.

    A directory holding only the leftovers of a start that never saved a checkpoint
    (``config.yaml``, ``data_report.json``, ``metrics.jsonl``, empty ``checkpoints/`` or
    ``previews/``) is reused for a fresh start: the leftovers are removed, so the corrected rerun
    of a start that failed on its data needs no new ``--out``. ``resume`` on a directory without
    ``marker`` (no checkpoint: nothing to continue) starts from step 0 in it, leaving the
    leftovers to be overwritten; finished outputs or foreign files are refused either way.

    Only rank 0 checks: under torchrun the other ranks start while rank 0 already writes into it.
    """
    out = Path(out)
    if not is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        return out
    if resume and (out / marker).exists():
        return out
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; expected a run directory")
    blocker = _blocker(out) if out.exists() and any(out.iterdir()) else None
    if blocker is not None:
        rel = blocker.relative_to(out)
        what = "a run" if _is_run_output(rel) else "files that are not from a run"
        if resume:
            raise SystemExit(f"error: --resume given but {out / marker} does not exist, and {out} holds {what} "
                             f"({rel}); choose a new --out (nothing was overwritten)")
        raise SystemExit(
            f"error: {out} is not empty: it holds {what} ({rel}); choose a new --out, "
            "or pass --resume to continue the run in it (nothing was overwritten)"
        )
    if resume:
        if marker != _CHECKPOINT:  # the trainer says so itself when it finds no checkpoint to load
            log.info("--resume: %s holds no %s; starting from step 0", out, marker)
        out.mkdir(parents=True, exist_ok=True)
        return out
    if out.exists() and any(out.iterdir()):
        leftovers = sorted(out.iterdir())
        for p in leftovers:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        log.info("%s holds only what a start that never trained left (%s); reusing it for this run",
                 out, ", ".join(p.name for p in leftovers))
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_resolved_config(cfg: Any, out: Path) -> None:
    if is_main_process():
        save_config(cfg, Path(out) / "config.yaml")


def run_main(fn: Callable[[], int | None]) -> None:
    """Run a CLI body, turning expected failures into one clear line and exit code 2; leave the
    process group (if the body joined one) on the way out, except when a peer broke it."""
    finished = False
    try:
        code = fn()
        finished = True
    except PeerFailure as e:
        # The process group is broken: destroying it, or letting the interpreter tear it down at
        # exit, can abort inside gloo/NCCL (SIGABRT), which would replace this message's exit code.
        # The last checkpoint is already on disk, so leave at once.
        print(f"error: {e}", file=sys.stderr)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except (Alice3DError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: could not write {e.filename or 'a run file'}: the disk is full ({e.strerror}); "
              "free some space, then continue with the same command plus --resume", file=sys.stderr)
        sys.exit(2)
    finally:
        cleanup_distributed(wait_for_peers=finished)
    sys.exit(code or 0)
