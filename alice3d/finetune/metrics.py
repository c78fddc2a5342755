"""Per-organ Dice and normalised surface Dice (NSD), their aggregation, and ROC AUC.

Conventions (per case and organ):

- organ absent from both ground truth and prediction: NaN ("not applicable"); such a
  case does not enter that organ's mean, and the count of cases that did is reported;
- organ absent from the ground truth but predicted (or the reverse): 0 for Dice and NSD,
  so false positives are never hidden;
- Dice is MONAI's ``compute_dice``; NSD is MONAI's ``SurfaceDiceMetric`` with one tolerance
  in mm per organ and the voxel spacing of the arrays compared;
- partial labels: an organ the case does not contour is unknown there, so it gets no Dice
  or NSD in that case (None, listed under the case's ``"not_contoured"``), whatever is
  predicted; its mean is over the cases that contour it, and ``n_contoured`` says how many.

Label maps are integer arrays/tensors ``(*S)`` (or ``(1, *S)``) of task label ids.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch
from monai.metrics import SurfaceDiceMetric, compute_dice


def _labels(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if hasattr(t, "as_tensor"):
        t = t.as_tensor()
    t = t.detach().cpu()
    if t.ndim >= 1 and t.shape[0] == 1 and t.ndim > 1:
        t = t[0]
    return t.round().long()


def dice_per_class(pred: Any, gt: Any, class_ids: Sequence[int]) -> np.ndarray:
    """Dice per class id ``(len(class_ids),)`` of two label maps ``(*S)`` (2-D or 3-D).

    Scored by MONAI's ``compute_dice`` on the label-encoded maps ``(1, 1, *S)``. NaN where the
    class is absent from both; 0 where it is in only one of them.
    """
    p, g = _labels(pred), _labels(gt)
    if p.shape != g.shape:
        raise ValueError(f"dice: prediction shape {tuple(p.shape)} != ground-truth shape {tuple(g.shape)}")
    ids = [int(c) for c in class_ids]
    if not ids:
        return np.empty(0)
    if min(ids) < 0:
        raise ValueError(f"dice: class ids must be label ids >= 0, got {ids}")
    # num_classes >= 2: with one channel MONAI would score label 1 whatever the id asked for
    n = max(max(ids) + 1, 2)
    scores = compute_dice(p[None, None], g[None, None], include_background=True, ignore_empty=True, num_classes=n)
    out = scores[0, ids].double().numpy()
    # ignore_empty gives NaN whenever the ground truth lacks the class, predicted or not; a
    # false positive must score 0 so it is never hidden from the mean
    for i, c in enumerate(ids):
        if math.isnan(out[i]) and bool((p == c).any()):
            out[i] = 0.0
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


def _known_ids(known: Any) -> set[int]:
    """Label ids of a ``(K,)`` bool vector (True = known) or of an id list."""
    arr = np.asarray(known.detach().cpu() if torch.is_tensor(known) else known)
    if arr.dtype == bool:
        return {int(i) for i in np.flatnonzero(arr)}
    return {int(i) for i in arr.reshape(-1)}


def case_metrics(pred: Any, gt: Any, organs: dict[int, str], tolerances_mm: Sequence[float],
                 spacing: Sequence[float], known: Any = None) -> dict[str, Any]:
    """``{"dice": {organ: value|None}, "nsd": {...}}`` for one case (None = not applicable).

    ``known``: the label ids the case contours, as ids or a ``(K,)`` bool vector indexed by
    label id (None: every organ). Organs outside it are not scored (None) and are listed
    under ``"not_contoured"`` (a key present only when there are some).
    """
    ids = list(organs)
    if len(tolerances_mm) != len(ids):
        raise ValueError(f"nsd: {len(tolerances_mm)} tolerances for {len(ids)} classes")
    scored = ids if known is None else [c for c in ids if c in _known_ids(known)]
    tol = dict(zip(ids, tolerances_mm))
    dice = dict(zip(scored, dice_per_class(pred, gt, scored))) if scored else {}
    nsd = dict(zip(scored, nsd_per_class(pred, gt, scored, [tol[c] for c in scored], spacing))) if scored else {}

    def named(values: dict[int, float]) -> dict[str, float | None]:
        return {organs[c]: (None if c not in values or math.isnan(values[c]) else float(values[c])) for c in ids}

    out: dict[str, Any] = {"dice": named(dice), "nsd": named(nsd)}
    if len(scored) < len(ids):
        out["not_contoured"] = [organs[c] for c in ids if c not in scored]
    return out


def _stats(values: list[float | None]) -> dict[str, float | int | None]:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}


def aggregate(cases: dict[str, dict[str, Any]], organ_names: Sequence[str]) -> dict[str, Any]:
    """Per-organ mean/std/count over cases, then the mean over organs that have a value
    (each organ's own mean counts once, however many cases it was measured on).

    ``cases``: case id -> output of :func:`case_metrics`. ``n`` counts the cases an organ was
    measured on; with partial labels (some case has ``"not_contoured"``) each organ also gets
    ``n_contoured``, the cases that contour it, and the result ``"partial_labels": True``.
    """
    partial = any(c.get("not_contoured") for c in cases.values())
    per_organ = {}
    for organ in organ_names:
        per_organ[organ] = {
            "dice": _stats([c["dice"].get(organ) for c in cases.values()]),
            "nsd": _stats([c["nsd"].get(organ) for c in cases.values()]),
        }
        if partial:
            per_organ[organ]["n_contoured"] = sum(organ not in c.get("not_contoured", ()) for c in cases.values())

    def mean_over(kind: str) -> float | None:
        vals = [o[kind]["mean"] for o in per_organ.values() if o[kind]["mean"] is not None]
        return float(np.mean(vals)) if vals else None

    out = {"mean_dice": mean_over("dice"), "mean_nsd": mean_over("nsd"), "per_organ": per_organ}
    if partial:
        out["partial_labels"] = True
    return out


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
    partial = bool(agg.get("partial_labels"))
    if partial:
        lines += ["", "Partial labels: an organ a case does not contour is left out of that case's Dice and NSD; "
                  "'cases' counts the cases each organ was measured on, 'contoured' the cases that contour it."]
    extra = (" contoured |", "---:|") if partial else ("", "")
    lines += ["", "| organ | Dice (%) | NSD (%) | tolerance (mm) | cases |" + extra[0],
              "|---|---:|---:|---:|---:|" + extra[1]]
    tol = results.get("nsd_tolerance_mm", {})
    for organ, m in agg["per_organ"].items():
        row = (f"| {organ} | {_fmt(m['dice']['mean'])} ± {_fmt(m['dice']['std'])} | "
               f"{_fmt(m['nsd']['mean'])} ± {_fmt(m['nsd']['std'])} | {tol.get(organ, '')} | {m['dice']['n']} |")
        lines.append(row + (f" {m.get('n_contoured', '')} |" if partial else ""))
    lines.append(f"| **mean** | **{_fmt(agg['mean_dice'])}** | **{_fmt(agg['mean_nsd'])}** | | |"
                 + (" |" if partial else ""))
    if results.get("bad_cases"):
        lines += ["", "Bad cases (not evaluated):", ""]
        lines += [f"- {cid}: {why}" for cid, why in results["bad_cases"].items()]
    return "\n".join(lines) + "\n"
