"""``configs/metadata.json`` of an exported bundle, and its offline validation.

The metadata follows the MONAI bundle specification (``schema`` names MONAI's published
schema, so online tools recognise it); alice3d vendors its own, stricter JSON schema
(:data:`SCHEMA_PATH`, copied into every bundle as ``docs/meta_schema.json``) so that
``python -m monai.bundle verify_metadata --filepath docs/meta_schema.json`` validates
without fetching anything.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import monai
import numpy
import torch

import alice3d
from alice3d.bundle.errors import ExportError
from alice3d.bundle.network import NETWORK_PACKAGES
from alice3d.finetune.tasks import TaskSpec

MONAI_SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                    "meta_schema_20240725.json")
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "resources" / "bundle" / "meta_schema.json"
# Beyond MONAI itself every bundle needs nibabel (NIfTI in and out) and fire (the bundle CLI);
# networks add their own (alice3d.bundle.network.NETWORK_PACKAGES).
REQUIRED_PACKAGES = ("nibabel", "fire")

NETWORK_TITLES = {"unetr": "UNETR", "swin_unetr": "Swin UNETR", "nnformer": "nnFormer"}
REFERENCES = {
    "unetr": "Hatamizadeh et al., UNETR: Transformers for 3D Medical Image Segmentation, WACV 2022. "
             "https://arxiv.org/abs/2103.10504",
    "swin_unetr": "Hatamizadeh et al., Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors "
                  "in MRI Images, BrainLes 2021. https://arxiv.org/abs/2201.01266",
    "nnformer": "Zhou et al., nnFormer: Volumetric Medical Image Segmentation via a 3D Transformer. "
                "https://arxiv.org/abs/2109.03201",
    "alice": "Jiang et al., Anatomical Invariance Modeling and Semantic Alignment for Self-supervised Learning "
             "in 3D Medical Image Analysis, ICCV 2023. https://arxiv.org/abs/2302.05615",
    "monai": "MONAI Consortium, MONAI: Medical Open Network for AI. https://monai.io",
}
INTENDED_USE = ("Research and method development only. Not a medical device; not for clinical or diagnostic "
                "use.")


class MetadataError(ExportError):
    """Metadata that does not satisfy the vendored schema."""


@dataclass
class BundleInfo:
    """Who/what the bundle is, beyond what the run records (CLI flags of alice3d-export)."""

    name: str = ""  # "" = derived from task and network
    version: str = "0.1.0"
    authors: str = "alice3d"
    copyright: str = "Copyright (c) the alice3d authors"


def package_version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _release(v: str) -> str:
    """'2.13.0+cpu' -> '2.13.0' (as MONAI records the PyTorch version)."""
    return v.split("+")[0]


def software_versions(extra_packages: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "monai_version": _release(monai.__version__),
        "pytorch_version": _release(torch.__version__),
        "numpy_version": numpy.__version__,
        "required_packages_version": {p: package_version(p) for p in (*REQUIRED_PACKAGES, *extra_packages)},
    }


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def eval_metrics(results: dict[str, Any] | None) -> dict[str, Any]:
    """Mean and per-organ validation Dice/NSD of the run (``results.json``), ``{}`` without one."""
    if not results:
        return {}
    m = results.get("metrics", {})
    per = m.get("per_organ", {})
    return {
        "mean_dice": _finite(m.get("mean_dice")),
        "mean_nsd": _finite(m.get("mean_nsd")),
        "per_organ_dice": {o: _finite(v.get("dice", {}).get("mean")) for o, v in per.items()},
        "per_organ_nsd": {o: _finite(v.get("nsd", {}).get("mean")) for o, v in per.items()},
        "n_validation_cases": results.get("n_cases"),
        "nsd_tolerance_mm": results.get("nsd_tolerance_mm", {}),
        "evaluated_on": "validation cases of the fine-tuning run, on the task grid (after orientation, "
                        "resampling and foreground crop)",
    }


def preprocessing_text(task: TaskSpec) -> str:
    lo, hi = task.hu_window
    spacing = f"resample to {' x '.join(f'{s:g}' for s in task.spacing)} mm (bilinear), " if task.spacing else ""
    return (f"orient to {task.orientation}, {spacing}HU window [{lo:g}, {hi:g}] scaled to [0, 1] and clipped, "
            f"crop to the body (voxels above {lo:g} HU)")


def data_source_text(config: dict[str, Any] | None, results: dict[str, Any] | None) -> str:
    data = (config or {}).get("data", {})
    n_train = (results or {}).get("n_train_cases")
    n_val = (results or {}).get("n_cases")
    counts = f" ({n_train} training, {n_val} validation cases)" if n_train is not None else ""
    if data.get("data"):
        return f"datalist/data root {data['data']}{counts}"
    if config is None:
        return "not recorded (the run directory has no config.yaml)"
    return (f"alice3d embedded synthetic abdominal CT phantoms (alice3d-data phantoms, n={data.get('phantom_n')}, "
            f"seed {data.get('phantom_seed')}){counts}; synthetic data, no patient data")


def network_data_format(task: TaskSpec) -> dict[str, Any]:
    roi = [int(r) for r in task.roi]
    labels = {str(k): v for k, v in sorted(task.labels.items())}
    lo, hi = task.hu_window
    return {
        "inputs": {"image": {
            "type": "image", "format": "hounsfield", "modality": task.modality, "num_channels": task.in_channels,
            "spatial_shape": roi, "dtype": "float32", "value_range": [0, 1], "is_patch_data": True,
            "channel_def": {"0": f"image (HU window [{lo:g}, {hi:g}] scaled to [0, 1])"},
        }},
        "outputs": {"pred": {
            "type": "image", "format": "labels", "modality": task.modality, "num_channels": task.num_classes,
            "spatial_shape": roi, "dtype": "float32", "value_range": [], "is_patch_data": True,
            "channel_def": labels,
        }},
        "post_processed_outputs": {"pred": {
            "type": "image", "format": "segmentation", "modality": task.modality, "num_channels": 1,
            "spatial_shape": ["*"] * len(roi), "dtype": "uint8" if task.num_classes <= 256 else "int16",
            "value_range": [0, task.num_classes - 1], "is_patch_data": False,
            "channel_def": {"0": "label ids: " + ", ".join(f"{k} {v}" for k, v in labels.items())},
        }},
    }


def bundle_metadata(task: TaskSpec, spec: dict[str, Any], info: BundleInfo, *, run: Path, step: int,
                    results: dict[str, Any] | None, config: dict[str, Any] | None, pretrained: str,
                    torchscript: str, pretrained_method: str = "") -> dict[str, Any]:
    """The full ``metadata.json`` dict. ``pretrained``: the encoder.pt the run started from ("" =
    random init); ``pretrained_method``: the method recorded in it ("" = unknown)."""
    title = NETWORK_TITLES[spec["name"]]
    organs = ", ".join(task.foreground.values())
    name = info.name or f"{task.name.upper()} {title} segmentation (alice3d)"
    method = f" ({pretrained_method} pretraining)" if pretrained_method else ""
    init = f"initialised from the pretrained encoder {pretrained}{method}" if pretrained else \
        "trained from random initialisation"
    cite_alice = bool(pretrained) and pretrained_method == "alice"
    refs = [REFERENCES[spec["name"]], *([REFERENCES["alice"]] if cite_alice else []), REFERENCES["monai"]]

    return {
        "schema": MONAI_SCHEMA_URL,
        "name": name,
        "version": info.version,
        "changelog": {info.version: f"exported by alice3d-export from {run.name} (step {step})"},
        **software_versions(NETWORK_PACKAGES[spec["name"]]),
        "task": f"{task.name} multi-organ segmentation of {task.modality}: {organs}",
        "description": (f"{title} fine-tuned with alice3d on the {task.name} task ({task.num_classes - 1} organs + "
                        f"background), {init}. Input: a {task.modality} volume in Hounsfield units, any orientation "
                        f"and spacing; output: a label map on the input's voxel grid."),
        "authors": info.authors,
        "copyright": info.copyright,
        "data_source": data_source_text(config, results),
        "data_type": "nibabel",
        "image_classes": f"single channel {task.modality} in HU; preprocessing: {preprocessing_text(task)}",
        "label_classes": "single channel label map: " + ", ".join(f"{k} {v}" for k, v in sorted(task.labels.items())),
        "pred_classes": (f"{task.num_classes} channels (logits), channel k is label k; the bundle writes their "
                         "argmax as label ids"),
        "eval_metrics": eval_metrics(results),
        "intended_use": INTENDED_USE,
        "references": refs,
        "network_data_format": network_data_format(task),
        "alice3d": {
            "version": alice3d.__version__, "run": str(run.resolve()), "best_step": int(step), "network": spec,
            "task": task.to_dict(), "pretrained": pretrained or None, "torchscript": torchscript,
            "torchscript_input_shape": [1, task.in_channels, *[int(r) for r in task.roi]],
        },
    }


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def validate_metadata(meta: dict[str, Any], schema_path: str | Path = SCHEMA_PATH) -> bool:
    """Validate against the vendored schema; ``False`` (nothing checked) without ``jsonschema``."""
    try:
        import jsonschema  # optional: installed with the test extra only
    except ImportError:
        return False
    try:
        jsonschema.validate(instance=meta, schema=load_schema(schema_path))
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        raise MetadataError(f"metadata.json does not satisfy {schema_path} at {where}: {e.message}") from None
    return True
