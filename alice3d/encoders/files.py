"""``encoder.pt``: the online encoder's weights plus what fine-tuning needs to rebuild it.

Format (a plain dict, loadable with ``torch.load(path, weights_only=True)``)::

    {"state_dict": {...},                  # loads strict into UNETR.vit / SwinUNETR.swinViT / NNFormer.encoder
     "metadata": {"kind": "alice3d-encoder",
                  "arch": "vit" | "swin" | "nnformer" | "resnet",
                  "arch_args": {...},       # the encoder's own metadata() (sizes) without "kind"
                  "crop_size": [...], "spacing": [...], "hu_window": [lo, hi],
                  "spatial_dims": 3, "in_channels": 1, "method": "alice", ...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import alice3d
from alice3d.encoders.registry import ENCODERS
from alice3d.train.checkpoint import CheckpointError, atomic_save, load_checkpoint

ENCODER_KIND = "alice3d-encoder"
ARCHS = tuple(ENCODERS)


def encoder_file_metadata(encoder_meta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Turn an encoder's ``metadata()`` (whose "kind" is its arch) into encoder.pt metadata."""
    args = {k: v for k, v in encoder_meta.items() if k not in ("kind", "method")}
    meta = {"arch": encoder_meta["kind"], "arch_args": args, **extra}
    if "method" in encoder_meta:
        meta.setdefault("method", encoder_meta["method"])
    return meta


def save_encoder(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """``metadata`` as built by :func:`encoder_file_metadata` (must have arch and arch_args)."""
    meta = {"alice3d_version": alice3d.__version__, **metadata, "kind": ENCODER_KIND}
    if meta.get("arch") not in ARCHS:
        raise ValueError(f"encoder metadata 'arch' must be one of {ARCHS}, got {meta.get('arch')!r}")
    if "arch_args" not in meta:
        raise ValueError("encoder metadata needs 'arch_args' (the encoder's constructor arguments)")
    sd = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return atomic_save({"state_dict": sd, "metadata": meta}, path)


def load_encoder(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an ``encoder.pt``; refuse other kinds of file (checkpoints, landmark models)."""
    obj = load_checkpoint(path, expect_kind=ENCODER_KIND)
    if not isinstance(obj.get("state_dict"), dict) or not obj["state_dict"]:
        raise CheckpointError(f"{path}: encoder file has no 'state_dict' entry")
    meta = obj["metadata"]
    if meta.get("arch") not in ARCHS:
        raise CheckpointError(f"{path}: unknown encoder arch {meta.get('arch')!r}; expected one of {ARCHS}")
    return obj["state_dict"], meta
