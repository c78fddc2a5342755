"""``alice3d-finetune predict``: a run's best network applied to one image file.

The image goes through :func:`~alice3d.finetune.transforms.inference_transforms` (the
list the exported bundle uses), sliding-window inference at the task ROI, argmax, and
``Invertd`` back through crop, resampling and orientation, so the written segmentation
has the input file's shape and voxel->world affine, whatever its orientation/spacing.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data.utils import dense_patch_slices

from alice3d.core.dist import resolve_device
from alice3d.data.inspect import log_modality_warnings
from alice3d.data.io import DataError, is_nifti, load_volume, save_image, save_nifti
from alice3d.finetune.config import EvalConfig
from alice3d.finetune.evaluate import sliding_window_logits
from alice3d.finetune.models import build_network
from alice3d.finetune.tasks import CLASSIFICATION, TaskSpec
from alice3d.finetune.transforms import inference_transforms, postprocess_transforms
from alice3d.runtime import progress
from alice3d.train.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger("alice3d.finetune")

BEST_KIND = "alice3d-best"


@dataclass
class LoadedRun:
    network: torch.nn.Module
    task: TaskSpec
    spec: dict[str, Any]
    inference: EvalConfig
    metadata: dict[str, Any]


def best_checkpoint(run: str | Path) -> Path:
    run = Path(run)
    path = run / "best.pt" if run.is_dir() else run
    if not path.is_file():
        raise CheckpointError(f"{run}: no best.pt (is this a finished alice3d-finetune run directory?)")
    return path


def load_run(run: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild the network of ``RUN/best.pt`` from its metadata and load its weights strictly."""
    path = best_checkpoint(run)
    ckpt = load_checkpoint(path, map_location="cpu", expect_kind=BEST_KIND)
    meta = ckpt["metadata"]
    if "task" not in meta or "network" not in meta:
        raise CheckpointError(f"{path}: not a fine-tuning checkpoint (metadata lacks 'task'/'network'; "
                              "a pretraining run's best.pt cannot predict)")
    task = TaskSpec.from_dict(meta["task"])
    spec = meta["network"]
    net = build_network(spec)
    prefix = "network."
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the network described in its metadata: {e}") from None
    inf = EvalConfig(**{k: v for k, v in meta.get("inference", {}).items() if k in EvalConfig.__dataclass_fields__})
    net.to(device).eval()
    return LoadedRun(net, task, spec, inf, meta)


def _logits_fn(net: torch.nn.Module, after: Callable[[], None] = lambda: None):
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        after()
        return out[0] if isinstance(out, (list, tuple)) else out

    return fn


def window_batches(shape: Sequence[int], roi: Sequence[int], ecfg: EvalConfig) -> int:
    """Network calls of MONAI's ``sliding_window_inference`` on one image of spatial ``shape``.

    MONAI pads the image to at least the ROI and steps ``int(roi * (1 - overlap))`` voxels
    (the whole axis where the padded size equals the ROI); ``sw_batch_size`` windows per call.
    """
    size = [max(int(s), int(r)) for s, r in zip(shape, roi)]
    interval = [r if r == s else max(1, int(r * (1 - ecfg.sw_overlap))) for s, r in zip(size, roi)]
    windows = len(dense_patch_slices(size, [int(r) for r in roi], interval))
    return math.ceil(windows / max(1, ecfg.sw_batch_size))


@torch.no_grad()
def segment_file(loaded: LoadedRun, image_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Label ids ``(*S_in)`` in the input file's voxel grid, and the file's RAS affine.

    NIfTI files go straight into :func:`inference_transforms` (as in the bundle); other
    formats (.mha, .nrrd, DICOM series folders) are read with SimpleITK and handed over as
    a temporary NIfTI with the same voxels and geometry.
    """
    task = loaded.task
    if task.kind == CLASSIFICATION:
        raise DataError(f"run task {task.name!r} is a classification task; predict writes segmentations only")
    image_path = str(image_path)
    vol = load_volume(image_path)  # clear errors for unreadable/non-finite/wrong-dimensional files
    log_modality_warnings(vol, task.modality, log)  # a label map or MR given as image: warn, go on
    lo = task.hu_window[0]
    if not (vol.array > lo).any():
        raise DataError(f"{image_path}: no voxel above {lo:g} HU (task window {list(task.hu_window)}); "
                        "is this a CT in Hounsfield units?")
    with tempfile.TemporaryDirectory(prefix="alice3d-predict-") as tmp:
        source = image_path
        if not is_nifti(image_path):
            source = str(save_nifti(vol.array, vol.affine, Path(tmp) / "image.nii.gz"))
        pre = inference_transforms(task)
        data = pre({"image": source})
        device = next(loaded.network.parameters()).device
        image = data["image"][None].to(device)
        total = window_batches(image.shape[2:], task.roi, loaded.inference)
        with progress(total=total, desc="sliding-window inference", unit="batch", logger=log) as bar:
            logits = sliding_window_logits(_logits_fn(loaded.network, bar.update), image, task.roi, loaded.inference)
        data["pred"] = logits[0].float().cpu()
        out = postprocess_transforms(task, pre)(data)
    seg = out["pred"]
    seg = (seg.as_tensor() if hasattr(seg, "as_tensor") else torch.as_tensor(seg))[0].round().long().numpy()
    if seg.shape != vol.shape:
        raise DataError(f"{image_path}: inverted segmentation has shape {seg.shape}, expected the input's {vol.shape}")
    return seg, vol.affine


def write_segmentation(seg: np.ndarray, image_path: str | Path, out_path: str | Path, affine: np.ndarray) -> Path:
    """Write ``seg`` with the input image's geometry: a NIfTI input's own header (exact
    affine) for NIfTI output, else ``affine`` (RAS) in the format of ``out_path``'s suffix."""
    dtype = np.uint8 if seg.max(initial=0) < 256 and seg.min(initial=0) >= 0 else np.int16
    image_path = str(image_path)
    if is_nifti(image_path) and is_nifti(out_path):
        ref = nib.load(image_path)
        img = nib.Nifti1Image(seg.astype(dtype), ref.affine, header=ref.header)
        img.set_data_dtype(dtype)
        img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(str(out_path))
        return Path(out_path)
    return save_image(seg, affine, out_path, dtype=dtype)


def predict(run: str | Path, image: str | Path, out: str | Path, device: str = "auto") -> Path:
    loaded = load_run(run, resolve_device(device))
    seg, affine = segment_file(loaded, image)
    path = write_segmentation(seg, image, out, affine)
    present = sorted(int(i) for i in np.unique(seg) if i)
    log.info("wrote %s: shape %s, labels %s", path, seg.shape,
             ", ".join(f"{i}={loaded.task.labels.get(i, '?')}" for i in present) or "none")
    return path
