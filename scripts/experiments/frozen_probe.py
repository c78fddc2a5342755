"""Frozen-feature probes of encoder files on organ-centre crops (helpers of the transfer experiments).

Task: crops of the encoder's pretraining size centred on voxels of a few organs ("which organ
is at the centre?"), from a labelled phantom cohort never seen in pretraining; crops of the
first 75 % of its subjects train the probe, the rest test it. Probes on the mean-pooled final
tokens: multinomial logistic regression (`alice3d.analysis.probing.linear_probe`) and a
cosine k-nearest-neighbour vote on the standardised features.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alice3d.analysis.probing import (
    ProbeTask,
    encoder_from_file,
    frozen_tokens,
    linear_probe,
    knn_probe as probing_knn,
    load_labeled_volumes,
    organ_center_task,
)
from alice3d.data.datalists import load_datalist
from alice3d.encoders.vit import ViTEncoder

__all__ = ["probe_task", "first_labeled_volumes", "random_encoder_like", "knn_probe", "probe_encoder"]


def probe_task(data: str = "", crop: tuple[int, ...] = (64, 64, 32), spacing=(3.0, 3.0, 3.0),
               phantom_n: int = 12, phantom_seed: int = 1, per_class: int = 16, seed: int = 0) -> ProbeTask:
    """Organ-centre crops of `data` (a datalist/folder; "" = the phantom cohort `phantom_seed`)."""
    vols = load_labeled_volumes(data, spacing=spacing, phantom_n=phantom_n, phantom_seed=phantom_seed)
    return organ_center_task(vols, crop, per_class=per_class, margin=1, seed=seed)


def first_labeled_volumes(datalist: str | Path, n: int, out: Path, spacing, hu_window) -> list:
    """The first `n` labelled cases of `datalist` (training, then validation), loaded like
    `load_labeled_volumes` does; `out` receives the subset's datalist (so only those are read)."""
    entries = []
    for key in ("training", "validation"):
        entries += [e for e in load_datalist(datalist, key=key) if e.get("label")]
    subset = out / "probe_datalist.json"
    subset.parent.mkdir(parents=True, exist_ok=True)
    subset.write_text(json.dumps({"training": entries[:n]}, indent=1))
    return load_labeled_volumes(str(subset), spacing=spacing, hu_window=hu_window, keys=("training",))


def random_encoder_like(path: str | Path, seed: int = 0) -> torch.nn.Module:
    """The ViT of `path`'s metadata with fresh random weights (the random-init reference)."""
    encoder, _ = encoder_from_file(path)
    if not isinstance(encoder, ViTEncoder):
        raise ValueError(f"{path}: random_encoder_like supports ViT encoders, got {type(encoder).__name__}")
    args = encoder.metadata()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fresh = ViTEncoder(img_size=args["img_size"], patch_size=args["patch_size"], in_channels=args["in_channels"],
                           spatial_dims=args["spatial_dims"], hidden_size=args["hidden_size"], mlp_dim=args["mlp_dim"],
                           num_layers=args["num_layers"], num_heads=args["num_heads"], qkv_bias=args["qkv_bias"])
    fresh.requires_grad_(False)
    return fresh.eval()


def knn_probe(tokens: torch.Tensor, task: ProbeTask, k: int = 10) -> float:
    """Test accuracy of `alice3d.analysis.probing.knn_probe`."""
    return probing_knn(tokens, task, k).test_acc


def probe_encoder(encoder: torch.nn.Module, task: ProbeTask) -> dict:
    """`{"linear": test acc, "knn": test acc, "linear_per_class": {...}}` of a frozen encoder."""
    tokens = frozen_tokens(encoder, task.images)
    lin = linear_probe(tokens, task)
    return {"linear": lin.test_acc, "knn": knn_probe(tokens, task), "linear_per_class": lin.per_class_test_acc}
