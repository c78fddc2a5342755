"""Networks for fine-tuning, described by plain-data *specs* and built from them.

A spec is ``{"name": ..., "args": {...}}`` with constructor arguments only, so a saved
``best.pt`` (and the exported bundle) rebuilds the exact network without the encoder
file it was initialised from:

- ``unetr``      -> ``monai.networks.nets.UNETR(**args)``       (encoder at ``.vit``)
- ``swin_unetr`` -> ``monai.networks.nets.SwinUNETR(**args)``   (encoder at ``.swinViT``)
- ``nnformer``   -> ``alice3d.encoders.nnformer.NNFormer(**args)`` (encoder at ``.encoder``)
- ``classifier`` -> :class:`EncoderClassifier` (ViT / Swin / nnFormer encoder + linear head)

:func:`network_spec` derives the spec from the model config and the task, or, with a
pretrained encoder, from the encoder file's metadata (its architecture wins).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

from alice3d.config import ConfigError
from alice3d.encoders.nnformer import NNFormer, nnformer_configs
from alice3d.encoders.registry import encoder_from_args, feature_dim
from alice3d.finetune.config import CLASSIFIER_ENCODERS, MODELS, ModelConfig
from alice3d.finetune.tasks import CLASSIFICATION, TaskSpec
from alice3d.train.checkpoint import CheckpointError

# Which encoder architecture (encoder.pt "arch") fits which network.
ARCH_OF_MODEL = {"unetr": "vit", "swin_unetr": "swin", "nnformer": "nnformer",
                 "vit": "vit", "swin": "swin"}
SEG_MODEL_OF_ARCH = {"vit": "unetr", "swin": "swin_unetr", "nnformer": "nnformer"}

UNETR_PATCH, UNETR_LAYERS = 16, 12  # hard-coded in MONAI's UNETR
SWIN_STAGES = 4

_SWIN_KEYS = ("in_channels", "feature_size", "depths", "num_heads", "spatial_dims", "window_size",
              "patch_size", "mlp_ratio", "qkv_bias", "patch_norm", "downsample", "use_v2")
_NNFORMER_KEYS = ("in_channels", "embed_dim", "depths", "num_heads", "window_sizes", "patch_stride",
                  "mlp_ratio", "qkv_bias", "spatial_dims")
_VIT_KEYS = ("img_size", "patch_size", "in_channels", "spatial_dims", "hidden_size", "mlp_dim",
             "num_layers", "num_heads", "qkv_bias", "cls_token")


class EncoderMismatchError(CheckpointError):
    """An encoder file that does not fit the chosen network or task."""


# ----------------------------------------------------------------------------- helpers


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _plain(v: Any) -> Any:
    """Tuples -> lists (specs are saved as YAML/JSON-friendly data)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def required_divisor(spec: dict[str, Any]) -> tuple[int, ...]:
    """Per-axis size every network input must be a multiple of."""
    name, a = spec["name"], spec["args"]
    nd = int(a.get("spatial_dims", 3))
    if name == "unetr":
        return (UNETR_PATCH,) * nd
    if name == "swin_unetr":
        return (int(a.get("patch_size", 2)) ** (SWIN_STAGES + 1),) * nd  # SwinUNETR checks patch_size**5
    if name == "nnformer":
        stride = _tuple(a.get("patch_stride", (4, 4, 2)), nd)
        return tuple(s * 2 ** (len(a["depths"]) - 1) for s in stride)
    return required_divisor({"name": SEG_MODEL_OF_ARCH[a["encoder"]], "args": a["encoder_args"]})


def check_roi(spec: dict[str, Any], roi: Sequence[int]) -> None:
    div = required_divisor(spec)
    bad = [a for a, (r, d) in enumerate(zip(roi, div)) if r % d]
    if len(roi) != len(div) or bad:
        raise ConfigError(
            f"task.roi {list(roi)} does not fit {spec['name']}: every axis must be a multiple of {list(div)} "
            f"(axes {bad} are not); choose e.g. task.roi={[max(d, round(r / d) * d) for r, d in zip(roi, div)]}"
        )
    if spec["name"] == "swin_unetr" and math.prod(r // d for r, d in zip(roi, div)) < 2:
        # SwinUNETR instance-normalises its 1/32 bottleneck, which needs more than one voxel.
        raise ConfigError(f"task.roi {list(roi)} is too small for SwinUNETR: at least one axis must be >= {2 * div[0]}")


# ----------------------------------------------------------------------------- specs


def _encoder_args_from_meta(meta: dict[str, Any], source: str) -> dict[str, Any]:
    args = meta.get("arch_args")
    if not isinstance(args, dict):
        raise EncoderMismatchError(f"{source}: encoder metadata has no 'arch_args' mapping")
    return dict(args)


def _check_common(args: dict[str, Any], task: TaskSpec, source: str, arch: str) -> None:
    nd = int(args.get("spatial_dims", 3))
    if nd != task.spatial_dims:
        raise EncoderMismatchError(
            f"{source}: {arch} encoder is {nd}-D but task {task.name!r} is {task.spatial_dims}-D (roi {list(task.roi)})"
        )
    ch = int(args.get("in_channels", 1))
    if ch != task.in_channels:
        raise EncoderMismatchError(
            f"{source}: {arch} encoder takes {ch} input channel(s) but task {task.name!r} has {task.in_channels}"
        )


def _vit_args(m: ModelConfig, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    nd = task.spatial_dims
    if meta is None:
        return dict(hidden_size=m.hidden_size, mlp_dim=m.mlp_dim, num_heads=m.num_heads, qkv_bias=m.qkv_bias,
                    patch_size=[UNETR_PATCH] * nd, num_layers=UNETR_LAYERS, in_channels=task.in_channels,
                    spatial_dims=nd, img_size=list(task.roi))
    a = _encoder_args_from_meta(meta, source)
    _check_common(a, task, source, "vit")
    patch = _tuple(a.get("patch_size", UNETR_PATCH), nd)
    layers = int(a.get("num_layers", UNETR_LAYERS))
    problems = []
    if patch != (UNETR_PATCH,) * nd:
        problems.append(f"patch size {list(patch)} (UNETR needs {UNETR_PATCH})")
    if layers != UNETR_LAYERS:
        problems.append(f"{layers} layers (UNETR needs {UNETR_LAYERS}; its skips read blocks 3/6/9)")
    if a.get("cls_token"):
        problems.append("a cls token (UNETR's ViT has none, so that weight could not load)")
    if problems:
        raise EncoderMismatchError(f"{source}: the ViT encoder does not fit UNETR: " + "; ".join(problems))
    return {k: _plain(a[k]) for k in _VIT_KEYS if k in a}


def _unetr_spec(m: ModelConfig, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    v = _vit_args(m, task, meta, source)
    args = dict(in_channels=task.in_channels, out_channels=task.num_classes, img_size=list(task.roi),
                feature_size=m.feature_size, hidden_size=int(v["hidden_size"]), mlp_dim=int(v["mlp_dim"]),
                num_heads=int(v["num_heads"]), norm_name=m.norm_name, qkv_bias=bool(v.get("qkv_bias", False)),
                spatial_dims=task.spatial_dims)
    return {"name": "unetr", "args": args}


def _swin_args(m: ModelConfig, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    if meta is None:
        return dict(in_channels=task.in_channels, feature_size=m.feature_size, depths=list(m.swin_depths),
                    num_heads=list(m.swin_heads), spatial_dims=task.spatial_dims,
                    window_size=[m.swin_window] * task.spatial_dims, patch_size=2, mlp_ratio=4.0, qkv_bias=True,
                    patch_norm=False, downsample="merging", use_v2=False)
    a = _encoder_args_from_meta(meta, source)
    _check_common(a, task, source, "swin")
    if len(a.get("depths", ())) != SWIN_STAGES:
        raise EncoderMismatchError(f"{source}: Swin encoder has depths {a.get('depths')}; SwinUNETR needs {SWIN_STAGES} stages")
    if int(a.get("feature_size", 0)) % 12:
        raise EncoderMismatchError(f"{source}: Swin feature_size {a.get('feature_size')} is not a multiple of 12 (SwinUNETR)")
    out = {k: _plain(a[k]) for k in _SWIN_KEYS if k in a}
    if isinstance(out.get("window_size"), int):
        out["window_size"] = [out["window_size"]] * task.spatial_dims
    return out


def _swin_unetr_spec(m: ModelConfig, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    args = dict(_swin_args(m, task, meta, source), out_channels=task.num_classes, norm_name=m.norm_name,
                dropout_path_rate=m.dropout_path_rate, use_checkpoint=m.use_checkpoint)
    return {"name": "swin_unetr", "args": args}


def _nnformer_args(m: ModelConfig, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    if meta is None:
        if m.nnformer_preset not in nnformer_configs:
            raise ConfigError(f"model.nnformer_preset: unknown {m.nnformer_preset!r}; expected one of {sorted(nnformer_configs)}")
        p = nnformer_configs[m.nnformer_preset]
        return dict(in_channels=task.in_channels, spatial_dims=task.spatial_dims,
                    **{k: _plain(p[k]) for k in _NNFORMER_KEYS if k in p})
    a = _encoder_args_from_meta(meta, source)
    _check_common(a, task, source, "nnformer")
    return {k: _plain(a[k]) for k in _NNFORMER_KEYS if k in a}


def _nnformer_spec(m: ModelConfig, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    args = dict(_nnformer_args(m, task, meta, source), out_channels=task.num_classes,
                deep_supervision=m.deep_supervision, drop_path_rate=m.dropout_path_rate,
                use_checkpoint=m.use_checkpoint)
    return {"name": "nnformer", "args": args}


def _classifier_spec(m: ModelConfig, name: str, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    arch = ARCH_OF_MODEL[name]
    if arch == "vit":
        enc = _vit_args(m, task, meta, source)
        enc["img_size"] = list(task.roi)  # the position embedding is resampled to the input grid
        enc.setdefault("cls_token", False)
    elif arch == "swin":
        enc = _swin_args(m, task, meta, source)
    else:
        enc = _nnformer_args(m, task, meta, source)
    return {"name": "classifier", "args": {"encoder": arch, "encoder_args": enc, "num_classes": task.num_classes}}


def resolve_model_name(m: ModelConfig, task: TaskSpec, meta: dict | None, source: str = "encoder file") -> str:
    """The network to build: the config's choice, checked against the encoder's arch."""
    arch = meta.get("arch") if meta else None
    if arch is not None and arch not in SEG_MODEL_OF_ARCH:
        raise EncoderMismatchError(
            f"{source}: holds a {arch!r} encoder; fine-tuning networks exist for {sorted(SEG_MODEL_OF_ARCH)} encoders "
            "(UNETR, SwinUNETR, nnFormer and their classifiers)"
        )
    classification = task.kind == CLASSIFICATION
    if not m.name:
        if arch:
            return arch if classification else SEG_MODEL_OF_ARCH[arch]
        return "vit" if classification else "unetr"
    allowed = CLASSIFIER_ENCODERS if classification else MODELS
    if m.name not in allowed:
        raise ConfigError(f"model.name: {m.name!r} is not a {task.kind} model; expected one of {list(allowed)}")
    if arch and ARCH_OF_MODEL[m.name] != arch:
        fits = arch if classification else SEG_MODEL_OF_ARCH[arch]
        raise EncoderMismatchError(
            f"{source}: holds a {arch!r} encoder, which fits model {fits!r}, not model.name={m.name!r}; "
            f"pass --model {fits} or another encoder file"
        )
    return m.name


def network_spec(m: ModelConfig, task: TaskSpec, encoder_meta: dict | None = None,
                 source: str = "encoder file") -> dict[str, Any]:
    """Plain-data description of the network for ``task`` (see the module docstring)."""
    name = resolve_model_name(m, task, encoder_meta, source)
    if task.kind == CLASSIFICATION:
        spec = _classifier_spec(m, name, task, encoder_meta, source)
    else:
        builders = {"unetr": _unetr_spec, "swin_unetr": _swin_unetr_spec, "nnformer": _nnformer_spec}
        spec = builders[name](m, task, encoder_meta, source)
    check_roi(spec, task.roi)
    return spec


# ----------------------------------------------------------------------------- networks


class EncoderClassifier(nn.Module):
    """Encoder -> global average pool of its deepest features -> linear head.

    forward: ``(B, C, *S)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, encoder: str, encoder_args: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        if encoder not in SEG_MODEL_OF_ARCH:
            raise ConfigError(f"classifier encoder {encoder!r}: expected one of {list(SEG_MODEL_OF_ARCH)}")
        self.arch = encoder
        self.encoder = encoder_from_args(encoder, encoder_args)
        dim = feature_dim(encoder, encoder_args)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> pooled features ``(B, D)``."""
        if self.arch == "vit":
            tokens = self.encoder(x)  # (B, L, D)
            return tokens.mean(1)
        deepest = self.encoder(x)[-1]  # (B, D, *s)
        return deepest.flatten(2).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))


def build_network(spec: dict[str, Any]) -> nn.Module:
    name, args = spec["name"], dict(spec["args"])
    if name == "unetr":
        args["img_size"] = tuple(args["img_size"])
        return UNETR(**args)
    if name == "swin_unetr":
        for k in ("depths", "num_heads", "window_size"):
            if isinstance(args.get(k), list):
                args[k] = tuple(args[k])
        return SwinUNETR(**args)
    if name == "nnformer":
        return NNFormer(**args)
    if name == "classifier":
        return EncoderClassifier(**args)
    raise ConfigError(f"unknown network {name!r}; expected one of {[*MODELS, 'classifier']}")


def encoder_module(network: nn.Module, spec: dict[str, Any]) -> tuple[nn.Module, str]:
    """The sub-module an ``encoder.pt`` loads into, and its attribute path for reports."""
    name = spec["name"]
    if name == "unetr":
        return network.vit, "UNETR.vit"
    if name == "swin_unetr":
        return network.swinViT, "SwinUNETR.swinViT"
    if name == "nnformer":
        return network.encoder, "NNFormer.encoder"
    return network.encoder, f"EncoderClassifier.encoder ({spec['args']['encoder']})"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vit_grid(img_size: Sequence[int], patch_size: Any) -> tuple[int, ...]:
    patch = _tuple(patch_size, len(img_size))
    return tuple(int(s) // p for s, p in zip(img_size, patch))
