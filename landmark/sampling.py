"""Training views for the landmark model: two augmented crops of one volume.

Each view is a regular grid placed in the volume with its own zoom (scale 0.8-1.2),
so its voxels sit at known world positions. The dataset returns the views together
with the affines of their *fine embedding grids* (index -> world mm); the loss pairs
voxels by those world positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alice3d.data.geometry import apply_affine
from alice3d.train.module import BatchDataset
from landmark.config import CropConfig
from landmark.model import grid_affine


@dataclass
class TrainVolume:
    """A normalised volume kept in memory: ``image (1, *S)`` float32, voxel->world ``affine (n+1, n+1)``."""

    image: torch.Tensor
    affine: np.ndarray
    body: np.ndarray  # (K, n) voxel indices of body voxels (seed points)
    name: str = ""


def make_train_volume(image: np.ndarray | torch.Tensor, affine: np.ndarray, body_threshold: float,
                      name: str = "", max_seeds: int = 20000, seed: int = 0) -> TrainVolume:
    """Wrap a normalised array ``(*S)`` or ``(C, *S)``; seeds = voxels whose channel 0 exceeds ``body_threshold``."""
    img = torch.as_tensor(np.asarray(image, dtype=np.float32))
    n = affine.shape[0] - 1 if hasattr(affine, "shape") else 3
    if img.ndim == n:
        img = img[None]
    body = np.argwhere(img[0].numpy() > body_threshold)
    if len(body) == 0:
        # A volume without body voxels still trains (seeds anywhere) rather than being dropped silently.
        body = np.argwhere(np.ones(img.shape[1:], dtype=bool))
    if len(body) > max_seeds:
        body = body[np.random.default_rng(seed).choice(len(body), max_seeds, replace=False)]
    return TrainVolume(img.contiguous(), np.asarray(affine, dtype=np.float64), body, name)


def crop_grid(center: np.ndarray, scale: float, size: Sequence[int]) -> np.ndarray:
    """Voxel->voxel affine ``(n+1, n+1)`` from crop index to (continuous) volume index.

    Crop voxel ``j`` sits at volume index ``center + (j - (size - 1) / 2) * scale``.
    """
    n = len(size)
    m = np.eye(n + 1)
    m[:n, :n] *= scale
    m[:n, n] = np.asarray(center, dtype=np.float64) - (np.asarray(size, dtype=np.float64) - 1) / 2 * scale
    return m


def sample_crop(image: torch.Tensor, index_map: np.ndarray, size: Sequence[int], pad_value: float = 0.0) -> torch.Tensor:
    """Trilinearly resample ``image (C, *S)`` on the crop grid ``index_map``; outside = ``pad_value``."""
    shape = image.shape[1:]
    axes = [torch.arange(s, dtype=torch.float32) for s in size]
    idx = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    vol_idx = apply_affine(index_map, idx)
    denom = torch.tensor([max(s - 1, 1) for s in shape], dtype=torch.float32)
    grid = (2 * vol_idx / denom - 1).flip(-1)  # grid_sample wants the last spatial axis first
    out = F.grid_sample((image - pad_value)[None], grid[None], mode="bilinear", padding_mode="zeros",
                        align_corners=True)[0]
    return out + pad_value


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, *S)`` with ``sigma`` in voxels (borders replicated)."""
    if sigma <= 0:
        return x
    n = x.ndim - 1
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    y = x[None]
    for d in range(n):
        shape = [1] * n
        shape[d] = len(k)
        pad = [0, 0] * n
        pad[2 * (n - 1 - d)] = pad[2 * (n - 1 - d) + 1] = r
        y = conv(F.pad(y, pad, mode="replicate"), k.reshape(1, 1, *shape).expand(x.shape[0], 1, *shape),
                 groups=x.shape[0])
    return y[0]


def augment(x: torch.Tensor, cfg: CropConfig, rng: np.random.Generator) -> torch.Tensor:
    """Gamma curve, blur, intensity jitter and Gaussian noise (none of them moves anatomy).

    The gamma curve changes the contrast between tissues differently in each view, as contrast
    phases and scanners do between patients.
    """
    if cfg.gamma_range[0] != 1.0 or cfg.gamma_range[1] != 1.0:
        lo, hi = np.log(cfg.gamma_range[0]), np.log(cfg.gamma_range[1])
        x = x.clamp(0.0, 1.0) ** float(np.exp(rng.uniform(lo, hi)))
    if rng.random() < cfg.blur_prob:
        x = gaussian_blur(x, float(rng.uniform(*cfg.blur_sigma)))
    j = cfg.intensity_jitter
    if j > 0:
        x = x * float(1 + rng.uniform(-j, j)) + float(rng.uniform(-j, j))
    if cfg.noise_std > 0:
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x = x + float(rng.uniform(0, cfg.noise_std)) * torch.randn(x.shape, generator=g)
    return x


MIN_OVERLAP = 0.25  # per axis, fraction of the smaller view's extent two views must share
INDEPENDENT_TRIES = 8  # draws of an independent second seed before falling back to the shared one


def views_overlap(center1: np.ndarray, extent1: np.ndarray, center2: np.ndarray, extent2: np.ndarray,
                  min_fraction: float = MIN_OVERLAP) -> bool:
    """Whether two axis-aligned boxes (volume index space) share ``min_fraction`` of the smaller
    extent along every axis."""
    shared = np.minimum(center1 + extent1 / 2, center2 + extent2 / 2) - np.maximum(center1 - extent1 / 2,
                                                                                   center2 - extent2 / 2)
    return bool(np.all(shared >= min_fraction * np.minimum(extent1, extent2)))


def sample_view_pair(vol: TrainVolume, cfg: CropConfig, rng: np.random.Generator, fine_stride: int = 2) -> dict:
    """Two views of ``vol``: ``view1/2 (1, *size)``, fine-grid affines ``affine1/2 (n+1, n+1)``.

    With probability ``shared_seed_prob`` both views contain one seed point; otherwise view 2
    has its own seed, redrawn until the views overlap (else the pair gives the loss no anchor
    and the step trains on nothing). A shared-seed pair overlaps by >= (1 - 2 * shift_frac) of
    the smaller extent (0.4 at the default 0.3), so it is never redrawn.
    """
    size = tuple(cfg.size)

    def geometry(seed_pt: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        scale = float(rng.uniform(*cfg.scale_range))
        extent = np.asarray(size, dtype=np.float64) * scale
        return seed_pt + rng.uniform(-cfg.shift_frac, cfg.shift_frac, size=len(size)) * extent, scale, extent

    def random_seed() -> np.ndarray:
        return vol.body[rng.integers(len(vol.body))].astype(np.float64)

    def view(k: int, center: np.ndarray, scale: float) -> None:
        index_map = crop_grid(center, scale, size)
        out[f"view{k}"] = augment(sample_crop(vol.image, index_map, size), cfg, rng)
        world = vol.affine @ index_map  # crop index -> world
        out[f"affine{k}"] = grid_affine(world, fine_stride).float()

    out: dict = {}
    shared = random_seed()
    center1, scale1, extent1 = geometry(shared)
    view(1, center1, scale1)
    if rng.random() < cfg.shared_seed_prob:
        center2, scale2, _ = geometry(shared)
    else:
        for _ in range(INDEPENDENT_TRIES):
            center2, scale2, extent2 = geometry(random_seed())
            if views_overlap(center1, extent1, center2, extent2):
                break
        else:
            center2, scale2, _ = geometry(shared)
    view(2, center2, scale2)
    return out


class ViewPairDataset(BatchDataset):
    """Item ``i`` (a training micro-step) = a whole batch, deterministic in ``(seed, i)``.

    Returns ``view1, view2 (B, 1, *size)``, ``affine1, affine2 (B, n+1, n+1)`` (fine grids,
    index -> world mm) and ``seed`` (for the loss's anchor sampling).
    """

    def __init__(self, volumes: Sequence[TrainVolume], cfg: CropConfig, batch_size: int, seed: int = 0,
                 fine_stride: int = 2):
        if not volumes:
            raise ValueError("ViewPairDataset needs at least one volume")
        self.volumes = list(volumes)
        self.cfg, self.batch_size, self.seed, self.fine_stride = cfg, batch_size, seed, fine_stride

    def __len__(self) -> int:
        return 2**31 - 1

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)])
        n = len(self.volumes)
        ids = rng.choice(n, self.batch_size, replace=self.batch_size > n)
        pairs = [sample_view_pair(self.volumes[j], self.cfg, rng, self.fine_stride) for j in ids]
        batch = {k: torch.stack([p[k] for p in pairs]) for k in pairs[0]}
        batch["seed"] = torch.tensor(int(rng.integers(2**62)), dtype=torch.int64)
        batch["ids"] = torch.as_tensor(ids, dtype=torch.int64)
        return batch
