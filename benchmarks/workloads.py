"""What is timed: one decode of a batch of latents into images, for SSDD and for the KL-VAE baseline.

A workload is a network (`net`, an nn.Module that backends transform, export or compile) plus the fixed
driver around it (`decode`): SSDD's `net` is the `UViTDecoder` itself, driven by the one Euler loop
(`sampler.euler_sample`, what `SSDDModule.sample` runs), one network evaluation per step; the KL-VAE runs
`net(z)` once (post_quant_conv + decoder, what `AutoencoderKL.decode` computes without tiling). Which kernels
the SSDD decoder runs is set by the backend with `optimize.use_kernels`.

Encode workloads (`encoder-f8c4`, ...: SSDD's encoder, `model.Encoder`) time one encoder forward
image (B, 3, H, W) -> moments (B, 2C, H/F, W/F), what `SSDD.encode` runs before splitting mean and logvar.

FLOPs (`gflop`): counted by `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add, convolutions,
matmuls and attention only) on a meta-device copy of the network, for one full call at the row's shape. The
SSDD eager reference computes attention densely with a window mask; the counter counts that dense form.

Weights: random unless a checkpoint is given. Throughput does not depend on weight values (the same ops run
on the same shapes; no data-dependent control flow), so random weights give the same images/s.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ssdd_runtime.model import DECODER_SIZES, Encoder, UViTDecoder, decoder_config, encoder_config
from ssdd_runtime.sampler import TIMESCALE, euler_sample, randn, time_grid

# Stable Diffusion's KL-f8 VAE (stabilityai/sd-vae-ft-mse config.json), built in code so no Hub download is
# needed: diffusers AutoencoderKL(**SD_VAE_CONFIG). Decoder: 4 UpDecoderBlock2D (512, 512, 256, 128 channels,
# 3 ResBlocks each), a mid block with one single-head attention, 49.5M decoder parameters.
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 256,
}
KL_VAE = "kl-vae"
SSDD_PREFIX = "ssdd-"
ENCODER_PREFIX = "encoder-"
ENCODERS = ("f8c4",)  # SSDD encoders offered as encode workloads (F8C4_*_256 checkpoints)
WEIGHTS_NOTE = ("random weights: throughput does not depend on weight values (same ops on the same shapes, no "
                "data-dependent control flow); pass a checkpoint to time real weights")


def model_names() -> list[str]:
    return [SSDD_PREFIX + s for s in DECODER_SIZES] + [KL_VAE] + [ENCODER_PREFIX + e for e in ENCODERS]


def is_encoder(model: str) -> bool:
    return model.startswith(ENCODER_PREFIX)


def check_model_name(name: str) -> None:
    if name not in model_names():
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(model_names())}")


@dataclass
class Workload:
    model: str  # "ssdd-M" or "kl-vae"
    net: nn.Module  # what a backend transforms: SSDD UViTDecoder (x_t, t, z) -> v; KL-VAE (z) -> image
    steps: int  # network evaluations per decode (1 for the KL-VAE)
    stride: int  # image pixels per latent pixel
    z_dim: int
    weights: str  # "random" or the checkpoint path
    params: int  # parameters of `net`
    reference: nn.Module | None = None  # fp32 eager copy of `net` for the quality columns (run.decode_quality)

    def example_inputs(self, batch: int, height: int, width: int, dtype: torch.dtype, device,
                       seed: int = 0) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """(network inputs, initial noise or None) for one decode. Different seeds give different tensors."""
        if height % self.stride or width % self.stride:
            raise ValueError(f"{self.model}: height and width must be multiples of {self.stride}; "
                             f"got {height}x{width}")
        g = torch.Generator().manual_seed(seed)
        z = randn((batch, self.z_dim, height // self.stride, width // self.stride), generator=g, device=device)
        z = z.to(dtype)
        if self.model == KL_VAE:
            return (z,), None
        if is_encoder(self.model):
            return (torch.rand((batch, 3, height, width), generator=g).mul(2).sub(1).to(device, dtype),), None
        noise = randn((batch, 3, height, width), generator=g, device=device)  # fp32 Euler state
        t = (time_grid(self.steps)[0] * TIMESCALE).expand(batch).to(device)  # the first step's network time
        return (noise.to(dtype), t, z), noise

    def decode(self, net: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
               noise: torch.Tensor | None) -> torch.Tensor:
        """One full decode with the (transformed) network `net`."""
        if self.model == KL_VAE or is_encoder(self.model):
            return net(*inputs)
        _, _, z = inputs
        return euler_sample(net, z, noise, steps=self.steps)


class KLVAEDecode(nn.Module):
    """AutoencoderKL.decode without tiling/slicing: post_quant_conv then the decoder (encoder not kept)."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv, vae.decoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def build_workload(model: str, *, steps: int = 1, checkpoint: str | None = None,
                   kl_vae_config: dict | str | None = None) -> Workload:
    check_model_name(model)
    if model == KL_VAE:
        return _build_kl_vae(checkpoint, kl_vae_config)
    if is_encoder(model):
        return _build_encoder(model[len(ENCODER_PREFIX):], checkpoint)
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    size = model[len(SSDD_PREFIX):]
    if checkpoint is not None:
        from ssdd_runtime.api import SSDD

        full = SSDD.from_pretrained(checkpoint, decoder=size, local_files_only=True)
        decoder, stride, weights = full.decoder, full.stride, str(checkpoint)
    else:
        torch.manual_seed(0)
        decoder, stride, weights = UViTDecoder(decoder_config(size), stride=8), 8, "random"
    net = decoder.float().eval().requires_grad_(False)
    return Workload(model, net, steps, stride, decoder.cfg.z_dim, weights, _count(net))


def load_kl_vae_config(spec: dict | str | None) -> dict:
    """None / "sd" -> SD_VAE_CONFIG; a dict; or a JSON file of AutoencoderKL keyword arguments."""
    if spec is None or spec == "sd":
        return dict(SD_VAE_CONFIG)
    if isinstance(spec, dict):
        return dict(spec)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--kl-vae-config expects 'sd' or a JSON file of AutoencoderKL arguments; "
                                f"{spec!r} is not a file")
    with open(spec, encoding="utf-8") as f:
        cfg = json.load(f)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}  # drop diffusers' _class_name etc.


def _build_kl_vae(checkpoint: str | None, config) -> Workload:
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("diffusers not installed: the KL-VAE baseline needs it "
                          "(pip install 'ssdd-runtime[bench]')") from e
    if checkpoint is not None:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--kl-vae-checkpoint expects a local diffusers AutoencoderKL folder "
                                    f"(config.json + weights); got {checkpoint!r}")
        vae = AutoencoderKL.from_pretrained(checkpoint, local_files_only=True)
        weights = str(checkpoint)
    else:
        torch.manual_seed(0)
        vae = AutoencoderKL(**load_kl_vae_config(config))
        weights = "random"
    stride = 2 ** (len(vae.config.block_out_channels) - 1)
    net = KLVAEDecode(vae).float().eval().requires_grad_(False)
    return Workload(KL_VAE, net, 1, stride, vae.config.latent_channels, weights, _count(net))


def _build_encoder(name: str, checkpoint: str | None) -> Workload:
    if checkpoint is not None:
        from ssdd_runtime.api import SSDD

        full = SSDD.from_pretrained(checkpoint, encoder=name, local_files_only=True)
        encoder, weights = full.encoder, str(checkpoint)
    else:
        torch.manual_seed(0)
        encoder, weights = Encoder(encoder_config(name)), "random"
    net = encoder.float().eval().requires_grad_(False)
    return Workload(ENCODER_PREFIX + name, net, 1, encoder.cfg.stride, encoder.cfg.z_dim, weights, _count(net))


def gflop(w: Workload, batch: int, height: int, width: int) -> float:
    """GFLOP of one full call of `w` (all Euler steps) at (batch, height, width), counted on the meta device."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(w.net).to("meta", torch.float32)  # FLOPs do not depend on the dtype the run used
    ins, noise = w.example_inputs(batch, height, width, torch.float32, "cpu")
    ins = tuple(a.to("meta") for a in ins)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        w.decode(net, ins, None if noise is None else noise.to("meta"))
    return counter.get_total_flops() / 1e9


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
