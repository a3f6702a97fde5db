"""Static report of the Triton kernels: `python -m ssdd_runtime.benchmarks.kernels --aot [--out FILE]`.

Method: nothing runs on a GPU. Every kernel that the decoder sizes XS..H dispatch (the compile gate's matrix,
kernels/aot.py: grids 8x8..128x128 and 12x20, fp32/fp16/bf16, NCHW and channels_last, batch 1 and 32) is
compiled for sm_80 and sm_90; per distinct compiled kernel it prints registers, spills (ptxas -v), shared
memory (Triton metadata), tensor-core / FMA instruction counts and global load widths (cuobjdump -sass).

Roofline (H100 SXM: 989 TFLOP/s dense bf16 tensor core, 3.35 TB/s HBM) for SSDD-M, bf16, batch 32, 256x256 and
512x512 images (latent grids 32x32 and 64x64, f8), per launch of one decoder evaluation:
    FLOPs     attention: the dot-product FLOPs the kernel executes (query tile x footprint key blocks x padded
              head dim, q k^T and p v, 2 FLOP per multiply-add; `attention.work`), and the useful part (in-window
              pairs x real head dim); norms: elementwise, not counted (a few FLOP per element)
    bytes     compulsory DRAM traffic: every tensor argument read or written once (its nbytes)
    time      max(FLOPs / peak, bytes / bandwidth); the bound is whichever term is larger. The attention
              kernel issues mma.sync (a 32-query tile is below wgmma's 64 rows), whose H100 throughput is below
              the dense peak, so its compute time here is a lower bound.
Writes the JSON (triton version, date, archs, records, roofline) to --out, default
benchmarks/results/kernels_aot_<date>.json beside this file.
"""
from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

from ssdd_runtime.benchmarks import schema
from ssdd_runtime.benchmarks.timing import environment

H100_BF16_FLOPS = 989e12
H100_BYTES_PER_S = 3.35e12
RESULTS = Path(__file__).parent / "results"


def _tensor_bytes(launch) -> int:
    import torch

    seen, total = set(), 0
    for a in launch.args:
        if isinstance(a, torch.Tensor) and id(a) not in seen:
            seen.add(id(a))
            total += a.numel() * a.element_size()
    return total


def roofline(size: str = "M", images=(256, 512), batch: int = 32, channels_last: bool = False) -> list[dict]:
    """Per launch of one decoder evaluation (bf16): FLOPs, bytes, time bounds on H100 SXM, and the bound."""
    import torch

    from ssdd_runtime.kernels import aot, attention

    rows = []
    for image in images:
        grid = (image // 8, image // 8)
        for op, launch in aot.decoder_launches(size, grid, torch.bfloat16, channels_last=channels_last,
                                               batch=batch):
            row = dict(size=size, image=image, grid=list(grid), batch=batch, dtype="bfloat16",
                       layout="channels_last" if channels_last else "NCHW", op=op,
                       kernel=getattr(launch.kernel, "__name__", None) or launch.kernel.fn.__name__,
                       launch_grid=list(launch.grid), bytes=_tensor_bytes(launch), flops=None)
            if op == "window_attention":
                q = launch.args[0]
                w = attention.work(launch, q.shape[-1], q.shape[0] * q.shape[1], grid)
                row.update(flops=w["executed_flops"], useful_flops=w["useful_flops"],
                           useful_fraction=round(w["useful_fraction"], 4))
            t_c = (row["flops"] or 0) / H100_BF16_FLOPS
            t_m = row["bytes"] / H100_BYTES_PER_S
            row.update(compute_us=round(t_c * 1e6, 3), memory_us=round(t_m * 1e6, 3),
                       bound="compute" if t_c > t_m else "memory")
            rows.append(row)
    return rows


def _summary(rows: list[dict]) -> list[dict]:
    """Per (image, op): calls, total FLOPs / bytes / roofline time, and the bound of the sum."""
    out = {}
    for r in rows:
        s = out.setdefault((r["image"], r["op"]), dict(image=r["image"], op=r["op"], calls=0, flops=0,
                                                       useful_flops=0, bytes=0, roofline_us=0.0))
        s["calls"] += 1
        s["flops"] += r["flops"] or 0
        s["useful_flops"] += r.get("useful_flops") or 0
        s["bytes"] += r["bytes"]
        s["roofline_us"] += max(r["compute_us"], r["memory_us"])
    for s in out.values():
        s["roofline_us"] = round(s["roofline_us"], 2)
        s["bound"] = "compute" if s["flops"] / H100_BF16_FLOPS > s["bytes"] / H100_BYTES_PER_S else "memory"
        if s["flops"]:
            s["useful_fraction"] = round(s["useful_flops"] / s["flops"], 4)
    return list(out.values())


def _fmt_bits(bits: dict) -> str:
    return " ".join(f"{n}x{w}b" for w, n in sorted(bits.items(), key=lambda kv: -int(kv[0]))) or "-"


def print_records(records: list[dict]) -> None:
    print(f"{'kernel':26} {'arch':5} {'dtype':5} {'warps':>5} {'regs':>4} {'spill':>5} {'smem':>6} "
          f"{'HGMMA':>5} {'HMMA':>5} {'FFMA':>5} {'LDGSTS':>6} {'LDG widths':18} uses  constexprs")
    for r in sorted(records, key=lambda r: (r["result"] or {}).get("kernel", "") + (r["result"] or {}).get("arch", "")):
        res = r["result"]
        if res is None:
            print(f"COMPILE ERROR {r['ops']}: {r['error'][:200]}")
            continue
        ops = res["ops"]
        dtype = next(iter(v for v in res["signature"].values() if v.startswith("*")), "?")[1:]
        print(f"{res['kernel']:26} {res['arch']:5} {dtype:5} {res['num_warps']:>5} {res['registers']:>4} "
              f"{res['spill_store_bytes']:>5} {res['shared_bytes']:>6} {ops['HGMMA']:>5} {ops['HMMA']:>5} "
              f"{ops['FFMA']:>5} {ops['LDGSTS']:>6} {_fmt_bits(res['ldg_bits']):18} {len(r['uses']):>4}  "
              f"{res['constexprs']}")


def wrap(doc: dict) -> dict:
    """The AOT report inside the one result schema: no timed rows (nothing ran on a GPU), the report under "aot"."""
    env = environment("cpu")
    env["triton"] = doc["triton"]
    return schema.other_kind("aot", env, "ahead-of-time compilation only (triton.compile for the listed archs, "
                             "ptxas -v, cuobjdump -sass); no kernel was run; roofline = max(FLOPs / peak, bytes / "
                             "bandwidth)", doc,
                             notes=["static analysis: no GPU timing; the roofline numbers are estimates for H100 SXM"],
                             skipped=[{"reason": "no GPU on this machine: compile-only report"}])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Static (ahead-of-time) report of the Triton kernels")
    ap.add_argument("--aot", action="store_true", required=True, help="compile for sm_80/sm_90 and report")
    ap.add_argument("--out", default=None, help="JSON output (default: results/kernels_aot_<date>.json)")
    ap.add_argument("--cache", default=None, help="folder of cached compile results (e.g. the gate's)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("unset TRITON_INTERPRET: the ahead-of-time compile needs compiled kernels")
    import triton

    from ssdd_runtime.kernels import aot

    records = aot.check(cache_dir=args.cache, jobs=args.jobs)
    print_records(records)
    bad = aot.problems(records)
    print(f"\n{len(records)} distinct compiled kernels; {len(bad)} fail the gate")
    for line in bad:
        print("  " + line)
    rows = roofline()
    summary = _summary(rows)
    print("\nRoofline, H100 SXM (989 TFLOP/s bf16 dense, 3.35 TB/s), SSDD-M bf16 batch 32, one decoder evaluation:")
    for s in summary:
        extra = f" useful {s['useful_fraction']:.1%}" if "useful_fraction" in s else ""
        print(f"  {s['image']}x{s['image']} {s['op']:18} calls {s['calls']:3} FLOP {s['flops'] / 1e9:9.2f} G "
              f"bytes {s['bytes'] / 1e6:9.1f} MB  roofline {s['roofline_us']:9.1f} us  {s['bound']}{extra}")
    today = datetime.date.today().isoformat()
    for r in records:  # one line per use would dominate the file: keep the count and the first
        r["n_uses"], r["uses"] = len(r["uses"]), r["uses"][:1]
    doc = dict(triton=triton.__version__, date=today, archs=[f"sm_{a}" for a in aot.ARCHS],
               matrix=dict(sizes=list(aot.SIZES), grids=[list(g) for g in aot.GRIDS],
                           dtypes=[str(d).removeprefix("torch.") for d in aot.DTYPES],
                           layouts=["NCHW", "channels_last"], batches=[1, 32]),
               gate_failures=bad, records=records,
               roofline=dict(device="H100 SXM", bf16_flops=H100_BF16_FLOPS, bytes_per_s=H100_BYTES_PER_S,
                             summary=summary, launches=rows))
    out = Path(args.out) if args.out else RESULTS / f"kernels_aot_{today}.json"
    schema.write_json(wrap(doc), out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
