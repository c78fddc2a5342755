"""Training views for the landmark model: two augmented crops of one volume.

Each view is a regular grid placed in the volume with its own zoom (scale 0.8-1.2),
so its voxels sit at known world positions. The dataset returns the views together
with the affines of their *fine embedding grids* (index -> world mm); the loss pairs
voxels by those world positions.

Training volumes are HU sources (:class:`HUTrainVolume`): a volume store's int16 HU read only
where a view lies (chunk by chunk), or an int16 array in memory for small data; the model's
input windows are computed per view, so memory does not grow with the cohort.
:class:`TrainVolume` holds ready-made input channels in memory (tests, synthetic images).
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

    def view(self, index_map: np.ndarray, size: Sequence[int]) -> torch.Tensor:
        """``(C, *size)`` resampled on the crop grid ``index_map`` (crop index -> volume index)."""
        return sample_crop(self.image, index_map, size)


def body_seeds(mask: np.ndarray, max_seeds: int, seed: int) -> np.ndarray:
    """``(K, n)`` int32 indices of ``mask``'s voxels, at most ``max_seeds`` drawn with ``default_rng(seed)``.

    The same voxels as ``np.argwhere(mask)[rng.choice(...)]``, without the ``(voxels, n)`` int64
    array of every body voxel; an empty mask gives seeds anywhere (the volume still trains).
    """
    flat = np.flatnonzero(mask)
    if len(flat) == 0:
        flat = np.arange(mask.size)
    if len(flat) > max_seeds:
        flat = flat[np.random.default_rng(seed).choice(len(flat), max_seeds, replace=False)]
    return np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(np.int32)


def make_train_volume(image: np.ndarray | torch.Tensor, affine: np.ndarray, body_threshold: float,
                      name: str = "", max_seeds: int = 20000, seed: int = 0) -> TrainVolume:
    """Wrap a normalised array ``(*S)`` or ``(C, *S)``; seeds = voxels whose channel 0 exceeds ``body_threshold``."""
    img = torch.as_tensor(np.asarray(image, dtype=np.float32))
    n = affine.shape[0] - 1 if hasattr(affine, "shape") else 3
    if img.ndim == n:
        img = img[None]
    body = body_seeds(img[0].numpy() > body_threshold, max_seeds, seed)
    return TrainVolume(img.contiguous(), np.asarray(affine, dtype=np.float64), body, name)


class HUArray:
    """An in-memory int16 HU volume ``(*S)`` with the reading interface of a store volume."""

    def __init__(self, hu: np.ndarray):
        self.hu = np.asarray(hu, dtype=np.int16)
        self.shape = tuple(self.hu.shape)

    def read_hu(self, region: tuple | None = None) -> np.ndarray:
        return self.hu if region is None else self.hu[region]


def window_tensor(hu: torch.Tensor, windows: Sequence[Sequence[float]]) -> torch.Tensor:
    """HU ``(*S)`` -> ``(len(windows), *S)``, each window scaled to [0, 1] and clipped (float32)."""
    return torch.stack([((hu - float(lo)) / (float(hi) - float(lo))).clamp(0.0, 1.0) for lo, hi in windows])


class HUTrainVolume:
    """A training volume read per view from HU: ``source.read_hu(region)`` gives int16 HU of a region
    (a :class:`alice3d.data.store.StoreVolume` reads only the chunks it touches; :class:`HUArray`
    slices memory). ``windows``: the input channels (primary window first), computed per view.

    A view equals resampling the volume's channel 0 (window applied per volume) on the crop grid:
    HU is clipped to the primary window before the trilinear interpolation, which is linear in
    it; the narrower extra windows are applied after it, as at matching time (resample, then window).
    """

    def __init__(self, source, affine: np.ndarray, body: np.ndarray, windows: Sequence[Sequence[float]],
                 name: str = ""):
        self.source = source
        self.shape = tuple(int(s) for s in source.shape)
        self.affine = np.asarray(affine, dtype=np.float64)
        self.body = np.asarray(body)
        self.windows = tuple((float(lo), float(hi)) for lo, hi in windows)
        self.name = name

    def region(self, index_map: np.ndarray, size: Sequence[int]) -> tuple[np.ndarray, np.ndarray] | None:
        """``(lo, hi)`` voxel box (hi exclusive) that trilinear sampling on the crop grid reads; None when
        the crop lies wholly outside the volume."""
        n = len(size)
        corners = np.array(np.meshgrid(*[(0.0, float(s) - 1) for s in size], indexing="ij")).reshape(n, -1).T
        idx = corners @ np.asarray(index_map)[:n, :n].T + np.asarray(index_map)[:n, n]
        shape = np.asarray(self.shape)
        # 1e-4 voxel of slack: the crop grid is evaluated again in float32 by sample_crop
        lo = np.clip(np.floor(idx.min(0) - 1e-4).astype(int), 0, shape)
        hi = np.clip(np.floor(idx.max(0) + 1e-4).astype(int) + 2, 0, shape)
        if np.any(hi <= lo):
            return None
        # >= 2 voxels per axis: on a 1-voxel axis grid_sample would not blend with the outside
        hi = np.minimum(np.maximum(hi, lo + 2), shape)
        lo = np.maximum(np.minimum(lo, hi - 2), 0)
        return lo, hi

    def view(self, index_map: np.ndarray, size: Sequence[int]) -> torch.Tensor:
        """``(len(windows), *size)`` float32: the windows of the HU resampled on ``index_map``."""
        size = tuple(int(s) for s in size)
        lo_hu, hi_hu = self.windows[0]
        box = self.region(index_map, size)
        if box is None:
            return torch.zeros((len(self.windows), *size))
        lo, hi = box
        sub = self.source.read_hu(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)))
        hu = torch.from_numpy(np.asarray(sub, dtype=np.float32)).clamp(lo_hu, hi_hu)
        shift = np.eye(len(size) + 1)
        shift[: len(size), len(size)] = -lo
        crop = sample_crop(hu[None], shift @ index_map, size, pad_value=lo_hu)[0]
        return window_tensor(crop, self.windows)


def make_hu_train_volume(source, affine: np.ndarray, windows: Sequence[Sequence[float]], body_threshold: float,
                         name: str = "", max_seeds: int = 20000, seed: int = 0) -> HUTrainVolume:
    """:class:`HUTrainVolume` whose seeds are the voxels above ``body_threshold`` in the primary window
    (the rule of :func:`make_train_volume`); reads the whole volume once, keeps only the seeds."""
    lo, hi = (float(w) for w in windows[0])
    hu = np.asarray(source.read_hu())
    body = body_seeds(np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) > body_threshold, max_seeds, seed)
    return HUTrainVolume(source, affine, body, windows, name)


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


def sample_view_pair(vol: TrainVolume | HUTrainVolume, cfg: CropConfig, rng: np.random.Generator, fine_stride: int = 2) -> dict:
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
        out[f"view{k}"] = augment(vol.view(index_map, size), cfg, rng)
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

    def __init__(self, volumes: Sequence[TrainVolume | HUTrainVolume], cfg: CropConfig, batch_size: int, seed: int = 0,
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
