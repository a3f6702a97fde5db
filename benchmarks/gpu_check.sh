#!/usr/bin/env bash
# GPU check of the Triton kernels (issue 3): kernel tests on the GPU, do_bench timings of each kernel against its
# PyTorch counterpart, SSDD-M 1-step decode timings and peak memory at 256/512/1024, bf16, batch 1 and 32.
# Needs a CUDA machine with the project installed (pip install --no-deps --no-build-isolation -e .); installs
# nothing, uses no network, finishes in under 8 minutes (hard stop at 7m50s). Writes one JSON to
# ${OUT:-benchmarks/results}/gpu_check_<UTC date>.json. Extra arguments go to gpu_check.py
# (--skip-tests; --cpu-smoke checks the script on a CPU-only machine under TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --cpu-smoke "* ]]; then
    unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
fi
exec timeout 470 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
