"""Linear CKA and the occlusion-invariance analysis (Kong & Zhang, CVPR 2023).

For every block of a frozen encoder, CKA between the features of masked inputs and of the
full inputs, at mask ratios 0.1 ... 0.9. MIM-trained encoders stay high; encoders that never
saw occlusion drop. Occlusion is applied the way each encoder family sees it:

- ViT, `mode="drop"`: the masked patches are removed (visible-token forward, as in MAE);
  rows are the visible tokens, compared with the same tokens of the full forward.
- any encoder, `mode="zero"`: masked patches are zeroed in pixel space and the encoder runs
  densely; rows are all tokens (ViT) or all feature-map positions (conv stages).

`pool="mean"` (default) compares one mean-pooled row per image, with the debiased CKA estimator
(few rows); `pool="tokens"` compares token rows (many rows, plain linear CKA).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from alice3d.core.masking import gather_tokens, mask_to_image, random_masking
from alice3d.encoders.resnet import ResNetEncoder
from alice3d.encoders.vit import ViTEncoder
from alice3d.methods.convmim import default_mask_patch

__all__ = [
    "DEFAULT_RATIOS",
    "linear_cka",
    "block_features",
    "occlusion_invariance",
    "write_cka_csv",
    "read_cka_csv",
    "plot_cka",
]

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9)  # 0.75: MAE's ratio


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """Linear CKA between `x (N, D1)` and `y (N, D2)` (rows = the same N examples).

    `||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)` with column-centred Xc, Yc; invariant to
    orthogonal transforms and isotropic scaling of either side. `debiased=True` uses the
    unbiased HSIC estimator (Song et al. 2012), which removes the upward bias when N is not
    much larger than the feature width.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: expected (N, D1) and (N, D2) with equal N, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if n < (4 if debiased else 2):
        raise ValueError(f"linear_cka: need at least {4 if debiased else 2} rows, got {n}")
    x = x.detach().double()
    y = y.detach().double()
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if not debiased:
        xy = (y.t() @ x).pow(2).sum()
        xx = (x.t() @ x).pow(2).sum().sqrt()
        yy = (y.t() @ y).pow(2).sum().sqrt()
        return float(xy / (xx * yy).clamp_min(1e-300))
    kx, ky = x @ x.t(), y @ y.t()

    def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        k = k.clone().fill_diagonal_(0)
        l = l.clone().fill_diagonal_(0)
        ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
        term = (k * l).sum() + (ones.t() @ k @ ones) * (ones.t() @ l @ ones) / ((n - 1) * (n - 2))
        term = term - 2.0 / (n - 2) * (ones.t() @ k @ l @ ones)
        return term.squeeze() / (n * (n - 3))

    denom = (hsic(kx, kx) * hsic(ky, ky)).clamp_min(1e-300).sqrt()
    return float(hsic(kx, ky) / denom)


def _tokens_of(feature: torch.Tensor) -> torch.Tensor:
    """Conv map `(B, C, *s)` -> `(B, prod(s), C)`; tokens pass through."""
    return feature.flatten(2).transpose(1, 2) if feature.ndim > 3 else feature


@torch.no_grad()
def block_features(
    encoder: nn.Module, x: torch.Tensor, ids_keep: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Per-block features as tokens `[(B, L_i, D_i)]`: ViT block outputs (prefix tokens dropped)
    or the four ResNet stage maps. `ids_keep` (ViT only) runs the visible-token forward."""
    if isinstance(encoder, ViTEncoder):
        _, hidden = encoder(x, ids_keep=ids_keep, return_hidden=True)
        p = encoder.num_prefix_tokens
        return [h[:, p:] for h in hidden]
    if ids_keep is not None:
        raise ValueError("block_features: ids_keep (token dropping) needs a ViT encoder; use mode='zero'")
    if isinstance(encoder, ResNetEncoder):
        return [_tokens_of(f) for f in encoder(x)]
    out = encoder(x)
    feats = out if isinstance(out, (list, tuple)) else [out]
    return [_tokens_of(f) for f in feats]


def _default_mask_patch(encoder: nn.Module, spatial_dims: int) -> tuple[int, ...]:
    if isinstance(encoder, ViTEncoder):
        return tuple(encoder.patch_size)

    return (default_mask_patch(spatial_dims),) * spatial_dims


@torch.no_grad()
def occlusion_invariance(
    encoder: nn.Module,
    images: torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    mode: str = "auto",
    pool: str = "mean",
    mask_patch: int | Sequence[int] | None = None,
    batch_size: int = 16,
    max_rows: int = 8192,
    seed: int = 0,
    debiased: bool | None = None,
) -> dict[float, list[float]]:
    """`{ratio: [CKA of block 1, ..., block n]}` between masked and full inputs.

    images `(N, C, *spatial)`. mode: `auto` (drop for ViT, zero otherwise), `drop`, `zero`.
    The masks are drawn from `seed`, so two encoders analysed with the same seed see the
    same occlusions. Rows beyond `max_rows` are subsampled (the same rows on both sides).
    debiased: None = the unbiased estimator for `pool="mean"` (few rows), plain linear CKA for tokens.
    """
    if images.ndim < 3 or images.shape[0] < 2:
        raise ValueError(f"occlusion_invariance: expected images (N >= 2, C, *spatial), got {tuple(images.shape)}")
    if mode == "auto":
        mode = "drop" if isinstance(encoder, ViTEncoder) else "zero"
    if mode not in ("drop", "zero"):
        raise ValueError(f"occlusion_invariance: mode must be 'auto', 'drop' or 'zero', got {mode!r}")
    if pool not in ("tokens", "mean"):
        raise ValueError(f"occlusion_invariance: pool must be 'tokens' or 'mean', got {pool!r}")
    if mode == "drop" and not isinstance(encoder, ViTEncoder):
        raise ValueError("occlusion_invariance: mode='drop' needs a ViT encoder; use mode='zero'")
    if debiased is None:
        debiased = pool == "mean"
    nd = images.ndim - 2
    patch = _default_mask_patch(encoder, nd) if mask_patch is None else (
        (mask_patch,) * nd if isinstance(mask_patch, int) else tuple(mask_patch))
    if any(s % p for s, p in zip(images.shape[2:], patch)):
        raise ValueError(f"occlusion_invariance: image size {tuple(images.shape[2:])} is not divisible by mask patch {patch}")
    grid = tuple(s // p for s, p in zip(images.shape[2:], patch))
    n_tokens = math.prod(grid)
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    results: dict[float, list[float]] = {}
    try:
        full_cache: list[list[torch.Tensor]] = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            full_cache.append([f.float().cpu() for f in block_features(encoder, x)])
        for ratio in ratios:
            gen = torch.Generator().manual_seed(seed + int(round(1000 * ratio)))
            rows_full: list[list[torch.Tensor]] = []
            rows_mask: list[list[torch.Tensor]] = []
            for b, start in enumerate(range(0, images.shape[0], batch_size)):
                x = images[start:start + batch_size].to(device)
                masking = random_masking(x.shape[0], n_tokens, ratio, generator=gen).to(device)
                if mode == "drop":
                    masked = [f.float().cpu() for f in block_features(encoder, x, ids_keep=masking.ids_keep)]
                    full = [gather_tokens(f, masking.ids_keep.cpu()) for f in full_cache[b]]
                    if pool == "mean":
                        full = [f.mean(1, keepdim=True) for f in full_cache[b]]
                        masked = [f.mean(1, keepdim=True) for f in masked]
                else:
                    hidden = mask_to_image(masking.mask, grid, patch).to(x.dtype)
                    masked = [f.float().cpu() for f in block_features(encoder, x * (1 - hidden))]
                    full = full_cache[b]
                    if pool == "mean":
                        full = [f.mean(1, keepdim=True) for f in full]
                        masked = [f.mean(1, keepdim=True) for f in masked]
                rows_full.append([f.reshape(-1, f.shape[-1]) for f in full])
                rows_mask.append([f.reshape(-1, f.shape[-1]) for f in masked])
            scores = []
            for k in range(len(rows_full[0])):
                a = torch.cat([r[k] for r in rows_full])
                m = torch.cat([r[k] for r in rows_mask])
                if a.shape[0] > max_rows:
                    keep = torch.randperm(a.shape[0], generator=gen)[:max_rows]
                    a, m = a[keep], m[keep]
                scores.append(linear_cka(a, m, debiased=debiased))
            results[float(ratio)] = scores
    finally:
        encoder.train(was_training)
    return results


def write_cka_csv(results: dict[float, list[float]], path: str | os.PathLike, label: str = "") -> Path:
    """Rows `label, mask_ratio, block, cka` (blocks counted from 1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "mask_ratio", "block", "cka"])
        for ratio, scores in results.items():
            for k, v in enumerate(scores, start=1):
                w.writerow([label, f"{ratio:g}", k, f"{v:.6f}"])
    return path


def read_cka_csv(path: str | os.PathLike) -> dict[float, list[float]]:
    out: dict[float, dict[int, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(float(row["mask_ratio"]), {})[int(row["block"])] = float(row["cka"])
    return {r: [v[k] for k in sorted(v)] for r, v in out.items()}


def plot_cka(results: dict[float, list[float]], path: str | os.PathLike, title: str = "CKA: masked vs full input") -> Path:
    """One line per mask ratio, CKA against block index."""
    from alice3d.viz.plots import line_plot  # matplotlib is heavy: imported only when plotting

    series = {f"mask {r:g}": (np.arange(1, len(v) + 1), np.asarray(v)) for r, v in sorted(results.items())}
    return line_plot(series, path, title=title, xlabel="block", ylabel="linear CKA", ylim=(0.0, 1.02), integer_x=True)
