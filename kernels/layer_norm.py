"""AdaLN: y = LN(x) * (1 + scale) + shift, (shift, scale) = channel halves of `mod` at each token's latent pixel.

Layout: x (B, N, C) tokens of a Gh x Gw row-major grid; mod (B, h, w, 2C), shift first (spec 3.6), repeated
to the token grid by nearest indexing (factor Gh / h: 1 for f8, 2 for f16, 4 for f32 encoders). LN without
affine, fp32 statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ada_layer_norm_ref(x, mod, grid, eps: float) -> torch.Tensor:
    B, N, C = x.shape
    m = F.interpolate(mod.float().permute(0, 3, 1, 2), size=tuple(grid), mode="nearest")  # (B, 2C, Gh, Gw)
    shift, scale = m.flatten(2).transpose(1, 2).chunk(2, dim=-1)  # (B, N, C) each
    y = F.layer_norm(x.float(), (C,), eps=eps) * (1 + scale) + shift
    return y.to(x.dtype)


def ada_layer_norm(x, mod, grid, eps: float, *, use_triton: bool | None = None) -> torch.Tensor:
    from ssdd_runtime.kernels._dispatch import use_triton_for

    if use_triton_for(x, use_triton):
        raise NotImplementedError("the Triton AdaLN kernel is not built yet")
    return ada_layer_norm_ref(x, mod, grid, eps)
