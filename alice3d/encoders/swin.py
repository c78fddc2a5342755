"""Swin encoder that is MONAI's ``SwinTransformer`` plus a visible-token (masked) forward.

``SwinEncoder`` subclasses ``monai.networks.nets.swin_unetr.SwinTransformer`` without
adding parameters, so ``encoder.state_dict()`` loads with ``strict=True`` into
``SwinUNETR(**encoder.swinunetr_kwargs(), out_channels=K).swinViT``.

``forward`` is MONAI's dense forward. ``forward_masked`` discards masked patches: a mask
unit is one token of the coarsest stage (``patch_size * 2**4`` voxels per axis, 32 by
default), so every patch merging sees groups that are entirely visible or entirely
masked, and window attention, MLPs and merging run on visible tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import SwinTransformer
from monai.utils import ensure_tuple_rep
from torch import nn

from alice3d.encoders import swin_masked as sm

NUM_STAGES = 4  # MONAI's SwinTransformer.forward is written for exactly four stages

# Presets are SwinUNETR-compatible (feature_size % 12 == 0, four stages). "swin_tiny" and
# "swin_small" are CPU/test sizes (not Swin-T/Swin-S); "swin_unetr" is the configuration of
# the released Swin UNETR; "swin_b" is the nearest SwinUNETR-loadable shape to the Swin-B of
# the Alice paper (embed 128 -> 120, depths (2, 2, 18, 2), heads (4, 8, 16, 32)).
# Encoder / full SwinUNETR parameters: 0.7M / 4.1M, 2.2M / 15.7M, 8.1M / 62M, 94M / 432M
# (the SwinUNETR decoder grows with feature_size squared).
swin_configs: dict[str, dict] = {
    "swin_tiny": {"feature_size": 12, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    "swin_small": {"feature_size": 24, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    "swin_unetr": {"feature_size": 48, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)},
    "swin_b": {"feature_size": 120, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
}


@dataclass
class MaskedSwinOutput:
    """Result of ``SwinEncoder.forward_masked``.

    hidden_states: five tensors ``(B, N_i, C_i)``, the visible tokens of MONAI's five
        outputs (patch embedding, then after each stage's merging), in Morton order per unit.
    coords: five tensors ``(B, N_i, n)``, grid coordinates of those tokens.
    grid_shapes: the five full grids.
    ids_keep: ``(B, N_vis)`` row-major ids of the visible units (ascending).
    ids_restore: ``(B, N_units)`` with ``cat([visible, masked])[ids_restore]`` = row-major.
    """

    hidden_states: list[torch.Tensor]
    coords: list[torch.Tensor]
    grid_shapes: list[tuple[int, ...]]
    ids_keep: torch.Tensor
    ids_restore: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        """Final-stage features ``(B, N_vis, C_last)`` in ``ids_keep`` order."""
        return self.hidden_states[-1]


class SwinEncoder(SwinTransformer):
    """MONAI ``SwinTransformer`` built from ``SwinUNETR`` arguments.

    Input ``(B, in_channels, *spatial)``; ``forward`` returns MONAI's five hidden states
    ``(B, feature_size * 2**i, *spatial / (patch_size * 2**i))``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        spatial_dims: int = 3,
        window_size: Sequence[int] | int = 7,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        patch_norm: bool = False,
        use_checkpoint: bool = False,
        downsample: str = "merging",
        use_v2: bool = False,
        bucket_ratio: float = 2.0**0.5,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"swin: spatial_dims must be 2 or 3, got {spatial_dims}")
        if feature_size % 12 != 0:
            raise ValueError(f"swin: feature_size must be divisible by 12 (SwinUNETR), got {feature_size}")
        if len(depths) != NUM_STAGES or len(num_heads) != NUM_STAGES:
            raise ValueError(f"swin: depths and num_heads need {NUM_STAGES} entries, got {depths}, {num_heads}")
        for i, heads in enumerate(num_heads):
            if (feature_size * 2**i) % heads:
                raise ValueError(f"swin: stage {i} width {feature_size * 2**i} not divisible by {heads} heads")
        if downsample not in ("merging", "mergingv2"):
            raise ValueError(f"swin: downsample must be 'merging' or 'mergingv2', got {downsample!r}")
        if not isinstance(patch_size, int):
            raise ValueError(f"swin: patch_size must be an int (as in SwinUNETR), got {patch_size!r}")
        if bucket_ratio <= 1.0:
            raise ValueError(f"swin: bucket_ratio must be > 1, got {bucket_ratio}")
        windows = ensure_tuple_rep(window_size, spatial_dims)
        super().__init__(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=windows,
            patch_size=ensure_tuple_rep(patch_size, spatial_dims),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=dropout_path_rate,
            norm_layer=nn.LayerNorm,
            patch_norm=patch_norm,
            use_checkpoint=use_checkpoint,
            spatial_dims=spatial_dims,
            downsample=downsample,
            use_v2=use_v2,
        )
        self.spatial_dims = spatial_dims
        self.bucket_ratio = bucket_ratio
        self.config = {
            "in_channels": in_channels,
            "feature_size": feature_size,
            "depths": list(depths),
            "num_heads": list(num_heads),
            "spatial_dims": spatial_dims,
            "window_size": list(windows),
            "patch_size": patch_size,
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "patch_norm": patch_norm,
            "downsample": downsample,
            "use_v2": use_v2,
        }

    @property
    def unit_size(self) -> tuple[int, ...]:
        """Voxels per axis of one mask unit (= one token of the coarsest output)."""
        return tuple(p * 2**NUM_STAGES for p in self.patch_size)

    def unit_grid(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Mask-unit grid for an input of ``spatial_shape``; each axis must be divisible."""
        spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(spatial_shape) != self.spatial_dims or any(s % u for s, u in zip(spatial_shape, self.unit_size)):
            raise ValueError(
                f"swin: input spatial shape {spatial_shape} must have {self.spatial_dims} axes, "
                f"each divisible by the mask unit {self.unit_size}"
            )
        return tuple(s // u for s, u in zip(spatial_shape, self.unit_size))

    def swinunetr_kwargs(self) -> dict:
        """Arguments for ``monai.networks.nets.SwinUNETR`` (add ``out_channels``) whose
        ``.swinViT`` accepts this encoder's state dict with ``strict=True``."""
        cfg = dict(self.config)
        cfg["depths"] = tuple(cfg["depths"])
        cfg["num_heads"] = tuple(cfg["num_heads"])
        cfg["window_size"] = tuple(cfg["window_size"])
        return cfg

    def metadata(self) -> dict:
        """Plain-data description saved next to the weights (``encoder.pt``)."""
        stride = self.patch_size[0] * 2**NUM_STAGES
        return {
            "kind": "swin",
            **self.config,
            "num_stages": NUM_STAGES,
            "stride": stride,
            "mask_unit": list(self.unit_size),
            "out_channels": [self.embed_dim * 2**i for i in range(NUM_STAGES + 1)],
        }

    def _stage_layers(self) -> list[nn.Module]:
        return [self.layers1[0], self.layers2[0], self.layers3[0], self.layers4[0]]

    def forward(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """MONAI's dense forward: ``(B, C_in, *spatial)`` -> five hidden states."""
        return self._forward_embedded(self.patch_embed(x), normalize)

    def forward_dense_masked(
        self, x: torch.Tensor, unit_mask: torch.Tensor, mask_token: torch.Tensor, normalize: bool = True
    ) -> list[torch.Tensor]:
        """Dense forward with the patch embeddings of masked units replaced by ``mask_token``
        (SimMIM style: every window sees the full grid). ``unit_mask (B, *unit_grid)`` bool,
        ``mask_token`` ``embed_dim`` values (any shape, e.g. ``(1, 1, embed_dim)``)."""
        units = self.unit_grid(x.shape[2:])
        if unit_mask.dtype != torch.bool or tuple(unit_mask.shape) != (x.shape[0], *units):
            raise ValueError(
                f"swin: unit_mask must be bool of shape {(x.shape[0], *units)}, got {unit_mask.dtype} {tuple(unit_mask.shape)}"
            )
        x0 = self.patch_embed(x)  # (B, D, *patch_grid)
        side = 2**NUM_STAGES
        m = unit_mask.to(x0.device)
        for axis in range(self.spatial_dims):
            m = m.repeat_interleave(side, dim=axis + 1)
        token = mask_token.reshape(1, -1, *([1] * self.spatial_dims)).to(x0.dtype)
        return self._forward_embedded(torch.where(m[:, None], token, x0), normalize)

    def _forward_embedded(self, x0: torch.Tensor, normalize: bool) -> list[torch.Tensor]:
        # MONAI's SwinTransformer.forward after its patch embedding (kept line for line so the
        # dense and dense-masked forwards share one path; a test pins equality with MONAI's).
        x0 = self.pos_drop(x0)
        outs = [self.proj_out(x0, normalize)]
        convs = [self.layers1c, self.layers2c, self.layers3c, self.layers4c] if self.use_v2 else [None] * NUM_STAGES
        h = x0
        for layer, conv in zip(self._stage_layers(), convs):
            if conv is not None:
                h = conv[0](h.contiguous())
            h = layer(h.contiguous())
            outs.append(self.proj_out(h, normalize))
        return outs

    def forward_masked(
        self, x: torch.Tensor, unit_mask: torch.Tensor, normalize: bool = True
    ) -> MaskedSwinOutput:
        """Encode only the visible mask units of ``x``.

        Args:
            x: ``(B, C_in, *spatial)``, each spatial axis divisible by ``unit_size``; the
                content of masked units is never read.
            unit_mask: ``(B, *unit_grid)`` bool, True = masked; every sample must have the
                same number of visible units (at least one).
            normalize: layer-norm each returned stage output, as ``forward`` does.
        """
        if self.use_v2:
            raise ValueError("swin: forward_masked needs use_v2=False (its conv blocks need the dense grid)")
        n = self.spatial_dims
        if x.ndim != n + 2:
            raise ValueError(f"swin: x must be (B, C, *spatial) with {n} spatial axes, got shape {tuple(x.shape)}")
        units = self.unit_grid(x.shape[2:])
        batch = x.shape[0]
        if unit_mask.dtype != torch.bool or tuple(unit_mask.shape) != (batch, *units):
            raise ValueError(
                f"swin: unit_mask must be bool of shape {(batch, *units)}, got {unit_mask.dtype} {tuple(unit_mask.shape)}"
            )
        flat_mask = unit_mask.reshape(batch, -1).to(x.device)
        visible = (~flat_mask).sum(1)
        num_vis = int(visible[0])
        if num_vis == 0 or bool((visible != num_vis).any()):
            raise ValueError(
                f"swin: unit_mask must leave the same, non-zero number of visible units in every sample, "
                f"got {visible.tolist()}"
            )
        ids_shuffle = torch.argsort(flat_mask.to(torch.uint8), dim=1, stable=True)
        ids_keep = ids_shuffle[:, :num_vis]
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        unit_coords = torch.stack(torch.unravel_index(ids_keep, units), -1)  # (B, N_vis, n)

        tokens = self._embed_visible(x, unit_coords)
        side = 2**NUM_STAGES
        grid = tuple(u * side for u in units)
        batch_index = torch.arange(batch, device=x.device).repeat_interleave(num_vis * side**n)
        outs, coords, grids = [], [], []

        def emit(t, grid_side, grid_shape):
            offs = sm.morton_offsets(grid_side, n, x.device)
            c = unit_coords[:, :, None, :] * grid_side + offs[None, None]
            coords.append(c.reshape(batch, -1, n))
            grids.append(grid_shape)
            t = F.layer_norm(t, [t.shape[-1]]) if normalize else t
            outs.append(t.reshape(batch, -1, t.shape[-1]))

        emit(tokens, side, grid)
        for layer in self._stage_layers():
            token_coords = coords[-1].reshape(-1, n)
            plans = {}
            for block in layer.blocks:
                key = tuple(block.shift_size)
                if key not in plans:
                    plans[key] = sm.window_plan(
                        token_coords, batch_index, batch, grid, block.window_size, block.shift_size, self.bucket_ratio
                    )
                tokens = sm.swin_block(block, tokens, plans[key], batch_index, batch)
            order = sm.merge_order(layer.downsample, n)
            tokens = sm.patch_merge(layer.downsample, tokens, order)
            batch_index = batch_index[:: len(order)]
            side //= 2
            grid = tuple(g // 2 for g in grid)
            emit(tokens, side, grid)
        return MaskedSwinOutput(outs, coords, grids, ids_keep, ids_restore)

    def _embed_visible(self, x: torch.Tensor, unit_coords: torch.Tensor) -> torch.Tensor:
        """Patch embedding of the visible units only: ``(B * N_vis * side**n, C)`` in Morton order."""
        n = self.spatial_dims
        b, c = x.shape[:2]
        unit = self.unit_size
        split = [b, c]
        for s, u in zip(x.shape[2:], unit):
            split += [s // u, u]
        # (B, C, U1, u1, U2, u2, ...) -> (B, U1, U2, ..., C, u1, u2, ...), a view
        perm = [0] + [2 + 2 * a for a in range(n)] + [1] + [3 + 2 * a for a in range(n)]
        view = x.reshape(split).permute(perm)
        bidx = torch.arange(b, device=x.device)[:, None].expand(unit_coords.shape[:2])
        crops = view[(bidx, *unit_coords.unbind(-1))].reshape(-1, c, *unit)  # (B*N_vis, C, *unit)
        emb = self.patch_embed.proj(crops)  # (B*N_vis, D, *side)
        side = emb.shape[2]
        order = sm.ravel(sm.morton_offsets(side, n, x.device), (side,) * n)
        tokens = sm.gather_rows(emb.flatten(2), order, torch.argsort(order), dim=2)
        tokens = tokens.transpose(1, 2).reshape(-1, emb.shape[1])
        if self.patch_embed.norm is not None:
            tokens = self.patch_embed.norm(tokens)
        return self.pos_drop(tokens)


def build_swin(name: str, spatial_dims: int = 3, in_channels: int = 1, **overrides) -> SwinEncoder:
    """A preset from ``swin_configs`` with ``SwinEncoder`` keyword overrides."""
    if name not in swin_configs:
        raise ValueError(f"swin: unknown preset {name!r}; expected one of {sorted(swin_configs)}")
    kwargs = {**swin_configs[name], "spatial_dims": spatial_dims, "in_channels": in_channels, **overrides}
    return SwinEncoder(**kwargs)
