"""The one encoder registry: family (the "kind" saved in encoder.pt) -> an `EncoderFamily`.

    kind      presets                       tokens / unit                    weights load strict into
    vit       vit_b, vit_s, vit_tiny        one per patch (patch_size)       UNETR(...).vit
    swin      swin_tiny ... swin_b          last stage (patch_size * 16)     SwinUNETR(...).swinViT
    nnformer  nnformer, _small, _tiny       last stage (total stride)        NNFormer(...).encoder
    resnet    resnet18, resnet10, _tiny     dense feature maps, no tokens    monai ResNet(feed_forward=False)

A family owns everything that differs between encoders, so no other module asks which kind
an encoder is: how a `BackboneConfig` builds it (`build`), its token / mask unit (`unit`),
the width of its deepest features (`feature_dim`), how saved constructor arguments rebuild
it (`from_args`) and its fine-tuning network (`finetune`: the segmentation network whose
encoder sub-module takes encoder.pt strict, plus what a classifier on the bare encoder needs).

`forwards` says which encoder forwards a family offers, so a method can state what it needs
and get a clear error for a pair that cannot work:

    visible   encode only the visible mask units (MAE-style; Swin "green" windows)
    dense     every unit encoded, masked ones replaced by a mask token at the stem
    cls       a CLS token whose attention scores the patches (ccMIM)
    abs_pos   an absolute position-embedding table that mask queries can use (CAE)
    conv      a convolutional multi-stage feature pyramid (ConvMIM)

The fine-tuning callables take the fine-tuning model config and task duck-typed (attributes
of `finetune.config.ModelConfig` / `finetune.tasks.TaskSpec`): this layer sits below them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
from monai.networks.nets import UNETR, SwinUNETR

from alice3d.config import ConfigError
from alice3d.encoders.nnformer import NNFormer, NNFormerEncoder, build_nnformer_encoder, nnformer_configs
from alice3d.encoders.resnet import ResNetEncoder, build_resnet, resnet_configs
from alice3d.encoders.swin import NUM_STAGES, SwinEncoder, build_swin, swin_configs
from alice3d.encoders.tokens import NNFormerTokens, SwinTokens, ViTTokens
from alice3d.encoders.vit import ViTEncoder, vit_configs

__all__ = ["EncoderFamily", "FinetuneNetwork", "ENCODERS", "family_of", "family_of_kind", "preset_names",
           "encoder_from_args", "feature_dim", "UNETR_PATCH"]

UNETR_PATCH, UNETR_LAYERS = 16, 12  # hard-coded in MONAI's UNETR
SWIN_STAGES = 4


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _plain(v: Any) -> Any:
    """Tuples -> lists (specs are saved as YAML/JSON-friendly data)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _pool_tokens(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder(x).mean(1)  # (B, L, D) -> (B, D)


def _pool_deepest(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return encoder(x)[-1].flatten(2).mean(-1)  # (B, D, *s) -> (B, D)


@dataclass(frozen=True)
class FinetuneNetwork:
    """The fine-tuning network of a family. `encoder args` are the raw encoder's constructor
    arguments (encoder.pt "arch_args"); `network args` those of the network (spec "args")."""

    name: str  # spec name and model.name: "unetr"
    title: str  # class name in reports: "UNETR"
    encoder_attr: str  # the network attribute encoder.pt loads into
    arg_keys: tuple[str, ...]  # encoder args the spec keeps from the metadata
    build: Callable[[dict], nn.Module]  # network args -> network
    divisor: Callable[[Mapping], tuple[int, ...]]  # network (or encoder) args -> per-axis multiple of inputs
    default_args: Callable[[Any, Any], dict]  # (model config, task) -> encoder args when there is no file
    network_args: Callable[[dict, Any, Any], dict]  # (encoder args, model config, task) -> network args
    misfit: Callable[[Mapping], str | None] = lambda a: None  # why saved encoder args cannot load, or None
    min_units: int = 1  # divisor cells the ROI must hold (SwinUNETR normalises a 1/32 bottleneck)
    classifier_args: Callable[[dict, Any], dict] = lambda enc, task: enc  # encoder args of the classifier
    pool: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _pool_deepest  # classifier features (B, D)

    def saved_args(self, args: Mapping[str, Any], nd: int) -> dict[str, Any]:
        """The encoder args of `arch_args` this network takes, as plain data."""
        out = {k: _plain(args[k]) for k in self.arg_keys if k in args}
        if isinstance(out.get("window_size"), int):
            out["window_size"] = [out["window_size"]] * nd
        return out


@dataclass(frozen=True)
class EncoderFamily:
    kind: str
    cls: type[nn.Module]  # the raw encoder: its state dict is encoder.pt's
    presets: Mapping[str, Mapping[str, Any]]
    forwards: frozenset[str]
    loads_into: str
    # Constructor arguments that BackboneConfig fields set; the others may come from encoder_kwargs.
    config_args: frozenset[str]
    build: Callable[[Any], nn.Module]  # BackboneConfig -> token encoder (or ResNet)
    unit: Callable[[Any, Mapping, str], tuple[int, ...]]  # (cfg, preset + kwargs, key prefix) -> voxels per unit
    unit_name: Callable[[tuple[int, ...]], str]  # for "img_size must be multiples of ..."
    feature_dim: Callable[[Mapping], int]  # metadata / arch_args -> channels of the deepest features
    has_tokens: bool = True  # False: dense feature maps only, no mask units to count
    from_args: Callable[[Mapping], nn.Module] | None = None  # None: cls(**accepted args)
    finetune: FinetuneNetwork | None = None
    pos_embed_key: str | None = None  # a position table that fine-tuning resamples to its grid
    token_grid: Callable[[Mapping], tuple[int, ...]] | None = None  # args -> grid of that table

    def kwargs(self) -> set[str]:
        """Constructor arguments a config may set through `encoder_kwargs`."""
        return set(inspect.signature(self.cls.__init__).parameters) - {"self"} - self.config_args

    def rebuild(self, args: Mapping[str, Any]) -> nn.Module:
        """The raw encoder from its saved constructor arguments (encoder.pt "arch_args")."""
        if self.from_args is not None:
            return self.from_args(dict(args))
        accepted = set(inspect.signature(self.cls.__init__).parameters) - {"self"}
        return self.cls(**{k: v for k, v in args.items() if k in accepted})


# ----------------------------------------------------------------------------- vit


def _vit_build(cfg: Any) -> nn.Module:
    kwargs: dict[str, Any] = dict(vit_configs[cfg.encoder])
    kwargs.update(pos_embed_trainable=cfg.pos_embed_trainable, use_flash_attention=cfg.use_flash_attention,
                  grad_checkpointing=cfg.grad_checkpointing)
    kwargs.update(cfg.encoder_kwargs)
    return ViTTokens(img_size=tuple(cfg.img_size), spatial_dims=cfg.spatial_dims, in_channels=cfg.in_channels,
                     patch_size=cfg.patch_size, **kwargs)


def _vit_misfit(a: Mapping) -> str | None:
    nd = int(a.get("spatial_dims", 3))
    patch = _tuple(a.get("patch_size", UNETR_PATCH), nd)
    layers = int(a.get("num_layers", UNETR_LAYERS))
    problems = []
    if patch != (UNETR_PATCH,) * nd:
        problems.append(f"patch size {list(patch)} (UNETR needs {UNETR_PATCH})")
    if layers != UNETR_LAYERS:
        problems.append(f"{layers} layers (UNETR needs {UNETR_LAYERS}; its skips read blocks 3/6/9)")
    if a.get("cls_token"):
        problems.append("a cls token (UNETR's ViT has none, so that weight could not load)")
    return "the ViT encoder does not fit UNETR: " + "; ".join(problems) if problems else None


def _unetr_build(args: dict) -> nn.Module:
    return UNETR(**{**args, "img_size": tuple(args["img_size"])})


_UNETR = FinetuneNetwork(
    name="unetr", title="UNETR", encoder_attr="vit",
    arg_keys=("img_size", "patch_size", "in_channels", "spatial_dims", "hidden_size", "mlp_dim", "num_layers",
              "num_heads", "qkv_bias", "cls_token"),
    build=_unetr_build,
    divisor=lambda a: (UNETR_PATCH,) * int(a.get("spatial_dims", 3)),
    default_args=lambda m, task: dict(
        hidden_size=m.hidden_size, mlp_dim=m.mlp_dim, num_heads=m.num_heads, qkv_bias=m.qkv_bias,
        patch_size=[UNETR_PATCH] * task.spatial_dims, num_layers=UNETR_LAYERS, in_channels=task.in_channels,
        spatial_dims=task.spatial_dims, img_size=list(task.roi)),
    network_args=lambda v, m, task: dict(
        in_channels=task.in_channels, out_channels=task.num_classes, img_size=list(task.roi),
        feature_size=m.feature_size, hidden_size=int(v["hidden_size"]), mlp_dim=int(v["mlp_dim"]),
        num_heads=int(v["num_heads"]), norm_name=m.norm_name, qkv_bias=bool(v.get("qkv_bias", False)),
        spatial_dims=task.spatial_dims),
    misfit=_vit_misfit,
    # The position table is resampled to the input grid; UNETR's ViT has no CLS token.
    classifier_args=lambda enc, task: {**enc, "img_size": list(task.roi), "cls_token": enc.get("cls_token", False)},
    pool=_pool_tokens,
)

# ----------------------------------------------------------------------------- swin


def _swin_unit(cfg: Any, merged: Mapping, prefix: str) -> tuple[int, ...]:
    patch = merged.get("patch_size", 2)
    if not isinstance(patch, int) or patch < 1:
        raise ConfigError(f"{prefix}.encoder_kwargs.patch_size: expected a positive int (Swin), got {patch!r}")
    return (patch * 2**NUM_STAGES,) * cfg.spatial_dims


def _swin_misfit(a: Mapping) -> str | None:
    if len(a.get("depths", ())) != SWIN_STAGES:
        return f"Swin encoder has depths {a.get('depths')}; SwinUNETR needs {SWIN_STAGES} stages"
    if int(a.get("feature_size", 0)) % 12:
        return f"Swin feature_size {a.get('feature_size')} is not a multiple of 12 (SwinUNETR)"
    return None


def _swin_unetr_build(args: dict) -> nn.Module:
    args = {k: tuple(v) if k in ("depths", "num_heads", "window_size") and isinstance(v, list) else v
            for k, v in args.items()}
    return SwinUNETR(**args)


_SWIN_UNETR = FinetuneNetwork(
    name="swin_unetr", title="SwinUNETR", encoder_attr="swinViT",
    arg_keys=("in_channels", "feature_size", "depths", "num_heads", "spatial_dims", "window_size", "patch_size",
              "mlp_ratio", "qkv_bias", "patch_norm", "downsample", "use_v2"),
    build=_swin_unetr_build,
    # SwinUNETR checks patch_size ** 5.
    divisor=lambda a: (int(a.get("patch_size", 2)) ** (SWIN_STAGES + 1),) * int(a.get("spatial_dims", 3)),
    default_args=lambda m, task: dict(
        in_channels=task.in_channels, feature_size=m.feature_size, depths=list(m.swin_depths),
        num_heads=list(m.swin_heads), spatial_dims=task.spatial_dims, window_size=[m.swin_window] * task.spatial_dims,
        patch_size=2, mlp_ratio=4.0, qkv_bias=True, patch_norm=False, downsample="merging", use_v2=False),
    network_args=lambda v, m, task: dict(
        v, out_channels=task.num_classes, norm_name=m.norm_name, dropout_path_rate=m.dropout_path_rate,
        use_checkpoint=m.use_checkpoint),
    misfit=_swin_misfit,
    min_units=2,
)

# ----------------------------------------------------------------------------- nnformer


def _nnformer_unit(cfg: Any, merged: Mapping, prefix: str) -> tuple[int, ...]:
    nd = cfg.spatial_dims
    stride = merged.get("patch_stride", (4, 4, 2))
    stride = (stride,) * nd if isinstance(stride, int) else tuple(stride)
    if len(stride) != nd:
        raise ConfigError(
            f"{prefix}.encoder_kwargs.patch_stride: expected {nd} values (spatial_dims={nd}), got {list(stride)}"
        )
    depth = len(merged.get("depths", (2, 2, 2, 2)))
    return tuple(int(s) * 2 ** (depth - 1) for s in stride)


def _nnformer_divisor(a: Mapping) -> tuple[int, ...]:
    stride = _tuple(a.get("patch_stride", (4, 4, 2)), int(a.get("spatial_dims", 3)))
    return tuple(s * 2 ** (len(a["depths"]) - 1) for s in stride)


_NNFORMER_KEYS = ("in_channels", "embed_dim", "depths", "num_heads", "window_sizes", "patch_stride", "mlp_ratio",
                  "qkv_bias", "spatial_dims")


def _nnformer_defaults(m: Any, task: Any) -> dict:
    if m.nnformer_preset not in nnformer_configs:
        raise ConfigError(f"model.nnformer_preset: unknown {m.nnformer_preset!r}; expected one of {sorted(nnformer_configs)}")
    p = nnformer_configs[m.nnformer_preset]
    return dict(in_channels=task.in_channels, spatial_dims=task.spatial_dims,
                **{k: _plain(p[k]) for k in _NNFORMER_KEYS if k in p})


_NNFORMER_NET = FinetuneNetwork(
    name="nnformer", title="NNFormer", encoder_attr="encoder", arg_keys=_NNFORMER_KEYS,
    build=lambda args: NNFormer(**args),
    divisor=_nnformer_divisor,
    default_args=_nnformer_defaults,
    network_args=lambda v, m, task: dict(
        v, out_channels=task.num_classes, deep_supervision=m.deep_supervision, drop_path_rate=m.dropout_path_rate,
        use_checkpoint=m.use_checkpoint),
)

# ----------------------------------------------------------------------------- the registry

ENCODERS: dict[str, EncoderFamily] = {
    "vit": EncoderFamily(
        "vit", ViTEncoder, vit_configs, frozenset({"visible", "dense", "cls", "abs_pos"}), "monai UNETR(...).vit",
        frozenset({"img_size", "patch_size", "in_channels", "spatial_dims", "pos_embed_trainable",
                   "use_flash_attention", "grad_checkpointing"}),
        build=_vit_build,
        unit=lambda cfg, merged, prefix: (cfg.patch_size,) * cfg.spatial_dims,
        unit_name=lambda unit: f"patch_size={unit[0]}",
        feature_dim=lambda a: int(a["hidden_size"]),
        finetune=_UNETR,
        pos_embed_key="patch_embedding.position_embeddings",
        # UNETR's args name no patch: it is fixed at 16.
        token_grid=lambda a: tuple(int(s) // p for s, p in zip(
            a["img_size"], _tuple(a.get("patch_size", UNETR_PATCH), len(a["img_size"])))),
    ),
    "swin": EncoderFamily(
        "swin", SwinEncoder, swin_configs, frozenset({"visible", "dense"}), "monai SwinUNETR(...).swinViT",
        frozenset({"in_channels", "spatial_dims"}),
        build=lambda cfg: SwinTokens(build_swin(cfg.encoder, cfg.spatial_dims, cfg.in_channels,
                                                **{"use_checkpoint": cfg.grad_checkpointing, **cfg.encoder_kwargs}),
                                     tuple(cfg.img_size)),
        unit=_swin_unit,
        unit_name=lambda unit: f"the Swin mask unit (patch_size * 16) {list(unit)}",
        feature_dim=lambda a: int(a["feature_size"]) * 2**NUM_STAGES,
        finetune=_SWIN_UNETR,
    ),
    "nnformer": EncoderFamily(
        "nnformer", NNFormerEncoder, nnformer_configs, frozenset({"visible", "dense"}),
        "alice3d NNFormer(...).encoder", frozenset({"in_channels", "spatial_dims"}),
        build=lambda cfg: NNFormerTokens(build_nnformer_encoder(
            cfg.encoder, cfg.in_channels, spatial_dims=cfg.spatial_dims,
            **{"use_checkpoint": cfg.grad_checkpointing, **cfg.encoder_kwargs}), tuple(cfg.img_size)),
        unit=_nnformer_unit,
        unit_name=lambda unit: f"the nnFormer total stride {list(unit)}",
        feature_dim=lambda a: int(a["embed_dim"]) * 2 ** (len(a["depths"]) - 1),
        finetune=_NNFORMER_NET,
    ),
    "resnet": EncoderFamily(
        "resnet", ResNetEncoder, resnet_configs, frozenset({"conv"}), "monai ResNet(..., feed_forward=False)",
        frozenset({"in_channels", "spatial_dims"}),
        build=lambda cfg: build_resnet(cfg.encoder, cfg.spatial_dims, cfg.in_channels, **cfg.encoder_kwargs),
        unit=lambda cfg, merged, prefix: (max(ResNetEncoder.stage_strides),) * cfg.spatial_dims,
        unit_name=lambda unit: f"the ResNet stride {list(unit)}",
        feature_dim=lambda a: int(a["widths"][-1]),
        has_tokens=False,
        from_args=ResNetEncoder.from_metadata,
    ),
}


def family_of(preset: str) -> EncoderFamily | None:
    """The family whose presets include `preset`, or None."""
    for family in ENCODERS.values():
        if preset in family.presets:
            return family
    return None


def family_of_kind(kind: str) -> EncoderFamily:
    """The family of an encoder.pt "arch" / an encoder's metadata "kind"; ValueError naming the choices."""
    if kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {kind!r}; expected one of {sorted(ENCODERS)}")
    return ENCODERS[kind]


def preset_names(forwards: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Every preset name (of the families that offer all of `forwards`), sorted."""
    return sorted(p for f in ENCODERS.values() if set(forwards) <= f.forwards for p in f.presets)


def encoder_from_args(kind: str, args: Mapping[str, Any]) -> nn.Module:
    """The raw encoder from its saved constructor arguments (encoder.pt "arch_args")."""
    return family_of_kind(kind).rebuild(args)


def feature_dim(kind: str, args: Mapping[str, Any]) -> int:
    """Channels of the deepest features of an encoder built from `args` (metadata / arch_args)."""
    return family_of_kind(kind).feature_dim(args)
