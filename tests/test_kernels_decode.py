"""A full decode through the Triton kernels (use_triton=True) against the official golden output.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before
triton is imported; the kernels also pick an interpreted copy if triton was imported earlier without it).
"""
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from safetensors import safe_open  # noqa: E402

from ssdd_runtime.kernels._dispatch import HAS_TRITON  # noqa: E402
from ssdd_runtime.model import SSDDModule  # noqa: E402
from ssdd_runtime.testing import test_state_dict  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "golden"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_case(name):
    path = GOLDEN / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return cfg, tensors


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_decode_through_kernels_matches_golden():
    cfg, g = load_case("S_f8c4_128_b2")
    model = SSDDModule(cfg["encoder"], cfg["decoder"])
    model.load_state_dict(test_state_dict(cfg["encoder"], cfg["decoder"], seed=cfg["weight_seed"]))
    model = model.eval().to(DEVICE)
    if DEVICE == "cuda":  # fp32 comparison: no TF32 in the reference convolutions/matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        out = model.sample(g["z_mean"].to(DEVICE), g["noise"].to(DEVICE), steps=1,
                           t_pow_shift=cfg["t_pow_shift"], use_triton=True).cpu()
    err = (out - g["decode_steps1"]).abs().max().item()
    assert err <= 5e-4, f"max |decode(use_triton=True) - golden| = {err:.3g} > 5e-4"
