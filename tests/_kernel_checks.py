"""Shared setup of the kernel tests: device, dtypes, the triton skip, the three-way check (STYLE rule 7).

Without CUDA the kernels run under Triton's interpreter: conftest.py sets TRITON_INTERPRET=1 before triton
is first imported.
"""
import pytest
import torch

from ssdd_runtime.kernels._dispatch import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_three_way(out, out_pt, out_ref, dtype, what=""):
    """max|out - out_ref| <= 2 * max|out_pt - out_ref| + atol; on failure print the first mismatches."""
    out, out_pt, out_ref = out.float().cpu(), out_pt.float().cpu(), out_ref.float().cpu()
    assert out.shape == out_ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(out_ref.shape)}"
    err = (out - out_ref).abs()
    bound = 2 * (out_pt - out_ref).abs().max().item() + ATOL[dtype]
    if not err.max().item() <= bound:  # also catches NaN
        bad = (~(err <= bound)).nonzero()[:5].tolist()
        rows = [f"  at {i}: kernel {out[tuple(i)].item():.6g} ref {out_ref[tuple(i)].item():.6g}" for i in bad]
        raise AssertionError(f"{what} {dtype}: max err {err.max().item():.3g} > bound {bound:.3g}\n"
                             + "\n".join(rows))
