"""Adaptive GroupNorm (+ SiLU): y = act(FiLM_t(FiLM_ctx(GN(x) * gamma + beta))).

GN over `num_groups` groups with fp32 statistics; ctx FiLM: (1 + scale) * y + shift with (scale, shift) =
channel halves of `ctx_mod` (B, 2C, h, w) taken at the nearest latent pixel (spec 3.3 norm1); time FiLM:
(1 + ts) * y + tsh with (ts, tsh) = halves of `time_mod` (B, 2C) (spec 3.3 norm2); optional SiLU.
Layout: x (B, C, H, W), NCHW or channels_last; H, W integer multiples of h, w.

Triton, two kernels: `_group_norm_stats_kernel` splits each (batch, group) into chunks of whole pixels; each
program reads its chunk once, tile by tile, takes each tile's mean and then its centred sum of squares in
fp32 and merges tiles with Chan's parallel formula (never E[x^2] - E[x]^2). `_ada_group_norm_kernel` merges
the chunk partials of each channel's group the same way, then applies (x - mean) * rstd, the affine, the
context FiLM gathered at (y // (H/h), x // (W/w)) from the latent-resolution map (no upsampled copy), the
time FiLM and SiLU, and writes y in x's memory format. Traffic: x read twice, y written once. Limits:
fp32/fp16/bf16, H % h == W % w == 0, x's H and W dims flattenable (NCHW or NHWC strides).
Verified: against `ada_group_norm_ref` under TRITON_INTERPRET=1 on CPU (tests/test_kernels_norms.py); not yet
run on a GPU (no GPU was lent to the session that wrote it).
"""
import torch
import torch.nn.functional as F

from ssdd_runtime.kernels._dispatch import Launch, jit, tl, triton, use_triton_for

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@jit(do_not_specialize=("CPG", "G", "NCHUNK"))  # index-only ints: fewer compiled variants
def _group_norm_stats_kernel(X, P, HW, sxb, sxc, sxhw, CPG, G, chunk_e, NCHUNK,
                             GB: tl.constexpr, BLOCK_E: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Partial statistics (mean, M2 = sum of squared deviations, count) of one chunk of GB (batch, group) rows.
    A group's CPG * HW elements are indexed by e in memory order: (channel, pixel) for NCHW, (pixel, channel)
    for channels_last, so consecutive e are contiguous in both layouts."""
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    n_gb = tl.cdiv(G, GB)
    b = pid // n_gb
    g = (pid % n_gb) * GB + tl.arange(0, GB)
    g_ok = g < G
    e_lo = chunk * chunk_e
    e_hi = tl.minimum(e_lo + chunk_e, CPG * HW)
    n_a = tl.zeros([GB], tl.float32)
    mean_a = tl.zeros([GB], tl.float32)
    m2_a = tl.zeros([GB], tl.float32)
    for e0 in range(e_lo, e_hi, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        if CHANNELS_LAST:
            c_in, hw = e % CPG, e // CPG
        else:
            c_in, hw = e // HW, e % HW
        ok = g_ok[:, None] & (e < e_hi)[None, :]
        ptr = X + b * sxb + (g[:, None] * CPG + c_in[None, :]) * sxc + hw[None, :] * sxhw
        x = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        n_b = tl.minimum(BLOCK_E, e_hi - e0).to(tl.float32)
        mean_b = tl.sum(x, 1) / n_b  # tile mean first, then the centred sum of squares
        dev = tl.where(ok, x - mean_b[:, None], 0.0)
        m2_b = tl.sum(dev * dev, 1)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    out = P + ((b * G + g) * NCHUNK + chunk) * 3
    tl.store(out, mean_a, mask=g_ok)
    tl.store(out + 1, m2_a, mask=g_ok)
    tl.store(out + 2, n_a, mask=g_ok)


@jit(do_not_specialize=("Wd", "scb", "scc", "sch", "scw", "RY", "RX", "stb", "CPG", "G", "NCHUNK"))
def _ada_group_norm_kernel(X, Y, P, Wt, Bs, CTX, TM, C, HW, Wd, sxb, sxc, sxhw, syb, syc, syhw,
                           scb, scc, sch, scw, RY, RX, stb, CPG, G, NCHUNK, eps,
                           HAS_AFFINE: tl.constexpr, HAS_CTX: tl.constexpr, HAS_TIME: tl.constexpr,
                           SILU: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_HW: tl.constexpr):
    """Integers that only index (the latent map, groups, chunks) are not specialised on divisibility: one
    compiled kernel serves every decoder size and grid. The contiguous dim's stride is the literal 1 (pixels
    for NCHW, channels for channels_last) so that loads and stores vectorise."""
    pid_hw = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    # merge the chunk partials of each channel's group (Chan et al.), chunk by chunk, all in fp32
    part = P + (b * G + c // CPG) * NCHUNK * 3
    n = tl.zeros([BLOCK_C], tl.float32)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for k in range(NCHUNK):
        p_mean = tl.load(part + 3 * k, mask=c_ok, other=0.0)
        p_m2 = tl.load(part + 3 * k + 1, mask=c_ok, other=0.0)
        p_n = tl.load(part + 3 * k + 2, mask=c_ok, other=0.0)
        n_new = tl.maximum(n + p_n, 1.0)
        delta = p_mean - mean
        mean = mean + delta * (p_n / n_new)
        m2 = m2 + p_m2 + delta * delta * (n * p_n / n_new)
        n = n + p_n
    rstd = 1.0 / tl.sqrt(m2 / tl.maximum(n, 1.0) + eps)

    hw = pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)
    ok = c_ok[:, None] & (hw < HW)[None, :]
    if CHANNELS_LAST:
        x_off = c[:, None] + hw[None, :] * sxhw
        y_off = c[:, None] + hw[None, :] * syhw
    else:
        x_off = c[:, None] * sxc + hw[None, :]
        y_off = c[:, None] * syc + hw[None, :]
    x = tl.load(X + b * sxb + x_off, mask=ok, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None]
    if HAS_AFFINE:
        w = tl.load(Wt + c, mask=c_ok, other=1.0).to(tl.float32)
        bb = tl.load(Bs + c, mask=c_ok, other=0.0).to(tl.float32)
        y = y * w[:, None] + bb[:, None]
    if HAS_CTX:  # nearest latent pixel of each output pixel; scale = first C channels, shift = last C
        pix = (hw // Wd // RY) * sch + (hw % Wd // RX) * scw
        cptr = CTX + b * scb + c[:, None] * scc + pix[None, :]
        scale = tl.load(cptr, mask=ok, other=0.0).to(tl.float32)
        shift = tl.load(cptr + C * scc, mask=ok, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    if HAS_TIME:  # time FiLM (B, 2C): scale first, shift second
        ts = tl.load(TM + b * stb + c, mask=c_ok, other=0.0).to(tl.float32)
        tsh = tl.load(TM + b * stb + C + c, mask=c_ok, other=0.0).to(tl.float32)
        y = y * (1.0 + ts[:, None]) + tsh[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(Y + b * syb + y_off, y.to(Y.dtype.element_ty), mask=ok)


def ada_group_norm_ref(x, num_groups: int, eps: float, *, weight=None, bias=None, ctx_mod=None, time_mod=None,
                       silu: bool = False) -> torch.Tensor:
    """The numerics spec, computed in fp32 and cast back to x.dtype.

    The context map is applied by broadcasting each latent pixel over its (H/h) x (W/w) block of a view of y
    (nearest upsampling without materialising it), and each FiLM is one addcmul: about 2.5x less memory
    traffic than upsample + separate mul/add on a CPU, same values up to float rounding."""
    y = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if ctx_mod is not None:
        B, C, H, W = y.shape
        h, w = ctx_mod.shape[-2:]
        # Materialise PyTorch's nearest upsampling when the factor is not an integer (never in the model) and
        # under torch.export: with dynamic H, W the 6-D view's symbolic H // h costs most of the export time
        # (SSDD-S decoder: 79 s -> 31 s with interpolate; the same values, exported as ONNX Resize).
        if torch.compiler.is_exporting() or H % h or W % w:
            scale, shift = F.interpolate(ctx_mod.float(), size=(H, W), mode="nearest").chunk(2, dim=1)
            y = torch.addcmul(shift, y, 1 + scale)
        else:
            scale, shift = ctx_mod.float()[:, :, :, None, :, None].chunk(2, dim=1)  # (B, C, h, 1, w, 1)
            y = torch.addcmul(shift, y.view(B, C, h, H // h, w, W // w), 1 + scale).reshape(B, C, H, W)
    if time_mod is not None:
        scale, shift = time_mod.float()[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1)
        y = torch.addcmul(shift, y, 1 + scale)
    if silu:
        y = F.silu(y, inplace=True)
    return y.to(x.dtype)


def _ada_group_norm_unsupported(x, num_groups, weight, bias, ctx_mod, time_mod) -> str | None:
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (expected one of {DTYPES})"
    if x.numel() >= 2 ** 31:
        return "2^31 elements or more (the kernels use 32-bit offsets)"
    if x.dim() != 4 or x.shape[1] % num_groups != 0:
        return f"x of shape {tuple(x.shape)} (expected (B, C, H, W) with C divisible by {num_groups} groups)"
    B, C, H, W = x.shape
    if H > 1 and x.stride(2) != W * x.stride(3):
        return "x's H and W dims cannot be flattened (expected NCHW or channels_last strides)"
    if not (x.stride(1) == 1 and C > 1) and H * W > 1 and x.stride(3) != 1:
        return "x's W dim is not contiguous (expected NCHW or channels_last strides)"
    if (weight is None) != (bias is None) or (weight is not None and (weight.shape != (C,) or bias.shape != (C,))):
        return "weight and bias must both be given with shape (C,), or both be None"
    if ctx_mod is not None:
        if ctx_mod.dim() != 4 or ctx_mod.shape[:2] != (B, 2 * C) or H % ctx_mod.shape[2] or W % ctx_mod.shape[3]:
            return f"ctx_mod of shape {tuple(ctx_mod.shape)} (expected (B, 2C, h, w) with H % h == W % w == 0)"
    if time_mod is not None and tuple(time_mod.shape) != (B, 2 * C):
        return f"time_mod of shape {tuple(time_mod.shape)} (expected ({B}, {2 * C}))"
    return None


def _norm_blocks(x: torch.Tensor, interpreter: bool) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_HW, num_warps) of the apply kernel: wide along the contiguous dim. channels_last runs 8
    warps: with 4, ptxas (triton 3.7.1, sm_80) spills 4 bytes in the fp16 affine-only variant. Interpreter:
    bigger tiles, as its cost is per op."""
    if interpreter:
        block_c = min(64, triton.next_power_of_2(x.shape[1]))
        return block_c, max(16, 65536 // block_c), 4
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels_last: channels contiguous
        block_c = min(128, triton.next_power_of_2(x.shape[1]))
        return block_c, max(1, 4096 // block_c), 8
    return 16, 256, 4


def ada_group_norm_launches(x, num_groups: int, eps: float, weight, bias, ctx_mod, time_mod, silu: bool, *,
                            interpreter: bool) -> tuple[torch.Tensor, list[Launch]]:
    """(y, launches): the output (allocated, in x's memory format) and the stats and apply launches that write
    it. A pure function of shapes, strides and dtypes (meta tensors work), shared by the launcher and the
    ahead-of-time compile check (kernels/aot.py)."""
    B, C, H, W = x.shape
    y = torch.empty_like(x)  # keeps x's memory format (NCHW or channels_last)
    time_mod = time_mod.contiguous() if time_mod is not None else None
    G, HW, cpg = num_groups, H * W, C // num_groups
    # stats: GPU splits each (batch, group) into chunks so that the programs fill the device; the interpreter
    # (cost per op and per program) takes all groups of an image in one program
    channels_last = x.stride(1) == 1 and C > 1
    gb = triton.next_power_of_2(G) if interpreter else 1
    block_e = 8192 if interpreter else 4096
    want_chunks = 1 if interpreter else max(1, 1024 // (B * G))
    chunk_e = triton.cdiv(max(block_e, triton.cdiv(cpg * HW, want_chunks)), block_e) * block_e
    nchunk = triton.cdiv(cpg * HW, chunk_e)
    partials = torch.empty((B * G, nchunk, 3), dtype=torch.float32, device=x.device)
    sxb, sxc, sxhw = x.stride(0), x.stride(1), x.stride(3)
    stats = Launch(_group_norm_stats_kernel, (B * triton.cdiv(G, gb), nchunk),
                   (x, partials, HW, sxb, sxc, sxhw, cpg, G, chunk_e, nchunk),
                   dict(GB=gb, BLOCK_E=block_e, CHANNELS_LAST=channels_last), num_warps=4)
    block_c, block_hw, apply_warps = _norm_blocks(x, interpreter)
    c_strides = ctx_mod.stride() if ctx_mod is not None else (0, 0, 0, 0)
    ry, rx = (H // ctx_mod.shape[2], W // ctx_mod.shape[3]) if ctx_mod is not None else (1, 1)
    apply = Launch(_ada_group_norm_kernel, (triton.cdiv(HW, block_hw), triton.cdiv(C, block_c), B),
                   (x, y, partials, weight, bias, ctx_mod, time_mod, C, HW, W, sxb, sxc, sxhw, y.stride(0),
                    y.stride(1), y.stride(3), *c_strides, ry, rx, time_mod.stride(0) if time_mod is not None else 0,
                    cpg, G, nchunk, eps),
                   dict(HAS_AFFINE=weight is not None, HAS_CTX=ctx_mod is not None, HAS_TIME=time_mod is not None,
                        SILU=silu, CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw),
                   num_warps=apply_warps)
    return y, [stats, apply]


@torch.library.custom_op("ssdd::ada_group_norm", mutates_args=())
def ada_group_norm_triton(x: torch.Tensor, num_groups: int, eps: float, weight: torch.Tensor | None,
                          bias: torch.Tensor | None, ctx_mod: torch.Tensor | None, time_mod: torch.Tensor | None,
                          silu: bool) -> torch.Tensor:
    """Launch the stats and apply kernels. A torch custom op (fake impl below) so torch.compile traces callers."""
    problem = _ada_group_norm_unsupported(x, num_groups, weight, bias, ctx_mod, time_mod)
    assert problem is None, problem
    y, launches = ada_group_norm_launches(x, num_groups, eps, weight, bias, ctx_mod, time_mod, silu,
                                          interpreter=x.device.type != "cuda")
    for launch in launches:
        launch()
    return y


@ada_group_norm_triton.register_fake
def _(x, num_groups, eps, weight, bias, ctx_mod, time_mod, silu):
    return torch.empty_like(x)


def ada_group_norm(x, num_groups: int, eps: float, *, weight=None, bias=None, ctx_mod=None, time_mod=None,
                   silu: bool = False, use_triton: bool | None = None) -> torch.Tensor:
    """Dispatch: Triton kernels where they apply (see `_dispatch.use_triton_for`), else the reference."""
    if use_triton is not False:
        problem = _ada_group_norm_unsupported(x, num_groups, weight, bias, ctx_mod, time_mod)
        if use_triton_for(x, use_triton, problem, "AdaGroupNorm"):
            return ada_group_norm_triton(x, num_groups, float(eps), weight, bias, ctx_mod, time_mod, bool(silu))
    return ada_group_norm_ref(x, num_groups, eps, weight=weight, bias=bias, ctx_mod=ctx_mod, time_mod=time_mod,
                              silu=silu)
