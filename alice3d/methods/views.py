"""Online / target views for siamese masked-image modeling, as batched torch ops.

MONAI's `Rand*d` transforms draw and apply one sample at a time on the CPU. Here a whole
batch `(B, C, *spatial)` is warped by one `affine_grid` + `grid_sample` call with per-sample
matrices, so the strong augmentation runs on whatever device the batch lives on (the GPU
during training) and never holds up the data loader. Everything is N-D: rotations are
composed from one planar rotation per pair of spatial axes (one angle in 2D, three in 3D).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alice3d.core.masking import MaskInfo, random_masking

__all__ = [
    "StrongAugConfig", "OnlineAugConfig", "AliceViews", "random_affine", "affine_warp", "strong_augment",
    "random_resized_crop", "make_alice_views", "make_seeded_alice_views",
]


@dataclass
class StrongAugConfig:
    """Strong augmentation of the intact (target) views.

    rotate_deg: max |angle| of the rotation in each plane of spatial axes (degrees).
    zoom: range of the isotropic zoom factor (>1 zooms in, i.e. a smaller region is resized
        to the full crop: the "resized" part of random resized rotation).
    flip_prob: probability of mirroring each spatial axis.
    intensity_scale, intensity_shift: x * (1 + U(-s, s)) + U(-t, t), per sample.
    """

    rotate_deg: float = 15.0
    zoom: tuple[float, float] = (0.9, 1.2)
    flip_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1

    def validate(self, prefix: str = "aug") -> None:
        if self.rotate_deg < 0:
            raise ValueError(f"{prefix}.rotate_deg must be >= 0, got {self.rotate_deg}")
        if not (0 < self.zoom[0] <= self.zoom[1]):
            raise ValueError(f"{prefix}.zoom must be (low, high) with 0 < low <= high, got {self.zoom}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"{prefix}.flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.intensity_scale < 0 or self.intensity_shift < 0:
            raise ValueError(
                f"{prefix}.intensity_scale / intensity_shift must be >= 0, got "
                f"{self.intensity_scale} / {self.intensity_shift}"
            )


@dataclass
class OnlineAugConfig:
    """MAE-style augmentation of the masked (online) views: random resized crop + flips, before masking.

    scale: range of the fraction of the crop's volume (area in 2D) that is cut out and resized
        back to the full crop (MAE: (0.2, 1.0) of the area in 2D).
    ratio: range of the per-axis stretch of the cut-out box (log-uniform per axis, then
        rescaled so the box keeps the drawn volume; MAE: aspect ratio (3/4, 4/3)).
    flip_prob: probability of mirroring each spatial axis.
    enabled: False gives the online branch the crop as it is (the target views are unaffected).
    """

    enabled: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5

    def validate(self, prefix: str = "online_aug") -> None:
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"{prefix}.scale must be (low, high) with 0 < low <= high <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= 1 <= self.ratio[1]):
            raise ValueError(f"{prefix}.ratio must be (low, high) with 0 < low <= 1 <= high, got {self.ratio}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"{prefix}.flip_prob must be in [0, 1], got {self.flip_prob}")


def _uniform(shape: tuple[int, ...], low: float, high: float, device, generator) -> torch.Tensor:
    """U[low, high) drawn on the generator's device (if any) and moved to `device`."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device).to(device)
    return low + (high - low) * u


def random_affine(
    batch: int, spatial_dims: int, cfg: StrongAugConfig, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample `(B, nd, nd)` matrices `R @ Flip / zoom` in tensor-axis order (see `affine_warp`)."""
    nd = spatial_dims
    eye = torch.eye(nd, device=device).expand(batch, nd, nd)
    mat = eye.clone()
    max_angle = math.radians(cfg.rotate_deg)
    for i in range(nd):
        for j in range(i + 1, nd):
            angle = _uniform((batch,), -max_angle, max_angle, device, generator)
            c, s = angle.cos(), angle.sin()
            rot = eye.clone()
            rot[:, i, i], rot[:, j, j] = c, c
            rot[:, i, j], rot[:, j, i] = -s, s
            mat = rot @ mat
    flips = _uniform((batch, nd), 0.0, 1.0, device, generator) < cfg.flip_prob
    mat = mat * torch.where(flips, -1.0, 1.0).unsqueeze(1)  # scales the columns: flip, then rotate
    zoom = _uniform((batch,), cfg.zoom[0], cfg.zoom[1], device, generator)
    return mat / zoom.view(batch, 1, 1)


def affine_warp(x: torch.Tensor, matrices: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Resample `x (B, C, *spatial)` about its centre: output voxel p samples input at `A p`.

    `matrices (B, nd, nd)` act on centred voxel coordinates in tensor-axis order (axis 0 = first
    spatial axis), so angles are true angles on isotropic voxels even for non-cubic crops.
    Linear interpolation; `align_corners=False`, so flips and quarter turns are exact.
    """
    nd = x.ndim - 2
    if matrices.shape != (x.shape[0], nd, nd):
        raise ValueError(f"affine_warp: matrices {tuple(matrices.shape)} must be (B, {nd}, {nd}) for input {tuple(x.shape)}")
    half = torch.tensor([s / 2.0 for s in x.shape[2:]], device=x.device, dtype=torch.float32)
    # Normalised coordinates u = p / half; affine_grid orders them last axis first.
    theta = matrices.to(x.device, torch.float32) * half.view(1, 1, nd) / half.view(1, nd, 1)
    theta = theta.flip(1).flip(2)
    theta = torch.cat([theta, theta.new_zeros(x.shape[0], nd, 1)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    return out.to(x.dtype)


def strong_augment(
    x: torch.Tensor, cfg: StrongAugConfig | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random resized rotation + flips + intensity scale/shift of `x (B, C, *spatial)`, per sample."""
    cfg = cfg or StrongAugConfig()
    b, nd = x.shape[0], x.ndim - 2
    out = affine_warp(x, random_affine(b, nd, cfg, x.device, generator))
    view = (b,) + (1,) * (x.ndim - 1)
    scale = 1.0 + _uniform((b,), -cfg.intensity_scale, cfg.intensity_scale, x.device, generator)
    shift = _uniform((b,), -cfg.intensity_shift, cfg.intensity_shift, x.device, generator)
    return out * scale.view(view).to(out.dtype) + shift.view(view).to(out.dtype)


def random_resized_crop(
    x: torch.Tensor, cfg: OnlineAugConfig | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random box of each sample of `x (B, C, *spatial)`, resized to the full size and randomly flipped.

    Box sides (whole voxels, at least 1) have a volume fraction in `cfg.scale` and a per-axis
    stretch in `cfg.ratio`; the box lies inside the crop at a uniform random position. Resizing
    is (bi/tri)linear; the box is cut with integer bounds, so a full-size box is the input itself.
    """
    cfg = cfg or OnlineAugConfig()
    b, nd = x.shape[0], x.ndim - 2
    size = x.shape[2:]
    volume = _uniform((b, 1), cfg.scale[0], cfg.scale[1], x.device, generator)
    log_r = _uniform((b, nd), math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), x.device, generator)
    log_r = log_r - log_r.mean(dim=1, keepdim=True)  # the stretch keeps the drawn volume
    sides = (volume.log() / nd + log_r).exp().clamp(max=1.0)
    where = _uniform((b, nd), 0.0, 1.0, x.device, generator)
    flips = _uniform((b, nd), 0.0, 1.0, x.device, generator) < cfg.flip_prob
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
    # Box geometry is host-side integer work: one transfer, not one device sync per number.
    sides, where, flips = sides.tolist(), where.tolist(), flips.tolist()
    out = []
    for i in range(b):
        box = [max(1, min(n, round(sides[i][d] * n))) for d, n in enumerate(size)]
        start = [int(where[i][d] * (n - w + 1)) for d, (n, w) in enumerate(zip(size, box))]
        crop = x[(slice(i, i + 1), slice(None), *(slice(s0, s0 + w) for s0, w in zip(start, box)))]
        if tuple(box) != tuple(size):
            crop = F.interpolate(crop.float(), size=tuple(size), mode=mode, align_corners=False).to(x.dtype)
        axes = [2 + d for d in range(nd) if flips[i][d]]
        out.append(crop.flip(axes) if axes else crop)
    return torch.cat(out)


@dataclass
class AliceViews:
    """The four Alice views of a batch of query/key crops, stacked as `[Q; K]` along the batch.

    images `(2B, C, *spatial)`: Q then K after the online augmentation (random resized crop +
        flips, if any): the input of the masked online branch, which only ever sees the tokens
        in `masking.ids_keep` (X_u^Q, X_r^K), and its reconstruction target.
    masking: MaskInfo over the 2B rows (independent masks for Q and K).
    augmented `(2B, C, *spatial)`: intact strongly augmented X_w^Q then X_v^K (target branch).
    """

    images: torch.Tensor
    masking: MaskInfo
    augmented: torch.Tensor

    @property
    def batch(self) -> int:
        return self.images.shape[0] // 2


def make_alice_views(
    q: torch.Tensor,
    k: torch.Tensor,
    num_tokens: int,
    mask_ratio: float,
    aug: StrongAugConfig | None = None,
    generator: torch.Generator | None = None,
    online_aug: OnlineAugConfig | None = None,
) -> AliceViews:
    """`q`, `k (B, C, *spatial)` -> AliceViews; masks and augmentations drawn independently per row.

    The target views are strong augmentations of the crops themselves; `online_aug` (None or
    disabled: none) augments the online views independently of them.
    """
    if q.shape != k.shape:
        raise ValueError(f"make_alice_views: query {tuple(q.shape)} and key {tuple(k.shape)} crops differ in shape")
    images = torch.cat([q, k], dim=0)
    masking = random_masking(images.shape[0], num_tokens, mask_ratio, device=images.device, generator=generator)
    augmented = strong_augment(images, aug, generator)
    if online_aug is not None and online_aug.enabled:
        images = random_resized_crop(images, online_aug, generator)
    return AliceViews(images=images, masking=masking, augmented=augmented)


def make_seeded_alice_views(
    q: torch.Tensor,
    k: torch.Tensor,
    seeds: torch.Tensor | list[int],
    num_tokens: int,
    mask_ratio: float,
    aug: StrongAugConfig | None = None,
    online_aug: OnlineAugConfig | None = None,
) -> AliceViews:
    """Like `make_alice_views`, with the masks and augmentations of pair `i` drawn from `seeds[i]` alone.

    A pair's views then depend on the pair, not on which process or batch position it lands
    in, so a run on N processes draws exactly the views of the same global batch on one.
    """
    if q.shape != k.shape:
        raise ValueError(f"make_seeded_alice_views: query {tuple(q.shape)} and key {tuple(k.shape)} crops differ in shape")
    seeds = [int(s) for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]
    if len(seeds) != q.shape[0]:
        raise ValueError(f"make_seeded_alice_views: {len(seeds)} seeds for a batch of {q.shape[0]} pairs")
    per_pair = []
    for i, seed in enumerate(seeds):
        gen = torch.Generator(device=q.device).manual_seed(seed)
        per_pair.append(make_alice_views(q[i : i + 1], k[i : i + 1], num_tokens, mask_ratio, aug, gen, online_aug))
    # Each per-pair view is [Q_i; K_i]; reorder to [Q_0..Q_{B-1}; K_0..K_{B-1}].
    order = lambda get: torch.cat([get(v)[:1] for v in per_pair] + [get(v)[1:] for v in per_pair])  # noqa: E731
    masking = MaskInfo(
        mask=order(lambda v: v.masking.mask),
        ids_keep=order(lambda v: v.masking.ids_keep),
        ids_restore=order(lambda v: v.masking.ids_restore),
        ids_masked=order(lambda v: v.masking.ids_masked),
    )
    return AliceViews(images=order(lambda v: v.images), masking=masking, augmented=order(lambda v: v.augmented))
