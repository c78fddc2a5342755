"""``configs/inference.json`` of an exported bundle: MONAI-native, no alice3d code inside.

The preprocessing entries mirror :func:`alice3d.finetune.transforms.inference_transforms`
one to one (same transforms, same arguments), so the bundle and ``alice3d-finetune
predict`` see the same network input; :func:`check_mirrors_finetune` refuses to export
when that list has changed shape. The run is a plain expression list (no ignite engine,
so the bundle needs only torch, monai, fire and nibabel):

    for each input file: preprocessing -> sliding window at the task ROI -> argmax ->
    Invertd (back through crop, resampling, orientation) -> SaveImaged (NIfTI, uint8)
"""

from __future__ import annotations

from typing import Any

from alice3d.bundle.errors import ExportError
from alice3d.finetune.config import EvalConfig
from alice3d.finetune.tasks import TaskSpec
from alice3d.finetune.transforms import RAS_LABELS, inference_transforms

# The MONAI transform classes of the preprocessing below, in order (for the drift check).
PREPROCESSING_CLASSES = ("LoadImaged", "EnsureChannelFirstd", "Orientationd", "Spacingd",
                         "ScaleIntensityRanged", "CropForegroundd")

NO_INPUT_MESSAGE = ("error: no input images: pass --dataset_dir DIR (a folder of *.nii / *.nii.gz CT files) "
                    "or --datalist \"['CT.nii.gz']\"")


class PreprocessingMismatchError(ExportError):
    """The fine-tuning inference transforms are not the list this exporter writes."""


def preprocessing_entries(task: TaskSpec) -> list[dict[str, Any]]:
    """Config entries of :func:`inference_transforms` for a segmentation ``task``."""
    lo, hi = task.hu_window
    steps: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": ["image"], "image_only": True, "dtype": "float32"},
        {"_target_": "EnsureChannelFirstd", "keys": ["image"], "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "keys": ["image"], "axcodes": task.orientation,
         "labels": [list(pair) for pair in RAS_LABELS]},
    ]
    if task.spacing:
        steps.append({"_target_": "Spacingd", "keys": ["image"], "pixdim": [float(s) for s in task.spacing],
                      "mode": ["bilinear"]})
    steps += [
        {"_target_": "ScaleIntensityRanged", "keys": ["image"], "a_min": float(lo), "a_max": float(hi),
         "b_min": 0.0, "b_max": 1.0, "clip": True},
        {"_target_": "CropForegroundd", "keys": ["image"], "source_key": "image", "allow_smaller": True,
         "margin": 0},
    ]
    return steps


def check_mirrors_finetune(task: TaskSpec) -> None:
    """Raise when ``inference_transforms(task)`` is not the list :func:`preprocessing_entries` writes."""
    ours = [e["_target_"] for e in preprocessing_entries(task)]
    theirs = [type(t).__name__ for t in inference_transforms(task).transforms]
    if ours != theirs:
        raise PreprocessingMismatchError(
            f"alice3d.finetune.transforms.inference_transforms now builds {theirs}, but the bundle exporter "
            f"writes {ours}; update alice3d/bundle/inference_config.py so the bundle preprocesses like predict"
        )


def postprocessing_entries(num_classes: int) -> list[dict[str, Any]]:
    """Argmax, invert the preprocessing onto the input grid, write ``<name>_seg.nii.gz``."""
    return [
        {"_target_": "AsDiscreted", "keys": ["pred"], "argmax": True},
        {"_target_": "Invertd", "keys": ["pred"], "transform": "@preprocessing", "orig_keys": ["image"],
         "nearest_interp": True, "to_tensor": True},
        {"_target_": "SaveImaged", "keys": ["pred"], "output_dir": "@output_dir", "output_postfix": "seg",
         "output_ext": ".nii.gz", "output_dtype": "uint8" if num_classes <= 256 else "int16", "resample": False,
         "separate_folder": False, "squeeze_end_dims": True, "writer": "NibabelWriter", "print_log": True},
    ]


def inference_config(task: TaskSpec, network_def: dict[str, Any], inference: EvalConfig) -> dict[str, Any]:
    """The whole ``inference.json`` (a dict ready for ``json.dump``).

    ``network_def``: ``{"_target_": ..., **constructor args}`` of the bundle network.
    Override on the command line: ``--bundle_root``, ``--dataset_dir`` or ``--datalist``,
    ``--output_dir``, ``--device``.
    """
    predict_one = ("$torch.no_grad()(lambda d: @postprocessing(dict(d, pred=@inferer(d['image'][None].to(@device), "
                   "@network)[0].float().cpu())))")
    return {
        "imports": ["$import glob", "$import os", "$import sys", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*')))",
        "check_inputs": f"$@datalist or sys.exit({NO_INPUT_MESSAGE!r})",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_entries(task)},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [int(r) for r in task.roi],
                    "sw_batch_size": int(inference.sw_batch_size), "overlap": float(inference.sw_overlap),
                    "mode": inference.sw_mode},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing_entries(task.num_classes)},
        "predict_one": predict_one,
        "run": ["$@check_inputs", "$@load_weights", "$@network.eval()",
                "$[@predict_one(@dataset[i]) for i in range(len(@dataset))]"],
    }
