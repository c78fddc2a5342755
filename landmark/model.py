"""Landmark embedding network: ResNet-style backbone + FPN, fine and coarse heads.

Grid convention (used everywhere in :mod:`landmark`): an output of stride ``s`` has
voxel ``i`` centred on input voxel ``s * i + (s - 1) / 2``, i.e. on the centre of the
``s``-block it summarises. Every down-sampling is a 2-average-pool (exactly centred
that way) and every up-sampling is linear interpolation with ``align_corners=False``
(the same convention), so embeddings of two crops of one volume line up in world
coordinates without half-voxel offsets, whatever their orientation.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from landmark.config import ModelConfig


def _conv(spatial_dims: int):
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


def _norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1](channels)
    return nn.Identity()


def _center(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[spatial_dims - 1](channels, affine=False)
    return nn.Identity()


def _pool(spatial_dims: int):
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[spatial_dims - 1](2)


class BasicBlock(nn.Module):
    """Two 3-convolutions with a residual connection (1-convolution when widths differ)."""

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, norm: str):
        super().__init__()
        conv = _conv(spatial_dims)
        bias = norm == "none"
        self.conv1 = conv(c_in, c_out, 3, padding=1, bias=bias)
        self.norm1 = _norm(norm, spatial_dims, c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, spatial_dims, c_out)
        self.skip = (
            nn.Sequential(conv(c_in, c_out, 1, bias=bias), _norm(norm, spatial_dims, c_out))
            if c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.skip(x), inplace=True)


class LandmarkNet(nn.Module):
    """``x (B, C, *S) -> (fine (B, D, *S/2), coarse (B, D, *S/2**coarse_level))``, both L2-normalised.

    Every side of ``S`` must be a multiple of :attr:`multiple`; :func:`embed_volume`
    pads arbitrary inputs.
    """

    def __init__(self, cfg: ModelConfig, spatial_dims: int = 3):
        super().__init__()
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        conv = _conv(spatial_dims)
        bias = cfg.norm == "none"
        self.stem = nn.Sequential(
            conv(cfg.in_channels, cfg.stem_width, 3, padding=1, bias=bias),
            _norm(cfg.norm, spatial_dims, cfg.stem_width),
            nn.ReLU(inplace=True),
        )
        stages = []
        c = cfg.stem_width
        for width, n in zip(cfg.widths, cfg.blocks):
            blocks: list[nn.Module] = [_pool(spatial_dims)]
            for _ in range(max(1, n)):
                blocks.append(BasicBlock(spatial_dims, c, width, cfg.norm))
                c = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        top = cfg.coarse_level
        self.lateral = nn.ModuleList(conv(w, cfg.fpn_dim, 1) for w in cfg.widths[:top])
        self.smooth = conv(cfg.fpn_dim, cfg.fpn_dim, 3, padding=1)
        # The heads end in a centring norm: features after ReLUs share one dominant direction, and
        # L2-normalised embeddings would start collapsed (cosine ~1 everywhere) and learn slowly.
        self.fine_head = nn.Sequential(
            conv(cfg.fpn_dim, cfg.fpn_dim, 1), nn.ReLU(inplace=True), conv(cfg.fpn_dim, cfg.embed_dim, 1),
            _center(cfg.norm, spatial_dims, cfg.embed_dim),
        )
        c_top = cfg.widths[-1]
        self.coarse_head = nn.Sequential(
            conv(cfg.fpn_dim + (c_top if len(cfg.widths) > top else 0), cfg.fpn_dim, 1),
            nn.ReLU(inplace=True),
            conv(cfg.fpn_dim, cfg.embed_dim, 1),
            _center(cfg.norm, spatial_dims, cfg.embed_dim),
        )

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this (2 ** number of stages)."""
        return 2 ** len(self.stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bad = [s for s in x.shape[2:] if s % self.multiple]
        if x.ndim != self.spatial_dims + 2 or bad:
            raise ValueError(
                f"LandmarkNet expects (B, C, *S) with {self.spatial_dims} spatial dims, each a multiple "
                f"of {self.multiple}; got shape {tuple(x.shape)}"
            )
        feats = []
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        top = self.cfg.coarse_level
        mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
        p = self.lateral[top - 1](feats[top - 1])
        coarse_in = p
        if len(feats) > top:
            # Deeper stages (beyond the coarse stride) add context to the coarse head only.
            deep = F.interpolate(feats[-1], size=p.shape[2:], mode=mode, align_corners=False)
            coarse_in = torch.cat([p, deep], dim=1)
        for level in range(top - 2, -1, -1):
            lat = self.lateral[level](feats[level])
            p = lat + F.interpolate(p, size=lat.shape[2:], mode=mode, align_corners=False)
        fine = self.fine_head(F.relu(self.smooth(p)))
        coarse = self.coarse_head(coarse_in)
        return F.normalize(fine, dim=1), F.normalize(coarse, dim=1)


def build_model(cfg: ModelConfig, spatial_dims: int = 3) -> LandmarkNet:
    return LandmarkNet(cfg, spatial_dims)


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """Pad the spatial sides of ``(B, C, *S)`` at their far end up to a multiple (index 0 stays put)."""
    pad: list[int] = []
    for s in reversed(x.shape[2:]):
        pad += [0, (-s) % multiple]
    return F.pad(x, pad, value=value) if any(pad) else x


@torch.no_grad()
def embed_volume(
    net: LandmarkNet, x: torch.Tensor, pad_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed a normalised volume ``(C, *S)`` -> ``fine (D, *ceil(S/2))``, ``coarse (D, *ceil(S/sc))``.

    Padding (background value) sits at the far end, so output voxel ``i`` keeps the
    grid convention of the module docstring relative to the unpadded input.
    """
    if x.ndim != net.spatial_dims + 1:
        raise ValueError(f"embed_volume expects (C, *S) with {net.spatial_dims} spatial dims, got {tuple(x.shape)}")
    shape = x.shape[1:]
    fine, coarse = net(pad_to_multiple(x[None], net.multiple, pad_value))
    fs = [math.ceil(s / 2) for s in shape]
    cs = [math.ceil(s / net.cfg.coarse_stride) for s in shape]
    fine = fine[(0, slice(None), *[slice(0, n) for n in fs])]
    coarse = coarse[(0, slice(None), *[slice(0, n) for n in cs])]
    return fine, coarse


def grid_affine(affine: torch.Tensor | Sequence, stride: int) -> torch.Tensor:
    """Affine of a stride-``s`` output grid from the input's voxel->world affine ``(4, 4)``."""
    a = torch.as_tensor(affine, dtype=torch.float64)
    n = a.shape[-1] - 1
    down = torch.eye(n + 1, dtype=torch.float64)
    down[:n, :n] *= stride
    down[:n, n] = (stride - 1) / 2
    return a @ down


@torch.no_grad()
def recalibrate_norms(net: LandmarkNet, inputs) -> LandmarkNet:
    """Set batch-norm statistics to the exact mean/variance over ``inputs`` (each ``(B, C, *S)``).

    Gives an untrained network data-adapted statistics (a fair "random features" baseline)
    and refreshes statistics after weights were changed outside training.
    """
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    was_training = net.training
    net.train()
    for x in inputs:
        net(pad_to_multiple(x, net.multiple))
    for m, (mom, _) in zip(norms, saved):
        m.momentum = mom
    net.train(was_training)
    return net
