"""What an export reads from a fine-tuning run directory, with clear refusals.

A fine-tuning run (``alice3d-finetune --out RUN``) holds ``RUN/best.pt`` (kind
``alice3d-best`` with the task and network in its metadata), ``RUN/config.yaml`` and
``RUN/results.json``. Pretraining runs, k-fold parents, classification runs and
unfinished runs are refused with a message that says what to pass instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from alice3d.bundle.errors import ExportError
from alice3d.finetune.predict import BEST_KIND, LoadedRun, load_run
from alice3d.finetune.tasks import CLASSIFICATION
from alice3d.train.checkpoint import CheckpointError, load_checkpoint


@dataclass
class ExportSource:
    run: Path
    loaded: LoadedRun
    state_dict: dict[str, Any]  # the network's own keys (no "network." prefix)
    step: int
    results: dict[str, Any] | None
    config: dict[str, Any] | None
    pretrained_method: str  # "" when unknown or trained from scratch


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not readable JSON ({e})") from None


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ExportError(f"{path}: not readable YAML ({e})") from None
    return data if isinstance(data, dict) else None


def _missing_best(run: Path) -> ExportError:
    if (run / "encoder.pt").is_file():
        return ExportError(
            f"{run} is a pretraining run (it has encoder.pt but no best.pt); alice3d-export takes a fine-tuning run: "
            f"fine-tune first (alice3d-finetune --pretrained {run / 'encoder.pt'} --out FINETUNE_RUN) and export that"
        )
    folds = sorted(p.parent.name for p in run.glob("fold_*/best.pt"))
    if folds:
        return ExportError(f"{run} is a k-fold run with one model per fold; export one fold, "
                           f"e.g. --run {run / folds[0]}")
    return ExportError(f"{run}: no best.pt (expected a finished alice3d-finetune run directory holding best.pt)")


def pretrained_method(path: str) -> str:
    """The pretraining method recorded in an ``encoder.pt`` (``""`` if it is gone or says nothing)."""
    if not path or not Path(path).is_file():
        return ""
    try:
        meta = load_checkpoint(path).get("metadata", {})
    except CheckpointError:
        return ""
    return str(meta.get("method", ""))


def load_source(run: str | Path) -> ExportSource:
    """Everything the export needs from ``run``; :class:`ExportError` on anything else."""
    run = Path(run)
    if not run.is_dir():
        raise ExportError(f"--run {run}: no such directory (expected an alice3d-finetune run directory)")
    best = run / "best.pt"
    if not best.is_file():
        raise _missing_best(run)
    ckpt = load_checkpoint(best, map_location="cpu")
    meta = ckpt.get("metadata", {}) if isinstance(ckpt, dict) else {}
    if meta.get("kind") != BEST_KIND or "task" not in meta or "network" not in meta:
        what = "a pretraining run's" if (run / "encoder.pt").is_file() else "not a fine-tuning"
        raise ExportError(f"{best}: {what} checkpoint (kind {meta.get('kind')!r}, metadata lacks the task/network "
                          "of a fine-tuning run); alice3d-export takes an alice3d-finetune run directory")
    if meta["task"].get("kind") == CLASSIFICATION:
        raise ExportError(f"{run}: a classification run; alice3d-export writes segmentation bundles only")
    loaded = load_run(run, "cpu")
    prefix = "network."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    config = _read_yaml(run / "config.yaml")
    if config is not None and "task" not in config:
        raise ExportError(f"{run / 'config.yaml'}: not a fine-tuning config (no 'task' section)")
    return ExportSource(run=run, loaded=loaded, state_dict=state, step=int(ckpt.get("step", 0)),
                        results=_read_json(run / "results.json"), config=config,
                        pretrained_method=pretrained_method(str(meta.get("pretrained") or "")))
