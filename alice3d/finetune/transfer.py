"""Load an ``encoder.pt`` into a fine-tuning network: strict, verified, reported.

Every key of the encoder file must land in the network's encoder and every encoder
parameter of the network must come from the file. The one tolerated difference is the
ViT position embedding, which is interpolated when the pretraining grid differs from
the fine-tuning grid (reported as *shape-adapted*). Anything else raises
:class:`~alice3d.finetune.models.EncoderMismatchError` naming the file and the keys;
weights are never loaded with ``strict=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alice3d.core.pos_embed import interpolate_pos_embed
from alice3d.encoders.registry import ENCODERS, EncoderFamily
from alice3d.finetune.models import UNETR_PATCH, EncoderMismatchError, encoder_module, vit_grid

POS_EMBED_KEY = ENCODERS["vit"].pos_embed_key


@dataclass
class TransferReport:
    source: str
    target: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network's encoder, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the network's encoder
    mismatched: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # file vs network shape
    adapted: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)  # resampled to fit

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, max_keys: int = 12) -> str:
        def keys(title: str, items: Any) -> list[str]:
            items = list(items.items()) if isinstance(items, dict) else list(items)
            lines = [f"  {title}: {len(items)}"]
            for it in items[:max_keys]:
                if isinstance(it, tuple):
                    lines.append(f"    {it[0]}: {it[1][0]} -> {it[1][1]}")
                else:
                    lines.append(f"    {it}")
            if len(items) > max_keys:
                lines.append(f"    ... and {len(items) - max_keys} more")
            return lines

        out = [f"weight transfer {self.source} -> {self.target}",
               f"  loaded: {len(self.loaded)} tensors"]
        out += keys("shape-adapted", self.adapted)
        out += keys("missing (network keys the file lacks)", self.missing)
        out += keys("unexpected (file keys the network lacks)", self.unexpected)
        out += keys("shape mismatch (file -> network)", self.mismatched)
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "loaded": len(self.loaded),
                "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": {k: list(v) for k, v in self.mismatched.items()},
                "adapted": {k: list(v) for k, v in self.adapted.items()}}


def _file_vit_grid(meta: dict[str, Any], tokens: int, source: str) -> tuple[int, ...]:
    args = meta.get("arch_args", {})
    img = args.get("img_size") or meta.get("crop_size")
    if img is None:
        raise EncoderMismatchError(f"{source}: ViT metadata gives neither arch_args.img_size nor crop_size; "
                                   "cannot tell the position-embedding grid")
    nd = int(args.get("spatial_dims", 3))
    img = [int(img)] * nd if isinstance(img, int) else [int(s) for s in img]
    grid = vit_grid(img, args.get("patch_size", UNETR_PATCH))
    expected = (1 if args.get("cls_token") else 0) + math.prod(grid)
    if expected != tokens:
        raise EncoderMismatchError(
            f"{source}: position embedding has {tokens} tokens but the metadata grid {list(grid)} "
            f"(img_size {img}, patch {args.get('patch_size', UNETR_PATCH)}) implies {expected}"
        )
    return grid


def _target_grid(family: EncoderFamily, spec: dict[str, Any]) -> tuple[int, ...]:
    """Token grid of the network's encoder, from its spec (the classifier's: its encoder args)."""
    args = spec["args"]
    return family.token_grid(args["encoder_args"] if spec["name"] == "classifier" else args)


def transfer_encoder(
    network: nn.Module,
    spec: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    source: str | Path = "encoder.pt",
) -> TransferReport:
    """Load ``state_dict`` (an encoder.pt's) into the network's encoder; raise unless all of it fits."""
    source = str(source)
    target, target_name = encoder_module(network, spec)
    want = target.state_dict()
    report = TransferReport(source=source, target=target_name)
    report.missing = sorted(set(want) - set(state_dict))
    report.unexpected = sorted(set(state_dict) - set(want))
    ready: dict[str, torch.Tensor] = {}
    family = ENCODERS.get(meta.get("arch"))
    table = family.pos_embed_key if family is not None else None
    for key in sorted(set(want) & set(state_dict)):
        src, dst = state_dict[key], want[key]
        if tuple(src.shape) == tuple(dst.shape):
            ready[key] = src
            continue
        if table and key.endswith(table) and src.ndim == 3 and src.shape[-1] == dst.shape[-1]:
            old = _file_vit_grid(meta, src.shape[1], source)
            new = _target_grid(family, spec)
            ready[key] = interpolate_pos_embed(src.float(), old, new).to(dst.dtype)
            report.adapted[key] = (list(src.shape), list(dst.shape))
            continue
        report.mismatched[key] = (list(src.shape), list(dst.shape))
    if not report.ok:
        raise EncoderMismatchError(
            f"{source}: the encoder does not fit {target_name} (arch {meta.get('arch')!r}); nothing was loaded.\n"
            + report.format()
        )
    target.load_state_dict(ready, strict=True)
    after = target.state_dict()
    for key, value in ready.items():
        if not torch.equal(after[key].cpu(), value.to(after[key].dtype).cpu()):
            raise EncoderMismatchError(f"{source}: tensor {key} did not arrive in {target_name} after loading")
    report.loaded = sorted(ready)
    return report
