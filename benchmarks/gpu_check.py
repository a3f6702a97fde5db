"""GPU check: kernel tests on the GPU, kernel timings against PyTorch (and the official dense-mask attention),
SSDD-M vs KL-VAE decode on cuda bf16.

Run by `benchmarks/gpu_check.sh` (as `python3 -m ssdd_runtime.benchmarks.gpu_check`: running the file itself
would put benchmarks/ first on sys.path) on a CUDA machine where the project is installed; no network needed.
Writes ONE JSON (benchmarks/schema.py, plus the sections "tests", "kernels", "errors") to `$OUT` (default
benchmarks/results) named gpu_check_<UTC date>.json, rewritten after every section, so a run stopped at the
time limit or a section that fails still leaves the rest (a failed section's error goes to "errors").
`--cpu-smoke` runs every code path with tiny shapes on CPU under Triton's interpreter (timings meaningless as
performance) so the script itself is checked on a machine without a GPU.

Method: kernel timings are `timing.kernel_ms` (CUDA: `triton.testing.do_bench`, median, warm-up excluded, L2
flushed, CUDA events). Decode timings are `run.run_benchmark` (the `ssdd bench` sweep: one full 1-step decode,
1 warm-up call excluded, timed calls interleaved between models, CUDA events; images/s = batch / median);
backend "eager" is SSDD on its reference path, i.e. the official-style dense (B, heads, N, N) mask + SDPA,
backend "triton" the windowed kernel and fused norms; the KL-VAE is diffusers' AutoencoderKL decoder (SD-VAE
f8c4 config), skipped when diffusers is not installed. Peak memory: torch.cuda.max_memory_allocated.
Formulas: attention TFLOP/s = 4 * B * heads * pairs * dh / t with pairs = the query-key pairs inside the
window (the useful work; dense paths are also given with N^2 pairs); norm GB/s = (bytes of x read once + bytes of
y written + side inputs) / t, compared with the device-to-device copy GB/s = 2 * bytes / t of `y.copy_(x)`.
"""
import argparse
import datetime as dt
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from ssdd_runtime.benchmarks.schema import SCHEMA, problems, write_json
from ssdd_runtime.benchmarks.timing import environment, kernel_ms

ROOT = Path(__file__).resolve().parent.parent  # the checkout (editable install: benchmarks/ is this folder)
BUDGET_S = 410  # gpu_check.sh passes its own (470 s minus install time minus 60); later sections are skipped
TINY_VAE = {"block_out_channels": [32, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 4, "layers_per_block": 1,
            "norm_num_groups": 32}


def window_pairs(Gh, Gw, half=7):
    """Number of (query, key) pairs with |dy| <= half and |dx| <= half on a Gh x Gw grid."""
    def count(n):  # sum over positions of the number of in-window positions along one axis
        return sum(min(n - 1, i + half) - max(0, i - half) + 1 for i in range(n))
    return count(Gh) * count(Gw)


def run_tests(device, smoke, timeout_s=300):
    """The kernel tests on this machine (on CUDA without TRITON_INTERPRET: the compiled kernels). A run past
    `timeout_s` is stopped and reported with what it printed, never raised."""
    env = dict(os.environ)
    if device == "cuda":
        env.pop("TRITON_INTERPRET", None)
    if smoke:  # one fast test: checks this code path, not the kernels
        files = ["tests/test_kernels_attention.py::test_dispatch_rules"]
    else:
        files = ["tests/test_kernels_attention.py", "tests/test_kernels_norms.py", "tests/test_kernels_decode.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    out = {"command": " ".join(["python3", *cmd[1:]]), "timeout_s": timeout_s}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        out.update(returncode=None, error=f"timed out after {timeout_s} s", seconds=round(time.perf_counter() - t0, 1),
                   summary=f"timed out after {timeout_s} s", failures=[], output_tail=text[-2000:])
        return out
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    out.update(returncode=proc.returncode, seconds=round(time.perf_counter() - t0, 1),
               summary=lines[-1] if lines else proc.stderr[-500:],
               failures=[ln for ln in lines if ln.startswith("FAILED")][:20])
    if proc.returncode != 0:
        out["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
    return out


def official_dense_mask(table, G, batch):
    """The official code's mask (spec 3.7), built on every call as it does: the (2W+1, 2W+1, heads) table padded
    with -1e7 to (2G-1, 2G-1), gathered with the Swin index (dy+G-1)*(2G-1) + (dx+G-1), repeated over the batch
    -> (B, heads, N, N) fp32. Square G x G grids with G >= 8 only (its limits)."""
    from ssdd_runtime.kernels.attention import MASKED

    K = table.shape[0]
    pad = G - 1 - K // 2
    if pad < 0:
        raise ValueError(f"the official mask needs G >= {K // 2 + 1}, got {G}")
    t = F.pad(table.float().permute(2, 0, 1), (pad, pad, pad, pad), value=MASKED)  # (heads, 2G-1, 2G-1)
    r = torch.arange(G, device=table.device)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    yy, xx = yy.reshape(-1), xx.reshape(-1)  # (N,)
    idx = (yy[:, None] - yy[None, :] + G - 1) * (2 * G - 1) + (xx[:, None] - xx[None, :] + G - 1)  # (N, N)
    bias = t.reshape(t.shape[0], -1)[:, idx]  # (heads, N, N)
    return bias[None].repeat(batch, 1, 1, 1)


def attention_bench(device, dtype, smoke):
    from ssdd_runtime.kernels import attention

    dev = torch.device(device)
    heads, dh = 4, 72  # SSDD-M
    grids = [(8, 8), (9, 9)] if smoke else [(32, 32), (64, 64), (128, 128)]
    rows = []
    for Gh, Gw in grids:
        B, N = 1, Gh * Gw
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, heads, N, dh, device=device, dtype=dtype, generator=g) for _ in range(3))
        table = 0.5 * torch.randn(15, 15, heads, device=device, generator=g)
        mask = attention.relative_position_bias(table, (Gh, Gw)).to(dtype)[None]  # prebuilt dense mask

        def official():  # mask built on every call, cast as autocast casts it, dense SDPA
            return F.scaled_dot_product_attention(q, k, v, attn_mask=official_dense_mask(table, Gh, B).to(dtype))

        def kernel():
            return attention.window_attention(q, k, v, table, (Gh, Gw), use_triton=True)

        t_kernel = kernel_ms(kernel, dev)
        t_official = kernel_ms(official, dev)
        t_sdpa = kernel_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), dev)
        t_ref = kernel_ms(lambda: attention.window_attention_ref(q, k, v, table, (Gh, Gw)), dev)
        pairs = window_pairs(Gh, Gw)
        rows.append({
            "op": "window_attention", "dtype": str(dtype), "batch": B, "heads": heads, "head_dim": dh,
            "grid": [Gh, Gw], "N": N, "ms_triton": t_kernel, "ms_official_dense_mask_built_per_call": t_official,
            "ms_sdpa_prebuilt_dense_mask": t_sdpa, "ms_reference_incl_mask_build": t_ref,
            "speedup_vs_official": t_official / t_kernel, "speedup_vs_sdpa": t_sdpa / t_kernel,
            "speedup_vs_reference": t_ref / t_kernel,
            "max_abs_diff_triton_vs_official": float((kernel().float() - official().float()).abs().max()),
            "tflops_triton_useful": 4 * B * heads * pairs * dh / (t_kernel * 1e-3) / 1e12,
            "tflops_official_dense": 4 * B * heads * N * N * dh / (t_official * 1e-3) / 1e12,
            "tflops_sdpa_dense": 4 * B * heads * N * N * dh / (t_sdpa * 1e-3) / 1e12,
            "window_pairs": pairs, "dense_pairs": N * N})
    return rows


def norm_bench(device, dtype, smoke):
    from ssdd_runtime.kernels import group_norm, layer_norm

    dev = torch.device(device)
    B, C, H, W = (2, 64, 16, 16) if smoke else (32, 96, 256, 256)  # SSDD-M level-0 ResBlock at 256x256
    h, w = H // 8, W // 8
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
    y = torch.empty_like(x)
    ctx = torch.randn(B, 2 * C, h, w, device=device, dtype=dtype, generator=g)
    tmod = torch.randn(B, 2 * C, device=device, dtype=dtype, generator=g)
    wgt, bia = torch.ones(C, device=device, dtype=dtype), torch.zeros(C, device=device, dtype=dtype)
    t_copy = kernel_ms(lambda: y.copy_(x), dev)
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
        t_k, t_e, t_r = kernel_ms(kern, dev), kernel_ms(eager, dev), kernel_ms(ref, dev)
        gbs = nbytes / (t_k * 1e-3) / 1e9
        rows.append({"op": name, "dtype": str(dtype), "shape": list((xt if "AdaLN" in name else x).shape),
                     "ms_triton": t_k, "ms_torch_eager_same_dtype": t_e, "ms_reference_fp32_math": t_r,
                     "GBps_triton": gbs, "fraction_of_copy_bandwidth": gbs / copy_gbs,
                     "speedup_vs_eager": t_e / t_k, "speedup_vs_reference": t_r / t_k,
                     "formula": "(input bytes read once + side inputs + output bytes) / t; the group-norm "
                                "kernels read x twice (statistics, then apply)"})
    return rows


def decode_configs(device, smoke):
    """The `ssdd bench` sweeps of the decode section: SSDD-M vs KL-VAE, bf16, eager (dense mask) vs triton."""
    from ssdd_runtime.benchmarks.run import Config

    if smoke:
        return [Config(models=["ssdd-XS", "kl-vae"], backends=["eager", "triton"], batches=[1],
                       resolutions=[(64, 64)], dtype="bf16", device=device, warmup=1, repeats=2, rotate=1,
                       kl_vae_config=TINY_VAE)]
    common = dict(models=["ssdd-M", "kl-vae"], backends=["eager", "triton"], dtype="bf16", device=device,
                  warmup=1, repeats=5, rotate=2)
    return [Config(batches=[1, 32], resolutions=[(256, 256), (512, 512)], **common),
            Config(batches=[1], resolutions=[(1024, 1024)], **common)]


def decode_bench(report, device, smoke, deadline, save=lambda: None):
    from ssdd_runtime.benchmarks.run import run_benchmark

    for cfg in decode_configs(device, smoke):
        if time.perf_counter() > deadline:
            report["skipped"].append({"reason": f"time budget: decode sweep {cfg.resolutions} not started"})
            continue
        part = run_benchmark(cfg, echo=lambda s: None if s.startswith("  ") else print(s, flush=True))
        report["results"] += part["results"]
        report["ratios"] += part["ratios"]
        report["skipped"] += [s for s in part["skipped"] if s not in report["skipped"]]
        save()  # each sweep's numbers survive a hard stop during the next
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script, not performance)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the kernel tests first")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="seconds after which no section starts")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it when the kernels are decorated (import)
            parser.error("--cpu-smoke needs TRITON_INTERPRET=1 in the environment before Python starts "
                         "(benchmarks/gpu_check.sh sets it)")
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --cpu-smoke to check the script on CPU")
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True  # the official eval setting (spec 1.5); bf16 runs anyway
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16
    now = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out)
    path = out / f"gpu_check_{'smoke_' if args.cpu_smoke else ''}{now.strftime('%Y%m%d_%H%M%S')}.json"
    report = {"schema": SCHEMA, "env": environment(device), "method": __doc__.split("Method: ")[1].strip(),
              "notes": ["random weights in the decode sweep: throughput does not depend on weight values"],
              "skipped": [], "results": [], "ratios": [], "smoke": args.cpu_smoke, "tests": None,
              "kernels": {}, "errors": {}}
    deadline = t0 + args.budget_s

    def save():  # after every section, so a run stopped by the time limit still leaves its numbers
        report["total_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(report, path, validate=False)

    def section(name, fn):
        if time.perf_counter() > deadline:
            report["skipped"].append({"reason": f"time budget: section {name} not started"})
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a failed section is recorded; the others still run and the JSON is written
            report["errors"][name] = f"{type(e).__name__}: {e}"[:1000] + "\n" + traceback.format_exc()[-3000:]
            if device == "cuda":
                torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - t:.1f} s{' (failed)' if name in report['errors'] else ''}", flush=True)
        save()

    save()
    with torch.no_grad():
        if not args.skip_tests:
            def tests():
                report["tests"] = run_tests(device, args.cpu_smoke,
                                            timeout_s=max(30, min(240, int(deadline - time.perf_counter()) - 120)))
                print("tests:", report["tests"]["summary"], flush=True)
            section("tests", tests)
        section("attention", lambda: report["kernels"].__setitem__("attention",
                                                                   attention_bench(device, dtype, args.cpu_smoke)))
        section("norms", lambda: report["kernels"].__setitem__("norms", norm_bench(device, dtype, args.cpu_smoke)))
        section("decode", lambda: decode_bench(report, device, args.cpu_smoke, deadline, save))
    report["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    bad = problems(report)
    if bad:
        report["errors"]["schema"] = "; ".join(bad[:10])
    save()
    print("wrote", path)
    for r in report["results"]:
        print(f"  {r['label']:>10} {r['backend']:>7} {r['dtype']} batch {r['batch']:>2} {r['height']}x{r['width']}: "
              f"{r['images_per_s']:9.2f} img/s, p50 {r['latency_ms']['p50']:8.2f} ms", flush=True)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
