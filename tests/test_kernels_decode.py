"""A full decode through the Triton kernels (use_triton=True) against the official golden output.

Without CUDA the kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1).
"""
import torch
from _kernel_checks import DEVICE, requires_triton

from conftest import load_golden
from ssdd_runtime import optimize
from ssdd_runtime.model import SSDDModule
from ssdd_runtime.testing import test_state_dict


@requires_triton
def test_decode_through_kernels_matches_golden():
    g, cfg = load_golden("S_f8c4_128_b2")
    model = SSDDModule(cfg["encoder"], cfg["decoder"])
    model.load_state_dict(test_state_dict(cfg["encoder"], cfg["decoder"], seed=cfg["weight_seed"]))
    model = model.eval().to(DEVICE)
    if DEVICE == "cuda":  # fp32 comparison: no TF32 in the reference convolutions/matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        out = model.sample(g["z_mean"].to(DEVICE), g["noise"].to(DEVICE), steps=1,
                           t_pow_shift=cfg["t_pow_shift"]).cpu()
    err = (out - g["decode_steps1"]).abs().max().item()
    assert err <= 5e-4, f"max |decode(use_triton=True) - golden| = {err:.3g} > 5e-4"
