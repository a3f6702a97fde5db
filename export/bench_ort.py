"""ONNX Runtime (CPU) vs PyTorch eager fp32: one-step decode latency, measured in one process.

Method: export the decoder (steps=1) of an SSDD model with deterministic test weights, then time
`SSDDModule.sample(..., use_triton=False)` under torch.inference_mode and `InferenceSession.run` on the same
(latent, noise), interleaving the backends round by round so machine load drifts hit all of them alike.
One warm-up call each is excluded; the statistic is the median wall time of `--rounds` calls (perf_counter; CPU
only, so nothing to synchronise). Outputs are compared (max abs) so a fast wrong graph cannot pass.

    python -m ssdd_runtime.export.bench_ort --decoder M --size 256 --rounds 5 \
        --out benchmarks/results/onnx_cpu_<date>.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ssdd_runtime.export.onnx import export_onnx, ort_session
from ssdd_runtime.model import SSDDModule
from ssdd_runtime.testing import test_state_dict

# ORT session variants tried against torch: (label, graph optimisation level, intra-op threads or None)
VARIANTS = (("ort_all_default_threads", "all", None), ("ort_all_2_threads", "all", 2),
            ("ort_extended_2_threads", "extended", 2))


def run(decoder: str = "M", encoder: str = "f8c4", size: int = 256, batch: int = 1, rounds: int = 5) -> dict:
    import onnx
    import onnxruntime

    model = SSDDModule(encoder, decoder).eval()
    model.load_state_dict(test_state_dict(encoder, decoder, seed=0))
    F, C = model.stride, model.decoder_config.z_dim
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, C, size // F, size // F, generator=g)
    noise = torch.randn(batch, 3, size, size, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_onnx(model, Path(tmp) / "decoder.onnx", part="decoder", steps=1)
        export_s = time.perf_counter() - t0
        sessions = {label: ort_session(path, threads=threads, optimization=level)
                    for label, level, threads in VARIANTS}
        feeds = {"latent_sample": z.numpy(), "noise": noise.numpy()}

        def torch_call():
            with torch.inference_mode():
                return model.sample(z, noise, steps=1)

        calls = {"torch_eager_fp32": torch_call}
        calls.update({label: (lambda s=s: torch.from_numpy(s.run(None, feeds)[0])) for label, s in sessions.items()})
        ref = torch_call()
        errors = {label: float((fn() - ref).abs().max()) for label, fn in calls.items()}  # also the warm-up
        times: dict[str, list[float]] = {label: [] for label in calls}
        for _ in range(rounds):
            for label, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
    median = {label: statistics.median(ts) for label, ts in times.items()}
    best_ort = min((label for label in median if label.startswith("ort")), key=median.get)
    return {
        "benchmark": "one-step decode latency, ONNX Runtime CPU vs torch eager fp32",
        "date": dt.date.today().isoformat(),
        "model": {"encoder": encoder, "decoder": decoder, "weights": "ssdd_runtime.testing.test_state_dict seed 0"},
        "batch": batch, "resolution": [size, size], "dtype": "float32", "steps": 1,
        "device": {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                     "python": platform.python_version()},
        "method": "median of %d interleaved rounds after one warm-up call each; time.perf_counter" % rounds,
        "export_seconds": round(export_s, 1),
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 4) for k, v in median.items()},
        "max_abs_error_vs_torch": errors,
        "best_ort": best_ort,
        "speedup_best_ort_vs_torch": round(median["torch_eager_fp32"] / median[best_ort], 3),
        "target_speedup": 1.2,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "note": "shared machine (other jobs on the same cores): numbers are noisy",
    }


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
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
