"""Validation: sliding-window inference at the task ROI, per-organ Dice/NSD, AUC, reports.

Segmentation metrics are computed on the task grid (after orientation, resampling and
foreground crop), with the grid's voxel spacing passed to NSD. With partial labels an organ
is scored only in the cases that contour it, and the mean Dice that selects ``best.pt``
averages the organs' own means over those cases.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from alice3d.finetune.config import EvalConfig
from alice3d.finetune.data import Prepared
from alice3d.finetune.metrics import aggregate, case_metrics, results_markdown, roc_auc
from alice3d.finetune.prediction_preview import save_prediction_preview
from alice3d.finetune.tasks import TaskSpec


def sliding_window_logits(predictor: Any, image: torch.Tensor, roi: Sequence[int], ecfg: EvalConfig) -> torch.Tensor:
    """``(B, C, *S)`` -> logits ``(B, K, *S)``; images smaller than the ROI are padded by MONAI."""
    return sliding_window_inference(image, roi_size=tuple(int(r) for r in roi), sw_batch_size=ecfg.sw_batch_size,
                                    predictor=predictor, overlap=ecfg.sw_overlap, mode=ecfg.sw_mode)


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_case(model: Any, case: Prepared, task: TaskSpec, ecfg: EvalConfig) -> torch.Tensor:
    """Label ids ``(*S)`` (int64, CPU) of a prepared case."""
    image = case.image[None].to(_device_of(model))
    logits = sliding_window_logits(model.logits, image, task.roi, ecfg)
    return logits.argmax(1)[0].cpu()


def evaluate_segmentation(model: Any, cases: Sequence[Prepared], task: TaskSpec, ecfg: EvalConfig,
                          keep_predictions: int = 0) -> dict[str, Any]:
    """Per-case and aggregated Dice/NSD over ``cases``; the label maps predicted for the first
    ``keep_predictions`` cases are returned too (``"predictions"``: case id -> int16 ``(*S)``)."""
    was_training = model.training
    model.eval()
    per_case, kept = {}, {}
    try:
        for k, case in enumerate(cases):
            pred = predict_case(model, case, task, ecfg)
            gt = case.label[0].round().long()
            # A class the case does not contour is unknown there: not scored (see metrics).
            per_case[case.id] = case_metrics(pred, gt, task.foreground, task.tolerances(), case.spacing,
                                             known=case.known)
            if k < keep_predictions:
                kept[case.id] = pred.to(torch.int16)
    finally:
        model.train(was_training)
    agg = aggregate(per_case, list(task.foreground.values()))
    return {"cases": per_case, "metrics": agg, "predictions": kept}


def save_previews(model: Any, cases: Sequence[Prepared], task: TaskSpec, ecfg: EvalConfig, out_dir: Path,
                  predictions: dict[str, torch.Tensor] | None = None) -> list[Path]:
    """``out_dir/<case>.png``: ground truth over prediction for each of ``cases`` (predicted
    now unless ``predictions`` holds the case)."""
    was_training = model.training
    model.eval()
    paths = []
    try:
        for case in cases:
            pred = (predictions or {}).get(case.id)
            if pred is None:
                pred = predict_case(model, case, task, ecfg)
            paths.append(save_prediction_preview(case.image[0].numpy(), case.label[0].round().long().numpy(),
                                                 pred.numpy(), Path(out_dir) / f"{case.id}.png", spacing=case.spacing))
    finally:
        model.train(was_training)
    return paths


def evaluate_classification(model: Any, cases: Sequence[Prepared], task: TaskSpec) -> dict[str, Any]:
    was_training = model.training
    model.eval()
    device = _device_of(model)
    probs, labels, per_case = [], [], {}
    try:
        with torch.no_grad():
            for case in cases:
                logits = model.logits(case.image[None].to(device)).float()
                p = torch.softmax(logits, 1)[0].cpu()
                score = float(p[1]) if p.numel() > 1 else float(p[0])
                probs.append(score)
                labels.append(int(case.label))
                per_case[case.id] = {"label": int(case.label), "prob": score, "pred": int(p.argmax())}
    finally:
        model.train(was_training)
    acc = float(np.mean([c["pred"] == c["label"] for c in per_case.values()])) if per_case else float("nan")
    return {"cases": per_case, "metrics": {"auc": roc_auc(probs, labels), "accuracy": acc}}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Finite scalars for the trainer's log: mean_dice, mean_nsd, dice_<organ>, nsd_<organ> (or auc)."""
    m = result["metrics"]
    out: dict[str, float] = {}
    for k in ("mean_dice", "mean_nsd", "auc", "accuracy"):
        if m.get(k) is not None and math.isfinite(m[k]):
            out[k] = float(m[k])
    for organ, v in m.get("per_organ", {}).items():
        for kind in ("dice", "nsd"):
            if v[kind]["mean"] is not None:
                out[f"{kind}_{organ}"] = float(v[kind]["mean"])
    return out


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


def classification_markdown(results: dict[str, Any]) -> str:
    m = results["metrics"]
    auc = "n/a" if m.get("auc") is None else f"{100 * m['auc']:.2f}"
    acc = "n/a" if m.get("accuracy") is None else f"{100 * m['accuracy']:.2f}"
    lines = [f"# {results.get('task')} — {results.get('model')}", "",
             f"Validation cases: {results.get('n_cases', 0)}", "", "| metric | value (%) |", "|---|---:|",
             f"| AUC | {auc} |", f"| accuracy | {acc} |"]
    if results.get("bad_cases"):
        lines += ["", "Bad cases (not evaluated):", ""] + [f"- {k}: {v}" for k, v in results["bad_cases"].items()]
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: dict[str, Any]) -> None:
    """``RUN/results.json`` and ``RUN/results.md``."""
    run_dir = Path(run_dir)
    results = _json_safe(results)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    md = classification_markdown(results) if results.get("kind") == "classification" else results_markdown(results)
    (run_dir / "results.md").write_text(md, encoding="utf-8")  # not the locale default: it may be ASCII
