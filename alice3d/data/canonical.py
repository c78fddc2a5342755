"""The one geometry path: every command turns a volume to RAS and resamples it to a spacing here.

:func:`geometry_transforms` builds the two steps, MONAI's ``Orientationd`` (to ``RAS``) and
``Spacingd`` (to ``spacing`` mm: images linear, labels nearest), and :func:`to_canonical` runs
exactly those steps on a :class:`~alice3d.data.io.Volume`. The volume store
(``alice3d-data preprocess``), pretraining's in-memory volumes, landmark embedding
(``alice3d-landmark``) and probing call :func:`to_canonical`; fine-tuning
(``alice3d-finetune``) puts :func:`geometry_transforms` into its transform list. A volume
therefore gets the same voxels and the same affine whichever command reads it.

Why MONAI's transforms and not a resampler of our own: fine-tuning writes predictions back
in the input's space with ``Invertd``, which needs invertible MONAI transforms in its list,
and the exported bundle must preprocess with plain MONAI (no alice3d code) exactly like
``alice3d-finetune predict``. Any other resampler would make one of those two differ from the
store; running the same MONAI steps everywhere changes nothing for fine-tuning or the bundle.

The grid is MONAI's: the direction cosines are kept, the spacing is exactly ``spacing``,
output voxel 0 sits on input voxel 0 (of the RAS-ordered array) and there are
``round((n - 1) * old / new) + 1`` voxels per axis, values beyond the last input voxel
repeat the border. A volume already at ``spacing`` is only reoriented (its voxels unchanged).
MONAI imports take seconds: this module is kept apart from :mod:`alice3d.data.io`, which
numpy-only workers (phantom rendering) import.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from alice3d.data.io import DataError, Volume

# Axis labels of RAS+ world coordinates (nibabel's, and alice3d.data.io's, convention).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
IMAGE_KEY, LABEL_KEY = "image", "label"

__all__ = ["RAS_LABELS", "geometry_transforms", "to_canonical"]


def geometry_transforms(keys: Sequence[str], spacing: Sequence[float] | None = None, orientation: str = "RAS",
                        image_keys: Sequence[str] = (IMAGE_KEY,)) -> list:
    """``[Orientationd, Spacingd]`` of channel-first ``(C, *S)`` MetaTensors under ``keys``.

    ``image_keys`` are resampled linearly ("bilinear", trilinear in 3-D), every other key
    (label maps) by nearest neighbour. No ``spacing`` (None or empty): orientation only.
    The arguments are those the bundle exporter writes (alice3d/bundle/inference_config.py),
    so ``alice3d-finetune predict`` and the bundle stay voxel-identical.
    """
    keys = list(keys)
    steps: list = [mt.Orientationd(keys=keys, axcodes=orientation, labels=RAS_LABELS)]
    if spacing:
        modes = ["bilinear" if k in image_keys else "nearest" for k in keys]
        steps.append(mt.Spacingd(keys=keys, pixdim=tuple(spacing), mode=modes))
    return steps


def _meta_tensor(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """``(*S)`` array -> ``(1, *S)`` float32 MetaTensor with its float64 affine (as fine-tuning builds it)."""
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.tensor(np.asarray(affine), dtype=torch.float64),
                      meta={"original_channel_dim": "no_channel"})


def to_canonical(volume: Volume, spacing: Sequence[float] | None) -> Volume:
    """``volume`` (array ``(X, Y, Z)`` float32, label int16 or None) -> RAS at ``spacing`` mm.

    Runs :func:`geometry_transforms` (image linear, label nearest); the array comes back
    float32 ``(X', Y', Z')``, the label in its own dtype, the affine float64.
    """
    nd = volume.array.ndim
    if spacing is not None and len(spacing) and len(spacing) != nd:
        raise DataError(f"{volume.path}: spacing {tuple(spacing)} has {len(spacing)} values, expected {nd}")
    data = {IMAGE_KEY: _meta_tensor(volume.array, volume.affine)}
    if volume.label is not None:
        data[LABEL_KEY] = _meta_tensor(volume.label, volume.affine)
    out = mt.Compose(geometry_transforms(list(data), spacing))(data)
    image = out[IMAGE_KEY]
    affine = image.affine.numpy().astype(np.float64)
    array = image.as_tensor()[0].numpy().astype(np.float32, copy=False)
    label = None
    if volume.label is not None:
        # nearest neighbour returns the input's ids (exact in float32 within int16) on the same grid
        label = np.rint(out[LABEL_KEY].as_tensor()[0].numpy()).astype(volume.label.dtype)
    return replace(volume, array=np.ascontiguousarray(array), affine=affine,
                   label=None if label is None else np.ascontiguousarray(label))
