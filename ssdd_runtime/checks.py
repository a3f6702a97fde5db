"""Input checks shared by `SSDD` (api.py) and the backend runners (export/openvino.py, export/tensorrt.py).

A leaf module: api.py imports the OpenVINO backend lazily (`SSDD.to_backend`), and that backend validates its
inputs with these, so they cannot live in api.py without an import cycle.
"""
from __future__ import annotations

import torch


def _check_tensor(name: str, t, rank: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
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


def _chunks(t: torch.Tensor, batch_size: int | None):
    if batch_size is None:
        return [t]
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    return list(t.split(batch_size))
