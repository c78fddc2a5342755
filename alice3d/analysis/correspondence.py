"""Cross-patient correspondence retrieval with frozen features: does patient A's organ crop look
most like the same organ in patient B, or like B's body a few centimetres higher or lower?

For every ordered pair of patients (A, B) and every organ both contour: the query is the crop
centred on the organ's centroid in A; the candidates are `n_candidates` crops of B centred on
B's centroid shifted by k * step voxels along the body axis, k = -n/2 .. n/2 - 1 (k = 0 is the
true match). Candidates are ranked by the cosine similarity of mean-pooled final tokens
(`frozen_tokens`). Per query: top-1 (k* = 0) and the error |k*| * step * spacing in mm.
A feature that encodes "what anatomy is here" rather than "what this crop's intensities look
like" ranks the true crop first; the body axis is the hard direction, since neighbouring crops
overlap and share most of their content.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from alice3d.analysis.probing import frozen_tokens
from alice3d.data.crops import crop_at
from alice3d.data.io import DataError, Volume

__all__ = ["RetrievalTask", "retrieval_task", "retrieval_scores"]


@dataclass
class RetrievalTask:
    """queries `(Q, C, *size)` with `query_of` `(Q, 2)` = (patient, organ index); candidates
    `(G, n_candidates, C, *size)` with `group_of` `(G, 2)` = (patient, organ index), the true
    crop at position `true_index` of every group; `offsets_mm` `(n_candidates,)`."""

    queries: torch.Tensor
    query_of: np.ndarray
    candidates: torch.Tensor
    group_of: np.ndarray
    true_index: int
    offsets_mm: np.ndarray
    organ_names: list[str]
    n_patients: int


def _centroid(mask: np.ndarray) -> np.ndarray | None:
    idx = np.argwhere(mask)
    return None if len(idx) == 0 else np.round(idx.mean(0)).astype(int)


def retrieval_task(
    volumes: Sequence[Volume],
    size: Sequence[int],
    organs: Mapping[str, int],
    contoured: Sequence[Sequence[int] | None] | None = None,
    n_candidates: int = 20,
    step: int = 3,
    axis: int = 2,
    spacing_mm: float = 1.0,
) -> RetrievalTask:
    """Crops for retrieval over `volumes` (canonical, intensities in [0, 1], label maps).

    organs: name -> label id. contoured: per volume, the ids it contours (None = every id present).
    step: candidate spacing in voxels along `axis`; spacing_mm: the voxel size along it (for mm errors).
    """
    size = tuple(int(s) for s in size)
    if n_candidates < 2:
        raise ValueError(f"retrieval_task: n_candidates must be >= 2, got {n_candidates}")
    shifts = np.arange(n_candidates) - n_candidates // 2
    names = list(organs)
    queries, query_of, cands, group_of = [], [], [], []
    for j, vol in enumerate(volumes):
        if vol.label is None:
            raise DataError(f"retrieval_task: {vol.path} has no label map")
        known = None if contoured is None or contoured[j] is None else set(int(i) for i in contoured[j])
        for o, name in enumerate(names):
            if known is not None and organs[name] not in known:
                continue
            c = _centroid(vol.label == organs[name])
            if c is None:
                continue
            queries.append(crop_at(vol.array, c, size))
            query_of.append((j, o))
            group = []
            for k in shifts:
                ck = c.copy()
                ck[axis] += int(k) * step
                group.append(crop_at(vol.array, ck, size))
            cands.append(np.stack(group))
            group_of.append((j, o))
    if not queries:
        raise DataError("retrieval_task: no organ of the list is contoured in the volumes")
    return RetrievalTask(
        queries=torch.from_numpy(np.stack(queries).astype(np.float32))[:, None],
        query_of=np.asarray(query_of), candidates=torch.from_numpy(np.stack(cands).astype(np.float32))[:, :, None],
        group_of=np.asarray(group_of), true_index=int(np.flatnonzero(shifts == 0)[0]),
        offsets_mm=np.abs(shifts) * step * float(spacing_mm), organ_names=names, n_patients=len(volumes))


@torch.no_grad()
def retrieval_scores(encoder: torch.nn.Module, task: RetrievalTask, batch_size: int = 32) -> dict:
    """Top-1 and mm error of every (A, B, organ) query, A != B, with the encoder frozen.

    Returns {"top1": (P, P, O) float with NaN where not defined, "error_mm": same,
    "per_patient_top1": (P,) mean over B and organs with A as query patient, "top1_mean",
    "error_mm_mean", "per_organ_top1": {organ: mean}}.
    """
    q = F.normalize(frozen_tokens(encoder, task.queries, batch_size).mean(1), dim=-1)
    g, n = task.candidates.shape[:2]
    flat = task.candidates.reshape(g * n, *task.candidates.shape[2:])
    cand = F.normalize(frozen_tokens(encoder, flat, batch_size).mean(1), dim=-1).reshape(g, n, -1)
    p, o = task.n_patients, len(task.organ_names)
    top1 = np.full((p, p, o), np.nan)
    err = np.full((p, p, o), np.nan)
    group_index = {(int(b), int(k)): i for i, (b, k) in enumerate(task.group_of)}
    for qi, (a, k) in enumerate(task.query_of):
        for b in range(p):
            gi = group_index.get((b, int(k)))
            if b == a or gi is None:
                continue
            best = int((cand[gi] @ q[qi]).argmax())
            top1[a, b, k] = float(best == task.true_index)
            err[a, b, k] = float(task.offsets_mm[best])
    with np.errstate(invalid="ignore"):
        per_patient = np.nanmean(top1.reshape(p, -1), axis=1) if np.isfinite(top1).any() else np.full(p, np.nan)
    return {"top1": top1, "error_mm": err, "per_patient_top1": per_patient,
            "per_patient_error_mm": np.nanmean(err.reshape(p, -1), axis=1),
            "top1_mean": float(np.nanmean(top1)), "error_mm_mean": float(np.nanmean(err)),
            "per_organ_top1": {name: float(np.nanmean(top1[:, :, i])) if np.isfinite(top1[:, :, i]).any() else None
                               for i, name in enumerate(task.organ_names)}}
