"""``alice3d-finetune evaluate``: a finished run's ``best.pt`` scored on a held-out split.

Fine-tuning chooses its checkpoint on the validation cases, so the figures it reports are
biased upwards; the held-out (``test``) cases of the same datalist, never used for any choice,
give the figures to report. Cases are prepared exactly as during fine-tuning (the task stored
in the checkpoint: orientation, spacing, window), scored with the same per-organ Dice/NSD and
partial-label rules, and written to ``RUN/<split>_results.json`` / ``.md``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from alice3d.core.dist import resolve_device
from alice3d.data.io import DataError
from alice3d.finetune.data import prepare_cases, read_datalist
from alice3d.finetune.evaluate import _json_safe, evaluate_segmentation
from alice3d.finetune.metrics import results_markdown
from alice3d.finetune.predict import load_run
from alice3d.finetune.tasks import CLASSIFICATION

log = logging.getLogger("alice3d.finetune")

__all__ = ["evaluate_run"]


class _Logits(torch.nn.Module):
    """The network as the evaluator calls it: ``logits(x)``, the first output under deep supervision."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def evaluate_run(run: str | Path, datalist: str | Path, split: str = "test", max_cases: int = 0,
                 device: str = "auto", on_bad_data: str = "skip") -> dict[str, Any]:
    """Score ``RUN/best.pt`` on the ``split`` cases of ``datalist`` (the first ``max_cases`` if > 0)."""
    run = Path(run)
    loaded = load_run(run, device=resolve_device(device))
    task = loaded.task
    if task.kind == CLASSIFICATION:
        raise DataError(f"{run}: held-out evaluation is for segmentation runs; this run is a classification")
    lists = read_datalist(datalist, task)
    cases = [c for c in lists.get(split, []) if c.label]
    if not cases:
        raise DataError(f"{datalist}: no labelled {split!r} cases (expected a list '{split}' whose entries have 'label')")
    if max_cases > 0:
        cases = cases[:max_cases]
    prepared, bad = prepare_cases(cases, task, on_bad_data, split)
    with torch.inference_mode():
        ev = evaluate_segmentation(_Logits(loaded.network), prepared, task, loaded.inference)
    results = {"kind": task.kind, "task": task.name, "run": str(run), "split": split, "datalist": str(datalist),
               "checkpoint_step": loaded.metadata.get("step"), "n_cases": len(ev["cases"]), "bad_cases": bad,
               "labels": {str(k): v for k, v in task.labels.items()}, "metrics": ev["metrics"], "cases": ev["cases"]}
    (run / f"{split}_results.json").write_text(json.dumps(_json_safe(results), indent=2))
    md = results_markdown(results).replace("Validation cases:", f"{split.capitalize()} cases:", 1)
    (run / f"{split}_results.md").write_text(md)
    log.info("%s: mean Dice %.4f over %d %s cases -> %s", run, ev["metrics"].get("mean_dice", float("nan")),
             len(ev["cases"]), split, run / f"{split}_results.json")
    return results
