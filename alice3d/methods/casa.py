"""CASA: conditional anatomical semantic alignment (Alice, Eq. 3-4).

    q = LN_q(V) W_q                  V: online-encoder features of the visible tokens (B, N_m, C_v)
    k = LN_kv(H) W_k, v = LN_kv(H) W_v   H: projection-head features of all tokens     (B, N, C_h)
    S = zeta(softmax(q k^T / sqrt(C)) v)

The same module (same q from the same V) is applied with the student's phi features H and
with the teacher's psi features Y; only the keys and values change, so S and T are both
indexed by the visible tokens of the masked view and can be compared token by token.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CASA"]


class CASA(nn.Module):
    """Cross-attention from visible-token queries to all-token head features.

    Args:
        query_dim: C_v, channels of V (encoder width).
        kv_dim: C_h, channels of H / Y (projection-head output); defaults to `query_dim`.
        dim: C, width of q, k, v (the softmax scale is 1/sqrt(C / num_heads)); defaults to `kv_dim`.
        out_dim: channels of the output of zeta; defaults to `kv_dim`.
        num_heads: 1 reproduces the equations exactly; >1 splits C into heads as usual.
    """

    def __init__(
        self,
        query_dim: int,
        kv_dim: int | None = None,
        dim: int | None = None,
        out_dim: int | None = None,
        num_heads: int = 1,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        kv_dim = kv_dim or query_dim
        dim = dim or kv_dim
        out_dim = out_dim or kv_dim
        if dim % num_heads:
            raise ValueError(f"CASA: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.dim = dim
        self.head_dim = dim // num_heads
        self.norm_q = nn.LayerNorm(query_dim)
        self.norm_kv = nn.LayerNorm(kv_dim)
        self.to_q = nn.Linear(query_dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, out_dim)  # zeta

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def query(self, v_visible: torch.Tensor) -> torch.Tensor:
        """`(B, N_m, C_v)` -> q `(B, heads, N_m, C / heads)`; compute once, reuse for S and T."""
        return self._split(self.to_q(self.norm_q(v_visible)))

    def attend(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """q from `query`, `h (B, N, C_h)` -> `(B, N_m, out_dim)`."""
        kv = self.norm_kv(h)
        k, v = self._split(self.to_k(kv)), self._split(self.to_v(kv))
        # Fused attention (flash / memory-efficient kernels on GPU); same maths as Eq. 4.
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        out = out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.dim)
        return self.proj(out)

    def forward(self, v_visible: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """`v_visible (B, N_m, C_v)`, `h (B, N, C_h)` -> `(B, N_m, out_dim)`."""
        if v_visible.shape[0] != h.shape[0]:
            raise ValueError(f"CASA: batch sizes differ, V {tuple(v_visible.shape)} vs H {tuple(h.shape)}")
        return self.attend(self.query(v_visible), h)
