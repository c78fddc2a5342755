"""The default landmark model for the embedded phantom cohort: trained once, then reused.

``alice3d-pretrain`` without ``--landmark`` on the embedded cohort needs a matcher; this
trains the default CPU configuration on that cohort the first time and keeps the result
under ``$ALICE3D_CACHE/landmark`` (or ``~/.cache/alice3d/landmark``). Training runs in a
temporary folder that is renamed into place when complete, so an interrupted first run
never leaves a half-written model behind and concurrent callers agree on the result.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("alice3d.landmark")

DEFAULT_VERSION = 2  # bump when the default configuration or training changes


def default_model_dir(n: int = 16, seed: int = 0) -> Path:
    from alice3d.data.phantom import cache_root

    return cache_root() / "landmark" / f"phantom-n{n}-s{seed}-v{DEFAULT_VERSION}"


def default_landmark_model(n: int = 16, seed: int = 0, overrides: tuple[str, ...] = ()) -> Path:
    """Path of ``landmark.pt`` trained with the default config on ``default_cohort(n, seed)``."""
    from alice3d.config import load_config
    from landmark.config import LandmarkConfig
    from landmark.train import load_train_volumes, train_landmark

    final = default_model_dir(n, seed)
    model = final / "landmark.pt"
    if model.is_file():
        return model
    final.parent.mkdir(parents=True, exist_ok=True)
    cfg = load_config(LandmarkConfig, None, [f"data.phantom_n={n}", f"data.phantom_seed={seed}", *overrides])
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.part-"))
    log.info("training the default landmark model on the phantom cohort (once; cached in %s)", final)
    try:
        if train_landmark(cfg, load_train_volumes(cfg), tmp) is None:
            log.warning("interrupted while training the default landmark model; nothing was cached, "
                        "run the command again to start it over")
            raise SystemExit(3)
        try:
            os.rename(tmp, final)
        except OSError:
            if not model.is_file():  # not another process's finished model: take ours
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return model
