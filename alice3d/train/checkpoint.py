"""Crash-safe saving and code-free loading of checkpoints and model files.

Every file alice3d writes with torch (checkpoints, encoder.pt, landmark.pt) goes
through :func:`atomic_save`: a temporary file in the same folder, fsync, rename. A
run killed mid-write therefore leaves the previous file intact, never half of one.
Every such file is read with :func:`load_checkpoint`, i.e. ``torch.load(...,
weights_only=True)``: a pickle that tries to execute code is refused.
"""

from __future__ import annotations

import errno
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from alice3d.errors import Alice3DError
from alice3d.runtime import atomic_write


class CheckpointError(Alice3DError, RuntimeError):
    """A checkpoint or model file that cannot be written or safely read."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` via temp file + fsync + rename.

    A full disk (or any OS error) removes the temporary file, keeps whatever was at
    ``path`` before, and raises :class:`CheckpointError` saying so.
    """
    path = Path(path)
    try:
        with atomic_write(path, fsync=True) as f:
            torch.save(obj, f)
    except OSError as e:
        reason = "the disk is full" if e.errno == errno.ENOSPC else str(e)
        kept = "the previous file is intact" if path.exists() else "no earlier file existed"
        raise CheckpointError(f"could not save {path}: {reason}; {kept}") from e
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu", expect_kind: str | None = None) -> Any:
    """Load a file written by :func:`atomic_save` without executing code.

    ``expect_kind`` checks ``obj["metadata"]["kind"]`` (e.g. ``"alice3d-encoder"``)
    so that a landmark model handed over as an encoder is refused by its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file contains Python objects other than tensors "
            f"and plain containers (loading it could execute code). Details: {e}"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch file (truncated or corrupt?): {e}") from None
    if expect_kind is not None:
        kind = obj.get("metadata", {}).get("kind") if isinstance(obj, dict) else None
        if kind != expect_kind:
            raise CheckpointError(
                f"{path}: expected a file of kind '{expect_kind}', found kind {kind!r}"
            )
    return obj
