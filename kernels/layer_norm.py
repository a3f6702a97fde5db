"""AdaLN: y = LN(x) * (1 + scale) + shift, (shift, scale) = channel halves of `mod` at each token's latent pixel.

Layout: x (B, N, C) tokens of a Gh x Gw row-major grid; mod (B, h, w, 2C), shift first (spec 3.6), repeated
to the token grid by nearest indexing (factor Gh / h: 1 for f8, 2 for f16, 4 for f32 encoders). LN without
affine, fp32 statistics. The same family holds the affine LayerNorm of the transformer FFN
(`affine_layer_norm`).

Triton (`_layer_norm_kernel`): one program per BLOCK_T tokens, the whole row of C channels in registers; mean
then centred variance in fp32; optional affine; optional modulation gathered from mod[b, y // (Gh/h),
x // (Gw/w)] (no repeated copy). Limits: fp32/fp16/bf16, C <= 4096, Gh % h == Gw % w == 0, last dims
contiguous. Verified: against the references under TRITON_INTERPRET=1 on CPU (tests/test_kernels_norms.py);
not yet run on a GPU (no GPU was lent to the session that wrote it).
"""
import torch
import torch.nn.functional as F

from ssdd_runtime.kernels._dispatch import Launch, jit, tl, triton, use_triton_for

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_C = 4096


@jit(do_not_specialize=("N", "Gw", "RY", "RX"))  # index-only ints: one kernel for every grid
def _layer_norm_kernel(X, Y, Wt, Bs, MOD, N, C, Gw, sxb, sxn, syb, syn, smb, smy, smx, RY, RX, eps,
                       HAS_AFFINE: tl.constexpr, HAS_MOD: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (t < N)[:, None] & c_ok[None, :]
    x = tl.load(X + b * sxb + t[:, None] * sxn + c[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / C
    dev = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(dev * dev, 1) / C + eps)
    y = dev * rstd[:, None]
    if HAS_AFFINE:
        w = tl.load(Wt + c, mask=c_ok, other=1.0).to(tl.float32)
        bb = tl.load(Bs + c, mask=c_ok, other=0.0).to(tl.float32)
        y = y * w[None, :] + bb[None, :]
    if HAS_MOD:  # token (y, x) -> latent pixel (y // RY, x // RX); shift = first C channels, scale = last C
        mptr = MOD + b * smb + ((t // Gw // RY) * smy + (t % Gw // RX) * smx)[:, None] + c[None, :]
        shift = tl.load(mptr, mask=ok, other=0.0).to(tl.float32)
        scale = tl.load(mptr + C, mask=ok, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    tl.store(Y + b * syb + t[:, None] * syn + c[None, :], y.to(Y.dtype.element_ty), mask=ok)


def ada_layer_norm_ref(x, mod, grid, eps: float) -> torch.Tensor:
    B, N, C = x.shape
    m = F.interpolate(mod.float().permute(0, 3, 1, 2), size=tuple(grid), mode="nearest")  # (B, 2C, Gh, Gw)
    shift, scale = m.flatten(2).transpose(1, 2).chunk(2, dim=-1)  # (B, N, C) each
    y = F.layer_norm(x.float(), (C,), eps=eps) * (1 + scale) + shift
    return y.to(x.dtype)


def affine_layer_norm_ref(x, weight, bias, eps: float) -> torch.Tensor:
    """Affine LayerNorm over the last dim in fp32, cast back to x.dtype (the FFN's norm2, spec 3.6)."""
    return F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


def _layer_norm_unsupported(x, mod, grid, weight, bias) -> str | None:
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (expected one of {DTYPES})"
    if x.numel() >= 2 ** 31:
        return "2^31 elements or more (the kernels use 32-bit offsets)"
    if x.dim() != 3 or x.shape[-1] > MAX_C or x.stride(-1) != 1:
        return f"x of shape {tuple(x.shape)} (expected (B, N, C), C <= {MAX_C}, contiguous channels)"
    B, N, C = x.shape
    if weight is not None and (weight.shape != (C,) or bias is None or bias.shape != (C,)):
        return "weight and bias must have shape (C,)"
    if mod is not None:
        Gh, Gw = grid
        if Gh * Gw != N:
            return f"grid {tuple(grid)} does not hold N={N} tokens"
        if mod.dim() != 4 or mod.shape[0] != B or mod.shape[3] != 2 * C or mod.stride(3) != 1 \
                or Gh % mod.shape[1] or Gw % mod.shape[2]:
            return f"mod of shape {tuple(mod.shape)} (expected (B, h, w, 2C), Gh % h == Gw % w == 0)"
    return None


def layer_norm_launches(x, weight, bias, mod, grid, eps: float, *,
                        interpreter: bool) -> tuple[torch.Tensor, list[Launch]]:
    """(y, launches): the output (allocated) and the launch that writes y = (Ada)LN(x). A pure function of
    shapes, strides and dtypes (meta tensors work), shared by the launcher and the ahead-of-time compile check
    (kernels/aot.py)."""
    B, N, C = x.shape
    y = torch.empty((B, N, C), dtype=x.dtype, device=x.device)
    block_c = triton.next_power_of_2(C)
    block_t = max(1, (65536 if interpreter else 4096) // block_c)
    Gh, Gw = (int(grid[0]), int(grid[1])) if mod is not None else (1, N)
    m_strides = mod.stride()[:3] if mod is not None else (0, 0, 0)
    ry, rx = (Gh // mod.shape[1], Gw // mod.shape[2]) if mod is not None else (1, 1)
    return y, [Launch(_layer_norm_kernel, (triton.cdiv(N, block_t), B),
                   (x, y, weight, bias, mod, N, C, Gw, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                    *m_strides, ry, rx, eps),
                   dict(HAS_AFFINE=weight is not None, HAS_MOD=mod is not None, BLOCK_T=block_t, BLOCK_C=block_c),
                   num_warps=4 if block_c <= 1024 else 8)]


@torch.library.custom_op("ssdd::layer_norm", mutates_args=())
def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      mod: torch.Tensor | None, grid: list[int], eps: float) -> torch.Tensor:
    """Launch `_layer_norm_kernel` (AdaLN when `mod` is given, affine LN when weight/bias are). A torch custom
    op (fake impl below) so torch.compile traces callers."""
    problem = _layer_norm_unsupported(x, mod, grid, weight, bias)
    assert problem is None, problem
    y, launches = layer_norm_launches(x, weight, bias, mod, grid, eps, interpreter=x.device.type != "cuda")
    for launch in launches:
        launch()
    return y


@layer_norm_triton.register_fake
def _(x, weight, bias, mod, grid, eps):
    return x.new_empty(x.shape)


def ada_layer_norm(x, mod, grid, eps: float, *, use_triton: bool | None = None) -> torch.Tensor:
    """Dispatch: Triton kernel where it applies (see `_dispatch.use_triton_for`), else the reference."""
    if use_triton is not False:
        problem = _layer_norm_unsupported(x, mod, grid, None, None)
        if use_triton_for(x, use_triton, problem, "AdaLN"):
            return layer_norm_triton(x, None, None, mod, list(grid), float(eps))
    return ada_layer_norm_ref(x, mod, grid, eps)


def affine_layer_norm(x, weight, bias, eps: float, *, use_triton: bool | None = None) -> torch.Tensor:
    """Dispatch of the affine LayerNorm: Triton kernel where it applies, else the reference."""
    if use_triton is not False:
        problem = _layer_norm_unsupported(x, None, None, weight, bias)
        if use_triton_for(x, use_triton, problem, "LayerNorm"):
            return layer_norm_triton(x, weight, bias, None, [1, x.shape[1]], float(eps))
    return affine_layer_norm_ref(x, weight, bias, eps)
