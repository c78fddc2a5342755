"""Projection and prediction heads for global `(B, D)` or token-wise `(B, N, D)` features.

Both heads flatten all leading axes into one batch axis, so BatchNorm statistics of a
`(B, N, D)` input are taken over all B*N tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["ProjectionHead", "PredictorMLP"]


def _flat_apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    lead = x.shape[:-1]
    y = module(x.reshape(-1, x.shape[-1]))
    return y.reshape(*lead, y.shape[-1])


class ProjectionHead(nn.Module):
    """DINO head: MLP (GELU) -> l2-normalised bottleneck -> weight-normalised linear (no bias).

    `(..., in_dim)` -> `(..., out_dim)`. With `norm_last_layer` the weight-norm magnitude g is
    fixed to 1 (not trained), so each output is a cosine against a unit prototype.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 256,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        num_layers = max(int(num_layers), 1)
        if num_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (num_layers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _flat_apply(self._forward_2d, x)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class PredictorMLP(nn.Module):
    """BYOL/SimSiam predictor: Linear -> norm -> ReLU -> Linear, `(..., in_dim)` -> `(..., out_dim)`.

    `norm="bn"` (default, as in BYOL) normalises over all flattened leading axes (token-wise
    statistics for `(B, N, D)`); `norm="ln"` uses LayerNorm, which also works for batch size 1.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, norm: str = "bn") -> None:
        super().__init__()
        if norm == "bn":
            norm_layer: nn.Module = nn.BatchNorm1d(hidden_dim)
        elif norm == "ln":
            norm_layer = nn.LayerNorm(hidden_dim)
        else:
            raise ValueError(f"PredictorMLP: norm must be 'bn' or 'ln', got {norm!r}")
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), norm_layer, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _flat_apply(self.net, x)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
