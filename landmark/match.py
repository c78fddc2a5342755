"""Point matching between volumes with cached landmark embeddings, in world millimetres.

A volume is embedded once: reoriented to RAS, resampled to the model spacing, windowed,
run through the network; its fine and coarse embeddings are stored with the affines of
their grids (index -> world mm) in the on-disk cache (:mod:`landmark.embed_cache`) and
kept in a small in-memory LRU. Matching never touches voxel indices of the input arrays:
query points go world -> embedding grid of A, matches come back embedding grid of B ->
world, so any orientation (RAS, LPS, ...) and spacing works.

Similarity of a query with voxel ``v`` of B:
``S(v) = w * fine(v) + (1 - w) * up(coarse)(v)`` where ``up`` is the trilinear (grid
convention of :mod:`landmark.model`) upsampling of the coarse similarity map. The match
is ``argmax S`` over every voxel of B, optionally refined to sub-voxel precision.

Consistency (default ``affine``): matching each point on its own confuses levels along the
body axis (axial anatomy repeats), so by default every query is mapped through an affine
map A -> B fitted once per volume pair: a few hundred body anchors of A are matched by
argmax, anchors whose match does not lead back (B -> A) to within ``roundtrip_mm`` are
dropped, and a trimmed least-squares fit on the rest gives the map. Its score is the
combined similarity at the mapped point. ``none`` returns the per-point argmax.

Search modes: ``full`` computes the dense map; ``pruned`` is branch-and-bound with exactly
the full-search argmax (fine similarities are at most 1, and an upsampled coarse value is
at most the largest of its coarse neighbours, so cells that cannot beat a known score are
skipped); ``coarse`` scores only the voxels of the most promising coarse cells.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alice3d.config import from_dict
from landmark.config import CONSISTENCY_MODES, LandmarkConfig, ModelConfig
from landmark.embed_cache import (CacheError, cache_max_bytes, default_cache_dir, evict_lru, hash_arrays, read_entry,
                                  write_entry)
from landmark.model import LandmarkNet, build_model, embed_volume, grid_affine

log = logging.getLogger("alice3d.landmark")

MODEL_KIND = "alice3d-landmark"
EMBED_FORMAT = "landmark-embedding-v2"  # v2: body mask on the fine grid
BODY_HU = -500.0  # above: soft tissue, fat, bone; below: air and lung
MIN_ANCHORS = 12  # consistent anchors needed to fit a pair's affine (4 would determine it)
PAIR_FORMAT = "landmark-pair-affine-v1"
_MISSING = object()  # no usable cache entry (None is a cached "could not fit")


class MatchError(ValueError):
    """A query that cannot be answered (point outside the volume, bad points string, ...)."""


# ----------------------------------------------------------------------------- model files


def load_landmark_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[LandmarkNet, dict]:
    """Rebuild the network from ``landmark.pt``; refuses files of another kind (metadata ``kind``)."""
    from alice3d.train.checkpoint import load_checkpoint

    obj = load_checkpoint(path, map_location=map_location, expect_kind=MODEL_KIND)
    meta = obj["metadata"]
    try:
        cfg = from_dict(ModelConfig, _upgrade_model_meta(meta["model"]))
    except Exception as e:  # noqa: BLE001 - any schema mismatch is reported with the file name
        raise MatchError(f"{path}: landmark model metadata does not describe a model ({e})") from None
    net = build_model(cfg)
    try:
        net.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, KeyError) as e:
        raise MatchError(f"{path}: weights do not fit the model described in its metadata ({e})") from None
    net.eval()
    return net, meta


def _upgrade_model_meta(model: dict) -> dict:
    """Metadata of older files (one input channel, ``in_channels`` stored) in today's form."""
    model = dict(model)
    if "in_channels" in model:
        n = int(model.pop("in_channels"))
        windows = model.setdefault("extra_windows", [] if n == 1 else None)
        if windows is None or len(windows) != n - 1:
            raise ValueError(f"in_channels={n} but extra_windows={windows}")
    return model


def model_key(net: LandmarkNet, spacing: Sequence[float], hu_window: Sequence[float]) -> str:
    """Digest of the weights, architecture and input normalisation (part of every cache key)."""
    from alice3d.config import to_dict

    state = net.state_dict()
    parts: list = [EMBED_FORMAT, to_dict(net.cfg), [float(s) for s in spacing], [float(h) for h in hu_window]]
    for name in sorted(state):
        parts += [name, state[name].detach().cpu().contiguous().numpy()]
    return hash_arrays(*parts)


# ----------------------------------------------------------------------------- embeddings


@dataclass
class Embedding:
    """Embeddings of one volume; grids are RAS-ordered and tied to world by their affines."""

    fine: torch.Tensor  # (Xf, Yf, Zf, D), unit vectors (float16 on CPU, memory-mapped from the cache)
    coarse: torch.Tensor  # (Xc, Yc, Zc, D) float32
    fine_affine: np.ndarray  # (4, 4) fine index -> world mm
    coarse_affine: np.ndarray  # (4, 4)
    source_shape: tuple  # the input volume (before any resampling)
    source_affine: np.ndarray
    key: str = ""
    name: str = ""
    body: torch.Tensor | None = None  # (Xf, Yf, Zf) bool, fine voxels mostly above BODY_HU

    def anchor_points(self, n: int) -> np.ndarray:
        """``n`` world points at body voxels of the fine grid; a fixed seed, so copies of a volume in
        other orientations (same RAS grid) get the same anchors."""
        body = self.body if self.body is not None else torch.ones(self.fine_shape, dtype=torch.bool)
        idx = torch.nonzero(body).numpy()
        if len(idx) == 0:
            return np.zeros((0, len(self.fine_shape)))
        rng = np.random.default_rng(0)
        pick = idx[np.sort(rng.choice(len(idx), size=min(n, len(idx)), replace=False))]
        return _apply(self.fine_affine, pick.astype(np.float64))

    @property
    def factor(self) -> int:
        """Coarse stride in fine voxels."""
        return int(round(np.linalg.norm(self.coarse_affine[:3, 0]) / np.linalg.norm(self.fine_affine[:3, 0])))

    @property
    def fine_shape(self) -> tuple:
        return tuple(self.fine.shape[:-1])

    def check_inside(self, points_world: np.ndarray, label: str = "") -> None:
        """MatchError listing the points that lie outside the source volume's voxel extent."""
        check_points_inside(self.source_affine, self.source_shape, points_world, label or self.name or "A")


def check_points_inside(affine: np.ndarray, shape: Sequence[int], points_world: np.ndarray, label: str) -> None:
    """MatchError naming ``label``, the points ``(N, 3)`` outside the grid's voxel extent and its world box."""
    ijk = _apply(np.linalg.inv(affine), points_world)
    bad = np.nonzero(((ijk < -0.5) | (ijk > np.asarray(shape, dtype=np.float64) - 0.5)).any(axis=1))[0]
    if len(bad):
        lo, hi = world_bounds(affine, shape)
        pts = "; ".join(",".join(f"{v:.1f}" for v in points_world[i]) for i in bad[:5])
        raise MatchError(
            f"{len(bad)} query point(s) outside volume {label} "
            f"(world extent {np.round(lo, 1).tolist()} .. {np.round(hi, 1).tolist()} mm): {pts}"
        )


@dataclass
class PairTransform:
    """Affine world A -> world B of one volume pair, fitted to consistent anchor matches."""

    matrix: np.ndarray  # (4, 4)
    inliers: int  # anchors that survived the round trip
    anchors: int  # anchors tried
    residual_mm: float  # median distance of those matches from the fitted map


def robust_affine(src: np.ndarray, dst: np.ndarray, keep: float = 0.6, rounds: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Trimmed least-squares affine ``dst ~ M @ src`` -> ``(M (4, 4), residuals (N,) mm)``.

    Each round refits on the ``keep`` fraction of points closest to the previous fit, so a
    minority of wrong matches (up to ``1 - keep``) does not pull the map.
    """
    x = np.c_[src, np.ones(len(src))]
    use = np.ones(len(src), dtype=bool)
    for _ in range(rounds):
        coef, *_ = np.linalg.lstsq(x[use], dst[use], rcond=None)  # (4, 3)
        residuals = np.linalg.norm(x @ coef - dst, axis=1)
        use = residuals <= np.quantile(residuals, keep)
    matrix = np.eye(4)
    matrix[:3] = coef.T
    return matrix, residuals


def world_bounds(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world box (mm) covered by the voxels of a grid (corners included)."""
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in shape], indexing="ij")).reshape(len(shape), -1).T
    w = _apply(affine, corners)
    return w.min(0), w.max(0)


def _apply(affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64)
    n = pts.shape[-1]
    return pts @ np.asarray(affine)[:n, :n].T + np.asarray(affine)[:n, n]


def window_channels(hu: np.ndarray, hu_window: Sequence[float], extra_windows: Sequence = ()) -> np.ndarray:
    """HU array ``(*S)`` -> ``(1 + len(extra_windows), *S)`` float32, each window clipped to [0, 1]."""
    from alice3d.data.volumes import normalize_hu

    return np.stack([normalize_hu(hu, w) for w in (hu_window, *extra_windows)])


def prepare_array(volume, spacing: Sequence[float], hu_window: Sequence[float],
                  extra_windows: Sequence = ()) -> tuple[np.ndarray, np.ndarray]:
    """``Volume`` (HU) -> RAS, resampled to ``spacing`` (mm), windowed: ``(array (C, X, Y, Z), affine)``."""
    from alice3d.data.io import reorient_to_ras, resample_to_spacing

    v = resample_to_spacing(reorient_to_ras(volume), tuple(float(s) for s in spacing))
    return window_channels(v.array, hu_window, extra_windows), np.asarray(v.affine, dtype=np.float64)


def _as_points(points_world) -> np.ndarray:
    """Points as ``(N, 3)`` float64; MatchError unless finite world coordinates."""
    pts = np.atleast_2d(np.asarray(points_world, dtype=np.float64))
    if pts.ndim != 2 or pts.shape[1] != 3 or not np.all(np.isfinite(pts)):
        raise MatchError(f"points must be finite (N, 3) world coordinates in mm, got shape {pts.shape}")
    return pts


def _as_volume(item):
    from alice3d.data.io import Volume, load_volume

    if isinstance(item, Volume):
        return item
    if isinstance(item, (str, os.PathLike)):
        return load_volume(item)
    raise TypeError(f"expected a Volume or an image path, got {type(item).__name__}")


# ----------------------------------------------------------------------------- search primitives


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
    vals = coarse_sim.float().flatten(1).gather(1, _ravel(nb, cshape).flatten(1)).view(*nb.shape[:3])
    w = weights[_ravel(fine_idx - cells * factor, (factor,) * n)]  # (N, K, 3**n)
    return (vals * w).sum(-1)


def _unravel(flat: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat = torch.div(flat, s, rounding_mode="floor")
    return torch.stack(out[::-1], dim=-1)


def _ravel(idx: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- matcher


class Matcher:
    """Find points of volume A in volume B (world mm in, world mm out).

    ``model``: path to ``landmark.pt`` or a :class:`LandmarkNet` (then ``spacing`` and
    ``hu_window`` describe its input; defaults of :class:`LandmarkConfig`).
    ``cache_dir``: on-disk embedding cache (default ``$ALICE3D_CACHE/embeddings`` or
    ``~/.cache/alice3d/embeddings``); ``use_cache=False`` keeps embeddings in memory only.
    ``search``: ``"full"`` (dense similarity maps over every voxel of B; fast on GPU),
    ``"pruned"`` (exact branch-and-bound: same result as full, fast when similarity maps are
    peaked), ``"coarse"`` (coarse-to-fine: exact scores on the voxels of the ``coarse_cells``
    most similar coarse cells; fast on CPU, as accurate as full search on the phantom
    evaluation) or ``"auto"`` (full on CUDA, coarse otherwise).
    """

    def __init__(self, model: str | os.PathLike | LandmarkNet, cache_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", use_cache: bool = True, search: str = "auto",
                 fine_weight: float | None = None, refine: bool | None = None,
                 spacing: Sequence[float] | None = None, hu_window: Sequence[float] | None = None,
                 memory_items: int = 32, verify_cache: bool = True, chunk_voxels: int | None = None,
                 coarse_cells: int | None = None, consistency: str | None = None, anchors: int | None = None,
                 roundtrip_mm: float | None = None):
        defaults = LandmarkConfig()
        if isinstance(model, LandmarkNet):
            self.net, meta = model, {}
        else:
            self.net, meta = load_landmark_model(model)
        match_meta = meta.get("match", {})
        self.spacing = tuple(float(s) for s in (spacing or meta.get("spacing") or defaults.data.spacing))
        self.hu_window = tuple(float(h) for h in (hu_window or meta.get("hu_window") or defaults.data.hu_window))
        self.fine_weight = float(fine_weight if fine_weight is not None else match_meta.get("fine_weight", defaults.match.fine_weight))
        self.refine = bool(refine if refine is not None else match_meta.get("refine", defaults.match.refine))
        self.chunk_voxels = int(chunk_voxels or match_meta.get("chunk_voxels", defaults.match.chunk_voxels))
        if search not in ("auto", "full", "pruned", "coarse"):
            raise ValueError(f"search: expected 'auto', 'full', 'pruned' or 'coarse', got {search!r}")
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.search = search if search != "auto" else ("full" if self.device.type == "cuda" else "coarse")
        self.coarse_cells = int(coarse_cells or match_meta.get("coarse_cells", defaults.match.coarse_cells))
        # Files written before the consistency step existed hold no such keys: today's defaults apply.
        self.consistency = consistency or match_meta.get("consistency", defaults.match.consistency)
        if self.consistency not in CONSISTENCY_MODES:
            raise ValueError(f"consistency: expected one of {list(CONSISTENCY_MODES)}, got {self.consistency!r}")
        self.anchors = int(anchors or match_meta.get("anchors", defaults.match.anchors))
        self.roundtrip_mm = float(roundtrip_mm or match_meta.get("roundtrip_mm", defaults.match.roundtrip_mm))
        self._transforms: OrderedDict[str, PairTransform | None] = OrderedDict()
        self.net = self.net.to(self.device).eval()
        self.use_cache = use_cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_max_bytes = cache_max_bytes() if use_cache else None  # a bad value fails before any work
        self.verify_cache = verify_cache
        self.memory_items = memory_items
        self._memory: OrderedDict[str, Embedding] = OrderedDict()
        self.model_key = model_key(self.net, self.spacing, self.hu_window)
        self.stats = {"computed": 0, "disk_hits": 0, "memory_hits": 0, "recomputed_bad_cache": 0,
                      "pair_transforms": 0, "pair_fallbacks": 0}

    # ------------------------------------------------------------- embeddings

    def image_key(self, volume) -> str:
        return hash_arrays(np.asarray(volume.array, dtype=np.float32), np.round(np.asarray(volume.affine, np.float64), 6))

    def cache_path(self, image_key: str) -> Path:
        return self.cache_dir / self.model_key[:20] / f"{image_key}.emb"

    def embed(self, volume) -> Embedding:
        """Embedding of a ``Volume`` or image path: memory LRU -> disk cache -> network."""
        if isinstance(volume, Embedding):
            return volume
        vol = _as_volume(volume)
        key = self.image_key(vol)
        name = Path(vol.path).name if getattr(vol, "path", "") else key[:12]
        if key in self._memory:
            self._memory.move_to_end(key)
            self.stats["memory_hits"] += 1
            return self._memory[key]
        emb = None
        path = self.cache_path(key)
        if self.use_cache and path.exists():
            try:
                emb = self._read(path, key, name)
                self.stats["disk_hits"] += 1
            except CacheError as e:
                log.warning("embedding cache entry unusable, recomputing: %s", e)
                self.stats["recomputed_bad_cache"] += 1
        if emb is None:
            emb = self._compute(vol, key, name)
            self.stats["computed"] += 1
            if self.use_cache:
                self._write(path, emb)
                try:
                    emb = self._read(path, key, name, verify=False)  # memory-mapped, not resident
                except CacheError as e:  # not written, or evicted at once by another process
                    log.debug("keeping the embedding in memory: %s", e)
        self._memory[key] = emb
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)
        return emb

    def _compute(self, vol, key: str, name: str) -> Embedding:
        arr, aff = prepare_array(vol, self.spacing, self.hu_window, self.net.cfg.extra_windows)
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
        fine, coarse = embed_volume(self.net, x)
        n = fine.ndim - 1
        perm = (*range(1, n + 1), 0)
        lo, hi = self.hu_window
        above = (x[0] > (BODY_HU - lo) / (hi - lo)).float()[None, None]
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        body = pool(above, 2, stride=2, ceil_mode=True)[0, 0] > 0.5
        return Embedding(
            fine=fine.permute(perm).to(torch.float16).contiguous().cpu(),
            coarse=coarse.permute(perm).float().contiguous().cpu(),
            fine_affine=grid_affine(aff, self.net.cfg.fine_stride).numpy(),
            coarse_affine=grid_affine(aff, self.net.cfg.coarse_stride).numpy(),
            source_shape=tuple(int(s) for s in vol.array.shape),
            source_affine=np.asarray(vol.affine, dtype=np.float64),
            key=key, name=name, body=body.cpu(),
        )

    def _write(self, path: Path, emb: Embedding) -> None:
        meta = {"image_key": emb.key, "model_key": self.model_key, "name": emb.name,
                "fine_affine": emb.fine_affine.tolist(), "coarse_affine": emb.coarse_affine.tolist(),
                "source_shape": list(emb.source_shape), "source_affine": emb.source_affine.tolist()}
        try:
            write_entry(path, {"body": emb.body.numpy().astype(np.uint8), "fine": emb.fine.numpy(),
                               "coarse": emb.coarse.numpy()}, meta)
        except OSError as e:
            log.warning("could not write embedding cache %s (%s); continuing without it", path, e)
            return
        self._evict(path)

    def _evict(self, written: Path) -> None:
        """Keep the cache under its cap (least recently used entries go first, never ``written``)."""
        try:
            gone = evict_lru(self.cache_dir, self.cache_max_bytes, keep=(written,))
        except OSError as e:
            log.warning("could not trim the embedding cache %s (%s)", self.cache_dir, e)
            return
        if gone:
            log.info("embedding cache over its cap of %.1f GB: removed %d least recently used entries",
                     self.cache_max_bytes / 1e9, len(gone))

    def _read(self, path: Path, key: str, name: str, verify: bool | None = None) -> Embedding:
        arrays, meta = read_entry(path, verify=self.verify_cache if verify is None else verify,
                                  expect_meta={"image_key": key, "model_key": self.model_key})
        try:
            fine, coarse, body = arrays["fine"], arrays["coarse"], arrays["body"]
            emb = Embedding(
                fine=torch.from_numpy(fine), coarse=torch.from_numpy(np.asarray(coarse, dtype=np.float32)),
                fine_affine=np.asarray(meta["fine_affine"], dtype=np.float64),
                coarse_affine=np.asarray(meta["coarse_affine"], dtype=np.float64),
                source_shape=tuple(meta["source_shape"]), source_affine=np.asarray(meta["source_affine"], np.float64),
                key=key, name=meta.get("name", name), body=torch.from_numpy(np.asarray(body, dtype=bool)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"{path}: header misses a field ({e})") from None
        if fine.ndim != 4 or coarse.ndim != 4 or fine.shape[-1] != coarse.shape[-1] or body.shape != fine.shape[:-1]:
            raise CacheError(f"{path}: unexpected array shapes fine {fine.shape}, coarse {coarse.shape}, "
                             f"body {body.shape}")
        return emb

    # ------------------------------------------------------------- matching

    def match(self, source, target, points_world) -> tuple[np.ndarray, np.ndarray]:
        """``points_world (N, 3)`` in A -> ``(points in B (N, 3) world mm, scores (N,))``."""
        if not isinstance(source, Embedding):
            source = _as_volume(source)
            # from the geometry alone: a point outside A should not cost two embeddings and a pair fit
            pts = _as_points(points_world)
            check_points_inside(source.affine, source.shape, pts, source.path or "A")
        return self.match_embeddings(self.embed(source), self.embed(target), points_world)

    def query(self, emb_a: Embedding, points_world, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine and coarse query vectors ``(N, D)`` at world points of A (interpolated, unit length)."""
        pts = _as_points(points_world)
        if check:
            emb_a.check_inside(pts)
        fi = torch.from_numpy(_apply(np.linalg.inv(emb_a.fine_affine), pts))
        ci = torch.from_numpy(_apply(np.linalg.inv(emb_a.coarse_affine), pts))
        q_f = F.normalize(interp_rows(emb_a.fine, fi), dim=1)
        q_c = F.normalize(interp_rows(emb_a.coarse, ci), dim=1)
        return q_f, q_c

    def match_embeddings(self, emb_a: Embedding, emb_b: Embedding, points_world) -> tuple[np.ndarray, np.ndarray]:
        """Points of A (world mm) -> ``(points in B (N, 3), scores (N,))`` with the configured consistency."""
        if self.consistency == "affine":
            transform = self.pair_transform(emb_a, emb_b)
            if transform is not None:
                return self._match_mapped(emb_a, emb_b, points_world, transform)
        return self.match_argmax(emb_a, emb_b, points_world)

    def match_argmax(self, emb_a: Embedding, emb_b: Embedding, points_world,
                     check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Per point, the voxel of B with the highest combined similarity (sub-voxel refined)."""
        q_f, q_c = self.query(emb_a, points_world, check=check)
        if len(q_f) == 0:
            return np.zeros((0, 3)), np.zeros(0)
        coarse_sim = torch.einsum("nd,...d->n...", q_c, emb_b.coarse.float())  # (N, *Sc)
        if self.search == "full":
            best, score = self._search_full(q_f, coarse_sim, emb_b)
        elif self.search == "coarse":
            best, score = self._search_coarse(q_f, coarse_sim, emb_b)
        else:
            best, score = zip(*(self._search_pruned(q_f[i], coarse_sim[i], emb_b) for i in range(len(q_f))))
            best, score = torch.stack(best), torch.stack(score)
        idx = best.double()
        if self.refine:
            idx = idx + self._refine(q_f, coarse_sim, emb_b, best)
        # fp16 storage can push a cosine a hair past 1
        return _apply(emb_b.fine_affine, idx.numpy()), score.float().clamp(-1.0, 1.0).numpy()

    def pair_transform(self, emb_a: Embedding, emb_b: Embedding) -> PairTransform | None:
        """Robust affine world A -> world B from round-trip-consistent anchor matches.

        Cached like embeddings: in memory, and on disk next to them (a few hundred bytes per
        pair, keyed by both embeddings and the fit's settings), so repeated ``match`` calls and
        other processes reuse it. None (logged) when fewer than ``MIN_ANCHORS`` anchors survive
        the round trip, e.g. when the two fields of view barely overlap; matching then falls
        back to the per-point argmax.
        """
        settings = {"anchors": self.anchors, "roundtrip_mm": self.roundtrip_mm, "fine_weight": self.fine_weight,
                    "search": self.search, "coarse_cells": self.coarse_cells, "refine": self.refine}
        key = hash_arrays(PAIR_FORMAT, emb_a.key, emb_b.key, self.model_key, json.dumps(settings, sort_keys=True))
        if key in self._transforms:
            self._transforms.move_to_end(key)
            return self._transforms[key]
        transform = self._read_pair(key) if self.use_cache else _MISSING
        if transform is _MISSING:
            transform = self._fit_pair(emb_a, emb_b)
            if self.use_cache:
                self._write_pair(key, transform)
        if transform is None:  # said once per pair and process, not at every query
            log.warning("%s -> %s: too few anchors match consistently (need %d); matching these volumes "
                        "point by point", emb_a.name or "A", emb_b.name or "B", MIN_ANCHORS)
        self._transforms[key] = transform
        while len(self._transforms) > 4 * self.memory_items:
            self._transforms.popitem(last=False)
        return transform

    def _fit_pair(self, emb_a: Embedding, emb_b: Embedding) -> PairTransform | None:
        anchors = emb_a.anchor_points(self.anchors)
        found, _ = self.match_argmax(emb_a, emb_b, anchors, check=False)
        back, _ = self.match_argmax(emb_b, emb_a, found, check=False)
        ok = np.linalg.norm(back - anchors, axis=1) <= self.roundtrip_mm
        log.info("%s -> %s: %d of %d anchors match consistently", emb_a.name or "A", emb_b.name or "B",
                 int(ok.sum()), len(anchors))
        if ok.sum() < MIN_ANCHORS:
            self.stats["pair_fallbacks"] += 1
            return None
        self.stats["pair_transforms"] += 1
        matrix, residuals = robust_affine(anchors[ok], found[ok])
        return PairTransform(matrix, int(ok.sum()), len(anchors), float(np.median(residuals)))

    def _pair_path(self, key: str) -> Path:
        return self.cache_dir / self.model_key[:20] / "pairs" / f"{key}.pair"

    def _read_pair(self, key: str):
        path = self._pair_path(key)
        if not path.exists():
            return _MISSING
        try:
            arrays, meta = read_entry(path, mmap=False, expect_meta={"pair_key": key})
            matrix = arrays["matrix"]
            if meta.get("fitted") is False:
                return None
            if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
                raise CacheError(f"{path}: matrix of shape {matrix.shape} is not a finite 4x4 affine")
            return PairTransform(np.asarray(matrix, dtype=np.float64), int(meta["inliers"]), int(meta["anchors"]),
                                 float(meta["residual_mm"]))
        except (CacheError, KeyError, TypeError, ValueError) as e:
            log.warning("pair cache entry unusable, refitting: %s", e)
            return _MISSING

    def _write_pair(self, key: str, transform: PairTransform | None) -> None:
        meta = {"pair_key": key, "fitted": transform is not None}
        matrix = np.zeros((0,)) if transform is None else transform.matrix
        if transform is not None:
            meta.update(inliers=transform.inliers, anchors=transform.anchors, residual_mm=transform.residual_mm)
        try:
            write_entry(self._pair_path(key), {"matrix": np.asarray(matrix, dtype=np.float64)}, meta)
        except OSError as e:
            log.warning("could not write pair cache %s (%s); continuing without it", self._pair_path(key), e)
            return
        self._evict(self._pair_path(key))

    def _match_mapped(self, emb_a: Embedding, emb_b: Embedding, points_world,
                      transform: PairTransform) -> tuple[np.ndarray, np.ndarray]:
        """Queries through the pair's affine; those it maps outside B get the per-point argmax."""
        q_f, q_c = self.query(emb_a, points_world)
        pts = np.atleast_2d(np.asarray(points_world, dtype=np.float64))
        mapped = _apply(transform.matrix, pts)
        fi = _apply(np.linalg.inv(emb_b.fine_affine), mapped)
        outside = ((fi < -0.5) | (fi > np.asarray(emb_b.fine_shape) - 0.5)).any(axis=1)
        w = self.fine_weight
        ci = torch.from_numpy(_apply(np.linalg.inv(emb_b.coarse_affine), mapped))
        score = w * (interp_rows(emb_b.fine, torch.from_numpy(fi)) * q_f).sum(1)
        score = (score + (1 - w) * (interp_rows(emb_b.coarse, ci) * q_c).sum(1)).clamp(-1.0, 1.0).numpy()
        if outside.any():
            mapped[outside], score[outside] = self.match_argmax(emb_a, emb_b, pts[outside])
        return mapped, score

    def _combined(self, q_f: torch.Tensor, coarse_sim: torch.Tensor, emb: Embedding, idx: torch.Tensor) -> torch.Tensor:
        """Combined similarity of one query at integer fine indices ``(K, n)`` -> ``(K,)``."""
        flat = _ravel(idx, emb.fine_shape)
        rows = emb.fine.reshape(-1, emb.fine.shape[-1]).index_select(0, flat).float()
        w = self.fine_weight
        return w * (rows @ q_f.float()) + (1 - w) * coarse_sim_at(coarse_sim, idx, emb.factor)

    def _search_coarse(self, q_f: torch.Tensor, coarse_sim: torch.Tensor, emb: Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Coarse-to-fine: every voxel of the ``coarse_cells`` most promising cells of each query.

        Cells are ranked by the largest coarse similarity among them and their neighbours (the
        most an upsampled coarse value inside them can reach). The fine similarities are then
        computed cell by cell rather than query by query: a cell's voxels are one strided block
        of the cache, read (and widened to float32) once for all queries that chose it, and
        multiplied with those queries together. Gathering voxel rows per query instead moved
        ~100x more memory and dominated batched matching. Scores are float32 products, the same
        values the full search computes. (Screening only every second voxel was tried: 4x
        faster, but it agreed with the full search on 76 % of queries instead of 98 %.)
        """
        shape, n, f = emb.fine_shape, len(emb.fine_shape), emb.factor
        csim = coarse_sim.float()
        cshape = csim.shape[1:]
        k = min(self.coarse_cells, int(np.prod(cshape)))
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
        bound = pool(csim[:, None], 3, stride=1, padding=1)[:, 0].flatten(1)
        chosen = bound.topk(k, dim=1).indices  # (N, k) flat cell ids
        cells = _unravel(chosen, cshape)  # (N, k, n)
        offs, neighbours, weights = cell_upsampling_stencil(f, n)  # (V, n), (3**n, n), (V, 3**n)
        # Upsampled coarse similarity at every voxel of the chosen cells: (N, k, V).
        nb = torch.minimum((cells[:, :, None] + neighbours).clamp_min(0), torch.tensor(cshape) - 1)
        nb_vals = csim.flatten(1).gather(1, _ravel(nb, cshape).flatten(1)).view(len(csim), k, -1)
        w = torch.tensor(self.fine_weight)
        step = max(1, self.chunk_voxels // (k * offs.shape[0]))  # queries per block (memory bound)
        best, score = [], []
        for s in range(0, len(q_f), step):
            fine_sim = self._cell_similarities(q_f[s:s + step].float(), chosen[s:s + step], cshape, emb)
            combined = torch.addcmul((1 - w) * (nb_vals[s:s + step] @ weights.T), fine_sim, w)
            val, j = combined.flatten(1).nan_to_num(nan=float("-inf")).max(1)  # NaN: beyond the grid
            slot, v = torch.div(j, offs.shape[0], rounding_mode="floor"), j % offs.shape[0]
            best.append(cells[s:s + step][torch.arange(len(j)), slot] * f + offs[v])
            score.append(val)
        return torch.cat(best), torch.cat(score)

    @staticmethod
    def _cell_similarities(q: torch.Tensor, chosen: torch.Tensor, cshape: Sequence[int], emb: Embedding) -> torch.Tensor:
        """Fine similarity of query ``i`` with every voxel of its cells ``chosen[i]`` -> ``(N, k, f**n)``.

        Voxels beyond the grid (partial border cells) get NaN, which stays NaN whatever they are
        combined with.
        """
        n, f = len(emb.fine_shape), emb.factor
        out = torch.full((*chosen.shape, *(f,) * n), float("nan"))
        flat = chosen.reshape(-1)
        order = flat.argsort()
        uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
        query_of, slot_of = torch.div(order, chosen.shape[1], rounding_mode="floor"), order % chosen.shape[1]
        corner = _unravel(uniq, cshape) * f
        start = 0
        for c, m in zip(corner.tolist(), counts.tolist()):
            qi, si = query_of[start:start + m], slot_of[start:start + m]
            start += m
            block = emb.fine[tuple(slice(lo, lo + f) for lo in c)]  # (<=f, ..., D) view of the cache
            sims = (block.reshape(-1, block.shape[-1]).float() @ q[qi].T).T.reshape(m, *block.shape[:-1])
            if sims.shape[1:] == (f,) * n:
                out[qi, si] = sims
            else:
                out[(qi, si, *(slice(0, s) for s in sims.shape[1:]))] = sims
        return out.flatten(2)

    def _search_full(self, q_f: torch.Tensor, coarse_sim: torch.Tensor, emb: Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        shape = emb.fine_shape
        m = int(np.prod(shape))
        dev = self.device
        fine = emb.fine.reshape(m, -1)
        if dev.type == "cuda":
            fine = self._on_device(emb)
        step = max(1, self.chunk_voxels // max(m, 1))
        best, score = [], []
        w = self.fine_weight
        for s in range(0, len(q_f), step):
            if dev.type == "cuda":
                qf = q_f[s:s + step].to(dev, fine.dtype)
                sim = (qf @ fine.T).float().reshape(len(qf), *shape)
            else:  # CPU: float32 products (half-precision matmul is slow and rounds differently)
                qf = q_f[s:s + step].float()
                sim = torch.cat([qf @ fine[v:v + 65536].float().T for v in range(0, m, 65536)], dim=1)
                sim = sim.reshape(len(qf), *shape)
            sim = w * sim + (1 - w) * upsample_sim(coarse_sim[s:s + step].to(dev), emb.factor, shape)
            val, flat = sim.reshape(len(qf), -1).max(dim=1)
            best.append(_unravel(flat.cpu(), shape))
            score.append(val.cpu())
        return torch.cat(best), torch.cat(score)

    def _on_device(self, emb: Embedding) -> torch.Tensor:
        cached = getattr(emb, "_device_fine", None)
        if cached is None or cached.device != self.device:
            cached = emb.fine.reshape(-1, emb.fine.shape[-1]).to(self.device)
            emb._device_fine = cached  # type: ignore[attr-defined]
        return cached

    def _search_pruned(self, q_f: torch.Tensor, coarse_sim: torch.Tensor, emb: Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact argmax of the combined similarity of one query, visiting few coarse cells."""
        shape = emb.fine_shape
        n = len(shape)
        f = emb.factor
        w = self.fine_weight
        csim = coarse_sim.float()
        cshape = csim.shape
        # Lower bound: the best voxel inside the most similar coarse cell.
        first = _unravel(csim.argmax().reshape(1), cshape)
        idx = self._cell_voxels(first, f, shape)
        vals = self._combined(q_f, csim, emb, idx)
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
            idx, val = self._search_full(q_f[None], coarse_sim[None], emb)
            return idx[0], val[0]
        if len(cells):
            idx = self._cell_voxels(cells, f, shape)
            vals = self._combined(q_f, csim, emb, idx)
            v, k = vals.max(0)
            if v > best_val:
                best_val, best_idx = v, idx[k]
        return best_idx, best_val

    @staticmethod
    def _cell_voxels(cells: torch.Tensor, factor: int, shape: Sequence[int]) -> torch.Tensor:
        """All fine indices ``(K, n)`` inside the given coarse cells ``(C, n)`` (clipped to the grid)."""
        n = cells.shape[1]
        offs = torch.stack(torch.meshgrid(*[torch.arange(factor)] * n, indexing="ij"), -1).reshape(-1, n)
        idx = (cells[:, None, :] * factor + offs[None]).reshape(-1, n)
        keep = (idx < torch.tensor(list(shape))).all(dim=1)
        return idx[keep]

    def _refine(self, q_f: torch.Tensor, coarse_sim: torch.Tensor, emb: Embedding, best: torch.Tensor) -> torch.Tensor:
        """Sub-voxel offsets ``(N, n)`` from a parabola through each axis' neighbours of the peak."""
        shape = torch.tensor(list(emb.fine_shape))
        n = best.shape[1]
        steps = torch.cat([torch.zeros(1, n, dtype=torch.long), torch.eye(n, dtype=torch.long).repeat_interleave(2, 0)])
        steps[1:] *= torch.tensor([-1, 1]).repeat(n)[:, None]  # peak, then -1/+1 along each axis
        pts = torch.minimum((best[:, None] + steps).clamp_min(0), shape - 1)  # (N, 1 + 2n, n)
        fine = emb.fine.reshape(-1, emb.fine.shape[-1])
        rows = fine.index_select(0, _ravel(pts, emb.fine_shape).reshape(-1)).view(*pts.shape[:2], -1).float()
        w = self.fine_weight
        vals = w * torch.einsum("npd,nd->np", rows, q_f.float())
        vals = (vals + (1 - w) * coarse_values_at(coarse_sim.float(), pts, emb.factor)).double()
        lo, hi, mid = vals[:, 1::2], vals[:, 2::2], vals[:, :1]
        curv = lo - 2 * mid + hi
        ok = (curv < 0) & (best > 0) & (best < shape - 1)
        offset = (0.5 * (lo - hi) / torch.where(ok, curv, -1.0)).clamp(-0.5, 0.5)
        return torch.where(ok, offset, 0.0)


def parse_points(text: str) -> np.ndarray:
    """``"x,y,z;x,y,z"`` -> ``(N, 3)`` world mm; MatchError saying what was expected."""
    pts = []
    for part in text.replace("\n", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        vals = part.replace(" ", ",").split(",")
        vals = [v for v in vals if v]
        try:
            xyz = [float(v) for v in vals]
        except ValueError:
            xyz = []
        if len(xyz) != 3:
            raise MatchError(f"--points: expected 'x,y,z;x,y,z;...' in world mm, could not read {part!r}")
        pts.append(xyz)
    if not pts:
        raise MatchError("--points: no points given (expected 'x,y,z;x,y,z;...' in world mm)")
    return np.asarray(pts, dtype=np.float64)


def read_points_file(path: str | os.PathLike) -> np.ndarray:
    """Points from a file -> ``(N, 3)`` world mm; MatchError naming the file and what was expected.

    JSON: ``[[x, y, z], ...]`` or ``{"points": [[x, y, z], ...]}``; otherwise text with one
    ``x,y,z`` (or ``x y z``) per line, blank lines and ``#`` comments ignored.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MatchError(f"--points-file {path}: cannot read it ({e})") from None
    rows = _json_points(path, text) if text.lstrip()[:1] in ("[", "{") else _text_points(path, text)
    if not rows:
        raise MatchError(f"--points-file {path}: no points in it (expected JSON [[x, y, z], ...] or one "
                         "'x,y,z' per line, world mm)")
    pts = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(pts)):
        raise MatchError(f"--points-file {path}: coordinates must be finite numbers (world mm)")
    return pts


def _json_points(path: Path, text: str) -> list:
    expected = 'expected a JSON list of [x, y, z] lists (world mm) or {"points": [...]}'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MatchError(f"--points-file {path}: not valid JSON ({e}); {expected}") from None
    if isinstance(data, dict):
        if "points" not in data:
            raise MatchError(f"--points-file {path}: no 'points' key (keys: {sorted(data)}); {expected}")
        data = data["points"]
    if not isinstance(data, list):
        raise MatchError(f"--points-file {path}: got a JSON {type(data).__name__}; {expected}")
    for i, p in enumerate(data):
        if not (isinstance(p, list) and len(p) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)):
            raise MatchError(f"--points-file {path}: point {i} is {json.dumps(p)}; {expected}")
    return data


def _text_points(path: Path, text: str) -> list:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            xyz = [float(v) for v in line.replace(",", " ").split()]
        except ValueError:
            xyz = []
        if len(xyz) != 3:
            raise MatchError(f"--points-file {path} line {n}: expected 'x,y,z' in world mm, could not read {line!r}")
        rows.append(xyz)
    return rows
