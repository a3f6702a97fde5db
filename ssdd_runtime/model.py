"""SSDD in plain PyTorch: f<F>c<C> encoder, UViT diffusion decoder, flow-matching Euler sampler.

Written from ../shared/spec/SSDD_SPEC.md (section numbers below refer to it). Parameter names follow the
official state dict so official `.safetensors` files load with strict matching. The fused ops
(windowed attention, adaptive GroupNorm, AdaLN) are called through `ssdd_runtime.kernels`, whose
dispatch functions end in the PyTorch reference; this file holds no device or Triton logic.

Read top to bottom: configs and the size table, the SSDD wrapper, the sampler, the decoder and its blocks,
the encoder and its blocks.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssdd_runtime import kernels
from ssdd_runtime.sampler import T_POW_SHIFT, euler_sample, randn

# ---------------------------------------------------------------------------------------------------------
# Configs (spec 2, 3.1)


@dataclass(frozen=True)
class DecoderConfig:
    size: str
    channels: int
    ch_mult: tuple[int, ...]
    mid_layers: int
    heads: int | None = None  # None: min(16, max(4, Cm // 64))
    z_dim: int = 4

    @property
    def levels(self) -> tuple[int, ...]:  # C0..C3, each rounded up to a multiple of 32 (GroupNorm(32))
        return tuple(math.ceil(self.channels * m / 32) * 32 for m in self.ch_mult)

    @property
    def mid_dim(self) -> int:
        return self.levels[-1]

    @property
    def num_heads(self) -> int:
        return self.heads if self.heads is not None else min(16, max(4, self.mid_dim // 64))


DECODER_SIZES = {
    "XS": dict(channels=32, ch_mult=(1, 2, 3, 3), mid_layers=8, heads=4),    # 4.77M params (/2^20)
    "S": dict(channels=48, ch_mult=(1, 2, 3, 3), mid_layers=8, heads=4),     # 13.41M
    "B": dict(channels=64, ch_mult=(1, 2, 3, 3), mid_layers=10),             # 20.16M
    "M": dict(channels=96, ch_mult=(1, 2, 3, 3), mid_layers=12),             # 47.95M
    "L": dict(channels=96, ch_mult=(1, 2, 4, 4), mid_layers=16),             # 86.56M
    "XL": dict(channels=128, ch_mult=(1, 2, 4, 4), mid_layers=16),           # 153.80M
    "H": dict(channels=192, ch_mult=(1, 2, 4, 4), mid_layers=16),            # 345.89M
    "XH": dict(channels=256, ch_mult=(1, 2, 4, 4), mid_layers=16),           # 614.76M
    "G": dict(channels=384, ch_mult=(1, 2, 4, 4), mid_layers=16),            # 1382.85M
}


def decoder_config(size: str, z_dim: int = 4) -> DecoderConfig:
    if size not in DECODER_SIZES:
        raise ValueError(f"unknown decoder size {size!r}; expected one of {', '.join(DECODER_SIZES)}")
    return DecoderConfig(size=size, z_dim=z_dim, **DECODER_SIZES[size])


@dataclass(frozen=True)
class EncoderConfig:
    stride: int  # F: image pixels per latent pixel
    z_dim: int  # C: latent channels
    base_dim: int = 128
    num_res_blocks: int = 2

    @property
    def name(self) -> str:
        return f"f{self.stride}c{self.z_dim}"

    @property
    def ch_mult(self) -> tuple[int, ...]:  # f8: 1,2,4,4  f16: 1,2,4,4,4  f32: 1,2,4,4,4,4
        return (1, 2) + (4,) * (int(math.log2(self.stride)) - 1)


ENCODER_STRIDES = (8, 16, 32)  # f4 builds upstream but its latent is finer than the decoder's 1/8 grid (3.9)


def encoder_config(name: str) -> EncoderConfig:
    m = re.fullmatch(r"f(\d+)c(\d+)", name)
    if m is None or int(m.group(1)) not in ENCODER_STRIDES or int(m.group(2)) < 1:
        raise ValueError(f"unknown encoder {name!r}; expected f8cC, f16cC or f32cC (e.g. 'f8c4')")
    return EncoderConfig(stride=int(m.group(1)), z_dim=int(m.group(2)))


WINDOW = 8  # relative-position window: keys within +-(WINDOW-1) tokens in each direction (spec 3.7)


# ---------------------------------------------------------------------------------------------------------
# Top level


class DiagonalGaussian:
    """Encoder posterior: per-element Gaussian with mean and clamped log-variance (spec 1.2)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar.float()).to(self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = randn(self.mean.shape, generator=generator, device=self.mean.device)
        return (self.mean.float() + self.std.float() * eps).to(self.mean.dtype)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={tuple(self.mean.shape)}, dtype={self.mean.dtype})"


class SSDDModule(nn.Module):
    """Encoder + single-step diffusion decoder. Holds the official state-dict layout (`encoder.*`, `decoder.*`).

    `encoder=None` builds a decoder-only model (state dict `decoder.*` only, as in the released SDVAE files):
    `self.encoder` is then None, or an external encoder object that is deliberately not a registered submodule
    (e.g. `ssdd_runtime.sdvae.SDVAEEncoder`, whose `encode(x)` returns the posterior), so the state dict stays
    decoder-only. The decoder's latent stride is then `stride` (default 8: the SD-VAE's).

    This module is the math. `ssdd_runtime.SSDD` subclasses it with the user-facing API: loading, input
    validation, dtype policy, batching and noise handling.
    """

    def __init__(self, encoder: EncoderConfig | str | None = "f8c4", decoder: DecoderConfig | str = "M", *,
                 stride: int | None = None):
        super().__init__()
        enc = encoder_config(encoder) if isinstance(encoder, str) else encoder
        if enc is not None and stride is not None and stride != enc.stride:
            raise ValueError(f"stride={stride} does not match the {enc.name} encoder's stride {enc.stride}")
        z_dim = enc.z_dim if enc is not None else 4
        dec = decoder_config(decoder, z_dim=z_dim) if isinstance(decoder, str) else decoder
        if enc is not None and dec.z_dim != enc.z_dim:
            raise ValueError(f"decoder z_dim {dec.z_dim} does not match encoder latent channels {enc.z_dim}")
        self.encoder_config, self.decoder_config = enc, dec
        self.encoder = Encoder(enc) if enc is not None else None
        if enc is None and stride is not None and stride not in ENCODER_STRIDES:
            raise ValueError(f"stride must be one of {ENCODER_STRIDES}, got {stride!r}")
        self.decoder = UViTDecoder(dec, stride=enc.stride if enc is not None else (8 if stride is None else stride))

    @property
    def stride(self) -> int:  # image pixels per latent pixel
        return self.decoder.stride

    @property
    def dtype(self) -> torch.dtype:  # of the weights (the activations follow)
        return self.decoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # x: (B, 3, H, W) in [-1, 1]
        if self.encoder is None:
            raise ValueError("this SSDD model is decoder-only (no encoder.* weights): pair it with an encoder")
        if not isinstance(self.encoder, Encoder):  # external (not a submodule): returns the posterior itself
            return self.encoder.encode(x)
        moments = self.encoder(x)  # (B, 2C, H/F, W/F)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def sample(self, z: torch.Tensor, noise: torch.Tensor, *, steps: int = 1,
               t_pow_shift: float = T_POW_SHIFT) -> torch.Tensor:
        """Euler flow-matching sampler (spec 4). z: (B, C, h, w); noise: (B, 3, h*F, w*F) fp32 = x at t=1."""
        return euler_sample(self.decoder, z, noise, steps=steps, t_pow_shift=t_pow_shift)


# ---------------------------------------------------------------------------------------------------------
# Decoder (spec 3)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features in fp32, cosines first (spec 3.2.1). t: (B,) already scaled by 1000 -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, c0: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(c0, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(feats)))


class UViTDecoder(nn.Module):
    """decoder(x_t, t*1000, z) -> x0 - eps. U-Net of adaptive-norm ResBlocks around a windowed transformer."""

    def __init__(self, cfg: DecoderConfig, stride: int = 8):
        super().__init__()
        self.cfg, self.stride = cfg, stride
        C = cfg.levels
        c0, temb = C[0], 4 * C[0]
        self.conv_in = nn.Conv2d(3 + cfg.z_dim, c0, 3, padding=1)
        self.time_embedding = TimestepEmbedding(c0, temb)
        self.ada_ctx_proj = nn.Sequential(nn.Conv2d(cfg.z_dim, c0, 3, padding=1), nn.SiLU(),
                                          nn.Conv2d(c0, c0, 3, padding=1))
        skips = [c0]  # channels of every tensor pushed on the skip stack, in push order
        self.down_blocks = nn.ModuleList()
        prev = c0
        for i, ch in enumerate(C):
            last = i == len(C) - 1
            block = DownBlock(prev, ch, c0, temb, downsample=not last)
            self.down_blocks.append(block)
            skips += [ch] * (3 if not last else 2)
            prev = ch
        self.mid_block = MidTransformer(C[-1], c0, cfg.num_heads, cfg.mid_layers)
        self.up_blocks = nn.ModuleList()
        for k, ch in enumerate(reversed(C)):
            ins = []
            for _ in range(3):
                ins.append(prev + skips.pop())
                prev = ch
            self.up_blocks.append(UpBlock(ins, ch, c0, temb, upsample=k < len(C) - 1))
        self.conv_norm_out = GroupNormAct(c0, eps=1e-5, silu=True)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W), t: (B,) in [0, 1000], z: (B, Cz, H/F, W/F)
        temb = self.time_embedding(timestep_embedding(t, self.cfg.levels[0]).to(x.dtype))  # (B, 4*C0)
        z_up = F.interpolate(z, size=x.shape[-2:], mode="nearest")
        h = self.conv_in(torch.cat([x, z_up], dim=1))  # (B, C0, H, W)
        ctx = self.ada_ctx_proj(z)  # (B, C0, h, w) at latent resolution
        skips = [h]
        for block in self.down_blocks:
            h = block(h, ctx, temb, skips)
        h = self.mid_block(h, ctx)  # (B, C3, H/8, W/8)
        for block in self.up_blocks:
            h = block(h, ctx, temb, skips)
        return self.conv_out(self.conv_norm_out(h))  # (B, 3, H, W), unclamped


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, c0: int, temb: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin, cout, c0, temb), ResnetBlock(cout, cout, c0, temb)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if downsample else None

    def forward(self, h, ctx, temb, skips):
        for resnet in self.resnets:
            h = resnet(h, ctx, temb)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h


class UpBlock(nn.Module):
    def __init__(self, ins: list[int], cout: int, c0: int, temb: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin, cout, c0, temb) for cin in ins])
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if upsample else None

    def forward(self, h, ctx, temb, skips):
        for resnet in self.resnets:
            h = resnet(torch.cat([h, skips.pop()], dim=1), ctx, temb)  # [h, skip], LIFO
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class Downsample(nn.Module):  # symmetric padding, unlike the encoder's (spec 3.4)
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FusedOp:
    """Marks a leaf that calls a fused op. `use_triton` (None: auto, False: reference, True: Triton or an error)
    is set once for the whole model by `ssdd_runtime.optimize.use_kernels`, never passed through `forward`."""

    use_triton: bool | None = None


class GroupNormAct(FusedOp, nn.GroupNorm):
    """Affine GroupNorm(32), optionally FiLM-modulated by a per-sample time vector, optionally followed by SiLU."""

    def __init__(self, ch: int, eps: float, silu: bool):
        super().__init__(32, ch, eps=eps)
        self.silu = silu

    def forward(self, x: torch.Tensor, time_mod: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W); time_mod: (B, 2C) = (scale, shift)
        return kernels.ada_group_norm(x, self.num_groups, self.eps, weight=self.weight, bias=self.bias,
                                      time_mod=time_mod, silu=self.silu, use_triton=self.use_triton)


class AdaGroupNormCtx(FusedOp, nn.Module):
    """norm1 of a decoder ResBlock: GroupNorm without affine, modulated by a 1x1 projection of the context map,
    then SiLU."""

    def __init__(self, c0: int, ch: int):
        super().__init__()
        self.ctx_proj = nn.Conv2d(c0, 2 * ch, 1)
        self.num_groups, self.eps = 32, 1e-5

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W); ctx: (B, C0, h, w): the (scale, shift) maps stay at latent resolution
        return kernels.ada_group_norm(x, self.num_groups, self.eps, ctx_mod=self.ctx_proj(ctx), silu=True,
                                      use_triton=self.use_triton)


class ResnetBlock(nn.Module):
    """Spec 3.3. AdaGN (scale, shift from ctx) + SiLU, conv, affine GN + time FiLM (scale, shift) + SiLU, conv."""

    def __init__(self, cin: int, cout: int, c0: int, temb: int):
        super().__init__()
        self.norm1 = AdaGroupNormCtx(c0, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, 2 * cout)
        self.norm2 = GroupNormAct(cout, eps=1e-5, silu=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, ctx, temb):
        # x: (B, Cin, Hl, Wl); ctx: (B, C0, h, w); temb: (B, 4*C0)
        a = self.conv1(self.norm1(x, ctx))
        time_mod = self.time_emb_proj(F.silu(temb))  # (B, 2*Cout)
        a = self.conv2(self.norm2(a, time_mod))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + a


class MidTransformer(nn.Module):
    """Spec 3.5: GN(eps 1e-6) -> tokens -> proj_in -> blocks -> proj_out -> + residual, at 1/8 resolution."""

    def __init__(self, dim: int, c0: int, heads: int, layers: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, c0, heads) for _ in range(layers)])
        self.proj_out = nn.Linear(dim, dim)
        self.norm = GroupNormAct(dim, eps=1e-6, silu=False)

    def forward(self, y, ctx):
        B, C, Gh, Gw = y.shape
        x = self.proj_in(self.norm(y).flatten(2).transpose(1, 2))  # (B, N, C), row-major tokens
        ctx = F.silu(ctx).permute(0, 2, 3, 1)  # (B, h, w, C0): AdaLN input, shared by all blocks
        for block in self.transformer_blocks:
            x = block(x, ctx, (Gh, Gw))
        x = self.proj_out(x).transpose(1, 2).reshape(B, C, Gh, Gw)
        return x + y


class AdaLayerNorm(FusedOp, nn.Module):
    """LayerNorm without affine, shifted and scaled per token by a projection of the latent-resolution context."""

    def __init__(self, c0: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(c0, 2 * dim)
        self.eps = 1e-5

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # x: (B, N, C); ctx: (B, h, w, C0) -> mod (B, h, w, 2C): shift first, scale second
        return kernels.ada_layer_norm(x, self.linear(ctx), grid, self.eps, use_triton=self.use_triton)


class LayerNorm(FusedOp, nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.affine_layer_norm(x, self.weight, self.bias, self.eps, use_triton=self.use_triton)


class Attention(FusedOp, nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, u, table, grid):
        B, N, C = u.shape
        q, k, v = (proj(u).view(B, N, self.heads, C // self.heads).transpose(1, 2).contiguous()
                   for proj in (self.to_q, self.to_k, self.to_v))  # (B, heads, N, dh), channel = head*dh + d
        o = kernels.window_attention(q, k, v, table, grid, use_triton=self.use_triton)  # (B, heads, N, dh)
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)  # value first, gate second
        return value * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in_act = GEGLU(dim, mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        return self.proj_out(self.proj_in_act(x))


class RelativePositionBias(nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.relative_bias_table = nn.Parameter(torch.zeros(2 * WINDOW - 1, 2 * WINDOW - 1, heads))

    def forward(self) -> torch.Tensor:  # (2W-1, 2W-1, heads): bias by (dy, dx) offset, expanded in the kernel
        return self.relative_bias_table


class TransformerBlock(nn.Module):
    """Spec 3.6: AdaLN (shift, scale) -> windowed self-attention -> affine LN -> GEGLU FFN, pre-norm residuals."""

    def __init__(self, dim: int, c0: int, heads: int):
        super().__init__()
        self.norm1 = AdaLayerNorm(c0, dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)
        self.relative_position_bias = RelativePositionBias(heads)

    def forward(self, x, ctx, grid):
        # x: (B, N, C) tokens of a Gh x Gw grid; ctx: (B, h, w, C0) = SiLU(context map)
        x = x + self.attn1(self.norm1(x, ctx, grid), self.relative_position_bias(), grid)
        return x + self.ff(self.norm2(x))


# ---------------------------------------------------------------------------------------------------------
# Encoder (spec 2): LDM "KL-f8"-style, GroupNorm eps 1e-6, no time embedding


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        chs = [cfg.base_dim * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(3, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        prev = chs[0]
        for i, ch in enumerate(chs):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(EncoderResBlock(prev, ch))
                prev = ch
            if i < len(chs) - 1:
                level.downsample = EncoderDownsample(ch)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = EncoderResBlock(prev, prev)
        self.mid.attn_1 = EncoderAttention(prev)
        self.mid.block_2 = EncoderResBlock(prev, prev)
        self.norm_out = nn.GroupNorm(32, prev, eps=1e-6)
        self.conv_out = nn.Conv2d(prev, 2 * cfg.z_dim, 3, padding=1)
        self.out_proj = nn.Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)

    def forward(self, x):  # (B, 3, H, W) -> (B, 2C, H/F, W/F): mean channels first, then logvar
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        h = self.conv_out(F.silu(self.norm_out(h)))
        return self.out_proj(h)


class EncoderResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class EncoderDownsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only


class EncoderAttention(nn.Module):
    """Single-head global attention over all latent pixels, 1x1 conv projections with bias, residual."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).flatten(2).transpose(1, 2)[:, None].contiguous() for proj in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-0.5
        return x + self.proj_out(o[:, 0].transpose(1, 2).reshape(B, C, H, W))
