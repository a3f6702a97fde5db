"""The one switch between Triton kernels and PyTorch references."""
from __future__ import annotations

import torch


def use_triton_for(t: torch.Tensor, use_triton: bool | None) -> bool:
    """use_triton=None: auto (CUDA tensor and triton importable); False: reference; True: Triton."""
    if use_triton is False or (use_triton is None and not t.is_cuda):
        return False
    if use_triton is None:
        return False  # no kernels yet
    return True
