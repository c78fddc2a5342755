"""Networks for fine-tuning, described by plain-data *specs* and built from them.

A spec is ``{"name": ..., "args": {...}}`` with constructor arguments only, so a saved
``best.pt`` (and the exported bundle) rebuilds the exact network without the encoder
file it was initialised from:

- ``unetr``      -> ``monai.networks.nets.UNETR(**args)``       (encoder at ``.vit``)
- ``swin_unetr`` -> ``monai.networks.nets.SwinUNETR(**args)``   (encoder at ``.swinViT``)
- ``nnformer``   -> ``alice3d.encoders.nnformer.NNFormer(**args)`` (encoder at ``.encoder``)
- ``classifier`` -> :class:`EncoderClassifier` (ViT / Swin / nnFormer encoder + linear head)

Which network belongs to which encoder, and everything that differs between them, is the
encoder family's ``finetune`` (``alice3d.encoders.registry``). :func:`network_spec` derives
the spec from the model config and the task, or, with a pretrained encoder, from the
encoder file's metadata (its architecture wins).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn

from alice3d.config import ConfigError
from alice3d.encoders.registry import ENCODERS, UNETR_PATCH, EncoderFamily, FinetuneNetwork
from alice3d.finetune.config import CLASSIFIER_ENCODERS, MODELS, ModelConfig
from alice3d.finetune.tasks import CLASSIFICATION, TaskSpec
from alice3d.train.checkpoint import CheckpointError

log = logging.getLogger("alice3d.finetune")

__all__ = ["UNETR_PATCH", "EncoderMismatchError", "network_spec", "build_network", "encoder_module", "EncoderClassifier"]

# Encoder families with a fine-tuning network, and that network by its spec name.
FINETUNABLE: dict[str, EncoderFamily] = {k: f for k, f in ENCODERS.items() if f.finetune is not None}
NETWORKS: dict[str, FinetuneNetwork] = {f.finetune.name: f.finetune for f in FINETUNABLE.values()}
# Which encoder architecture (encoder.pt "arch") fits which network (model.name).
SEG_MODEL_OF_ARCH = {k: f.finetune.name for k, f in FINETUNABLE.items()}
ARCH_OF_MODEL = {**{n: k for k, n in SEG_MODEL_OF_ARCH.items()}, **{k: k for k in FINETUNABLE}}


class EncoderMismatchError(CheckpointError):
    """An encoder file that does not fit the chosen network or task."""


# ----------------------------------------------------------------------------- helpers


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _network(spec: dict[str, Any]) -> tuple[FinetuneNetwork, dict[str, Any]]:
    """The network that sets the input divisor of `spec`, and its args (a classifier: its encoder's)."""
    if spec["name"] == "classifier":
        return FINETUNABLE[spec["args"]["encoder"]].finetune, spec["args"]["encoder_args"]
    return NETWORKS[spec["name"]], spec["args"]


def required_divisor(spec: dict[str, Any]) -> tuple[int, ...]:
    """Per-axis size every network input must be a multiple of."""
    net, args = _network(spec)
    return net.divisor(args)


def check_roi(spec: dict[str, Any], roi: Sequence[int]) -> None:
    div = required_divisor(spec)
    bad = [a for a, (r, d) in enumerate(zip(roi, div)) if r % d]
    if len(roi) != len(div) or bad:
        raise ConfigError(
            f"task.roi {list(roi)} does not fit {spec['name']}: every axis must be a multiple of {list(div)} "
            f"(axes {bad} are not); choose e.g. task.roi={[max(d, round(r / d) * d) for r, d in zip(roi, div)]}"
        )
    net = NETWORKS.get(spec["name"])
    if net is not None and math.prod(r // d for r, d in zip(roi, div)) < net.min_units:
        raise ConfigError(f"task.roi {list(roi)} is too small for {net.title}: at least one axis must be >= {2 * div[0]}")


# ----------------------------------------------------------------------------- specs


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


def _encoder_args(arch: str, m: ModelConfig, task: TaskSpec, meta: dict | None, source: str) -> dict[str, Any]:
    """Constructor args of the `arch` encoder: from the model config, or checked from the file's metadata."""
    net = FINETUNABLE[arch].finetune
    if meta is None:
        return net.default_args(m, task)
    args = meta.get("arch_args")
    if not isinstance(args, dict):
        raise EncoderMismatchError(f"{source}: encoder metadata has no 'arch_args' mapping")
    _check_common(args, task, source, arch)
    problem = net.misfit(args)
    if problem:
        raise EncoderMismatchError(f"{source}: {problem}")
    return net.saved_args(args, task.spatial_dims)


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
    arch = ARCH_OF_MODEL[name]
    enc = _encoder_args(arch, m, task, encoder_meta, source)
    net = FINETUNABLE[arch].finetune
    if task.kind == CLASSIFICATION:
        spec = {"name": "classifier", "args": {"encoder": arch, "encoder_args": net.classifier_args(enc, task),
                                               "num_classes": task.num_classes}}
    else:
        spec = {"name": net.name, "args": net.network_args(enc, m, task)}
    check_roi(spec, task.roi)
    return spec


# ----------------------------------------------------------------------------- networks


class EncoderClassifier(nn.Module):
    """Encoder -> global average pool of its deepest features -> linear head.

    forward: ``(B, C, *S)`` -> logits ``(B, num_classes)``.
    """

    def __init__(self, encoder: str, encoder_args: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        if encoder not in FINETUNABLE:
            raise ConfigError(f"classifier encoder {encoder!r}: expected one of {list(FINETUNABLE)}")
        family = FINETUNABLE[encoder]
        self.arch = encoder
        self._pool = family.finetune.pool
        self.encoder = family.rebuild(encoder_args)
        dim = family.feature_dim(encoder_args)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` -> pooled features ``(B, D)``."""
        return self._pool(self.encoder, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x)))


# ----------------------------------------------------------------------------- CPU bf16 guard


def bf16_weight_grad_unsafe(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether oneDNN's CPU bf16 Conv3d weight gradient may be wrong for an input of this size.

    oneDNN 3.x ``jit_bf16:avx512_core_bf16`` backward_weights (the kernel PyTorch picks for bf16
    on AVX512-BF16 CPUs) returns garbage -- values of uninitialised memory, so sometimes inf or
    NaN -- when the input depth is larger than 1 but shorter than the kernel (measured: depth 2
    with kernel 3, depth 2-4 with kernel 5; forward and input gradient are correct, fp32 and the
    native kernel are correct). SwinUNETR's 1/32 bottleneck block is exactly that at ROI depth 64
    (2x2x1 for 64x64x32). Checked on every axis, not only depth: the tensors concerned are tiny.
    """
    return any(1 < s < d * (k - 1) + 1 for s, k, d in zip(spatial, kernel, dilation))


class CpuBf16SafeConv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs in fp32 under CPU bf16 autocast when its weight gradient would be
    wrong (:func:`bf16_weight_grad_unsafe`); otherwise exactly ``nn.Conv3d``. Same parameters and
    state-dict keys, so checkpoints and bundles are unaffected.

    forward: ``(B, C_in, D, H, W)`` -> ``(B, C_out, D', H', W')`` (fp32 on the guarded path).
    """

    _announced = False  # one log line per process

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles only the plain path
            if self._needs_fp32(x):
                return self._fp32_forward(x)
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _needs_fp32(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and bf16_weight_grad_unsafe(x.shape[2:], self.kernel_size, self.dilation))

    @torch.jit.unused
    def _fp32_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not CpuBf16SafeConv3d._announced:
            CpuBf16SafeConv3d._announced = True
            log.info("CPU bf16 autocast: Conv3d on %s inputs (kernel %s) runs in fp32, because oneDNN's bf16 "
                     "weight gradient is wrong when an input axis is shorter than the kernel; the rest stays bf16",
                     "x".join(str(s) for s in x.shape[2:]), "x".join(str(k) for k in self.kernel_size))
        with torch.autocast("cpu", enabled=False):
            return self._conv_forward(x.float(), self.weight, self.bias)


def guard_cpu_bf16_convs(network: nn.Module) -> int:
    """Turn every plain ``nn.Conv3d`` of ``network`` into :class:`CpuBf16SafeConv3d` in place
    (parameters untouched); returns how many. A no-op outside CPU bf16 autocast training."""
    n = 0
    for m in network.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = CpuBf16SafeConv3d
            n += 1
    return n


def build_network(spec: dict[str, Any]) -> nn.Module:
    name, args = spec["name"], dict(spec["args"])
    if name == "classifier":
        return EncoderClassifier(**args)
    if name in NETWORKS:
        return NETWORKS[name].build(args)
    raise ConfigError(f"unknown network {name!r}; expected one of {[*MODELS, 'classifier']}")


def encoder_module(network: nn.Module, spec: dict[str, Any]) -> tuple[nn.Module, str]:
    """The sub-module an ``encoder.pt`` loads into, and its attribute path for reports."""
    net = NETWORKS.get(spec["name"])
    if net is None:
        return network.encoder, f"EncoderClassifier.encoder ({spec['args']['encoder']})"
    return getattr(network, net.encoder_attr), f"{net.title}.{net.encoder_attr}"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def vit_grid(img_size: Sequence[int], patch_size: Any) -> tuple[int, ...]:
    patch = _tuple(patch_size, len(img_size))
    return tuple(int(s) // p for s, p in zip(img_size, patch))
