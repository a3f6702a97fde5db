#!/usr/bin/env bash
# GPU check (issues 3, 13): kernel tests on the GPU, do_bench timings of each kernel against its PyTorch
# counterpart and against the official dense-mask attention, SSDD-M vs KL-VAE 1-step decode (bf16, batch 1 and 32,
# 256/512/1024, eager dense-mask reference vs Triton kernels) with peak memory. Writes ONE JSON to
# ${OUT:-benchmarks/results}/gpu_check_<UTC date>.json, also when sections fail or time runs out (errors and
# skipped sections are recorded in it). Uses no network; finishes in under 8 minutes (the Python side starts no
# section after its budget; the whole script, install included, stops at 470 s). Runs unchanged on the lent
# machine (python3 = Python 3.12, torch 2.11, triton 3.6, no diffusers/TensorRT):
#   - installs this checkout with `pip install --no-deps --no-build-isolation -e .` when ssdd_runtime is not
#     importable from it (nothing is downloaded);
#   - wheels in .whl/ (carried, e.g. diffusers for the KL-VAE baseline) are installed to /tmp/ssdd-whl first;
#   - runs `python3 -P -m ssdd_runtime.benchmarks.gpu_check`: the module, never the file (benchmarks/ on sys.path
#     would shadow standard modules), and -P keeps the checkout folder off sys.path too.
# PYTHON picks the interpreter (default python3). Extra arguments go to gpu_check.py (--skip-tests; --cpu-smoke
# checks the script on a CPU-only machine under TRITON_INTERPRET=1).
set -euo pipefail
LIMIT_S=470  # the whole script; the Python side starts no section in its last 60 s
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [[ " $* " == *" --cpu-smoke "* ]]; then
    export TRITON_INTERPRET=1  # before Python starts: Triton reads it when the kernels are decorated (import)
else
    unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
fi
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ssdd-whl \
        .whl/*.whl
    export PYTHONPATH="/tmp/ssdd-whl${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -P -c 'import sys, ssdd_runtime; sys.exit(not ssdd_runtime.__file__.startswith(sys.argv[1]))' \
        "$PWD/" 2>/dev/null; then
    timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
left=$((LIMIT_S - SECONDS))
exec timeout -k 5 "$left" "$PY" -P -m ssdd_runtime.benchmarks.gpu_check --budget-s "$((left - 60))" "$@"
