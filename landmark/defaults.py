"""The default landmark model for the embedded phantom cohort: shipped, or trained once and reused.

``alice3d-pretrain`` without ``--landmark`` on the embedded cohort needs a matcher. For the
default cohort (16 subjects, seed 0) the package ships the model that ``alice3d-landmark
train --out RUN`` produces with every default (``landmark/resources``, 1 MB, read with
``weights_only``), so a first run does not spend minutes training it; it is used only while
its recorded phantom and default versions are the current ones. For any other cohort this
trains the default CPU configuration the first time and keeps the result under
``$ALICE3D_CACHE/landmark`` (or ``~/.cache/alice3d/landmark``). Training runs in a
temporary folder that is renamed into place when complete, so an interrupted first run
never leaves a half-written model behind and concurrent callers agree on the result.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alice3d.config import load_config
from alice3d.data.phantom import PHANTOM_VERSION, build_cache_dir, cache_root
from alice3d.train.checkpoint import load_checkpoint
from landmark.config import LandmarkConfig
from landmark.train import load_train_volumes, train_landmark

log = logging.getLogger("alice3d.landmark")

DEFAULT_VERSION = 2  # bump when the default configuration or training changes


def default_model_dir(n: int = 16, seed: int = 0) -> Path:
    return cache_root() / "landmark" / f"phantom-n{n}-s{seed}-v{DEFAULT_VERSION}"


SHIPPED = Path(__file__).with_name("resources") / "default_phantom_n16_s0.pt"


def shipped_model(n: int, seed: int) -> Path | None:
    """The shipped model when it is the one ``default_landmark_model(n, seed)`` would train, else None."""
    if not SHIPPED.is_file():
        return None
    info = load_checkpoint(SHIPPED, expect_kind="alice3d-landmark")["metadata"].get("shipped_default", {})
    wanted = {"phantom_version": PHANTOM_VERSION, "default_version": DEFAULT_VERSION, "phantom_n": n,
              "phantom_seed": seed}
    return SHIPPED if all(info.get(k) == v for k, v in wanted.items()) else None


def default_landmark_model(n: int = 16, seed: int = 0) -> Path:
    """Path of ``landmark.pt`` trained with the default config on ``default_cohort(n, seed)``."""
    shipped = shipped_model(n, seed)
    if shipped is not None:
        return shipped
    final = default_model_dir(n, seed)
    model = final / "landmark.pt"
    if model.is_file():
        return model
    cfg = load_config(LandmarkConfig, None, [f"data.phantom_n={n}", f"data.phantom_seed={seed}"])
    log.info("training the default landmark model on the phantom cohort (once; cached in %s)", final)

    def build(tmp: Path) -> None:
        if train_landmark(cfg, load_train_volumes(cfg), tmp) is None:
            log.warning("interrupted while training the default landmark model; nothing was cached, "
                        "run the command again to start it over")
            raise SystemExit(3)

    build_cache_dir(final, build, lambda d: (d / "landmark.pt").is_file())
    return model
