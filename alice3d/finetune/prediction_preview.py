"""Preview PNG of a validation case: ground truth (top row) and prediction (bottom row)
over axial | coronal | sagittal slices through the centre of the ground-truth foreground
(marked by the cross-hair)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from alice3d.viz.ortho import save_label_comparison


def save_prediction_preview(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, path: str | Path,
                            spacing: Sequence[float] | None = None) -> Path:
    """image ``(X, Y, Z)`` in [0, 1] (RAS), gt/pred label ids of the same shape -> PNG."""
    image, gt, pred = np.asarray(image, np.float32), np.asarray(gt), np.asarray(pred)
    if image.ndim != 3 or image.shape != gt.shape or gt.shape != pred.shape:
        raise ValueError(f"preview {path}: expected three (X, Y, Z) arrays of one shape, got "
                         f"{image.shape}, {gt.shape}, {pred.shape}")
    fg = np.argwhere(gt > 0)
    centre = fg.mean(0) if len(fg) else (np.asarray(image.shape) - 1) / 2
    return save_label_comparison(path, image, {"ground truth": gt, "prediction": pred}, point_vox=centre,
                                 window=(0.0, 1.0), spacing=spacing, alpha=0.45)
