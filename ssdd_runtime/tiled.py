"""Tiled decoding: one network evaluation of the UViT decoder over overlapping latent tiles, with the GroupNorm
statistics of the whole image.

Why not plain tiles: every decoder GroupNorm normalises with statistics over the whole image (spec 3.3), so
decoding tiles independently changes every value (and leaves seams). What is local: 3x3 convs (a receptive
field), AdaGN/FiLM/SiLU (pointwise once the statistics are known), AdaLN and the FFN (per token) and the windowed
attention (keys within +-7 tokens, exactly zero weight beyond: the -1e7 bias underflows in exp).

Design (one evaluation `net(x, t, z)`; `sample` runs it inside the one Euler loop, sampler.euler_sample):
* The two top U-Net levels (full and 1/2 resolution: conv_in, down_blocks 0-1, up_blocks 1's upsampler, up_blocks
  2-3, the output head) run tile by tile on crops of the latent grid grown by a halo that covers their receptive
  field, so each tile's interior is exact; their memory is bounded by the tile.
  Halos, counted conv by conv (each 3x3 conv at 1/d resolution spoils d more pixels from a crop edge):
  down path to its 1/4 output 16 px (D_RADIUS), up path including the recomputed skips 34 px (U_RADIUS).
* The U-Net core at <= 1/4 resolution (down_blocks 2-3, the middle transformer, up_blocks 0 and up_blocks 1's
  ResBlocks) runs on the whole image: 1/16 of the pixels and exact GroupNorms. Its transformer blocks run one at
  a time over token tiles with a 7-token halo, so the CPU attention reference never builds the dense (N, N)
  bias of the whole image. The latent-resolution context map and the time embedding are computed once.
* GroupNorm statistics of the tiled levels (21 GroupNorms) are exact: one statistics pass per GroupNorm, in
  evaluation order. Pass k runs every tile up to GroupNorm k (the ones before it normalise with the statistics
  already gathered), records the count, mean and centred sum of squares of the tile's interior, and stops that
  tile; the tiles' partials are merged with Chan's parallel formula in fp64 (never E[x^2] - E[x]^2). The result
  therefore equals the untiled decode up to float reassociation (tests/test_tiled.py states the bound).
Cost per Euler step, in units of one untiled evaluation of the down path D (~20% of the FLOPs) and the up path U
(~70%), before the halo overhead: sum_k (k/8) D + D over the 8 down GroupNorms, then per up GroupNorm one D
(the skips are recomputed, never stored) plus the prefix of U: about 19.5 D + 8 U, i.e. ~9x an untiled
evaluation, times the crop/tile area ratio ((tile + 2 halo) / tile)^2. Memory is what tiling buys, not time.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssdd_runtime.model import ResnetBlock, UViTDecoder, timestep_embedding
from ssdd_runtime.sampler import T_POW_SHIFT, euler_sample

D_RADIUS = 16  # px spoilt from a crop edge by conv_in + down_blocks 0-1 (the 1/4-resolution output)
U_RADIUS = 34  # px spoilt by conv_in .. conv_out through the tiled levels, skips included
MID_RADIUS = 7  # tokens: the attention window's reach per transformer block (spec 3.7)


@dataclass(frozen=True)
class Tile:
    """A latent-grid tile: `interior` rows/cols it produces, `crop` rows/cols it reads (interior + halo, clipped)."""
    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    def crop(self, t: torch.Tensor, scale: int = 1) -> torch.Tensor:  # t: (B, C, h*scale, w*scale)
        return t[..., self.cy0 * scale:self.cy1 * scale, self.cx0 * scale:self.cx1 * scale]

    def interior(self, t: torch.Tensor) -> torch.Tensor:  # t: a crop at any resolution; its interior part
        s = t.shape[-2] // (self.cy1 - self.cy0)
        y0, x0 = (self.y0 - self.cy0) * s, (self.x0 - self.cx0) * s
        return t[..., y0:y0 + (self.y1 - self.y0) * s, x0:x0 + (self.x1 - self.x0) * s]

    def put(self, out: torch.Tensor, t: torch.Tensor) -> None:  # write a crop's interior into the whole map
        s = t.shape[-2] // (self.cy1 - self.cy0)
        out[..., self.y0 * s:self.y1 * s, self.x0 * s:self.x1 * s] = self.interior(t)


def tiles(h: int, w: int, tile: int, halo: int) -> list[Tile]:
    """Row-major tiles of size `tile` (the last row/column smaller) over an h x w latent grid."""
    return [Tile(y, min(y + tile, h), x, min(x + tile, w),
                 max(y - halo, 0), min(y + tile + halo, h), max(x - halo, 0), min(x + tile + halo, w))
            for y in range(0, h, tile) for x in range(0, w, tile)]


# ---------------------------------------------------------------------------------------------------------
# GroupNorm with given statistics


class Stats:
    """Per-GroupNorm (count, mean, centred sum of squares) per (batch, group), merged with Chan's formula in fp64."""

    def __init__(self):
        self.acc: dict[torch.nn.Module, tuple[float, torch.Tensor, torch.Tensor]] = {}

    def add(self, module, x: torch.Tensor) -> None:
        B = x.shape[0]
        g = x.float().reshape(B, module.num_groups, -1)
        n_b = g.shape[-1]
        mean_b = g.mean(-1)
        m2_b = ((g - mean_b[..., None]) ** 2).sum(-1)  # centred in the tile, fp32
        if module not in self.acc:
            self.acc[module] = (n_b, mean_b.double(), m2_b.double())
            return
        n_a, mean_a, m2_a = self.acc[module]
        n = n_a + n_b
        delta = mean_b.double() - mean_a
        self.acc[module] = (n, mean_a + delta * (n_b / n), m2_a + m2_b.double() + delta ** 2 * (n_a * n_b / n))

    def finish(self) -> dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (mean, rstd), fp32 (B, groups), biased variance as F.group_norm."""
        return {m: (mean.float(), torch.rsqrt(m2 / n + m.eps).float()) for m, (n, mean, m2) in self.acc.items()}


class Norm:
    """Applies the decoder's GroupNorm leaves (AdaGroupNormCtx, GroupNormAct) to a tile crop with the whole image's
    statistics from `stats`. With a `target`: on reaching it, record its input's tile interior into `record`
    and stop the tile (raise _Stop); every GroupNorm before it has its statistics already.

    The math is `kernels.ada_group_norm_ref` with the statistics passed in instead of computed: normalise in fp32,
    affine, context FiLM (latent-resolution map broadcast over its pixel blocks), time FiLM, SiLU, cast back.
    tests/test_tiled.py pins it to the untiled decode."""

    def __init__(self, tile: Tile, stats: dict, record: Stats | None = None, target=None):
        self.tile, self.stats, self.record, self.target = tile, stats, record, target

    def __call__(self, module, x: torch.Tensor, *, ctx_mod=None, time_mod=None) -> torch.Tensor:
        if module is self.target:
            self.record.add(module, self.tile.interior(x))
            raise _Stop
        B, C, H, W = x.shape
        mean, rstd = self.stats[module]  # (B, groups) fp32
        y = ((x.float().reshape(B, module.num_groups, -1) - mean[..., None]) * rstd[..., None]).reshape(B, C, H, W)
        if getattr(module, "weight", None) is not None:
            y = torch.addcmul(module.bias.float()[:, None, None], y, module.weight.float()[:, None, None])
        if ctx_mod is not None:
            h, w = ctx_mod.shape[-2:]
            scale, shift = ctx_mod.float()[:, :, :, None, :, None].chunk(2, dim=1)  # (B, C, h, 1, w, 1)
            y = torch.addcmul(shift, y.view(B, C, h, H // h, w, W // w), 1 + scale).reshape(B, C, H, W)
        if time_mod is not None:
            scale, shift = time_mod.float()[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1)
            y = torch.addcmul(shift, y, 1 + scale)
        if getattr(module, "silu", True):  # AdaGroupNormCtx always applies SiLU
            y = F.silu(y, inplace=True)
        return y.to(x.dtype)


def _resnet(block: ResnetBlock, x, ctx, temb, norm: Norm):
    """ResnetBlock.forward (spec 3.3) with the GroupNorms applied by `norm`."""
    a = block.conv1(norm(block.norm1, x, ctx_mod=block.norm1.ctx_proj(ctx)))
    a = block.conv2(norm(block.norm2, a, time_mod=block.time_emb_proj(F.silu(temb))))
    return (x if block.conv_shortcut is None else block.conv_shortcut(x)) + a


# ---------------------------------------------------------------------------------------------------------
# The three parts of one evaluation (UViTDecoder.forward, split at 1/4 resolution)


def _top_down(dec: UViTDecoder, x, z, ctx, temb, norm: Norm):
    """conv_in + down_blocks 0-1 on a crop -> the skips [h0, d0r0, d0r1, d0ds, d1r0, d1r1, d1ds] (last: 1/4)."""
    z_up = F.interpolate(z, size=x.shape[-2:], mode="nearest")
    h = dec.conv_in(torch.cat([x, z_up], dim=1))
    skips = [h]
    for block in dec.down_blocks[:2]:
        for resnet in block.resnets:
            h = _resnet(resnet, h, ctx, temb, norm)
            skips.append(h)
        h = block.downsamplers[0](h)
        skips.append(h)
    return skips


def _core(dec: UViTDecoder, h, ctx, temb, tile: int):
    """The whole-image part at <= 1/4 resolution: h (B, C1, H/4, W/4) -> up_blocks[1]'s ResBlock output (1/4)."""
    skips = [h]
    for block in dec.down_blocks[2:]:
        h = block(h, ctx, temb, skips)
    h = _mid(dec.mid_block, h, ctx, tile)
    h = dec.up_blocks[0](h, ctx, temb, skips)
    for resnet in dec.up_blocks[1].resnets:
        h = resnet(torch.cat([h, skips.pop()], dim=1), ctx, temb)
    assert not skips
    return h


def _top_up(dec: UViTDecoder, low, skips, ctx, temb, norm: Norm):
    """up_blocks[1]'s upsampler, up_blocks 2-3 and the head on a crop; skips from _top_down without its last."""
    h = dec.up_blocks[1].upsamplers[0](low)
    for block in dec.up_blocks[2:]:
        for resnet in block.resnets:
            h = _resnet(resnet, torch.cat([h, skips.pop()], dim=1), ctx, temb, norm)
        if block.upsamplers is not None:
            h = block.upsamplers[0](h)
    return dec.conv_out(norm(dec.conv_norm_out, h))


def _mid(mid, y, ctx, tile: int):
    """MidTransformer.forward with each transformer block run over token tiles (halo MID_RADIUS): exact."""
    B, C, Gh, Gw = y.shape
    h, w = ctx.shape[-2:]
    r = Gh // h  # tokens per latent pixel: 1 (f8), 2 (f16), 4 (f32)
    x = mid.proj_in(mid.norm(y).flatten(2).transpose(1, 2)).reshape(B, Gh, Gw, C)
    c = F.silu(ctx).permute(0, 2, 3, 1)  # (B, h, w, C0)
    parts = tiles(h, w, tile, math.ceil(MID_RADIUS / r))
    for block in mid.transformer_blocks:
        out = torch.empty_like(x)
        for t in parts:
            xc = x[:, t.cy0 * r:t.cy1 * r, t.cx0 * r:t.cx1 * r]
            gh, gw = xc.shape[1:3]
            yc = block(xc.reshape(B, gh * gw, C), c[:, t.cy0:t.cy1, t.cx0:t.cx1], (gh, gw))
            t.put(out.permute(0, 3, 1, 2), yc.reshape(B, gh, gw, C).permute(0, 3, 1, 2))
        x = out
    x = mid.proj_out(x.reshape(B, Gh * Gw, C)).transpose(1, 2).reshape(B, C, Gh, Gw)
    return x + y


# ---------------------------------------------------------------------------------------------------------
# Public entry points


def check_tile(tile) -> int:
    """A positive integer (numpy integers too, as `steps`; not bools or floats) -> int."""
    if isinstance(tile, bool) or not isinstance(tile, numbers.Integral) or tile < 1:
        raise ValueError(f"tile must be a positive integer (latent pixels) or None, got {tile!r}")
    return int(tile)


class _Stop(Exception):
    """Raised by Norm after recording its target GroupNorm: the rest of the tile's evaluation is not needed."""


class TiledDecoder:
    """`net(x, t, z) -> v` equal to `decoder(x, t, z)` up to float reassociation, evaluated in tiles of `tile`
    latent pixels."""

    def __init__(self, decoder: UViTDecoder, tile: int):
        self.decoder, self.tile = decoder, check_tile(tile)
        # The tiled GroupNorms in evaluation order: each one's input depends on the statistics of those before it.
        self.down_norms = [n for b in decoder.down_blocks[:2] for r in b.resnets for n in (r.norm1, r.norm2)]
        self.up_norms = [n for b in decoder.up_blocks[2:] for r in b.resnets for n in (r.norm1, r.norm2)]
        self.up_norms.append(decoder.conv_norm_out)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dec = self.decoder
        B, _, H, W = x.shape
        h, w = z.shape[-2:]
        F_ = H // h
        temb = dec.time_embedding(timestep_embedding(t, dec.cfg.levels[0]).to(x.dtype))  # (B, 4*C0)
        ctx = dec.ada_ctx_proj(z)  # (B, C0, h, w), whole: latent resolution
        stats = {}  # GroupNorm -> (mean, rstd) of the whole image, filled in evaluation order

        def down(t, norm):
            return _top_down(dec, t.crop(x, F_), t.crop(z), t.crop(ctx), temb, norm)

        down_tiles = tiles(h, w, self.tile, math.ceil(D_RADIUS / F_))
        _record_stats(down, down_tiles, self.down_norms, stats)
        quarter = _assemble(lambda t, norm: down(t, norm)[-1], down_tiles, stats, (B, H // 4, W // 4))
        low = _core(dec, quarter, ctx, temb, self.tile)  # (B, C2, H/4, W/4)
        del quarter

        def up(t, norm):
            skips = down(t, Norm(t, stats))[:-1]
            return _top_up(dec, t.crop(low, F_ // 4), skips, t.crop(ctx), temb, norm)

        up_tiles = tiles(h, w, self.tile, math.ceil(U_RADIUS / F_))
        _record_stats(up, up_tiles, self.up_norms, stats)
        return _assemble(up, up_tiles, stats, (B, H, W))


def _record_stats(run, tiles_, targets, stats: dict) -> None:
    """One pass over the tiles per GroupNorm in `targets` (evaluation order): each tile runs until that norm has
    recorded its partial sums, then the whole-image statistics are merged into `stats`."""
    for target in targets:
        record = Stats()
        for t in tiles_:
            try:
                run(t, Norm(t, stats, record, target))
            except _Stop:
                pass
        stats.update(record.finish())


def _assemble(run, tiles_, stats: dict, bhw: tuple[int, int, int]) -> torch.Tensor:
    """Run every tile with the whole-image statistics and paste its core into a (B, C, H, W) output."""
    full = None
    for t in tiles_:
        out = run(t, Norm(t, stats))
        if full is None:
            full = out.new_empty(bhw[0], out.shape[1], *bhw[1:])
        t.put(full, out)
    return full


def sample(decoder: UViTDecoder, z: torch.Tensor, noise: torch.Tensor, *, steps: int = 1,
           t_pow_shift: float = T_POW_SHIFT, tile: int) -> torch.Tensor:
    """The Euler sampler (sampler.euler_sample) with each network evaluation run in tiles of `tile` latent pixels."""
    return euler_sample(TiledDecoder(decoder, tile), z, noise, steps=steps, t_pow_shift=t_pow_shift)
