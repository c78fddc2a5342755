"""Linear and attentive probing of frozen encoders on a classification task built from labelled volumes.

Task ("which organ is at the centre of the crop"): crops (3D) or slice windows (2D) centred
on voxels of a few organs, plus "other" body voxels, from labelled CT volumes (the phantom
cohort by default). Train and test crops come from different subjects.

Probes on frozen features:
- linear: mean-pooled final tokens (or the last conv stage), standardised with the training
  statistics (MAE's BatchNorm without affine), multinomial logistic regression (L-BFGS).
- attentive (CAE): one cross-attention block whose learnable query attends over the frozen
  patch tokens, then LayerNorm and a linear classifier (AdamW).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from alice3d.data.canonical import to_canonical
from alice3d.data.crops import crop_at
from alice3d.data.datalists import load_datalist
from alice3d.data.io import DataError, Volume, load_volume
from alice3d.data.phantom import default_cohort
from alice3d.data.volumes import normalize_hu
from alice3d.encoders.resnet import ResNetEncoder
from alice3d.encoders.vit import ViTEncoder
from alice3d.methods.cae import CrossAttentionBlock
from alice3d.train.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PROBE_CLASSES",
    "ProbeTask",
    "ProbeResult",
    "load_labeled_volumes",
    "organ_center_task",
    "frozen_tokens",
    "linear_probe",
    "knn_probe",
    "attentive_probe",
    "run_probes",
    "encoder_from_file",
]

# Class name -> BTCV label ids; "other" (label 0 inside the body) is added by the task builder.
DEFAULT_PROBE_CLASSES: dict[str, tuple[int, ...]] = {
    "spleen": (1,),
    "right_kidney": (2,),
    "left_kidney": (3,),
    "liver": (6,),
    "stomach": (7,),
}


@dataclass
class ProbeTask:
    """images `(N, C, *spatial)` float, labels `(N,)` long, train `(N,)` bool (False = test),
    subjects `(N,)` long: the index of the volume each crop comes from (per-subject scores)."""

    images: torch.Tensor
    labels: torch.Tensor
    train: torch.Tensor
    class_names: list[str]
    subjects: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return (f"{len(self.labels)} crops of {tuple(self.images.shape[2:])} ({int(self.train.sum())} train / "
                f"{int((~self.train).sum())} test), classes " + ", ".join(f"{n}={c}" for n, c in zip(self.class_names, counts)))


@dataclass
class ProbeResult:
    kind: str
    train_acc: float
    test_acc: float
    n_train: int
    n_test: int
    per_class_test_acc: dict[str, float] = field(default_factory=dict)
    test_correct: torch.Tensor | None = None  # (n_test,) bool, in task order: per-subject scores

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "train_acc": self.train_acc, "test_acc": self.test_acc,
                "n_train": self.n_train, "n_test": self.n_test, "per_class_test_acc": self.per_class_test_acc}


# ----------------------------------------------------------------------------- data


def load_labeled_volumes(
    data: str = "",
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    hu_window: Sequence[float] = (-125.0, 255.0),
    phantom_n: int = 16,
    phantom_seed: int = 0,
    keys: Sequence[str] = ("training", "validation"),
) -> list[Volume]:
    """Image + label volumes of a datalist/folder (or the embedded phantom cohort), RAS, resampled, windowed to [0, 1]."""
    if not data:
        data = str(default_cohort(n=phantom_n, seed=phantom_seed) / "dataset_0.json")
    entries: list[dict] = []
    for key in keys:
        try:
            entries += load_datalist(data, key=key)
        except DataError:
            if key == keys[0]:
                raise
    labeled = [e for e in entries if isinstance(e, dict) and e.get("label")]
    if not labeled:
        raise DataError(f"{data}: no entries with a 'label'; probing needs labelled volumes")
    vols = []
    for e in labeled:
        vol = load_volume(e["image"], e["label"])
        vol = to_canonical(vol, spacing)
        vols.append(Volume(array=normalize_hu(vol.array, hu_window), affine=vol.affine, path=vol.path, label=vol.label))
    return vols


def organ_center_task(
    volumes: Sequence[Volume],
    size: Sequence[int],
    classes: Mapping[str, Sequence[int]] | None = None,
    per_class: int = 8,
    axis: int = 2,
    train_fraction: float = 0.75,
    body_threshold: float = 0.05,
    margin: int = 0,
    seed: int = 0,
    contoured: Sequence[Sequence[int] | None] | None = None,
    other: bool = True,
) -> ProbeTask:
    """Crops centred on `per_class` random voxels of each class in every volume (fewer if a class is absent).

    size: 3 entries -> 3D crops; 2 entries -> 2D windows of slices normal to `axis`.
    margin: centres are taken at least this many voxels inside the class (binary erosion), so
    the centre label is unambiguous. The first `train_fraction` of the volumes are training subjects.
    contoured: per volume, the label ids it contours (None = all); a class with an id outside them
    is unknown there, so it gives no crops. other: add the "other" class (label 0 in the body);
    with partial labels leave it out, since an uncontoured organ would count as "other".
    """
    classes = dict(DEFAULT_PROBE_CLASSES if classes is None else classes)
    names = list(classes) + (["other"] if other else [])
    if contoured is not None and len(contoured) != len(volumes):
        raise ValueError(f"organ_center_task: {len(contoured)} contoured lists for {len(volumes)} volumes")
    size = tuple(int(s) for s in size)
    window = size if len(size) == 3 else tuple(np.insert(np.asarray(size), axis, 1).tolist())
    if len(size) not in (2, 3):
        raise ValueError(f"organ_center_task: size must have 2 or 3 entries, got {size}")
    if any(v.label is None for v in volumes):
        raise DataError("organ_center_task: every volume needs a label map")
    rng = np.random.default_rng(seed)
    n_train_vol = max(1, min(len(volumes) - 1, int(round(train_fraction * len(volumes))))) if len(volumes) > 1 else 1
    images, labels, train, subjects = [], [], [], []
    for j, vol in enumerate(volumes):
        known = None if contoured is None or contoured[j] is None else set(int(i) for i in contoured[j])
        regions = {name: np.isin(vol.label, ids) for name, ids in classes.items()
                   if known is None or set(int(i) for i in ids) <= known}
        if other:
            regions["other"] = (vol.label == 0) & (vol.array > body_threshold)
        for k, name in enumerate(names):
            if name not in regions:
                continue
            region = regions[name]
            if margin > 0:
                region = ndimage.binary_erosion(region, iterations=margin)
            idx = np.argwhere(region)
            if len(idx) == 0:
                continue
            for c in idx[rng.choice(len(idx), min(per_class, len(idx)), replace=False)]:
                crop = crop_at(vol.array, c, window)
                images.append(crop.reshape(size))
                labels.append(k)
                train.append(j < n_train_vol)
                subjects.append(j)
    if not images:
        raise DataError("organ_center_task: no voxel of any probe class found in the volumes")
    return ProbeTask(
        images=torch.from_numpy(np.stack(images).astype(np.float32))[:, None],
        labels=torch.tensor(labels, dtype=torch.long),
        train=torch.tensor(train, dtype=torch.bool),
        class_names=names,
        subjects=torch.tensor(subjects, dtype=torch.long),
    )


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def frozen_tokens(encoder: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Final features as tokens `(N, L, D)`: ViT output after the final norm (prefix tokens
    dropped) or the last ResNet stage `(N, prod(s), C)`. The encoder is run in eval mode."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            if isinstance(encoder, ViTEncoder):
                tok = encoder(x)[:, encoder.num_prefix_tokens:]
            elif isinstance(encoder, ResNetEncoder):
                tok = encoder(x)[-1].flatten(2).transpose(1, 2)
            else:
                y = encoder(x)
                y = y[-1] if isinstance(y, (list, tuple)) else y
                tok = y.flatten(2).transpose(1, 2) if y.ndim > 3 else y
            out.append(tok.float().cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def _accuracies(pred: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> tuple[float, dict[str, float]]:
    acc = float((pred == labels).float().mean()) if len(labels) else float("nan")
    per = {}
    for k, n in enumerate(names):
        sel = labels == k
        if sel.any():
            per[n] = float((pred[sel] == k).float().mean())
    return acc, per


def linear_probe(
    tokens: torch.Tensor, task: ProbeTask, weight_decay: float = 1e-3, max_iter: int = 100, seed: int = 0
) -> ProbeResult:
    """Multinomial logistic regression on standardised mean-pooled tokens."""
    feats = tokens.mean(1).double()
    tr, te = task.train, ~task.train
    mean, std = feats[tr].mean(0), feats[tr].std(0).clamp_min(1e-6)
    feats = (feats - mean) / std
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(feats.shape[1], task.num_classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)
    x, y = feats[tr], task.labels[tr]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(x), y) + 0.5 * weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = lin(feats).argmax(1)
    train_acc, _ = _accuracies(pred[tr], task.labels[tr], task.class_names)
    test_acc, per = _accuracies(pred[te], task.labels[te], task.class_names)
    return ProbeResult("linear", train_acc, test_acc, int(tr.sum()), int(te.sum()), per, pred[te] == task.labels[te])


def knn_probe(tokens: torch.Tensor, task: ProbeTask, k: int = 10, temperature: float = 0.07) -> ProbeResult:
    """Cosine k-nearest-neighbour vote (weights exp(cos / T), as in DINO) on standardised mean-pooled tokens."""
    feats = tokens.mean(1).double()
    tr, te = task.train, ~task.train
    feats = (feats - feats[tr].mean(0)) / feats[tr].std(0).clamp_min(1e-6)
    feats = F.normalize(feats, dim=-1)
    sims = feats[te] @ feats[tr].t()  # (N_test, N_train)
    k = min(k, int(tr.sum()))
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(int(te.sum()), task.num_classes, dtype=torch.float64)
    votes.scatter_add_(1, task.labels[tr][idx], (top / temperature).exp())
    pred = votes.argmax(1)
    test_acc, per = _accuracies(pred, task.labels[te], task.class_names)
    return ProbeResult("knn", float("nan"), test_acc, int(tr.sum()), int(te.sum()), per, pred == task.labels[te])


class AttentiveProbe(nn.Module):
    """CAE's attentive probe: learnable query -> cross-attention over frozen tokens -> LayerNorm -> linear."""

    def __init__(self, dim: int, num_classes: int, num_heads: int | None = None) -> None:
        super().__init__()
        heads = num_heads or next(h for h in (8, 6, 4, 3, 2, 1) if dim % h == 0)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = CrossAttentionBlock(dim, heads)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1)
        return self.head(self.norm(self.attn(q, tokens)[:, 0]))


def attentive_probe(
    tokens: torch.Tensor,
    task: ProbeTask,
    steps: int = 300,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
) -> ProbeResult:
    """Train an `AttentiveProbe` on the training tokens (standardised per channel) with AdamW."""
    g = torch.Generator().manual_seed(seed)
    tr, te = task.train, ~task.train
    mean = tokens[tr].mean((0, 1))
    std = tokens[tr].std((0, 1)).clamp_min(1e-6)
    tokens = (tokens - mean) / std
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = AttentiveProbe(tokens.shape[-1], task.num_classes)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = tokens[tr], task.labels[tr]
    n = x.shape[0]
    probe.train()
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            opt.zero_grad()
            F.cross_entropy(probe(x[idx]), y[idx]).backward()
            opt.step()
    probe.eval()
    with torch.no_grad():
        pred = torch.cat([probe(tokens[i:i + 256]).argmax(1) for i in range(0, tokens.shape[0], 256)])
    train_acc, _ = _accuracies(pred[tr], task.labels[tr], task.class_names)
    test_acc, per = _accuracies(pred[te], task.labels[te], task.class_names)
    return ProbeResult("attentive", train_acc, test_acc, int(tr.sum()), int(te.sum()), per)


def run_probes(
    encoder: nn.Module, task: ProbeTask, kinds: Sequence[str] = ("linear", "attentive"), seed: int = 0, **kwargs: Any
) -> dict[str, ProbeResult]:
    """Extract frozen tokens once and fit each probe kind; `kwargs` go to `attentive_probe`."""
    unknown = set(kinds) - {"linear", "attentive"}
    if unknown:
        raise ValueError(f"run_probes: unknown probe kinds {sorted(unknown)}; expected linear and/or attentive")
    if not bool(task.train.any()) or not bool((~task.train).any()):
        raise ValueError("run_probes: the task needs both training and test crops (use at least 2 volumes)")
    tokens = frozen_tokens(encoder, task.images)
    out = {}
    if "linear" in kinds:
        out["linear"] = linear_probe(tokens, task, seed=seed)
    if "attentive" in kinds:
        out["attentive"] = attentive_probe(tokens, task, seed=seed, **kwargs)
    return out


# ----------------------------------------------------------------------------- encoder files


_VIT_ARGS = ("img_size", "patch_size", "in_channels", "spatial_dims", "hidden_size", "mlp_dim", "num_layers",
             "num_heads", "qkv_bias", "cls_token")


def encoder_from_file(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a frozen ViT or ResNet encoder from an `encoder.pt` (weights loaded strict, eval mode)."""
    obj = load_checkpoint(path, expect_kind="alice3d-encoder")
    state, meta = obj.get("state_dict"), obj.get("metadata", {})
    args = meta.get("arch_args", {})
    arch = meta.get("arch")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: encoder file has no 'state_dict'")
    if arch == "vit":
        missing = [k for k in _VIT_ARGS if k not in args and k != "cls_token"]
        if missing:
            raise CheckpointError(f"{path}: ViT metadata lacks {missing} in arch_args")
        enc: nn.Module = ViTEncoder(**{k: args[k] for k in _VIT_ARGS if k in args})
    elif arch == "resnet":
        enc = ResNetEncoder.from_metadata(args)
    else:
        raise CheckpointError(f"{path}: probing supports ViT and ResNet encoders, got arch {arch!r}")
    enc.load_state_dict(state, strict=True)
    enc.requires_grad_(False)
    return enc.eval(), meta
