"""Ahead-of-time compile gate: every kernel the CUDA launchers would dispatch compiles for sm_80 and sm_90,
without spills, and the fp16/bf16 attention dots run on tensor cores (kernels/aot.py).

The configurations are not listed here: each decoder size XS..H is traced on meta tensors at latent grids 8x8,
16x16, 32x32, 64x64, 128x128 and 12x20, fp32/fp16/bf16, NCHW and channels_last, batch 1 and 32, and every fused
op call goes through the op's own `*_launches` function (the one its CUDA launcher calls). Launches that
specialise to the same kernel are compiled once; results are cached in the pytest cache, keyed by the kernel
source hash, specialisation, options, target and triton version.

The compile runs in a subprocess: conftest sets TRITON_INTERPRET=1 for this process, under which Triton's own
library functions are interpreter functions that cannot be compiled.
"""
import json
import os
import subprocess
import sys

import pytest
from _kernel_checks import requires_triton

pytestmark = requires_triton


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


@pytest.fixture(scope="module")
def records(request, tmp_path_factory):
    if not _has_nvidia_backend():
        pytest.skip("triton has no NVIDIA backend (ptxas) to compile with")
    cache = request.config.cache.mkdir("kernels_aot") if getattr(request.config, "cache", None) is not None \
        else tmp_path_factory.mktemp("kernels_aot")
    out = tmp_path_factory.mktemp("aot") / "records.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ssdd_runtime.kernels.aot", "--out", str(out), "--cache",
                           str(cache), "--jobs", str(min(2, os.cpu_count() or 1))], env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, f"ahead-of-time compile failed:\n{proc.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_every_dispatched_kernel_compiles_without_spills_and_with_tensor_cores(records):
    from ssdd_runtime.kernels import aot

    bad = aot.problems(records)
    assert not bad, f"{len(bad)} of {len(records)} compiled kernels fail the gate:\n" + "\n".join(bad[:20])


def test_trace_covers_every_kernel_and_arch(records):
    """The trace reached every kernel family and both archs; the attention path is in use at every size."""
    seen = {(r["result"]["kernel"], r["result"]["arch"]) for r in records if r["result"]}
    kernels = {"_window_attention_kernel", "_group_norm_stats_kernel", "_ada_group_norm_kernel",
               "_layer_norm_kernel"}
    assert seen == {(k, f"sm_{a}") for k in kernels for a in (80, 90)}
    sizes = {u["size"] for r in records for u in r["uses"] if "window_attention" in r["ops"]}
    assert sizes == {"XS", "S", "B", "M", "L", "XL", "H"}


def test_attention_loads_are_vectorised(records):
    """The model's q, k, v strides are multiples of 8 elements (dh 24..72), so rows load as 128-bit vectors
    (64-bit where a padded head-dim chunk holds 4 real elements), pipelined through cp.async (LDGSTS)."""
    for r in records:
        res = r["result"]
        if res and res["kernel"] == "_window_attention_kernel":
            wide = res["ldg_bits"].get("128", 0) + res["ldg_bits"].get("64", 0)
            assert wide > 0 and res["ops"]["LDGSTS"] > 0, (res["arch"], res["constexprs"], res["ldg_bits"])
