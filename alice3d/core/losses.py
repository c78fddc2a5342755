"""SSL loss functions: masked pixel MSE, negative cosine, InfoNCE, DINO cross-entropy.

Half-precision inputs are upcast to float32 (AMP-safe); every loss returns a scalar.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dist import all_gather_with_grad, all_reduce_sum, rank, world_size

__all__ = ["normalize_patches", "masked_mse", "negative_cosine", "info_nce", "info_nce_logits", "DINOLoss"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE norm-pix target: per token `(t - mean) / sqrt(var + eps)` over the last axis.

    `var` is torch's default unbiased variance, as in MAE's reference code.
    """
    if target.shape[-1] < 2:
        raise ValueError(
            f"normalize_patches: need at least 2 values per token to normalise, got shape {tuple(target.shape)}"
        )
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def masked_mse(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """MAE loss. pred/target `(B, L, P)`, mask `(B, L)` (True / 1 = counted).

    Per-token MSE (mean over P), then summed over masked tokens and divided by the number of
    masked tokens in the whole batch. An all-False mask gives 0. The target is used as given
    (detach it yourself if it carries a graph you do not want to train).
    """
    if pred.shape != target.shape:
        raise ValueError(f"masked_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if mask.shape != pred.shape[:-1]:
        raise ValueError(f"masked_mse: mask {tuple(mask.shape)} must be pred.shape[:-1] = {tuple(pred.shape[:-1])}")
    target = _upcast(target)
    if norm_pix:
        target = normalize_patches(target, eps)
    per_token = (_upcast(pred) - target).pow(2).mean(dim=-1)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL/SimSiam: `-cos(p, stopgrad(z))` over the last axis, averaged over all other axes."""
    if p.shape != z.shape:
        raise ValueError(f"negative_cosine: p {tuple(p.shape)} and z {tuple(z.shape)} differ")
    p = F.normalize(_upcast(p), dim=-1)
    z = F.normalize(_upcast(z.detach()), dim=-1)
    return -(p * z).sum(dim=-1).mean()


def info_nce_logits(
    pos: torch.Tensor, neg: torch.Tensor, temperature: float, neg_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean InfoNCE from similarities already computed: ``pos (N, 1)``, ``neg (N, K)``.

    Per row: ``-log(exp(pos/t) / (exp(pos/t) + sum_k exp(neg_k/t)))``. ``neg_valid (N, K)`` bool,
    False = that slot holds no negative and is left out of the sum (a row with none left gives
    0). For callers that mine negatives per anchor or build the similarities themselves (the
    landmark pixel loss reads them off a small matmul instead of a ``(N, K, D)`` gather).
    """
    if pos.ndim != 2 or pos.shape[1] != 1 or neg.ndim != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"info_nce_logits: expected pos (N, 1) and neg (N, K), got {tuple(pos.shape)} and "
                         f"{tuple(neg.shape)}")
    pos, neg = _upcast(pos), _upcast(neg)
    if neg_valid is not None:
        if neg_valid.shape != neg.shape:
            raise ValueError(f"info_nce_logits: neg_valid {tuple(neg_valid.shape)} must match neg {tuple(neg.shape)}")
        neg = neg.masked_fill(~neg_valid, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float = 0.2,
    gather: bool = False,
    self_negatives: bool = False,
    *,
    negatives: torch.Tensor | None = None,
    neg_valid: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """InfoNCE: row i of q `(N, D)` is positive with row i of k `(N, D)`, negatives = other rows of k.

    Leading axes beyond one are flattened (`(B, T, D)` -> `(B*T, D)` rows). Both are
    l2-normalised (unless `normalize=False`). With `gather=True` under torch.distributed
    (world > 1), k is gathered from all ranks (gradient flows to the local slice) and labels are
    offset by `rank * N`, so the mean of the rank losses equals the single-process loss on the
    concatenated batch. k is not detached here.

    `self_negatives=True` also puts the other rows of q in the denominator (ccMIM Eq. 7, the
    visible-visible pairs; SimCLR's NT-Xent from one side):
    `-log exp(q_i.k_i/t) / (sum_j exp(q_i.k_j/t) + sum_{j != i} exp(q_i.q_j/t))`, with q gathered
    like k when `gather` (gradient through every q term).

    `negatives (N, K, D)` gives each row its own negatives instead of the other rows of k
    (mined negatives, e.g. the landmark pixel loss), `neg_valid (N, K)` bool marks the filled
    slots (False = left out): `-log exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_k exp(q_i.n_ik/t))`,
    see `info_nce_logits`. Not combinable with `gather` or `self_negatives`.
    """
    if q.shape != k.shape:
        raise ValueError(f"info_nce: q {tuple(q.shape)} and k {tuple(k.shape)} differ")
    d = q.shape[-1]
    q = _upcast(q.reshape(-1, d))
    k = _upcast(k.reshape(-1, d))
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    n = q.shape[0]
    if negatives is not None:
        if gather or self_negatives:
            raise ValueError("info_nce: per-row negatives cannot be combined with gather or self_negatives")
        if negatives.ndim != 3 or negatives.shape[0] != n or negatives.shape[2] != d:
            raise ValueError(f"info_nce: negatives must be (N, K, D) = ({n}, K, {d}), got {tuple(negatives.shape)}")
        negatives = _upcast(negatives)
        if normalize:
            negatives = F.normalize(negatives, dim=-1)
        pos = (q * k).sum(-1, keepdim=True)
        return info_nce_logits(pos, torch.einsum("nd,nkd->nk", q, negatives), temperature, neg_valid)
    if neg_valid is not None:
        raise ValueError("info_nce: neg_valid needs negatives (N, K, D)")
    offset = 0
    q_all = q
    if gather and world_size() > 1:
        k = all_gather_with_grad(k)
        if self_negatives:
            q_all = all_gather_with_grad(q)
        offset = rank() * n
    logits = q @ k.t() / temperature
    labels = torch.arange(n, device=q.device) + offset
    if self_negatives:
        qq = q @ q_all.t() / temperature
        own = torch.zeros_like(qq, dtype=torch.bool)
        own[torch.arange(n, device=q.device), labels] = True  # q_i with itself is neither positive nor negative
        logits = torch.cat([logits, qq.masked_fill(own, float("-inf"))], dim=1)
    return F.cross_entropy(logits, labels)


class DINOLoss(nn.Module):
    """DINO cross-entropy between a centred, sharpened teacher and the student.

    forward(student_logits, teacher_logits, step) with logits `(..., out_dim)` of equal shape:
    `mean(-softmax((t - center) / T_t(step)) * log_softmax(s / T_s))`, teacher detached. In
    training mode the `center` buffer `(1, out_dim)` is then updated with the teacher batch mean
    (summed over ranks when distributed): `c = m * c + (1 - m) * mean(t)`.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_steps: int = 0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_steps = warmup_steps
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, step: int) -> float:
        """Linear from `warmup_teacher_temp` at step 0 to `teacher_temp` at `warmup_steps`, then flat."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            frac = max(step, 0) / self.warmup_steps
            return self.warmup_teacher_temp + frac * (self.teacher_temp - self.warmup_teacher_temp)
        return self.teacher_temp

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, step: int = 0) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.shape[-1] != self.out_dim:
            raise ValueError(
                f"DINOLoss: student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
                f"must have equal shapes ending in out_dim={self.out_dim}"
            )
        teacher = _upcast(teacher_logits.detach())
        probs = F.softmax((teacher - self.center) / self.teacher_temperature(step), dim=-1)
        log_probs = F.log_softmax(_upcast(student_logits) / self.student_temp, dim=-1)
        loss = -(probs * log_probs).sum(dim=-1).mean()
        if self.training:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        flat = teacher_logits.detach().float().reshape(-1, self.out_dim)
        stats = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])
        all_reduce_sum(stats)
        batch_center = (stats[:-1] / stats[-1].clamp_min(1.0)).unsqueeze(0)
        self.center.mul_(self.center_momentum).add_(batch_center.to(self.center.dtype), alpha=1 - self.center_momentum)
