"""Input checks shared by `SSDD` (api.py) and the backend runners (export/openvino.py, export/tensorrt.py).

A leaf module: api.py imports the OpenVINO backend lazily (`SSDD.to_backend`), and that backend validates its
inputs with these, so they cannot live in api.py without an import cycle.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from ssdd_runtime.sampler import randn

MAX_STEPS = 10_000  # far beyond any useful Euler schedule (the paper uses 1..8); bounds runaway loops


def _check_tensor(name: str, t, rank: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise ValueError(f"{name} is a meta-device tensor (shape only, no data): pass a CPU or CUDA tensor")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor (B, C, H, W), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite values (NaN or inf)")


def check_batch_size(batch_size) -> int | None:
    """None, or a positive integer (numpy integers too, as steps and tile) -> int."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return int(batch_size)


def _chunks(t: torch.Tensor, batch_size: int | None):
    batch_size = check_batch_size(batch_size)
    return [t] if batch_size is None else list(t.split(batch_size))


def refuse_tile(tile, backend: str) -> None:
    """The compiled backends (OpenVINO, TensorRT) take `decode(tile=)` for signature parity and refuse a tile."""
    if tile is not None:
        raise ValueError(f"tile={tile!r}: the {backend} backend decodes whole images (its compiled network cannot "
                         "gather the whole-image GroupNorm statistics tiled decoding needs); use the torch backend "
                         "for SSDD.decode(tile=), or batch_size= to bound memory")


def check_sampler_args(steps, t_pow_shift, generator) -> tuple[int, float]:
    """The decode arguments every runner (PyTorch, OpenVINO, TensorRT) accepts: (steps, t_pow_shift) as
    (int, float); numpy integers are fine, booleans are not."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    if (isinstance(t_pow_shift, bool) or not isinstance(t_pow_shift, numbers.Real)
            or not (t_pow_shift > 0 and math.isfinite(t_pow_shift))):
        raise ValueError(f"t_pow_shift must be a positive finite number, got {t_pow_shift!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return int(steps), float(t_pow_shift)


def start_noise(z: torch.Tensor, stride: int, noise, generator, device) -> torch.Tensor:
    """The fp32 start noise for latents z (B, C, h, w): `noise` checked against (B, 3, h*F, w*F), or the whole
    batch drawn at once from `generator` (so batch chunking never changes the result)."""
    B, _, h, w = z.shape
    shape = (B, 3, h * stride, w * stride)
    if noise is None:
        return randn(shape, generator=generator, device=device)
    if generator is not None:  # the generator would be silently unused
        raise ValueError("pass noise= or generator=, not both (the generator draws the start noise)")
    _check_tensor("noise", noise)
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise must have shape {shape} for latents of shape {tuple(z.shape)}, "
                         f"got {tuple(noise.shape)}")
    _check_finite("noise", noise)
    return noise


IMAGE_RANGE_SLACK = 1.5  # |x| above this is no [-1, 1] image (resampling overshoot stays far below)


def check_image_range(x: torch.Tensor) -> None:
    """Encoders read images in [-1, 1]. Values far outside (0..255 pixels, a forgotten normalisation) encode to
    latents the decoder was never trained on: warn, naming the range found and the conversion."""
    lo, hi = float(x.min()), float(x.max())
    if lo < -IMAGE_RANGE_SLACK or hi > IMAGE_RANGE_SLACK:
        hint = (" (0..255 pixel values? use x / 127.5 - 1)" if lo >= 0 and hi > 2
                else " (0..1 values? use x * 2 - 1)" if lo >= 0 else "")
        warnings.warn(f"images must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}", UserWarning,
                      stacklevel=4)  # the caller of encode (past encode and its torch.no_grad wrapper)
