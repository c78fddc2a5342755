"""The network of an exported bundle: its config entry, its weights and its TorchScript.

The bundle builds the *inference form* of the fine-tuned network: the same constructor
arguments without training-only switches (gradient checkpointing, drop path, nnFormer's
deep-supervision heads other than the full-resolution one, which eval mode never uses).
UNETR and Swin UNETR come from ``monai.networks.nets``; nnFormer from the bundle's own
``scripts/nnformer.py``, a verbatim copy of :mod:`alice3d.encoders.nnformer` (torch only).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alice3d.bundle.errors import ExportError
from alice3d.finetune.models import build_network

NETWORK_TARGETS = {
    "unetr": "monai.networks.nets.UNETR",
    "swin_unetr": "monai.networks.nets.SwinUNETR",
    "nnformer": "scripts.nnformer.NNFormer",
}
# Arguments that only matter while training, and their inference values.
INFERENCE_ARGS = {
    "unetr": {},
    "swin_unetr": {"use_checkpoint": False, "dropout_path_rate": 0.0},
    "nnformer": {"deep_supervision": False, "use_checkpoint": False, "drop_path_rate": 0.0},
}
# Packages a network needs beyond torch and monai's core: MONAI's ViT and Swin blocks use
# einops (monai's "einops" extra); the bundled nnFormer is torch only.
NETWORK_PACKAGES = {"unetr": ("einops",), "swin_unetr": ("einops",), "nnformer": ()}
NNFORMER_SOURCE = Path(__file__).resolve().parents[1] / "encoders" / "nnformer.py"

_EXTRA_HEAD = re.compile(r"^heads\.([1-9]\d*)\.")


class UnsupportedNetworkError(ExportError):
    """A run whose network has no bundle form (e.g. a classifier)."""


def inference_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``{"name", "args"}`` of the network the bundle builds."""
    name = spec["name"]
    if name not in NETWORK_TARGETS:
        raise UnsupportedNetworkError(
            f"network {name!r} cannot be exported as a segmentation bundle; expected one of {list(NETWORK_TARGETS)}"
        )
    return {"name": name, "args": {**spec["args"], **INFERENCE_ARGS[name]}}


def network_def(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``network_def`` entry of ``inference.json`` (lists, not tuples: it is JSON)."""
    inf = inference_spec(spec)
    return {"_target_": NETWORK_TARGETS[inf["name"]], **_json_ready(inf["args"])}


def _json_ready(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_json_ready(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_ready(x) for k, x in v.items()}
    return v


def needs_scripts(spec: dict[str, Any]) -> bool:
    return NETWORK_TARGETS.get(spec["name"], "").startswith("scripts.")


def inference_state_dict(state_dict: dict[str, torch.Tensor], spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fine-tuned network's weights restricted to the inference form (CPU, contiguous)."""
    keep = {}
    for k, v in state_dict.items():
        if spec["name"] == "nnformer" and _EXTRA_HEAD.match(k):
            continue  # deep-supervision heads at 1/2, 1/4, ... resolution
        keep[k] = v.detach().cpu().contiguous()
    return keep


def build_inference_network(spec: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The bundle's network (eval mode) with ``state_dict`` loaded strictly."""
    net = build_network(inference_spec(spec))
    net.load_state_dict(state_dict, strict=True)
    return net.eval()


def to_torchscript(net: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """Script ``net`` when TorchScript can compile it (UNETR), else trace it at ``example``'s
    shape (Swin UNETR, nnFormer). Returns ``(module, "scripted" | "traced")``.

    A traced network is specialised to the traced input size; the bundle only ever feeds
    it sliding windows of the task ROI, which is the size it is traced with.
    """
    net = net.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # TorchScript is deprecated in favour of torch.export, but it is what MONAI bundles carry.
        warnings.simplefilter("ignore")
        try:
            return torch.jit.script(net), "scripted"
        except Exception:  # TorchScript raises many unrelated types for unsupported Python
            return torch.jit.trace(net, example, check_trace=False), "traced"


def network_output(net: Any, x: torch.Tensor) -> torch.Tensor:
    """Full-resolution logits ``(B, K, *S)`` of an eval-mode network."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = net(x)
    return out[0] if isinstance(out, (list, tuple)) else out
