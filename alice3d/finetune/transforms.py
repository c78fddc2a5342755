"""MONAI transform lists of every fine-tuning task, each built by one function.

- :func:`preprocess_transforms`: deterministic steps after loading (channel first,
  orientation, spacing, HU window -> [0, 1], foreground crop / resize);
- :func:`inference_transforms`: ``LoadImaged`` + the same steps; ``predict`` and the
  exported bundle use exactly this list, so they agree voxel for voxel;
- :func:`postprocess_transforms`: argmax + ``Invertd`` back to the input image's space;
- :func:`train_random_transforms`: the random crop/augmentation of training samples.

The preprocessing and inference lists are plain MONAI, with no alice3d code inside, so the
bundle can serialise them. Training flips of a task with lateral pairs use
:class:`RandLateralFlipd` (a ``RandFlipd`` that also exchanges right/left label ids); the
bundle never carries training transforms.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection
from monai.utils import TraceKeys
from monai.transforms.utils import map_binary_to_indices, map_classes_to_indices

from alice3d.data.canonical import RAS_LABELS, geometry_transforms  # RAS_LABELS: the bundle exporter's too
from alice3d.finetune.config import AugConfig
from alice3d.finetune.tasks import CLASSIFICATION, TaskSpec


def _is_seg(task: TaskSpec) -> bool:
    return task.kind != CLASSIFICATION


def preprocess_transforms(task: TaskSpec, keys: Sequence[str] = ("image", "label")) -> list:
    """Deterministic preprocessing of already loaded ``(*S)`` arrays with their affines.

    Segmentation: RAS, resample to ``task.spacing`` (bilinear image, nearest label),
    HU window -> [0, 1] clipped, crop to the image foreground (voxels above the window's
    low end). Classification: RAS, HU window, resize to ``task.roi``.
    """
    keys = [k for k in keys]
    image_keys = [k for k in keys if k == "image"]
    lo, hi = task.hu_window
    # The geometry steps are the store's, landmark's and probing's (alice3d.data.canonical), so a
    # case gets the same voxels here as in every other command; they stay invertible for Invertd.
    steps: list = [mt.EnsureChannelFirstd(keys=keys, channel_dim="no_channel"),
                   *geometry_transforms(keys, task.spacing if _is_seg(task) else None, task.orientation,
                                        image_keys=image_keys)]
    if _is_seg(task):
        steps.append(mt.ScaleIntensityRanged(keys=image_keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
        steps.append(mt.CropForegroundd(keys=keys, source_key="image", allow_smaller=True, margin=0))
    else:
        steps.append(mt.ScaleIntensityRanged(keys=image_keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
        steps.append(mt.Resized(keys=image_keys, spatial_size=tuple(task.roi), mode="trilinear"))
    return steps


def inference_transforms(task: TaskSpec) -> mt.Compose:
    """Image file path under key ``"image"`` -> preprocessed MetaTensor ``(C, *S)``."""
    return mt.Compose([mt.LoadImaged(keys=["image"], image_only=True, dtype="float32"),
                       *preprocess_transforms(task, keys=("image",))])


def postprocess_transforms(task: TaskSpec, preprocessing: mt.Compose) -> mt.Compose:
    """Logits ``"pred"`` ``(K, *S)`` -> label ids ``(1, *S_in)`` in the input image's space."""
    return mt.Compose([
        mt.AsDiscreted(keys=["pred"], argmax=True),
        mt.Invertd(keys=["pred"], transform=preprocessing, orig_keys=["image"], nearest_interp=True, to_tensor=True),
    ])


def swap_label_ids(label, pairs: Sequence[Sequence[int]]):
    """A copy of the label map (tensor or array of ids, any shape) with the ids of each pair exchanged."""
    out = label.clone() if isinstance(label, torch.Tensor) else np.array(label, copy=True)
    for a, b in pairs:
        out[label == a] = b
        out[label == b] = a
    return out


def swap_channels(onehot, pairs: Sequence[Sequence[int]]):
    """A one-hot / per-class ``(K, *S)`` tensor with the channels of each pair exchanged."""
    order = list(range(onehot.shape[0]))
    for a, b in pairs:
        order[a], order[b] = b, a
    return onehot[order] if isinstance(onehot, torch.Tensor) else np.asarray(onehot)[order]


class RandLateralFlipd(mt.RandFlipd):
    """``RandFlipd`` of one spatial axis that, when it flips, also exchanges the ids of the
    task's lateral pairs (right kidney <-> left kidney, ...) in ``label_keys`` (id maps
    ``(1, *S)``) and the matching channels of ``onehot_keys`` (``(K, *S)``).

    A flip of any axis is a mirror image: the right-hand structure of the original becomes,
    anatomically, the left-hand one of the mirrored body (anterior x superior, which defines
    "right", changes sign). Hence every axis' flip swaps, and two flips (a rotation) swap back.
    For the left-right axis (0 in RAS) this is the obvious case: the right kidney moves to the
    left and must be labelled left; a flip of the anterior-posterior axis leaves it on the right
    of a body whose front is now at the back, which is a mirrored body rotated 180 degrees
    in-plane, where it is the left kidney again. Without the swap at every flip, RandRotate90d
    (proper rotations, no swap) and the flips would teach opposite sides for the same image.

    The draw is RandFlipd's (one ``R.rand() < prob`` per call), so seeds give the same flips.
    """

    def __init__(self, keys: KeysCollection, pairs: Sequence[Sequence[int]], label_keys: KeysCollection = ("label",),
                 onehot_keys: KeysCollection = (), prob: float = 0.1, spatial_axis: int = 0,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys=keys, prob=prob, spatial_axis=spatial_axis, allow_missing_keys=allow_missing_keys)
        self.pairs = tuple((int(a), int(b)) for a, b in pairs)
        self.label_keys = (label_keys,) if isinstance(label_keys, str) else tuple(label_keys)
        self.onehot_keys = (onehot_keys,) if isinstance(onehot_keys, str) else tuple(onehot_keys)

    def _swap(self, d: dict) -> dict:
        for key in self.label_keys:
            if key in d:
                d[key] = swap_label_ids(d[key], self.pairs)
        for key in self.onehot_keys:
            if key in d:
                d[key] = swap_channels(d[key], self.pairs)
        return d

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict[Hashable, torch.Tensor]:
        d = super().__call__(data, lazy=lazy)
        return self._swap(d) if self._do_transform and self.pairs else d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = next(iter(self.key_iterator(d)), None)
        flipped = first is not None and self.get_most_recent_transform(d, first)[TraceKeys.DO_TRANSFORM]
        return self._swap(super().inverse(d)) if flipped and self.pairs else super().inverse(d)


def flip_transforms(keys: Sequence[str], nd: int, prob: float, lateral_pairs: Sequence[Sequence[int]] = (),
                    label_keys: Sequence[str] = ("label",), onehot_keys: Sequence[str] = ()) -> list:
    """One random flip per spatial axis; with lateral pairs every flip exchanges their ids (and the
    channels of ``onehot_keys``: per-class vectors or maps, e.g. the known classes)."""
    if not lateral_pairs:
        return [mt.RandFlipd(keys=list(keys), prob=prob, spatial_axis=a) for a in range(nd)]
    return [RandLateralFlipd(keys=list(keys), pairs=lateral_pairs, label_keys=[k for k in label_keys if k in keys],
                             onehot_keys=list(onehot_keys), prob=prob, spatial_axis=a) for a in range(nd)]


FG_KEY, BG_KEY = "label_fg", "label_bg"  # precomputed crop-centre candidates (see training_view)
CLASS_KEY = "label_classes"
# (K,) bool, the classes a case contours (partial labels). Crops and spatial transforms leave it
# alone (MONAI copies keys they do not transform); a lateral flip exchanges its entries with the
# label ids, because the flipped image's "left parotid" is the original's right one.
KNOWN_KEY = "known"


def training_view(image, label, task: TaskSpec, max_indices: int = 200_000, seed: int = 0) -> dict:
    """A preprocessed case made ready for repeated random crops: zero-padded to at least the
    ROI (as MONAI's cropping needs), plus flat indices of foreground voxels (label > 0), of
    background voxels inside the body (image > 0) and of each class (background = the body's
    background voxels), each uniformly subsampled to at most ``max_indices`` so that every crop
    does not rescan the whole volume."""
    d = mt.SpatialPadd(keys=["image", "label"], spatial_size=tuple(task.roi), mode="constant")(
        {"image": image, "label": label})
    fg, bg = map_binary_to_indices(d["label"] > 0, d["image"], image_threshold=0.0)
    organs = map_classes_to_indices(d["label"], task.num_classes)[1:]
    rng = np.random.default_rng(seed)
    keep = []
    for idx in (np.asarray(fg), np.asarray(bg), *map(np.asarray, organs)):
        if len(idx) > max_indices:
            idx = np.sort(rng.choice(idx, size=max_indices, replace=False))
        keep.append(idx.astype(np.int64))
    return {"image": d["image"], "label": d["label"], FG_KEY: keep[0], BG_KEY: keep[1], CLASS_KEY: keep[1:]}


def train_random_transforms(task: TaskSpec, aug: AugConfig) -> mt.Compose:
    """Random ROI crop + augmentation of one :func:`training_view` -> one training sample."""
    roi = tuple(task.roi)
    nd = len(roi)
    if not _is_seg(task):
        steps: list = [mt.RandFlipd(keys=["image"], prob=aug.flip_prob, spatial_axis=a) for a in range(nd)]
        if aug.shift_intensity > 0 and aug.shift_prob > 0:
            steps.append(mt.RandShiftIntensityd(keys=["image"], offsets=aug.shift_intensity, prob=aug.shift_prob))
        return mt.Compose(steps)
    keys = ["image", "label"]
    if aug.crop == "classes":
        # A class absent from a case gets ratio 0 for it (MONAI warns once per class).
        ratios = [aug.neg] + [aug.pos] * (task.num_classes - 1)
        crop = mt.RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=roi, ratios=ratios,
                                          num_classes=task.num_classes, num_samples=1, indices_key=CLASS_KEY,
                                          allow_smaller=False)
    else:
        crop = mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=aug.pos, neg=aug.neg,
                                         num_samples=1, image_key="image", image_threshold=0.0, allow_smaller=False,
                                         fg_indices_key=FG_KEY, bg_indices_key=BG_KEY)
    steps = [crop]
    if aug.scale_prob > 0:
        steps.append(mt.RandZoomd(keys=keys, prob=aug.scale_prob, min_zoom=1.0 - aug.scale_range,
                                  max_zoom=1.0 + aug.scale_range, mode=["trilinear", "nearest"], keep_size=True))
    if aug.flip_prob > 0:
        # Axis 0 is left-right: preprocess_transforms orients every case RAS (Orientationd) first.
        steps += flip_transforms(keys, nd, aug.flip_prob, task.lateral_pairs, onehot_keys=[KNOWN_KEY])
    if aug.rot90_prob > 0 and nd >= 2 and roi[0] == roi[1]:
        steps.append(mt.RandRotate90d(keys=keys, prob=aug.rot90_prob, max_k=3, spatial_axes=(0, 1)))
    if aug.blur_prob > 0:
        steps.append(mt.RandGaussianSmoothd(keys=["image"], prob=aug.blur_prob, sigma_x=(0.5, 1.0),
                                            sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)))
    if aug.shift_intensity > 0 and aug.shift_prob > 0:
        steps.append(mt.RandShiftIntensityd(keys=["image"], offsets=aug.shift_intensity, prob=aug.shift_prob))
    return mt.Compose(steps)
