"""Per-organ Dice and normalised surface Dice (NSD), their aggregation, and ROC AUC.

Conventions (per case and organ):

- organ absent from both ground truth and prediction: NaN ("not applicable"); such a
  case does not enter that organ's mean, and the count of cases that did is reported;
- organ absent from the ground truth but predicted (or the reverse): 0 for Dice and NSD,
  so false positives are never hidden;
- NSD uses MONAI's ``SurfaceDiceMetric`` with one tolerance in mm per organ and the
  voxel spacing of the arrays compared.

Label maps are integer arrays/tensors ``(*S)`` (or ``(1, *S)``) of task label ids.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import SurfaceDiceMetric


def _labels(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if hasattr(t, "as_tensor"):
        t = t.as_tensor()
    t = t.detach().cpu()
    if t.ndim >= 1 and t.shape[0] == 1 and t.ndim > 1:
        t = t[0]
    return t.round().long()


def dice_per_class(pred: Any, gt: Any, class_ids: Sequence[int]) -> np.ndarray:
    """Dice per class id ``(len(class_ids),)``; NaN where the class is absent from both."""
    p, g = _labels(pred), _labels(gt)
    if p.shape != g.shape:
        raise ValueError(f"dice: prediction shape {tuple(p.shape)} != ground-truth shape {tuple(g.shape)}")
    out = np.full(len(class_ids), np.nan)
    for i, c in enumerate(class_ids):
        a, b = p == c, g == c
        sa, sb = int(a.sum()), int(b.sum())
        if sa + sb:
            out[i] = 2.0 * int((a & b).sum()) / (sa + sb)
    return out


def _box(mask: torch.Tensor, margin: int = 1) -> tuple[slice, ...]:
    """Bounding box of a non-empty mask, grown by ``margin`` voxels (clipped to the array)."""
    idx = mask.nonzero()
    lo = (idx.min(0).values - margin).clamp(min=0)
    hi = idx.max(0).values + 1 + margin
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def nsd_per_class(pred: Any, gt: Any, class_ids: Sequence[int], tolerances_mm: Sequence[float],
                  spacing: Sequence[float]) -> np.ndarray:
    """Normalised surface Dice per class id at its tolerance (mm), voxel ``spacing`` in mm.

    Each class is scored by MONAI's ``SurfaceDiceMetric`` on the bounding box of its
    prediction and ground truth (plus one voxel), which gives the same surfaces and
    distances as the whole volume without a full-size one-hot tensor per class.
    """
    p, g = _labels(pred), _labels(gt)
    if p.shape != g.shape:
        raise ValueError(f"nsd: prediction shape {tuple(p.shape)} != ground-truth shape {tuple(g.shape)}")
    if len(tolerances_mm) != len(class_ids):
        raise ValueError(f"nsd: {len(tolerances_mm)} tolerances for {len(class_ids)} classes")
    spacing = [float(s) for s in spacing]
    out = np.full(len(class_ids), np.nan)
    for i, (c, tol) in enumerate(zip(class_ids, tolerances_mm)):
        a, b = p == c, g == c
        has_a, has_b = bool(a.any()), bool(b.any())
        if not (has_a and has_b):
            out[i] = 0.0 if has_a or has_b else np.nan
            continue
        box = _box(a | b)
        a, b = a[box], b[box]
        onehot_p = torch.stack([~a, a])[None].float()
        onehot_g = torch.stack([~b, b])[None].float()
        metric = SurfaceDiceMetric(class_thresholds=[float(tol)], include_background=False, reduction="none")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # raised inside MONAI 1.6's own call chain
            out[i] = float(metric(onehot_p, onehot_g, spacing=spacing).reshape(-1)[0])
    return out


def case_metrics(pred: Any, gt: Any, organs: dict[int, str], tolerances_mm: Sequence[float],
                 spacing: Sequence[float]) -> dict[str, dict[str, float | None]]:
    """``{"dice": {organ: value|None}, "nsd": {...}}`` for one case (None = not applicable)."""
    ids = list(organs)
    dice = dice_per_class(pred, gt, ids)
    nsd = nsd_per_class(pred, gt, ids, tolerances_mm, spacing)

    def named(values: np.ndarray) -> dict[str, float | None]:
        return {organs[c]: (None if math.isnan(v) else float(v)) for c, v in zip(ids, values)}

    return {"dice": named(dice), "nsd": named(nsd)}


def _stats(values: list[float | None]) -> dict[str, float | int | None]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def aggregate(cases: dict[str, dict[str, dict[str, float | None]]], organ_names: Sequence[str]) -> dict[str, Any]:
    """Per-organ mean/std/count over cases, then the mean over organs that have a value.

    ``cases``: case id -> output of :func:`case_metrics`.
    """
    per_organ = {}
    for organ in organ_names:
        per_organ[organ] = {
            "dice": _stats([c["dice"].get(organ) for c in cases.values()]),
            "nsd": _stats([c["nsd"].get(organ) for c in cases.values()]),
        }

    def mean_over(kind: str) -> float | None:
        vals = [o[kind]["mean"] for o in per_organ.values() if o[kind]["mean"] is not None]
        return float(np.mean(vals)) if vals else None

    return {"mean_dice": mean_over("dice"), "mean_nsd": mean_over("nsd"), "per_organ": per_organ}


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count 1/2); NaN with one class only."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels).astype(int)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _fmt(x: float | None, scale: float = 100.0) -> str:
    return "n/a" if x is None else f"{scale * x:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    """Markdown table of a segmentation ``results.json`` (values in %)."""
    agg = results["metrics"]
    lines = [f"# {results.get('task', 'task')} — {results.get('model', '')}", ""]
    lines.append(f"Validation cases: {results.get('n_cases', 0)} evaluated"
                 + (f", {len(results.get('bad_cases', {}))} bad (listed below)" if results.get("bad_cases") else ""))
    lines += ["", "| organ | Dice (%) | NSD (%) | tolerance (mm) | cases |", "|---|---:|---:|---:|---:|"]
    tol = results.get("nsd_tolerance_mm", {})
    for organ, m in agg["per_organ"].items():
        lines.append(f"| {organ} | {_fmt(m['dice']['mean'])} ± {_fmt(m['dice']['std'])} | "
                     f"{_fmt(m['nsd']['mean'])} ± {_fmt(m['nsd']['std'])} | {tol.get(organ, '')} | {m['dice']['n']} |")
    lines.append(f"| **mean** | **{_fmt(agg['mean_dice'])}** | **{_fmt(agg['mean_nsd'])}** | | |")
    if results.get("bad_cases"):
        lines += ["", "Bad cases (not evaluated):", ""]
        lines += [f"- {cid}: {why}" for cid, why in results["bad_cases"].items()]
    return "\n".join(lines) + "\n"
