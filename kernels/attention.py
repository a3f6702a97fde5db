"""Windowed relative-position attention: softmax(q k^T / sqrt(d) + bias) v.

bias(i, j) = table[dy + W, dx + W, head] when |dy| <= W and |dx| <= W (W = 7 for the (15, 15, heads) table),
-1e7 otherwise (the official constant), with (dy, dx) the offset between query token i and key token j on a
Gh x Gw row-major grid. Closed form of spec 3.7, valid for any grid (non-square, smaller than the window).
Layout: q, k, v (B, heads, N, dh), N = Gh * Gw; table (2W+1, 2W+1, heads).

Triton kernel (`_window_attention_kernel`): one program per (query tile of TQ_H x TQ_W grid cells, batch*head).
The keys it needs are the tile's footprint, rows ty0-W .. ty0+TQ_H-1+W by columns tx0-W .. tx0+TQ_W-1+W clipped
to the grid; that rectangle is flattened and visited BLOCK_K keys at a time (gathered by token index: each
key row is dh contiguous elements), so no key slot outside the footprint is executed and work and memory grow
linearly with N. GPU tiles: 4 x 8 queries, 16 keys: for SSDD-M 54% (32x32 grid) and 52% (64x64) of the dot FLOPs
executed fall inside the window and the real head dim (64-query x 64-key-slot tiles at dh padded to 128: 19%, 21%).
The head dim is split into a power-of-two chunk and a remainder chunk padded to >= 16 (72 = 64 + 16,
40 = 32 + 16), not padded to the next power of two. The bias is gathered from a (heads, 2W+1, 2W+1) copy of the
table inside the kernel (no (N, N) mask exists) and keys outside the window are excluded (weight exactly 0, as
exp(-1e7) is in the reference). Online softmax in fp32 (exp2 domain); q k^T and p v on tensor cores in the
input dtype with fp32 accumulation (mma.sync / HMMA on sm_80 and sm_90: a 32-query tile is below wgmma's
64 rows); fp32 inputs: IEEE fp32 dot (FFMA, no TF32). When every stride is a multiple of 8 elements (always
for the model's contiguous q, k, v: dh is 24..96) the launcher sets ALIGN=8 and the kernel hints the row
offsets, so the rows load as 128-bit vectors; other strides fall back to narrower loads.
Limits: dh <= 128, fp32/fp16/bf16, last dim contiguous. Verified: against `window_attention_ref` under
TRITON_INTERPRET=1 on CPU (tests/test_kernels_attention.py), and compiled ahead of time for sm_80/sm_90 with
no spills and tensor-core dots at every dispatched configuration (tests/test_kernels_compile.py); not yet run
on a GPU (no GPU was lent to the session that wrote it).
"""
import math

import torch
import torch.nn.functional as F

from ssdd_runtime.kernels._dispatch import Launch, jit, tl, triton, use_triton_for

MASKED = -1e7  # logit outside the window (spec 3.7); exp() of it is exactly 0 in fp32
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@jit(do_not_specialize=("sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn", "sob", "soh", "son",
                         "heads", "Gh", "Gw"))  # one compiled kernel per tile config, not per grid and stride
def _window_attention_kernel(Q, K, V, T, O,
                             sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                             heads, Gh, Gw, qk_scale,
                             HALF: tl.constexpr, DH: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                             TQ_H: tl.constexpr, TQ_W: tl.constexpr, BLOCK_K: tl.constexpr,
                             ALIGN: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    WIN: tl.constexpr = 2 * HALF + 1
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
    q_row = b * sqb + h * sqh + (qy * Gw + qx) * sqn
    o_row = b * sob + h * soh + (qy * Gw + qx) * son
    if ALIGN > 1:  # every stride is a multiple of ALIGN elements (the launcher checked): vector loads/stores
        q_row = tl.multiple_of(q_row, ALIGN)
        o_row = tl.multiple_of(o_row, ALIGN)
    # head dim in two chunks: d0 = [0, D0) (D0 a power of two), d1 = [D0, D0 + D1) holding the rest (D1 = 0: none)
    d0 = tl.arange(0, D0)
    q0 = tl.load(Q + q_row[:, None] + d0[None, :], mask=q_ok[:, None] & (d0 < DH)[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([TQ_H * TQ_W, D0], tl.float32)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(Q + q_row[:, None] + d1[None, :], mask=q_ok[:, None] & (d1 < DH)[None, :], other=0.0)
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([TQ_H * TQ_W, D1], tl.float32)
    m_i = tl.full([TQ_H * TQ_W], -1e30, tl.float32)  # finite: a block with no key in the window gives p = 1,
    l_i = tl.zeros([TQ_H * TQ_W], tl.float32)       # wiped by alpha = 0 once an in-window key (the diagonal) comes

    # the footprint: key rows ky_lo..ky_hi-1 x columns kx_lo..kx_hi-1, flattened row-major, BLOCK_K at a time
    ky_lo = tl.maximum(ty0 - HALF, 0)
    kx_lo = tl.maximum(tx0 - HALF, 0)
    fw = tl.minimum(tx0 + TQ_W + HALF, Gw) - kx_lo
    n_keys = (tl.minimum(ty0 + TQ_H + HALF, Gh) - ky_lo) * fw
    T_h = T + h * WIN * WIN  # this head's (WIN, WIN) bias table
    for j0 in range(0, n_keys, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        k_ok = j < n_keys
        ky = ky_lo + j // fw
        kx = kx_lo + j % fw
        k_row = b * skb + h * skh + (ky * Gw + kx) * skn
        v_row = b * svb + h * svh + (ky * Gw + kx) * svn
        if ALIGN > 1:
            k_row = tl.multiple_of(k_row, ALIGN)
            v_row = tl.multiple_of(v_row, ALIGN)
        k0 = tl.load(K + k_row[:, None] + d0[None, :], mask=k_ok[:, None] & (d0 < DH)[None, :], other=0.0)
        if UPCAST:
            k0 = k0.to(tl.float32)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)  # (TQ, BLOCK_K) fp32
        if D1 > 0:
            k1 = tl.load(K + k_row[:, None] + d1[None, :], mask=k_ok[:, None] & (d1 < DH)[None, :], other=0.0)
            if UPCAST:
                k1 = k1.to(tl.float32)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        inside = (dy <= HALF) & (dy >= -HALF) & (dx <= HALF) & (dx >= -HALF) & k_ok[None, :]
        bias = tl.load(T_h + (dy + HALF) * WIN + (dx + HALF), mask=inside, other=0.0)
        s = tl.where(inside, s * qk_scale + bias * LOG2E, -1e30)  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = tl.load(V + v_row[:, None] + d0[None, :], mask=k_ok[:, None] & (d0 < DH)[None, :], other=0.0)
        if UPCAST:
            v0 = v0.to(tl.float32)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            v1 = tl.load(V + v_row[:, None] + d1[None, :], mask=k_ok[:, None] & (d1 < DH)[None, :], other=0.0)
            if UPCAST:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    tl.store(O + o_row[:, None] + d0[None, :], (acc0 * inv_l[:, None]).to(O.dtype.element_ty),
             mask=q_ok[:, None] & (d0 < DH)[None, :])
    if D1 > 0:
        tl.store(O + o_row[:, None] + d1[None, :], (acc1 * inv_l[:, None]).to(O.dtype.element_ty),
                 mask=q_ok[:, None] & (d1 < DH)[None, :])


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


# Tiles: (query tile width cap, query cells, keys per block). GPU: 4 x 8 queries and 16 keys (fixed heuristic,
# no autotune): small enough that 52-54% of the executed dot FLOPs are useful for SSDD-M (see `work`). The
# interpreter's cost is per op, not per element, so on CPU bigger tiles mean fewer programs and iterations
# (tests switch back to the GPU sizes to cover them).
TILES = {"cuda": (8, 32, 16), "cpu": (16, 256, 512)}


def _tiles(Gh: int, Gw: int, q_w: int, q_cells: int, block_k: int) -> tuple[int, int, int]:
    """(TQ_H, TQ_W, BLOCK_K): query tiles q_w wide (narrower on a narrower grid) and q_cells // TQ_W tall."""
    tq_w = min(q_w, triton.next_power_of_2(Gw))
    tq_h = max(1, min(q_cells // tq_w, triton.next_power_of_2(Gh)))
    tq_h = max(tq_h, 16 // tq_w)  # tl.dot needs >= 16 rows
    return tq_h, tq_w, block_k


def _num_warps(dtype: torch.dtype, dh: int) -> int:
    """4 warps for the 16-bit tensor-core path, 2 for the fp32 FFMA path up to dh 96: the choices ptxas compiles
    without spills at every head dim 24..128 on sm_80 and sm_90 with triton 3.7.1 (2 warps spill 8 bytes at
    dh 72 bf16 on sm_80; 4 warps spill 12 bytes at dh 72 fp32 on sm_90, 2 warps 164 bytes at dh 128 fp32;
    tests/test_kernels_compile.py checks every dispatched one)."""
    return 2 if dtype == torch.float32 and dh <= 96 else 4


def _head_chunks(dh: int) -> tuple[int, int]:
    """(D0, D1): a power-of-two chunk and the rest padded to a power of two >= 16 (0: none); tl.dot needs K >= 16."""
    d0 = max(16, 1 << (dh.bit_length() - 1))
    rest = dh - d0
    return d0, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


def _stride_align(*tensors) -> int:
    """The largest of 8, 4, 2, 1 elements dividing every non-unit stride of the tensors' first three dims."""
    strides = [st for t in tensors for st in t.stride()[:3]]
    return next(a for a in (8, 4, 2, 1) if all(st % a == 0 for st in strides))


def work(launch: Launch, dh: int, batch_heads: int, grid) -> dict:
    """Dot-product FLOPs of one attention launch, counted as the kernel iterates (query tile x footprint keys
    in BLOCK_K blocks x padded head dim, both dots), and the useful part: in-window (query, key) pairs x real dh.
    Also the compulsory DRAM bytes (q, k, v read, o written once)."""
    c = launch.constexprs
    tq_h, tq_w, bk, half = c["TQ_H"], c["TQ_W"], c["BLOCK_K"], c["HALF"]
    d_pad = c["D0"] + c["D1"]
    Gh, Gw = grid

    def span(t0, tq, G):  # footprint extent of the tile starting at t0 along one axis
        return min(t0 + tq + half, G) - max(t0 - half, 0)

    key_slots = sum(span(y, tq_h, Gh) * span(x, tq_w, Gw) for y in range(0, Gh, tq_h) for x in range(0, Gw, tq_w))
    blocks = sum(triton.cdiv(span(y, tq_h, Gh) * span(x, tq_w, Gw), bk)
                 for y in range(0, Gh, tq_h) for x in range(0, Gw, tq_w))

    def keys_1d(G):  # sum over queries of the in-window keys along one axis
        return sum(min(i + half + 1, G) - max(i - half, 0) for i in range(G))

    executed = 4 * batch_heads * tq_h * tq_w * blocks * bk * d_pad  # 2 dots x 2 FLOP per multiply-add
    useful = 4 * batch_heads * keys_1d(Gh) * keys_1d(Gw) * dh
    esize = launch.args[0].element_size()
    return dict(executed_flops=executed, useful_flops=useful, useful_fraction=useful / executed,
                footprint_key_slots=key_slots, dram_bytes=4 * batch_heads * Gh * Gw * dh * esize)


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


def window_attention_launches(q, k, v, table, grid, *, interpreter: bool) -> tuple[torch.Tensor, list[Launch]]:
    """(o, launches): the output (allocated) and the launch that writes o = window_attention(q, k, v, table,
    grid). A pure function of shapes, strides and dtypes (meta tensors work), shared by the launcher and the
    ahead-of-time compile check (kernels/aot.py)."""
    B, heads, N, dh = q.shape
    Gh, Gw = int(grid[0]), int(grid[1])
    o = torch.empty((B, heads, N, dh), dtype=q.dtype, device=q.device)
    table_h = table.permute(2, 0, 1).contiguous()  # (heads, 2W+1, 2W+1): one head's bias is contiguous
    tq_h, tq_w, block_k = _tiles(Gh, Gw, *TILES["cpu" if interpreter else "cuda"])
    d0, d1 = _head_chunks(dh)
    return o, [Launch(_window_attention_kernel, (triton.cdiv(Gh, tq_h) * triton.cdiv(Gw, tq_w), B * heads),
                      (q, k, v, table_h, o, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                       heads, Gh, Gw, 1.4426950408889634 / math.sqrt(dh)),
                      dict(HALF=table.shape[0] // 2, DH=dh, D0=d0, D1=d1, TQ_H=tq_h, TQ_W=tq_w, BLOCK_K=block_k,
                           ALIGN=_stride_align(q, k, v, o), UPCAST=interpreter and q.dtype != torch.float32,
                           PRECISION="ieee" if q.dtype == torch.float32 or interpreter else "tf32"),
                      num_warps=_num_warps(q.dtype, dh), num_stages=2)]


@torch.library.custom_op("ssdd::window_attention", mutates_args=())
def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                            grid: list[int]) -> torch.Tensor:
    """Launch `_window_attention_kernel`. A torch custom op (fake impl below) so torch.compile traces callers."""
    problem = _window_attention_unsupported(q, k, v, table, grid)
    assert problem is None, problem
    o, launches = window_attention_launches(q, k, v, table, grid, interpreter=q.device.type != "cuda")
    for launch in launches:
        launch()
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
