"""ONNX Runtime (CPU) vs PyTorch eager fp32: one-step decode latency of the deployed decoder graph, one process.

Method: export the decoder (steps=1, `export_onnx`) of an SSDD model with deterministic test weights, then time
`SSDDModule.sample` (PyTorch reference path) under torch.inference_mode and `InferenceSession.run` on the same
(latent, noise) with `benchmarks.timing.measure_interleaved` (one warm-up call each excluded; backends
interleaved round by round so machine load drifts hit all of them alike; perf_counter, CPU only). Outputs are
compared (max abs) so a fast wrong graph cannot pass. The report follows `benchmarks.schema` (one row per
session variant, `backend_options` naming the ORT optimisation level and threads).

    python -m ssdd_runtime.export.bench_ort --decoder M --size 256 --rounds 5 \
        --out benchmarks/results/onnx_cpu_<date>.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ssdd_runtime.benchmarks.run import result_row
from ssdd_runtime.benchmarks.schema import SCHEMA, write_json
from ssdd_runtime.benchmarks.timing import env_cpu_load, environment, measure_interleaved
from ssdd_runtime.export.onnx import export_onnx, ort_session
from ssdd_runtime.model import SSDDModule
from ssdd_runtime.testing import test_state_dict

# ORT session variants tried against torch: (label, graph optimisation level, intra-op threads or None)
VARIANTS = (("ort_all_default_threads", "all", None), ("ort_all_2_threads", "all", 2),
            ("ort_extended_2_threads", "extended", 2))
WEIGHTS = "ssdd_runtime.testing.test_state_dict seed 0"


def run(decoder: str = "M", encoder: str = "f8c4", size: int = 256, batch: int = 1, rounds: int = 5) -> dict:
    """Export, time and compare; returns the report (schema.SCHEMA)."""
    model = SSDDModule(encoder, decoder).eval()
    model.load_state_dict(test_state_dict(encoder, decoder, seed=0))
    F, C = model.stride, model.decoder_config.z_dim
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, C, size // F, size // F, generator=g)
    noise = torch.randn(batch, 3, size, size, generator=g)
    env = environment("cpu")
    with tempfile.TemporaryDirectory(prefix="ssdd-bench-ort-") as tmp:
        t0 = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "decoder.onnx", part="decoder", steps=1)
        export_s = time.perf_counter() - t0
        sessions = {label: ort_session(path, threads=threads, optimization=level)
                    for label, level, threads in VARIANTS}
    feeds = {"latent_sample": z.numpy(), "noise": noise.numpy()}
    with torch.inference_mode():
        ref = model.sample(z, noise, steps=1)
    outs: dict[str, torch.Tensor] = {}

    def torch_call(i):
        with torch.inference_mode():
            outs["torch_eager_fp32"] = model.sample(z, noise, steps=1)

    calls = {"torch_eager_fp32": torch_call}
    for label, s in sessions.items():
        def ort_call(i, s=s, label=label):
            outs[label] = torch.from_numpy(s.run(None, feeds)[0])
        calls[label] = ort_call
    meas = measure_interleaved(calls, device=torch.device("cpu"), warmup=1, repeats=rounds)
    env["loadavg_end"] = env_cpu_load()
    params = sum(p.numel() for p in model.decoder.parameters())
    rows = []
    for label, m in meas.items():
        variant = next((v for v in VARIANTS if v[0] == label), None)
        extra = {"variant": label, "max_abs_error_vs_eager": float((outs[label] - ref).abs().max())}
        if variant is not None:
            extra["backend_options"] = {"graph_optimization": variant[1],
                                        "intra_op_threads": "default" if variant[2] is None else variant[2]}
        rows.append(result_row(f"ssdd-{decoder}", f"ssdd-{decoder}@1", "onnxruntime" if variant else "eager", "fp32",
                               "cpu", batch, size, size, 1, m, prepare_s=export_s if variant else None,
                               weights=WEIGHTS, params=params,
                               notes=["the deployed decoder graph (export_onnx, Euler step in the graph)"]
                               if variant else ["SSDDModule.sample, PyTorch reference path"], **extra))
    return {"schema": SCHEMA, "env": env,
            "method": f"median of {rounds} interleaved rounds after one warm-up call each (excluded); "
                      "time.perf_counter; ORT prepare_s = the export time (session creation not included)",
            "notes": ["shared machine (other jobs on the same cores): numbers are noisy"],
            "skipped": [], "results": rows, "ratios": []}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--decoder", default="M")
    p.add_argument("--encoder", default="f8c4")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    args = p.parse_args(argv)
    result = run(args.decoder, args.encoder, args.size, args.batch, args.rounds)
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
