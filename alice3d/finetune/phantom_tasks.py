"""Embedded default data of the fine-tuning tasks (no download, generated on first use).

``btcv``: the phantom cohort of :mod:`alice3d.data.phantom` as it is (BTCV layout).
``classification``: the same phantoms, half of them with hypodense liver lesions
(label 1, "findings"), half without (label 0), written next to the cohort with a
``dataset_0.json`` whose labels are class ids. It stands in for MosMed-style
"findings / no findings" CT classification.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from alice3d.data.io import DataError, load_volume, save_nifti
from alice3d.data.phantom import default_cohort

log = logging.getLogger("alice3d.finetune")

LIVER = 6  # BTCV id
LESION_HU_DROP = 70.0


def segmentation_cohort(n: int, seed: int) -> Path:
    return Path(default_cohort(n=n, seed=seed))


def _add_lesions(image: np.ndarray, label: np.ndarray, spacing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darken 2-4 spheres (radius 6-12 mm) centred inside the liver; returns a new image."""
    liver = np.argwhere(label == LIVER)
    if len(liver) == 0:
        raise DataError("phantom without a liver: cannot place a lesion")
    out = image.copy()
    grid = np.indices(image.shape, dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        c = liver[rng.integers(len(liver))].astype(np.float32)
        r = float(rng.uniform(6.0, 12.0))
        d2 = sum(((grid[a] - c[a]) * spacing[a]) ** 2 for a in range(3))
        out = np.where((d2 <= r * r) & (label == LIVER), out - LESION_HU_DROP, out)
    return out


def classification_cohort(n: int, seed: int) -> Path:
    """Folder with imagesTr/*.nii.gz and dataset_0.json (labels 0/1), cached after the first call."""
    src = segmentation_cohort(n, seed)
    root = src.parent / f"{src.name}-classification"
    datalist = root / "dataset_0.json"
    if datalist.is_file():
        return root
    lists = json.loads((src / "dataset_0.json").read_text())
    entries = [e for key in ("training", "validation") for e in lists.get(key, [])]
    rng = np.random.default_rng(seed + 101)
    out: dict[str, list] = {"training": [], "validation": []}
    n_val = max(2, len(entries) // 4)
    for i, e in enumerate(entries):
        vol = load_volume(src / e["image"], src / e["label"])
        cls = i % 2
        arr = _add_lesions(vol.array, vol.label, np.asarray(vol.spacing), rng) if cls else vol.array
        name = f"imagesTr/case{i:04d}.nii.gz"
        save_nifti(arr.astype(np.float32), vol.affine, root / name)
        key = "validation" if i >= len(entries) - n_val else "training"
        out[key].append({"image": name, "label": cls})
    out.update(description="alice3d phantoms with/without hypodense liver lesions", labels={"0": "normal", "1": "findings"},
               modality={"0": "CT"}, numTraining=len(out["training"]), tensorImageSize="3D")
    tmp = datalist.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(datalist)  # written last: a half-built folder is regenerated next time
    log.info("classification phantoms written to %s", root)
    return root
