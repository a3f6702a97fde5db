"""Adaptive GroupNorm (+ SiLU): y = act(FiLM_t(FiLM_ctx(GN(x) * gamma + beta))).

GN over `num_groups` groups with fp32 statistics; ctx FiLM: (1 + scale) * y + shift with (scale, shift) =
channel halves of `ctx_mod` (B, 2C, h, w) taken at the nearest latent pixel (spec 3.3 norm1); time FiLM:
(1 + ts) * y + tsh with (ts, tsh) = halves of `time_mod` (B, 2C) (spec 3.3 norm2); optional SiLU.
Layout: x (B, C, H, W), NCHW or channels_last; H, W integer multiples of h, w.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ada_group_norm_ref(x, num_groups: int, eps: float, *, weight=None, bias=None, ctx_mod=None, time_mod=None,
                       silu: bool = False) -> torch.Tensor:
    """The numerics spec, computed in fp32 and cast back to x.dtype."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if ctx_mod is not None:
        scale, shift = F.interpolate(ctx_mod.float(), size=x.shape[-2:], mode="nearest").chunk(2, dim=1)
        y = y * (1 + scale) + shift
    if time_mod is not None:
        scale, shift = time_mod.float()[:, :, None, None].chunk(2, dim=1)
        y = y * (1 + scale) + shift
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)


def ada_group_norm(x, num_groups: int, eps: float, *, weight=None, bias=None, ctx_mod=None, time_mod=None,
                   silu: bool = False, use_triton: bool | None = None) -> torch.Tensor:
    from ssdd_runtime.kernels._dispatch import use_triton_for

    if use_triton_for(x, use_triton):
        raise NotImplementedError("the Triton AdaGroupNorm kernel is not built yet")
    return ada_group_norm_ref(x, num_groups, eps, weight=weight, bias=bias, ctx_mod=ctx_mod, time_mod=time_mod,
                              silu=silu)
