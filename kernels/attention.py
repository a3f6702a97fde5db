"""Windowed relative-position attention: softmax(q k^T / sqrt(d) + bias) v.

bias(i, j) = table[dy + W, dx + W, head] when |dy| <= W and |dx| <= W (W = 7 for the (15, 15, heads) table),
-1e7 otherwise (the official constant), with (dy, dx) the offset between query token i and key token j on a
Gh x Gw row-major grid. Closed form of spec 3.7, valid for any grid (non-square, smaller than the window).
Layout: q, k, v (B, heads, N, dh), N = Gh * Gw; table (2W+1, 2W+1, heads).

Triton kernel (`_window_attention_kernel`): one program per (query tile of TQ_H x TQ_W grid cells, batch*head).
It visits only the key rows within +-W of the tile and, in each, only the columns within +-W, in tiles of
TK_H x TK_W cells, so work and memory grow linearly with N; the bias is gathered from the table inside the
kernel (no (N, N) mask exists) and keys outside the window are excluded (weight exactly 0, as exp(-1e7) is in
the reference). Online softmax in fp32 (exp2 domain); q k^T and p v on tensor cores in the input dtype with
fp32 accumulation (fp32 inputs: IEEE fp32 dot, no TF32). Limits: dh <= 128 (padded to a power of two),
fp32/fp16/bf16, last dim contiguous. Verified: against `window_attention_ref` under TRITON_INTERPRET=1 on CPU
(tests/test_kernels_attention.py); not yet run on a GPU (no GPU was lent to the session that wrote it).
"""
import math

import torch
import torch.nn.functional as F

from ssdd_runtime.kernels._dispatch import jit, launchable, next_pow2, tl, use_triton_for

MASKED = -1e7  # logit outside the window (spec 3.7); exp() of it is exactly 0 in fp32
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@jit
def _window_attention_kernel(Q, K, V, T, O,
                             sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                             heads, Gh, Gw, qk_scale,
                             HALF: tl.constexpr, DH: tl.constexpr, BLOCK_D: tl.constexpr,
                             TQ_H: tl.constexpr, TQ_W: tl.constexpr, TK_H: tl.constexpr,
                             TK_W: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // heads
    h = pid_bh % heads
    n_tw = tl.cdiv(Gw, TQ_W)
    ty0 = (pid_t // n_tw) * TQ_H
    tx0 = (pid_t % n_tw) * TQ_W

    i = tl.arange(0, TQ_H * TQ_W)
    qy = ty0 + i // TQ_W
    qx = tx0 + i % TQ_W
    q_ok = (qy < Gh) & (qx < Gw)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    q = tl.load(Q + b * sqb + h * sqh + (qy * Gw + qx)[:, None] * sqn + d[None, :],
                mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
        q = q.to(tl.float32)

    m_i = tl.full([TQ_H * TQ_W], -1e30, tl.float32)  # finite: a tile with no key in the window gives p = 1,
    l_i = tl.zeros([TQ_H * TQ_W], tl.float32)       # wiped by alpha = 0 once an in-window key (the diagonal) comes
    acc = tl.zeros([TQ_H * TQ_W, BLOCK_D], tl.float32)

    # keys: rows ty0-HALF .. ty0+TQ_H-1+HALF, columns tx0-HALF .. tx0+TQ_W-1+HALF, clipped to the grid
    ky_lo = tl.maximum(ty0 - HALF, 0)
    ky_hi = tl.minimum(ty0 + TQ_H + HALF, Gh)
    kx_lo = tl.maximum(tx0 - HALF, 0)
    kx_hi = tl.minimum(tx0 + TQ_W + HALF, Gw)
    j = tl.arange(0, TK_H * TK_W)
    kx = kx_lo + j % TK_W
    for ky0 in range(ky_lo, ky_hi, TK_H):
        ky = ky0 + j // TK_W
        k_ok = (ky < ky_hi) & (kx < kx_hi)
        ktok = ky * Gw + kx
        k = tl.load(K + b * skb + h * skh + ktok[:, None] * skn + d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + h * svh + ktok[:, None] * svn + d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (TQ, TK) fp32, log2 domain
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        inside = (dy <= HALF) & (dy >= -HALF) & (dx <= HALF) & (dx >= -HALF) & k_ok[None, :]
        bias = tl.load(T + ((dy + HALF) * (2 * HALF + 1) + (dx + HALF)) * heads + h, mask=inside, other=0.0)
        s = tl.where(inside, s + bias.to(tl.float32) * LOG2E, -1e30)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + (qy * Gw + qx)[:, None] * son + d[None, :], out.to(O.dtype.element_ty),
             mask=q_ok[:, None] & d_ok[None, :])


def relative_position_bias(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Dense (heads, N, N) fp32 bias for a Gh x Gw grid, built fresh on every call: no cache survives a weight
    change (the official LRU cache does, spec 6.12).

    The table is gathered separably (rows by dy, then columns by dx) with 1-D index_selects whose indices come
    from arange; out-of-window offsets read index 0 and are masked to -1e7 afterwards. This form is also the
    ONNX export's: no `%`/`//` on dynamic sizes, no integer Clip/Abs (TensorRT's parser lacks them)."""
    Gh, Gw = grid
    K = table.shape[0]
    W = K // 2
    heads = table.shape[-1]

    def offsets(G):  # (G, G): table index of query row minus key row, and whether it is inside the window
        r = torch.arange(G, device=table.device)
        d = r[:, None] - r[None, :] + W
        inside = (d >= 0) & (d < K)
        return torch.where(inside, d, torch.zeros_like(d)), inside

    iy, in_y = offsets(Gh)
    ix, in_x = offsets(Gw)
    t = table.float().permute(2, 0, 1)  # (heads, K, K)
    t = t.index_select(1, iy.reshape(-1)).reshape(heads, Gh, Gh, K)  # (heads, yi, yj, K)
    t = t.index_select(3, ix.reshape(-1)).reshape(heads, Gh, Gh, Gw, Gw)  # (heads, yi, yj, xi, xj)
    bias = t.permute(0, 1, 3, 2, 4).reshape(heads, Gh * Gw, Gh * Gw)  # (heads, (yi, xi), (yj, xj))
    inside = (in_y[:, None, :, None] & in_x[None, :, None, :]).reshape(Gh * Gw, Gh * Gw)
    return torch.where(inside, bias, torch.full_like(bias, MASKED))


def window_attention_ref(q, k, v, table, grid, *, upcast: bool = False) -> torch.Tensor:
    """The numerics spec: dense SDPA with the materialised (heads, N, N) bias (as the official code does).
    upcast=True computes in fp32 and casts back (the 'fp32 reference' of the three-way kernel test)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    bias = relative_position_bias(table, grid).to(q.dtype)  # under autocast the official mask is rounded too
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None]).to(dtype)


# (query tile, key tile) sizes in grid cells. GPU: 64 x 64 (fixed heuristic, no autotune). The interpreter's cost
# is per op, not per element, so on CPU bigger tiles mean fewer programs and iterations (tests switch back to
# the GPU sizes to cover them).
TILES = {"cuda": (64, 64), "cpu": (256, 512)}


def _tiles(Gh: int, Gw: int, half: int, q_cells: int, k_cells: int) -> tuple[int, int, int, int]:
    """Query tiles up to 16 cells wide; key tiles whose width covers the query tile's column span plus the
    window (<= 32 columns), so each key row is visited once per query tile."""
    tq_w = min(16, next_pow2(Gw))
    tq_h = max(1, min(q_cells // tq_w, next_pow2(Gh)))
    tk_w = next_pow2(min(tq_w + 2 * half, Gw))
    tk_h = max(1, min(k_cells // tk_w, next_pow2(min(tq_h + 2 * half, Gh))))
    tq_h, tk_h = max(tq_h, 16 // tq_w), max(tk_h, 16 // tk_w)  # tl.dot needs >= 16 rows and columns
    return tq_h, tq_w, tk_h, tk_w


def _window_attention_unsupported(q, k, v, table, grid) -> str | None:
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (expected one of {DTYPES})"
    if q.numel() >= 2 ** 31:
        return "2^31 elements or more (the kernels use 32-bit offsets)"
    if q.dim() != 4 or q.shape[-1] > MAX_HEAD_DIM:
        return f"q of shape {tuple(q.shape)} (expected (B, heads, N, dh) with dh <= {MAX_HEAD_DIM})"
    if k.shape != q.shape or v.shape != q.shape or k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k, v differ in shape or dtype"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "q, k, v need a contiguous last dimension"
    if table.dim() != 3 or table.shape[0] != table.shape[1] or table.shape[0] % 2 != 1 \
            or table.shape[2] != q.shape[1]:
        return f"table of shape {tuple(table.shape)} (expected (2W+1, 2W+1, heads={q.shape[1]}))"
    if len(grid) != 2 or grid[0] * grid[1] != q.shape[2]:
        return f"grid {tuple(grid)} does not hold N={q.shape[2]} tokens"
    return None


@torch.library.custom_op("ssdd::window_attention", mutates_args=())
def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                            grid: list[int]) -> torch.Tensor:
    """Launch `_window_attention_kernel`. A torch custom op (fake impl below) so torch.compile traces callers."""
    problem = _window_attention_unsupported(q, k, v, table, grid)
    assert problem is None, problem
    B, heads, N, dh = q.shape
    Gh, Gw = int(grid[0]), int(grid[1])
    half = table.shape[0] // 2
    table = table.contiguous()
    o = torch.empty((B, heads, N, dh), dtype=q.dtype, device=q.device)
    interp = q.device.type != "cuda"
    tq_h, tq_w, tk_h, tk_w = _tiles(Gh, Gw, half, *TILES["cpu" if interp else "cuda"])
    launch_grid = (math.ceil(Gh / tq_h) * math.ceil(Gw / tq_w), B * heads)
    launchable(_window_attention_kernel, q.device)[launch_grid](
        q, k, v, table, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        heads, Gh, Gw, 1.4426950408889634 / math.sqrt(dh),
        HALF=half, DH=dh, BLOCK_D=max(16, next_pow2(dh)), TQ_H=tq_h, TQ_W=tq_w, TK_H=tk_h, TK_W=tk_w,
        UPCAST=interp and q.dtype != torch.float32, PRECISION="ieee" if q.dtype == torch.float32 or interp
        else "tf32", num_warps=4, num_stages=2)
    return o


@window_attention_triton.register_fake
def _(q, k, v, table, grid):
    return q.new_empty(q.shape)


def window_attention(q, k, v, table, grid, *, use_triton: bool | None = None) -> torch.Tensor:
    """Dispatch: Triton kernel where it applies (see `_dispatch.use_triton_for`), else the reference."""
    if use_triton is not False:
        problem = _window_attention_unsupported(q, k, v, table, grid)
        if use_triton_for(q, use_triton, problem, "windowed attention"):
            return window_attention_triton(q, k, v, table, list(grid))
    return window_attention_ref(q, k, v, table, grid)
