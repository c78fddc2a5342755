"""Pixel-level InfoNCE for the landmark embedding (SAM-style, fine + coarse).

Correspondences come from world coordinates only: each view carries the affine of its
fine embedding grid (index -> world mm), so two differently scaled crops of one volume
pair their voxels by physical distance, never by array index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alice3d.core.losses import info_nce as core_info_nce, info_nce_logits
from alice3d.data.geometry import apply_affine
from landmark.config import LossConfig


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float, neg_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean InfoNCE of ``anchor (N, D)`` vs ``positive (N, D)`` and its own ``negatives (N, K, D)``.

    ``neg_valid (N, K)`` bool, False = that negative slot is empty (left out of the softmax).
    Loss per anchor: ``-log(exp(a.p/t) / (exp(a.p/t) + sum_k exp(a.n_k/t)))`` on the vectors as
    given (the embeddings are unit already; coarse targets are deliberately not renormalised).
    This argument order is kept for landmark callers; the loss is
    :func:`alice3d.core.losses.info_nce` with per-anchor negatives.
    """
    return core_info_nce(anchor, positive, temperature, negatives=negatives, neg_valid=neg_valid, normalize=False)


def grid_world(affine: torch.Tensor, shape) -> torch.Tensor:
    """World coordinates ``(prod(shape), n)`` of every voxel of a grid with ``affine (n+1, n+1)``."""
    axes = [torch.arange(s, dtype=affine.dtype, device=affine.device) for s in shape]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    return apply_affine(affine, idx)


def nearest_index(affine: torch.Tensor, shape, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat index of the grid voxel nearest to each world point ``(P, n)``, and an in-grid mask ``(P,)``."""
    n = len(shape)
    ijk = torch.round(apply_affine(torch.linalg.inv(affine), points)).long()
    size = torch.tensor(list(shape), device=points.device)
    inside = ((ijk >= 0) & (ijk < size)).all(dim=1)
    ijk = torch.minimum(ijk.clamp(min=0), size - 1)
    flat = torch.zeros(len(points), dtype=torch.long, device=points.device)
    for d in range(n):
        flat = flat * int(shape[d]) + ijk[:, d]
    return flat, inside


def upsample_to(coarse: torch.Tensor, shape, normalize: bool = True) -> torch.Tensor:
    """Coarse embedding ``(B, D, *Sc)`` -> fine grid ``(B, D, *shape)`` (grid convention of model.py).

    ``shape`` may be smaller than ``factor * Sc`` (cropped padding); the interpolation runs at
    ``factor * Sc`` so the voxel centres stay aligned, then the far end is cut off.
    """
    factor = max(math.ceil(f / c) for f, c in zip(shape, coarse.shape[2:]))
    mode = ("linear", "bilinear", "trilinear")[coarse.ndim - 3]
    up = F.interpolate(coarse, scale_factor=factor, mode=mode, align_corners=False)
    up = up[(slice(None), slice(None), *[slice(0, s) for s in shape])]
    return F.normalize(up, dim=1) if normalize else up


def coarse_at(coarse: torch.Tensor, flat_idx: torch.Tensor, fine_shape, factor: int,
              normalize: bool = True) -> torch.Tensor:
    """Coarse embedding ``(D, *Sc)`` interpolated at fine-grid voxels ``flat_idx (P,)`` -> ``(P, D)``.

    Same values as :func:`upsample_to` at those voxels, without building the full fine-size map.
    ``normalize=False`` keeps the plain interpolation, whose dot product with a query equals the
    linearly upsampled similarity map that matching uses.
    """
    n = len(fine_shape)
    ijk = []
    rest = flat_idx
    for d in reversed(range(n)):
        ijk.append(rest % int(fine_shape[d]))
        rest = torch.div(rest, int(fine_shape[d]), rounding_mode="floor")
    ijk = torch.stack(ijk[::-1], dim=-1).to(coarse.dtype)  # (P, n)
    c_idx = (ijk + 0.5) / factor - 0.5
    size = torch.tensor(list(coarse.shape[1:]), dtype=coarse.dtype, device=coarse.device)
    grid = ((2 * c_idx + 1) / size - 1).flip(-1)  # align_corners=False, last axis first
    grid = grid.reshape(1, len(flat_idx), *([1] * (n - 1)), n)
    out = F.grid_sample(coarse[None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    out = out.reshape(coarse.shape[0], -1).T
    return F.normalize(out, dim=1) if normalize else out


@dataclass
class _View:
    fine: torch.Tensor  # (M, D)
    coarse: torch.Tensor  # (D, *Sc)
    world: torch.Tensor  # (M, n)
    affine: torch.Tensor  # (n+1, n+1) fine grid
    shape: tuple
    factor: int

    def coarse_at(self, idx: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return coarse_at(self.coarse, idx, self.shape, self.factor, normalize)

    def cell_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat index of the coarse cell containing each fine voxel ``idx (K,)``."""
        cshape = self.coarse.shape[1:]
        flat = torch.zeros_like(idx)
        rest = idx
        mult = 1
        for d in reversed(range(len(self.shape))):
            c = torch.div(rest % int(self.shape[d]), self.factor, rounding_mode="floor").clamp(max=int(cshape[d]) - 1)
            flat = flat + c * mult
            mult *= int(cshape[d])
            rest = torch.div(rest, int(self.shape[d]), rounding_mode="floor")
        return flat


def _direction(a: _View, b: _View, others: list[_View], cfg: LossConfig,
               gen: torch.Generator) -> dict[str, torch.Tensor] | None:
    """Loss terms for anchors in view ``a`` against view ``b``; None when the views do not overlap."""
    dev = a.fine.device
    j, inside = nearest_index(b.affine, b.shape, a.world)
    dist = (b.world[j] - a.world).norm(dim=1)
    valid = torch.nonzero(inside & (dist < cfg.fine_pos_radius)).flatten()
    if len(valid) == 0:
        return None
    pick = valid[torch.randperm(len(valid), generator=gen, device=dev)[: cfg.anchors]]
    j = j[pick]
    n_anc = len(pick)
    anc_f = a.fine[pick]
    # Anchor: unit coarse vector at the anchor (the matcher's query); coarse targets are plain
    # interpolations, so anchor . target is the upsampled coarse similarity matching scores with.
    anc_c = a.coarse_at(pick)

    # Fine: hard negatives = the most similar candidates by fine + coarse similarity outside the
    # ignore radius (coarse term read at each candidate's coarse cell), plus random ones.
    m_b = b.fine.shape[0]
    cand = torch.randperm(m_b, generator=gen, device=dev)[: cfg.mine_candidates]
    d_cand = torch.cdist(a.world[pick], b.world[cand])  # (P, C)
    with torch.no_grad():
        csim = anc_c.detach() @ b.coarse.flatten(1)  # (P, cells)
        mine = anc_f.detach() @ b.fine[cand].T + csim[:, b.cell_of(cand)]
        mine = mine.masked_fill(d_cand < cfg.fine_ignore_radius, float("-inf"))
        k = min(cfg.hard_pool, mine.shape[1])
        top_sim, top_pos = mine.topk(k, dim=1)
        order = torch.randint(0, k, (n_anc, min(cfg.negatives, k)), generator=gen, device=dev)
        neg_pos = top_pos.gather(1, order)
        neg_ok = torch.isfinite(top_sim.gather(1, order))
        if cfg.random_negatives > 0:
            # Easy negatives alongside the hard ones keep a learning signal while features are weak.
            rnd = torch.randint(0, mine.shape[1], (n_anc, cfg.random_negatives), generator=gen, device=dev)
            neg_pos = torch.cat([neg_pos, rnd], dim=1)
            neg_ok = torch.cat([neg_ok, torch.isfinite(mine.gather(1, rnd))], dim=1)
        # Similarities with grad only for the candidates actually used (hard negatives cluster,
        # so this is a small matmul rather than a (P, K, D) gather and its slow scatter backward).
        used, slot = torch.unique(neg_pos, return_inverse=True)
    pos_f = (anc_f * b.fine[j]).sum(-1, keepdim=True)
    neg_f = (anc_f @ b.fine[cand[used]].T).gather(1, slot)
    loss_f = info_nce_logits(pos_f, neg_f, cfg.temperature, neg_ok)

    # Coarse: random negatives (shared by the anchors) outside the looser radius in the own
    # volume, plus voxels of the other volumes in the batch.
    sources = [b] + list(others)
    counts = torch.tensor([v.fine.shape[0] for v in sources], device=dev)
    cidx = torch.randint(0, int(counts.sum()), (cfg.coarse_negatives,), generator=gen, device=dev)
    starts = torch.cumsum(counts, 0) - counts
    negs, ok = [], []
    for v, s0, m in zip(sources, starts.tolist(), counts.tolist()):
        sel = cidx[(cidx >= s0) & (cidx < s0 + m)] - s0
        if len(sel) == 0:
            continue
        negs.append(v.coarse_at(sel, normalize=False))
        if v is b:
            ok.append(torch.cdist(a.world[pick], b.world[sel]) >= cfg.coarse_ignore_radius)
        else:
            ok.append(torch.ones(n_anc, len(sel), dtype=torch.bool, device=dev))
    pos_cs = (anc_c * b.coarse_at(j, normalize=False)).sum(-1, keepdim=True)
    loss_c = info_nce_logits(pos_cs, anc_c @ torch.cat(negs).T, cfg.temperature, torch.cat(ok, dim=1))

    with torch.no_grad():
        neg_max = neg_f.masked_fill(~neg_ok, float("-inf")).max(dim=1).values
        acc = (pos_f[:, 0] > neg_max).float().mean()
    return {"fine": loss_f, "coarse": loss_c, "pos_sim": pos_f.detach().mean(), "acc": acc,
            "anchors": torch.tensor(float(n_anc), device=dev)}


def landmark_loss(fine1: torch.Tensor, coarse1: torch.Tensor, affine1: torch.Tensor,
                  fine2: torch.Tensor, coarse2: torch.Tensor, affine2: torch.Tensor,
                  cfg: LossConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fine + coarse pixel InfoNCE between two views of the same volumes.

    ``fine* (B, D, *Sf)``, ``coarse* (B, D, *Sc)`` L2-normalised embeddings of view 1 and 2;
    ``affine* (B, n+1, n+1)`` index->world (mm) affines of the *fine* grids. Anchors are taken
    in both directions (1->2 and 2->1). Returns ``loss`` plus detached diagnostics.
    """
    dev = fine1.device
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed) % (2**63 - 1))
    views = []
    for fine, coarse, aff in ((fine1, coarse1, affine1), (fine2, coarse2, affine2)):
        shape = tuple(fine.shape[2:])
        factor = max(math.ceil(f / c) for f, c in zip(shape, coarse.shape[2:]))
        row = []
        for b in range(fine.shape[0]):
            a = aff[b].to(dev, torch.float32)
            row.append(_View(fine[b].flatten(1).T.contiguous(), coarse[b], grid_world(a, shape), a, shape, factor))
        views.append(row)
    terms: dict[str, list[torch.Tensor]] = {}
    batch = fine1.shape[0]
    for src, dst in ((0, 1), (1, 0)):
        for b in range(batch):
            others = [views[dst][o] for o in range(batch) if o != b] if cfg.cross_volume_negatives else []
            out = _direction(views[src][b], views[dst][b], others, cfg, gen)
            if out is None:
                continue
            for k, v in out.items():
                terms.setdefault(k, []).append(v)
    if not terms:
        zero = (fine1.sum() + coarse1.sum() + fine2.sum() + coarse2.sum()) * 0.0
        return {"loss": zero, "loss_fine": zero.detach(), "loss_coarse": zero.detach(),
                "pos_sim": zero.detach(), "acc": zero.detach(), "anchors": zero.detach()}
    mean = {k: torch.stack(v).mean() for k, v in terms.items()}
    loss = mean["fine"] + cfg.coarse_weight * mean["coarse"]
    return {"loss": loss, "loss_fine": mean["fine"].detach(), "loss_coarse": mean["coarse"].detach(),
            "pos_sim": mean["pos_sim"], "acc": mean["acc"], "anchors": torch.stack(terms["anchors"]).sum()}
