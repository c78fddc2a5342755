"""Per-point argmax of the combined similarity over every voxel of a target: pure tensor functions.

Inputs are the target's fine embedding ``fine (*Sf, D)`` (unit rows, float16 or float32, CPU
or device) and, per query, its fine vector ``q_f (N, D)`` and its coarse similarity map
``coarse_sim (N, *Sc)`` (the query's coarse vector against every coarse cell). The score of
fine voxel ``v`` is ``S(v) = w * fine(v) . q_f + (1 - w) * up(coarse_sim)(v)``, where ``up`` is
linear upsampling by ``factor`` with ``align_corners=False`` (the grid convention of
:mod:`landmark.model`) and ``w`` the fine weight. Indices are C-order voxel indices of the fine
grid; nothing here knows about world coordinates, files or caches.

Modes: ``full`` scores every voxel; ``pruned`` is branch-and-bound with exactly the full-search
argmax (fine similarities are at most 1, and an upsampled coarse value is at most the largest
of its coarse neighbours, so cells that cannot beat a known score are skipped); ``coarse``
scores only the voxels of the most promising coarse cells.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

SEARCH_MODES = ("full", "pruned", "coarse")


def interp_rows(grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Multilinear interpolation of ``grid (*S, D)`` at continuous indices ``idx (N, n)`` -> ``(N, D)``.

    Indices are clamped to the grid (like ``F.interpolate`` at the borders).
    """
    n = idx.shape[1]
    shape = torch.tensor(grid.shape[:n], dtype=torch.float64)
    idx = torch.minimum(idx.double().clamp(min=0), shape - 1)
    lo = idx.floor().long()
    frac = (idx - lo).float()
    hi = torch.minimum(lo + 1, (shape - 1).long())
    out = 0
    for corner in range(2**n):
        w = torch.ones(len(idx))
        sel = []
        for d in range(n):
            up = (corner >> d) & 1
            sel.append(hi[:, d] if up else lo[:, d])
            w = w * (frac[:, d] if up else 1 - frac[:, d])
        out = out + w[:, None] * grid[tuple(sel)].float()
    return out


def upsample_sim(coarse_sim: torch.Tensor, factor: int, fine_shape: Sequence[int]) -> torch.Tensor:
    """Coarse similarity maps ``(N, *Sc)`` -> fine grid ``(N, *fine_shape)`` (align_corners=False)."""
    n = len(fine_shape)
    mode = ("linear", "bilinear", "trilinear")[n - 1]
    up = F.interpolate(coarse_sim[:, None], scale_factor=factor, mode=mode, align_corners=False)[:, 0]
    return up[(slice(None), *[slice(0, s) for s in fine_shape])]


def coarse_sim_at(coarse_sim: torch.Tensor, fine_idx: torch.Tensor, factor: int) -> torch.Tensor:
    """One coarse similarity map ``(*Sc)`` upsampled, read at integer fine indices ``(K, n)`` -> ``(K,)``.

    Same values as :func:`upsample_sim` (linear, ``align_corners=False``, borders clamped).
    """
    n = fine_idx.shape[1]
    cidx = (fine_idx.float() + 0.5) / factor - 0.5
    if n == 1:
        return interp_rows(coarse_sim[..., None], cidx.double())[:, 0]
    size = torch.tensor(list(coarse_sim.shape), dtype=torch.float32)
    grid = ((2 * cidx + 1) / size - 1).flip(-1).reshape(1, -1, *([1] * (n - 1)), n)
    out = F.grid_sample(coarse_sim.float()[None, None], grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.reshape(-1)


def coarse_values_at(coarse_sim: torch.Tensor, fine_idx: torch.Tensor, factor: int) -> torch.Tensor:
    """Coarse maps ``(N, *Sc)`` upsampled, read at integer fine indices ``(N, K, n)`` -> ``(N, K)``.

    Same values as :func:`upsample_sim`, for many maps and points at once.
    """
    n = fine_idx.shape[-1]
    cshape = coarse_sim.shape[1:]
    _, neighbours, weights = cell_upsampling_stencil(factor, n)
    cells = torch.div(fine_idx, factor, rounding_mode="floor")
    nb = torch.minimum((cells[:, :, None] + neighbours).clamp_min(0), torch.tensor(cshape) - 1)  # (N, K, 3**n, n)
    vals = coarse_sim.float().flatten(1).gather(1, ravel_index(nb, cshape).flatten(1)).view(*nb.shape[:3])
    w = weights[ravel_index(fine_idx - cells * factor, (factor,) * n)]  # (N, K, 3**n)
    return (vals * w).sum(-1)


def unravel_index(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Flat C-order indices ``(...)`` -> indices ``(..., n)`` of a grid of ``shape``."""
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat = torch.div(flat, s, rounding_mode="floor")
    return torch.stack(out[::-1], dim=-1)


def ravel_index(idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Indices ``(..., n)`` -> flat C-order indices ``(...)`` of a grid of ``shape``."""
    flat = torch.zeros(idx.shape[:-1], dtype=torch.long, device=idx.device)
    for d, s in enumerate(shape):
        flat = flat * int(s) + idx[..., d]
    return flat


def cell_upsampling_stencil(factor: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear upsampling by ``factor`` (``align_corners=False``, borders clamped) inside one coarse cell.

    Returns voxel offsets in the cell ``(factor**n, n)``, neighbour cell offsets ``(3**n, n)``
    and weights ``(factor**n, 3**n)``: the upsampled value at ``cell * factor + offset[v]`` is
    ``weights[v] @ coarse[clamp(cell + neighbour)]``, the same value :func:`upsample_sim` gives.
    """
    t = (torch.arange(factor, dtype=torch.float64) + 0.5) / factor - 0.5  # position in coarse units
    w1 = torch.zeros(factor, 3, dtype=torch.float64)  # weights of the neighbours -1, 0, +1
    left = t < 0
    w1[left, 0], w1[left, 1] = -t[left], 1 + t[left]
    w1[~left, 1], w1[~left, 2] = 1 - t[~left], t[~left]
    weights = w1
    for _ in range(n - 1):
        weights = torch.einsum("ab,cd->acbd", weights, w1).reshape(weights.shape[0] * factor, -1)
    grid = lambda values: torch.stack(torch.meshgrid(*[values] * n, indexing="ij"), -1).reshape(-1, n)  # noqa: E731
    return grid(torch.arange(factor)), grid(torch.arange(-1, 2)), weights.float()


def query_vectors(fine: torch.Tensor, coarse: torch.Tensor, fine_idx: torch.Tensor,
                  coarse_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit query vectors ``(N, D)`` interpolated from ``fine (*Sf, D)`` / ``coarse (*Sc, D)`` at
    continuous indices ``fine_idx`` / ``coarse_idx (N, n)``."""
    return F.normalize(interp_rows(fine, fine_idx), dim=1), F.normalize(interp_rows(coarse, coarse_idx), dim=1)


def score_at(q_f: torch.Tensor, q_c: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor,
             fine_idx: torch.Tensor, coarse_idx: torch.Tensor, fine_weight: float) -> torch.Tensor:
    """Combined similarity ``(N,)`` of queries ``(N, D)`` at continuous indices ``(N, n)`` of the
    target grids, clamped to [-1, 1] (fp16 storage can push a cosine a hair past 1)."""
    w = fine_weight
    score = w * (interp_rows(fine, fine_idx) * q_f).sum(1)
    return (score + (1 - w) * (interp_rows(coarse, coarse_idx) * q_c).sum(1)).clamp(-1.0, 1.0)


def combined_at(q_f: torch.Tensor, coarse_sim: torch.Tensor, fine: torch.Tensor, factor: int,
                fine_weight: float, idx: torch.Tensor) -> torch.Tensor:
    """Combined similarity of one query ``q_f (D,)``, ``coarse_sim (*Sc)`` at integer fine indices
    ``idx (K, n)`` -> ``(K,)``."""
    flat = ravel_index(idx, fine.shape[:-1])
    rows = fine.reshape(-1, fine.shape[-1]).index_select(0, flat).float()
    w = fine_weight
    return w * (rows @ q_f.float()) + (1 - w) * coarse_sim_at(coarse_sim, idx, factor)


def search_full(q_f: torch.Tensor, coarse_sim: torch.Tensor, fine: torch.Tensor, factor: int,
                fine_weight: float, chunk_voxels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense argmax: ``q_f (N, D)``, ``coarse_sim (N, *Sc)`` -> ``(best (N, n) long, score (N,))``.

    Runs where ``fine`` lives: on an accelerator in its dtype, on the CPU with float32 products
    (half-precision matmul is slow there and rounds differently). ``chunk_voxels`` bounds
    queries x voxels per block.
    """
    shape = tuple(fine.shape[:-1])
    m = int(np.prod(shape))
    dev = fine.device
    flat = fine.reshape(m, -1)
    step = max(1, chunk_voxels // max(m, 1))
    best, score = [], []
    w = fine_weight
    for s in range(0, len(q_f), step):
        if dev.type != "cpu":
            qf = q_f[s:s + step].to(dev, flat.dtype)
            sim = (qf @ flat.T).float().reshape(len(qf), *shape)
        else:
            qf = q_f[s:s + step].float()
            sim = torch.cat([qf @ flat[v:v + 65536].float().T for v in range(0, m, 65536)], dim=1)
            sim = sim.reshape(len(qf), *shape)
        sim = w * sim + (1 - w) * upsample_sim(coarse_sim[s:s + step].to(dev), factor, shape)
        val, idx = sim.reshape(len(qf), -1).max(dim=1)
        best.append(unravel_index(idx.cpu(), shape))
        score.append(val.cpu())
    return torch.cat(best), torch.cat(score)


def search_coarse(q_f: torch.Tensor, coarse_sim: torch.Tensor, fine: torch.Tensor, factor: int,
                  fine_weight: float, cells: int, chunk_voxels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse-to-fine: every voxel of the ``cells`` most promising coarse cells of each query.

    ``q_f (N, D)``, ``coarse_sim (N, *Sc)``, ``fine (*Sf, D)`` on the CPU -> ``(best (N, n), score (N,))``.
    Cells are ranked by the largest coarse similarity among them and their neighbours (the
    most an upsampled coarse value inside them can reach). The fine similarities are then
    computed cell by cell rather than query by query: a cell's voxels are one strided block
    of the cache, read (and widened to float32) once for all queries that chose it, and
    multiplied with those queries together. Gathering voxel rows per query instead moved
    ~100x more memory and dominated batched matching. Scores are float32 products, the same
    values the full search computes. (Screening only every second voxel was tried: 4x
    faster, but it agreed with the full search on 76 % of queries instead of 98 %.)
    """
    if cells < 1:
        raise ValueError(f"coarse_cells: expected at least 1 coarse cell to search per query, got {cells}")
    n, f = fine.ndim - 1, factor
    csim = coarse_sim.float()
    cshape = csim.shape[1:]
    k = min(cells, int(np.prod(cshape)))
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    bound = pool(csim[:, None], 3, stride=1, padding=1)[:, 0].flatten(1)
    chosen = bound.topk(k, dim=1).indices  # (N, k) flat cell ids
    cell_idx = unravel_index(chosen, cshape)  # (N, k, n)
    offs, neighbours, weights = cell_upsampling_stencil(f, n)  # (V, n), (3**n, n), (V, 3**n)
    # Upsampled coarse similarity at every voxel of the chosen cells: (N, k, V).
    nb = torch.minimum((cell_idx[:, :, None] + neighbours).clamp_min(0), torch.tensor(cshape) - 1)
    nb_vals = csim.flatten(1).gather(1, ravel_index(nb, cshape).flatten(1)).view(len(csim), k, -1)
    w = torch.tensor(fine_weight)
    step = max(1, chunk_voxels // (k * offs.shape[0]))  # queries per block (memory bound)
    best, score = [], []
    for s in range(0, len(q_f), step):
        fine_sim = cell_similarities(q_f[s:s + step].float(), chosen[s:s + step], cshape, fine, f)
        combined = torch.addcmul((1 - w) * (nb_vals[s:s + step] @ weights.T), fine_sim, w)
        val, j = combined.flatten(1).nan_to_num(nan=float("-inf")).max(1)  # NaN: beyond the grid
        slot, v = torch.div(j, offs.shape[0], rounding_mode="floor"), j % offs.shape[0]
        best.append(cell_idx[s:s + step][torch.arange(len(j)), slot] * f + offs[v])
        score.append(val)
    return torch.cat(best), torch.cat(score)


def cell_similarities(q: torch.Tensor, chosen: torch.Tensor, cshape: Sequence[int], fine: torch.Tensor,
                      factor: int) -> torch.Tensor:
    """Fine similarity of query ``q[i]`` with every voxel of its cells ``chosen[i]`` -> ``(N, k, f**n)``.

    ``q (N, D)`` float32, ``chosen (N, k)`` flat coarse cell ids. Voxels beyond the grid
    (partial border cells) get NaN, which stays NaN whatever they are combined with.
    """
    n, f = fine.ndim - 1, factor
    out = torch.full((*chosen.shape, *(f,) * n), float("nan"))
    flat = chosen.reshape(-1)
    order = flat.argsort()
    uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
    query_of, slot_of = torch.div(order, chosen.shape[1], rounding_mode="floor"), order % chosen.shape[1]
    corner = unravel_index(uniq, cshape) * f
    start = 0
    for c, m in zip(corner.tolist(), counts.tolist()):
        qi, si = query_of[start:start + m], slot_of[start:start + m]
        start += m
        block = fine[tuple(slice(lo, lo + f) for lo in c)]  # (<=f, ..., D) view of the cache
        sims = (block.reshape(-1, block.shape[-1]).float() @ q[qi].T).T.reshape(m, *block.shape[:-1])
        if sims.shape[1:] == (f,) * n:
            out[qi, si] = sims
        else:
            out[(qi, si, *(slice(0, s) for s in sims.shape[1:]))] = sims
    return out.flatten(2)


def search_pruned(q_f: torch.Tensor, coarse_sim: torch.Tensor, fine: torch.Tensor, factor: int,
                  fine_weight: float, dense_fine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact argmax of one query, visiting few coarse cells: ``q_f (D,)``, ``coarse_sim (*Sc)`` ->
    ``(best (n,), score ())``. ``dense_fine``: the copy of ``fine`` a dense pass runs on (e.g. on
    the GPU) when the landscape is too flat to prune; default ``fine``."""
    shape = tuple(fine.shape[:-1])
    n, f, w = len(shape), factor, fine_weight
    csim = coarse_sim.float()
    # Lower bound: the best voxel inside the most similar coarse cell.
    first = unravel_index(csim.argmax().reshape(1), csim.shape)
    idx = cell_voxels(first, f, shape)
    vals = combined_at(q_f, csim, fine, f, w, idx)
    best_val, k = vals.max(0)
    best_idx = idx[k]
    # Upper bound of any voxel of a cell: w * max fine (1, plus fp16 slack) + (1 - w) * the
    # largest coarse value among the cell and its neighbours (linear upsampling mixes only those).
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    bound = w * 1.002 + (1 - w) * pool(csim[None, None], 3, stride=1, padding=1)[0, 0]
    todo = bound >= best_val
    todo[tuple(first.T)] = False
    cells = torch.nonzero(todo)
    if len(cells) * f**n > 0.3 * np.prod(shape):
        # Flat similarity landscape (e.g. an untrained model): a dense pass is cheaper.
        dense = fine if dense_fine is None else dense_fine
        idx, val = search_full(q_f[None], coarse_sim[None], dense, f, w, chunk_voxels=1)  # one query, one block
        return idx[0], val[0]
    if len(cells):
        idx = cell_voxels(cells, f, shape)
        vals = combined_at(q_f, csim, fine, f, w, idx)
        v, k = vals.max(0)
        if v > best_val:
            best_val, best_idx = v, idx[k]
    return best_idx, best_val


def cell_voxels(cells: torch.Tensor, factor: int, shape: Sequence[int]) -> torch.Tensor:
    """All fine indices ``(K, n)`` inside the given coarse cells ``(C, n)`` (clipped to the grid)."""
    n = cells.shape[1]
    offs = torch.stack(torch.meshgrid(*[torch.arange(factor)] * n, indexing="ij"), -1).reshape(-1, n)
    idx = (cells[:, None, :] * factor + offs[None]).reshape(-1, n)
    keep = (idx < torch.tensor(list(shape))).all(dim=1)
    return idx[keep]


def refine_peak(q_f: torch.Tensor, coarse_sim: torch.Tensor, fine: torch.Tensor, factor: int,
                fine_weight: float, best: torch.Tensor) -> torch.Tensor:
    """Sub-voxel offsets ``(N, n)`` from a parabola through each axis' neighbours of the peaks
    ``best (N, n)``; 0 on the grid border and where the peak is not a maximum."""
    fine_shape = tuple(fine.shape[:-1])
    shape = torch.tensor(list(fine_shape))
    n = best.shape[1]
    steps = torch.cat([torch.zeros(1, n, dtype=torch.long), torch.eye(n, dtype=torch.long).repeat_interleave(2, 0)])
    steps[1:] *= torch.tensor([-1, 1]).repeat(n)[:, None]  # peak, then -1/+1 along each axis
    pts = torch.minimum((best[:, None] + steps).clamp_min(0), shape - 1)  # (N, 1 + 2n, n)
    flat = fine.reshape(-1, fine.shape[-1])
    rows = flat.index_select(0, ravel_index(pts, fine_shape).reshape(-1)).view(*pts.shape[:2], -1).float()
    w = fine_weight
    vals = w * torch.einsum("npd,nd->np", rows, q_f.float())
    vals = (vals + (1 - w) * coarse_values_at(coarse_sim.float(), pts, factor)).double()
    lo, hi, mid = vals[:, 1::2], vals[:, 2::2], vals[:, :1]
    curv = lo - 2 * mid + hi
    ok = (curv < 0) & (best > 0) & (best < shape - 1)
    offset = (0.5 * (lo - hi) / torch.where(ok, curv, -1.0)).clamp(-0.5, 0.5)
    return torch.where(ok, offset, 0.0)


def best_voxels_near(q_f: torch.Tensor, q_c: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, factor: int,
                     centres: torch.Tensor, radius: Sequence[int], *, fine_weight: float,
                     refine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the fine voxel with the highest combined similarity within a box of ``radius``
    voxels per axis around its ``centres (N, n)`` (continuous fine indices, e.g. where the pair's
    affine maps it). Returns continuous fine indices ``(N, n)`` float64 and scores ``(N,)``, like
    :func:`best_voxels`; a box cut by the grid border searches what is inside."""
    n = centres.shape[1]
    shape = torch.tensor(list(fine.shape[:-1]))
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-r, r + 1) for r in radius], indexing="ij"), -1).reshape(-1, n)
    coarse_sim = torch.einsum("nd,...d->n...", q_c, coarse.float())  # (N, *Sc)
    best, score = [], []
    for i in range(len(q_f)):
        idx = centres[i].round().long() + offsets
        idx = idx[((idx >= 0) & (idx < shape)).all(dim=1)]
        if len(idx) == 0:  # the centre lies outside the grid by more than the radius: its nearest voxel
            idx = torch.minimum(centres[i].round().long().clamp_min(0), shape - 1)[None]
        values = combined_at(q_f[i], coarse_sim[i], fine, factor, fine_weight, idx)
        k = int(values.argmax())
        best.append(idx[k])
        score.append(values[k])
    best_t = torch.stack(best)
    out = best_t.double()
    if refine:
        out = out + refine_peak(q_f, coarse_sim, fine, factor, fine_weight, best_t)
    return out, torch.stack(score).float().clamp(-1.0, 1.0)


def best_voxels(q_f: torch.Tensor, q_c: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor, factor: int, *,
                mode: str, fine_weight: float, coarse_cells: int, chunk_voxels: int, refine: bool,
                dense_fine: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query, the fine voxel of the target with the highest combined similarity.

    ``q_f``, ``q_c (N, D)``; ``fine (*Sf, D)``, ``coarse (*Sc, D)`` on the CPU; ``dense_fine``: a
    copy of ``fine`` on an accelerator for the dense passes. Returns continuous fine indices
    ``(N, n)`` float64 (sub-voxel refined when ``refine``) and scores ``(N,)`` in [-1, 1].
    """
    if mode not in SEARCH_MODES:
        raise ValueError(f"search: expected one of {list(SEARCH_MODES)}, got {mode!r}")
    coarse_sim = torch.einsum("nd,...d->n...", q_c, coarse.float())  # (N, *Sc)
    if mode == "full":
        best, score = search_full(q_f, coarse_sim, fine if dense_fine is None else dense_fine, factor, fine_weight,
                                  chunk_voxels)
    elif mode == "coarse":
        best, score = search_coarse(q_f, coarse_sim, fine, factor, fine_weight, coarse_cells, chunk_voxels)
    else:
        found = [search_pruned(q_f[i], coarse_sim[i], fine, factor, fine_weight, dense_fine) for i in range(len(q_f))]
        best, score = torch.stack([b for b, _ in found]), torch.stack([s for _, s in found])
    idx = best.double()
    if refine:
        idx = idx + refine_peak(q_f, coarse_sim, fine, factor, fine_weight, best)
    # fp16 storage can push a cosine a hair past 1
    return idx, score.float().clamp(-1.0, 1.0)
