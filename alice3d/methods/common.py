"""Pieces several methods share (methods import these, never each other).

    CPU_* / TINY_*          sizes of the registry's CPU defaults (`MethodEntry.defaults`) and of
                            the contract tests' one-step configs (`MethodEntry.tiny`)
    reconstruction_panels   input / masked / reconstruction previews of a patch prediction
    intensity_jitter        per-sample affine intensity change (the colour jitter of 2D images)
"""

from __future__ import annotations

import numpy as np
import torch

from alice3d.core.masking import MaskInfo, mask_to_image
from alice3d.core.patches import as_tuple, patchify, unpatchify

__all__ = ["CPU_VIT", "CPU_DECODER", "CPU_PROJ", "TINY_VIT", "TINY_DECODER", "TINY_PROJ",
           "reconstruction_panels", "intensity_jitter"]

# The embedded CPU run (`alice3d-pretrain` without a recipe): ViT-tiny on 64x64x32 crops.
CPU_VIT = dict(encoder="vit_tiny", img_size=(64, 64, 32))
CPU_DECODER = dict(decoder_dim=96, decoder_depth=2, decoder_heads=4)
CPU_PROJ = dict(proj_hidden_dim=256, proj_dim=64)

# One step in ~0.1 s on one CPU thread: a 2-layer ViT on 32x32x16 crops (16 tokens).
TINY_VIT = dict(img_size=(32, 32, 16), patch_size=8,
                encoder_kwargs={"num_layers": 2, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4})
TINY_DECODER = dict(decoder_dim=24, decoder_depth=1, decoder_heads=2)
TINY_PROJ = dict(proj_hidden_dim=32, proj_dim=16)


def reconstruction_panels(
    x: torch.Tensor,
    masking: MaskInfo,
    pred: torch.Tensor | None,
    patch_size: int | tuple[int, ...],
    norm_pix: bool,
) -> dict[str, np.ndarray]:
    """Channel 0 of the first sample: input, masked input and (if `pred`) the reconstruction.

    x `(B, C, *spatial)`, pred `(B, L, P)`. With norm-pix the prediction is mapped back to pixels
    with the target patch's own mean and (unbiased) variance; visible patches show the input.
    """
    x = x[:1].float()
    nd = x.ndim - 2
    patch = as_tuple(patch_size, nd)
    grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
    hidden = mask_to_image(masking.mask[:1], grid, patch).to(x.device)
    panels = {"input": x, "masked": x * (1 - hidden)}
    if pred is not None:
        pred = pred[:1].float()
        if norm_pix:
            target = patchify(x, patch)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        recon = unpatchify(pred, patch, grid, x.shape[1])
        panels["reconstruction"] = x * (1 - hidden) + recon * hidden
    return {name: t[0, 0].detach().cpu().numpy().astype(np.float32) for name, t in panels.items()}


def intensity_jitter(
    x: torch.Tensor, scale: float, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample `x * (1 + U(-scale, scale)) + U(-shift, shift)` for `x (B, C, *spatial)`."""
    b = x.shape[0]
    gen_device = generator.device if generator is not None else x.device
    u = torch.rand(2, b, generator=generator, device=gen_device).to(x.device, x.dtype)
    view = (b,) + (1,) * (x.ndim - 1)
    return x * (1 + scale * (2 * u[0] - 1)).view(view) + (shift * (2 * u[1] - 1)).view(view)
