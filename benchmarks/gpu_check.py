"""GPU check of the Triton kernels: tests on the GPU, kernel timings against PyTorch, SSDD-M decode timings.

Run by `benchmarks/gpu_check.sh` on a CUDA machine where the project is installed (no network needed). Writes
one JSON to `$OUT` (default benchmarks/results) named gpu_check_<UTC date>.json. `--cpu-smoke` runs every code
path with tiny shapes on CPU under Triton's interpreter (perf_counter timings, meaningless as performance) so
the script itself can be checked on a machine without a GPU.

Method: kernel timings are `triton.testing.do_bench(fn, return_mode="median")` (warm-up excluded, L2 flushed,
CUDA events); decode timings are the median of `reps` calls of `SSDD.decode(z, steps=1, noise=...)` after one
warm-up call, each bracketed by `torch.cuda.synchronize()`; peak memory is `torch.cuda.max_memory_allocated`
during one decode call, minus the memory held before it (weights, inputs).
Formulas: attention TFLOP/s = 4 * B * heads * pairs * dh / t with pairs = the query-key pairs inside the
window (the useful work; dense SDPA is also given with N^2 pairs); norm GB/s = (bytes of x read once + bytes of
y written + side inputs) / t, compared with the device-to-device copy GB/s = 2 * bytes / t of `y.copy_(x)`.
"""
import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def bench(fn, device, reps=3):
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def window_pairs(Gh, Gw, half=7):
    """Number of (query, key) pairs with |dy| <= half and |dx| <= half on a Gh x Gw grid."""
    def count(n):  # sum over positions of the number of in-window positions along one axis
        return sum(min(n - 1, i + half) - max(0, i - half) + 1 for i in range(n))
    return count(Gh) * count(Gw)


def run_tests(device, smoke):
    """The kernel tests on this machine (on CUDA without TRITON_INTERPRET: the compiled kernels)."""
    env = dict(os.environ)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    files = ["tests/test_kernels_attention.py", "tests/test_kernels_norms.py"]
    if not smoke:
        files.append("tests/test_kernels_decode.py")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *files], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return {"command": "python -m pytest -q " + " ".join(files), "returncode": proc.returncode,
            "summary": lines[-1] if lines else proc.stderr[-500:], "seconds": round(time.perf_counter() - t0, 1),
            "failures": [ln for ln in lines if ln.startswith("FAILED")][:20]}


def attention_bench(device, dtype, smoke):
    from ssdd_runtime.kernels import attention

    heads, dh = 4, 72  # SSDD-M
    grids = [(4, 4), (9, 9)] if smoke else [(32, 32), (64, 64), (128, 128)]
    rows = []
    for Gh, Gw in grids:
        B, N = 1, Gh * Gw
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, heads, N, dh, device=device, dtype=dtype, generator=g) for _ in range(3))
        table = 0.5 * torch.randn(15, 15, heads, device=device, generator=g)
        mask = attention.relative_position_bias(table, (Gh, Gw)).to(dtype)[None]  # prebuilt dense mask
        t_kernel = bench(lambda: attention.window_attention(q, k, v, table, (Gh, Gw), use_triton=True), device)
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device)
        t_ref = bench(lambda: attention.window_attention_ref(q, k, v, table, (Gh, Gw)), device)
        pairs = window_pairs(Gh, Gw)
        rows.append({
            "op": "window_attention", "dtype": str(dtype), "batch": B, "heads": heads, "head_dim": dh,
            "grid": [Gh, Gw], "N": N, "ms_triton": t_kernel, "ms_sdpa_prebuilt_dense_mask": t_sdpa,
            "ms_reference_incl_mask_build": t_ref, "speedup_vs_sdpa": t_sdpa / t_kernel,
            "speedup_vs_reference": t_ref / t_kernel,
            "tflops_triton_useful": 4 * B * heads * pairs * dh / (t_kernel * 1e-3) / 1e12,
            "tflops_sdpa_dense": 4 * B * heads * N * N * dh / (t_sdpa * 1e-3) / 1e12,
            "window_pairs": pairs, "dense_pairs": N * N})
    return rows


def norm_bench(device, dtype, smoke):
    from ssdd_runtime.kernels import group_norm, layer_norm

    B, C, H, W = (2, 64, 16, 16) if smoke else (32, 96, 256, 256)  # SSDD-M level-0 ResBlock at 256x256
    h, w = H // 8, W // 8
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
    y = torch.empty_like(x)
    ctx = torch.randn(B, 2 * C, h, w, device=device, dtype=dtype, generator=g)
    tmod = torch.randn(B, 2 * C, device=device, dtype=dtype, generator=g)
    wgt, bia = torch.ones(C, device=device, dtype=dtype), torch.zeros(C, device=device, dtype=dtype)
    t_copy = bench(lambda: y.copy_(x), device)
    copy_gbs = 2 * x.nbytes / (t_copy * 1e-3) / 1e9

    def eager_norm1():  # what PyTorch runs without the kernel, in the model dtype
        scale, shift = F.interpolate(ctx, size=(H, W), mode="nearest").chunk(2, dim=1)
        return F.silu(F.group_norm(x, 32, eps=1e-5) * (1 + scale) + shift)

    def eager_norm2():
        scale, shift = tmod[:, :, None, None].chunk(2, dim=1)
        return F.silu(F.group_norm(x, 32, wgt, bia, 1e-5) * (1 + scale) + shift)

    rows = [{"op": "device_copy", "dtype": str(dtype), "shape": list(x.shape), "ms": t_copy, "GBps": copy_gbs,
             "formula": "2 * x.nbytes / t"}]
    cases = [
        ("ada_group_norm ctx FiLM + SiLU (ResBlock norm1)", 2 * x.nbytes + ctx.nbytes,
         lambda: group_norm.ada_group_norm(x, 32, 1e-5, ctx_mod=ctx, silu=True, use_triton=True), eager_norm1,
         lambda: group_norm.ada_group_norm_ref(x, 32, 1e-5, ctx_mod=ctx, silu=True)),
        ("ada_group_norm affine + time FiLM + SiLU (ResBlock norm2)", 2 * x.nbytes + tmod.nbytes,
         lambda: group_norm.ada_group_norm(x, 32, 1e-5, weight=wgt, bias=bia, time_mod=tmod, silu=True,
                                           use_triton=True), eager_norm2,
         lambda: group_norm.ada_group_norm_ref(x, 32, 1e-5, weight=wgt, bias=bia, time_mod=tmod, silu=True)),
    ]
    xc = x.to(memory_format=torch.channels_last)
    cases.append(("ada_group_norm ctx FiLM + SiLU, channels_last", 2 * x.nbytes + ctx.nbytes,
                  lambda: group_norm.ada_group_norm(xc, 32, 1e-5, ctx_mod=ctx, silu=True, use_triton=True),
                  eager_norm1, lambda: group_norm.ada_group_norm_ref(xc, 32, 1e-5, ctx_mod=ctx, silu=True)))
    Nt, Cm = (64, 96) if smoke else (1024, 288)  # SSDD-M tokens at 256x256
    xt = torch.randn(B, Nt, Cm, device=device, dtype=dtype, generator=g)
    Gt = int(Nt ** 0.5)
    mod = torch.randn(B, Gt, Gt, 2 * Cm, device=device, dtype=dtype, generator=g)

    def eager_adaln():
        shift, scale = mod.reshape(B, Nt, 2 * Cm).chunk(2, dim=-1)
        return F.layer_norm(xt, (Cm,), eps=1e-5) * (1 + scale) + shift

    cases.append(("ada_layer_norm (AdaLN)", 2 * xt.nbytes + mod.nbytes,
                  lambda: layer_norm.ada_layer_norm(xt, mod, (Gt, Gt), 1e-5, use_triton=True), eager_adaln,
                  lambda: layer_norm.ada_layer_norm_ref(xt, mod, (Gt, Gt), 1e-5)))
    for name, nbytes, kern, eager, ref in cases:
        t_k, t_e, t_r = bench(kern, device), bench(eager, device), bench(ref, device)
        gbs = nbytes / (t_k * 1e-3) / 1e9
        rows.append({"op": name, "dtype": str(dtype), "shape": list((xt if "AdaLN" in name else x).shape),
                     "ms_triton": t_k, "ms_torch_eager_same_dtype": t_e, "ms_reference_fp32_math": t_r,
                     "GBps_triton": gbs, "fraction_of_copy_bandwidth": gbs / copy_gbs,
                     "speedup_vs_eager": t_e / t_k, "speedup_vs_reference": t_r / t_k,
                     "formula": "(input bytes read once + side inputs + output bytes) / t; the group-norm "
                                "kernels read x twice (statistics, then apply)"})
    return rows


def decode_bench(device, dtype, smoke):
    from ssdd_runtime import SSDD, optimize
    from ssdd_runtime.testing import test_state_dict

    size = "S" if smoke else "M"
    model = SSDD.from_state_dict(test_state_dict("f8c4", size), device=device, dtype=dtype)
    configs = [(64, 1)] if smoke else [(256, 1), (256, 32), (512, 1), (512, 32), (1024, 1)]
    rows = []
    for res, B in configs:
        g = torch.Generator(device=device).manual_seed(0)
        z = torch.randn(B, 4, res // 8, res // 8, device=device, generator=g)
        noise = torch.randn(B, 3, res, res, device=device, generator=g)
        row = {"op": f"decode SSDD-{size} f8c4 steps=1", "dtype": str(dtype), "batch": B, "resolution": res}
        outs = {}
        for use_triton in (False, True):
            key = "triton" if use_triton else "reference"

            def call():
                return optimize.use_kernels(model, use_triton).decode(z, steps=1, noise=noise)

            try:
                outs[key] = call()  # warm-up (Triton compilation, cuDNN heuristics)
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    call()
                    torch.cuda.synchronize()
                    row[f"peak_mem_GiB_{key}"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
                times = []
                reps = 1 if (smoke or res >= 1024 or (res >= 512 and B > 1)) else 3
                for _ in range(reps):
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    call()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - t0) * 1e3)
                row[f"ms_{key}"] = statistics.median(times)
                row[f"images_per_s_{key}"] = B / (row[f"ms_{key}"] * 1e-3)
            except torch.OutOfMemoryError as e:
                row[f"error_{key}"] = f"out of memory: {str(e)[:200]}"
                torch.cuda.empty_cache()
        if "ms_triton" in row and "ms_reference" in row:
            row["speedup"] = row["ms_reference"] / row["ms_triton"]
            row["max_abs_diff_triton_vs_reference"] = (outs["triton"] - outs["reference"]).abs().max().item()
        if "peak_mem_GiB_triton" in row and "peak_mem_GiB_reference" in row:
            row["peak_mem_ratio_triton_over_reference"] = row["peak_mem_GiB_triton"] / row["peak_mem_GiB_reference"]
        rows.append(row)
        outs.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script, not performance)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the kernel tests first")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (the kernels import it)
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --cpu-smoke to check the script on CPU")
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True  # the official eval setting (spec 1.5); bf16 runs anyway
        torch.backends.cudnn.allow_tf32 = True
    import triton

    dtype = torch.bfloat16
    t0 = time.perf_counter()
    now = dt.datetime.now(dt.timezone.utc)
    report = {
        "date_utc": now.isoformat(timespec="seconds"), "smoke": args.cpu_smoke,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor()})",
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "cuda": torch.version.cuda, "method": __doc__.split("Method: ")[1].strip(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_check_{'smoke_' if args.cpu_smoke else ''}{now.strftime('%Y%m%d_%H%M%S')}.json"

    def save():  # after every section, so a run stopped by the time limit still leaves its numbers
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(report, indent=1, default=str))

    with torch.no_grad():
        if not args.skip_tests:
            report["tests"] = run_tests(device, args.cpu_smoke)
            print("tests:", report["tests"]["summary"], flush=True)
            save()
        for name, fn in (("attention", attention_bench), ("norms", norm_bench), ("decode", decode_bench)):
            t = time.perf_counter()
            report[name] = fn(device, dtype, args.cpu_smoke)
            print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
            for row in report[name]:
                print("  ", json.dumps(row, default=str), flush=True)
            save()
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
