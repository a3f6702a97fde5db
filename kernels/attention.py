"""Windowed relative-position attention: softmax(q k^T / sqrt(d) + bias) v.

bias(i, j) = table[dy + W, dx + W, head] when |dy| <= W and |dx| <= W (W = 7 for the (15, 15, heads) table),
-1e7 otherwise (the official constant), with (dy, dx) the offset between query token i and key token j on a
Gh x Gw row-major grid. Closed form of spec 3.7, valid for any grid (non-square, smaller than the window).
Layout: q, k, v (B, heads, N, dh), N = Gh * Gw; table (2W+1, 2W+1, heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED = -1e7  # logit outside the window (spec 3.7); exp() of it is exactly 0 in fp32


def relative_position_bias(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Dense (heads, N, N) fp32 bias for a Gh x Gw grid. Built fresh on every call: no cache survives a
    weight change (the official LRU cache does, spec 6.12). Uses no `%`/`//` on sizes so it exports to ONNX."""
    Gh, Gw = grid
    W = table.shape[0] // 2
    ys = torch.arange(Gh, device=table.device)[:, None].expand(Gh, Gw).reshape(-1)  # (N,) row of each token
    xs = torch.arange(Gw, device=table.device)[None, :].expand(Gh, Gw).reshape(-1)  # (N,) column
    dy = ys[:, None] - ys[None, :]  # (N, N) query minus key
    dx = xs[:, None] - xs[None, :]
    inside = (dy.abs() <= W) & (dx.abs() <= W)
    bias = table.float()[dy.clamp(-W, W) + W, dx.clamp(-W, W) + W]  # (N, N, heads)
    return bias.permute(2, 0, 1).masked_fill(~inside, MASKED)


def window_attention_ref(q, k, v, table, grid, *, upcast: bool = False) -> torch.Tensor:
    """The numerics spec: dense SDPA with the materialised (heads, N, N) bias (as the official code does).
    upcast=True computes in fp32 and casts back (the 'fp32 reference' of the three-way kernel test)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    bias = relative_position_bias(table, grid).to(q.dtype)  # under autocast the official mask is rounded too
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None]).to(dtype)


def window_attention(q, k, v, table, grid, *, use_triton: bool | None = None) -> torch.Tensor:
    """Dispatch: Triton kernel where it applies (see `_dispatch.use_triton_for`), else the reference."""
    from ssdd_runtime.kernels._dispatch import use_triton_for

    if use_triton_for(q, use_triton):
        raise NotImplementedError("the Triton windowed-attention kernel is not built yet")
    return window_attention_ref(q, k, v, table, grid)
