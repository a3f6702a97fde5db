"""Where a decode's time goes: torch.profiler over one eager call per model, grouped into convolutions, matmuls
and attention, and the rest (norms, element-wise glue, copies).

    python -m ssdd_runtime.benchmarks.op_profile                      # SSDD-M 1 network call vs KL-VAE, 256x256
    python -m ssdd_runtime.benchmarks.op_profile --models ssdd-S,kl-vae --res 512 --threads 2
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ssdd_runtime.benchmarks.workloads import build_workload

GROUPS = {"convolution": ("convolution",), "matmul + attention": ("addmm", "aten::mm", "bmm", "attention")}


def breakdown(model: str, res: int, device: str = "cpu") -> dict[str, float]:
    """Seconds of self CPU time per group for one warm call of `model`'s network at res x res, batch 1."""
    w = build_workload(model)
    inputs, _ = w.example_inputs(1, res, res, torch.float32, device)
    net = w.net.to(device)
    with torch.no_grad():
        net(*inputs)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            net(*inputs)
    out = dict.fromkeys([*GROUPS, "other"], 0.0)
    for e in prof.key_averages():
        group = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), "other")
        out[group] += e.self_cpu_time_total / 1e6
    out["total"] = sum(out.values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ssdd-M,kl-vae")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for model in args.models.split(","):
        b = breakdown(model, args.res)
        parts = ", ".join(f"{k} {v:.2f} s ({v / b['total']:.0%})" for k, v in b.items() if k != "total")
        print(f"{model} {args.res}x{args.res}, {torch.get_num_threads()} threads: total {b['total']:.2f} s; {parts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
