"""From a model file and an image to an :class:`~landmark.store.Embedding`.

``landmark.pt`` holds the weights and what the network expects as input (spacing, HU
window, extra windows). An image is reoriented to RAS, resampled to that spacing, windowed
and run through the network once; :func:`model_key` digests everything that changes the
result, so cached embeddings of other weights or another normalisation are never reused.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from alice3d.config import from_dict, to_dict
from alice3d.data.canonical import to_canonical
from alice3d.data.volumes import normalize_hu
from alice3d.train.checkpoint import load_checkpoint
from landmark.config import ModelConfig
from landmark.embed_cache import hash_arrays
from landmark.model import LandmarkNet, build_model, embed_volume, grid_affine
from landmark.points import MatchError
from landmark.store import Embedding

MODEL_KIND = "alice3d-landmark"
# v2: body mask on the fine grid; v3: the grid of alice3d.data.canonical (exact spacing, MONAI's), so
# embeddings cached on the former corner-aligned grid are computed again rather than reused
EMBED_FORMAT = "landmark-embedding-v3"
BODY_HU = -500.0  # above: soft tissue, fat, bone; below: air and lung


def load_landmark_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[LandmarkNet, dict]:
    """Rebuild the network from ``landmark.pt``; refuses files of another kind (metadata ``kind``)."""
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
    state = net.state_dict()
    parts: list = [EMBED_FORMAT, to_dict(net.cfg), [float(s) for s in spacing], [float(h) for h in hu_window]]
    for name in sorted(state):
        parts += [name, state[name].detach().cpu().contiguous().numpy()]
    return hash_arrays(*parts)


def window_channels(hu: np.ndarray, hu_window: Sequence[float], extra_windows: Sequence = ()) -> np.ndarray:
    """HU array ``(*S)`` -> ``(1 + len(extra_windows), *S)`` float32, each window clipped to [0, 1]."""
    return np.stack([normalize_hu(hu, w) for w in (hu_window, *extra_windows)])


def prepare_array(volume, spacing: Sequence[float], hu_window: Sequence[float],
                  extra_windows: Sequence = ()) -> tuple[np.ndarray, np.ndarray]:
    """``Volume`` (HU) -> RAS, resampled to ``spacing`` (mm), windowed: ``(array (C, X, Y, Z), affine)``."""
    v = to_canonical(volume, tuple(float(s) for s in spacing))
    return window_channels(v.array, hu_window, extra_windows), np.asarray(v.affine, dtype=np.float64)


def compute_embedding(net: LandmarkNet, volume, spacing: Sequence[float], hu_window: Sequence[float],
                      device: torch.device, key: str = "", name: str = "") -> Embedding:
    """Run ``net`` on a ``Volume`` (HU): fine grid ``(Xf, Yf, Zf, D)`` float16, coarse float32, body mask."""
    arr, aff = prepare_array(volume, spacing, hu_window, net.cfg.extra_windows)
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    fine, coarse = embed_volume(net, x)
    n = fine.ndim - 1
    perm = (*range(1, n + 1), 0)
    lo, hi = hu_window
    above = (x[0] > (BODY_HU - lo) / (hi - lo)).float()[None, None]
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    body = pool(above, 2, stride=2, ceil_mode=True)[0, 0] > 0.5
    return Embedding(
        fine=fine.permute(perm).to(torch.float16).contiguous().cpu(),
        coarse=coarse.permute(perm).float().contiguous().cpu(),
        fine_affine=grid_affine(aff, net.cfg.fine_stride).numpy(),
        coarse_affine=grid_affine(aff, net.cfg.coarse_stride).numpy(),
        source_shape=tuple(int(s) for s in volume.array.shape),
        source_affine=np.asarray(volume.affine, dtype=np.float64),
        key=key, name=name, body=body.cpu(),
    )
