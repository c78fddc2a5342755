"""What every console script shares: logging, config resolution, run directories, errors."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from alice3d.config import ConfigError, load_config, save_config, valid_keys

T = TypeVar("T")
log = logging.getLogger("alice3d")


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING)
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
    """Defaults <- --config <- flags mapped to keys (``extra``) <- key=value overrides."""
    for o in args.overrides:
        if "=" not in o:
            raise ConfigError(f"unexpected argument {o!r}: overrides must look like key=value (see --help)")
    return load_config(cls, args.config, [*extra, *args.overrides])


def prepare_run_dir(out: Path, resume: bool, marker: str = "checkpoints/last.pt") -> Path:
    """Refuse to write into a directory holding another run unless resuming it.

    Only rank 0 checks: under torchrun the other ranks start while rank 0 already writes into it.
    """
    out = Path(out)
    if int(os.environ.get("RANK", "0")) != 0:
        out.mkdir(parents=True, exist_ok=True)
        return out
    if resume:
        if not (out / marker).exists():
            raise SystemExit(f"error: --resume given but {out / marker} does not exist")
        return out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(
            f"error: {out} is not empty; choose a new --out, or pass --resume to continue the run in it "
            "(nothing was overwritten)"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_resolved_config(cfg: Any, out: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, Path(out) / "config.yaml")


def run_main(fn: Callable[[], int | None]) -> None:
    """Run a CLI body, turning expected failures into one clear line and exit code 2."""
    from alice3d.train.checkpoint import CheckpointError
    from alice3d.train.trainer import TrainingError

    expected: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, TrainingError, FileNotFoundError)
    try:
        from alice3d.data.validate import DataError

        expected += (DataError,)
    except ImportError:
        pass
    try:
        code = fn()
    except expected as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: could not write {e.filename or 'a run file'}: the disk is full ({e.strerror}); "
              "free some space, then continue with the same command plus --resume", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
