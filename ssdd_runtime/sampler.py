"""The flow-matching sampler (spec 4): time grid, start noise, and the one Euler loop every decode path uses.

x_1 is Gaussian noise, x_0 the image; the network predicts v = x_0 - eps at time t (seen as t * TIMESCALE), and
each Euler step moves x_{t_k} -> x_{t_k} + v * (t_k - t_{k+1}) on the grid t_k = (1 - k/S)^p, p = t_pow_shift.
`net` is any callable `net(x, t, z) -> v`: the PyTorch decoder, a compiled one, an ONNX Runtime / OpenVINO /
TensorRT runner. The Euler state stays fp32 whatever dtype the network runs in.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

TIMESCALE = 1000.0  # the network sees t * 1000
T_POW_SHIFT = 2.0  # default time-grid exponent (the official sampler's default)


def time_grid(steps: int, t_pow_shift: float = T_POW_SHIFT) -> torch.Tensor:
    """t_k = (1 - k/S)^p for k = 0..S, fp32, from 1 (noise) to 0 (image)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32) ** torch.tensor(t_pow_shift, dtype=torch.float32)


def randn(shape, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """fp32 standard normal drawn on the generator's device (CPU by default), then moved: reproducible per seed."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=gen_device).to(device)


def per_image_noise(shape: Sequence[int], generators: Sequence[torch.Generator], *, device=None) -> torch.Tensor:
    """(B, *shape) fp32 noise, image i drawn from generators[i]: an image's noise does not depend on its batch."""
    return torch.cat([randn((1, *shape), generator=g, device=device) for g in generators])


def seeded_noise(shape: Sequence[int], seed: int, batch: int, *, device=None) -> torch.Tensor:
    """(batch, *shape) fp32 noise where every image gets the noise of `torch.Generator().manual_seed(seed)`,
    so a decode depends only on its latent and the seed (resumable jobs, per-item reproducibility)."""
    one = randn((1, *shape), generator=torch.Generator().manual_seed(seed), device=device)
    return one.expand(batch, *shape)


def euler_sample(net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                 noise: torch.Tensor, *, steps: int = 1, t_pow_shift: float = T_POW_SHIFT) -> torch.Tensor:
    """Integrate from t=1 (noise) to t=0 in `steps` Euler steps. z: (B, C, h, w) in the network's dtype;
    noise: (B, 3, H, W) = x at t=1. The network input is cast to z's dtype; the returned image is fp32."""
    x = noise.float()
    ts = time_grid(steps, t_pow_shift).to(x.device)
    for k in range(steps):
        t = (ts[k] * TIMESCALE).expand(x.shape[0])  # (B,) fp32
        v = net(x.to(z.dtype), t, z)
        x = x + v.float() * (ts[k] - ts[k + 1])
    return x
