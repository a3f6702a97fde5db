"""Deterministic test weights (the recipe of ../shared/golden/make_weights.py, re-implemented).

Every tensor is non-zero, including those the official initialisation zeroes (ResBlock conv2, FFN proj_out,
relative-bias tables), so every code path matters. Each tensor draws from its own generator seeded with
crc32(f"{seed}:{key}"), so the result does not depend on key order:
    key ends with "relative_bias_table" -> 0.5 * N(0, 1)
    ndim >= 2 (conv / linear weights)   -> N(0, 1) / sqrt(prod(shape[1:]))
    ndim == 1, key ends with ".weight"  -> 1 + 0.1 * N(0, 1)
    ndim == 1, key ends with ".bias"    -> 0.1 * N(0, 1)
The golden reference tensors were computed with these weights by the official implementation.
"""
from __future__ import annotations

import math
import zlib

import torch


def test_tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if key.endswith("relative_bias_table"):
        return 0.5 * x
    if len(shape) >= 2:
        return x / math.sqrt(math.prod(shape[1:]))
    if key.endswith(".weight"):
        return 1 + 0.1 * x
    if key.endswith(".bias"):
        return 0.1 * x
    raise ValueError(f"no test-weight recipe for {key} {shape}")


def test_state_dict(encoder: str | None = "f8c4", decoder: str = "S", seed: int = 0, *,
                    meta: bool = False) -> dict[str, torch.Tensor]:
    """A full SSDD state dict (official key names) filled with the deterministic test weights.
    encoder=None or "sdvae": decoder-only (`decoder.*`, 4 latent channels), the layout of the SDVAE files.
    meta=True: the same keys and shapes as meta tensors (layout checks of large sizes without the memory)."""
    from ssdd_runtime.model import SSDDModule

    with torch.device("meta"):
        sd = SSDDModule(None if encoder in (None, "sdvae") else encoder, decoder).state_dict()
    if meta:
        return dict(sd)
    return {k: test_tensor(k, tuple(v.shape), seed) for k, v in sd.items()}


test_tensor.__test__ = False  # not pytest tests
test_state_dict.__test__ = False
