"""Ahead-of-time compile check of the Triton kernels for GPU targets, on a machine without a GPU.

One implementation shared by tests/test_kernels_compile.py (the gate) and `python -m
ssdd_runtime.benchmarks.kernels --aot` (the static report):

  decoder_launches(size, grid, dtype, channels_last=, batch=)  every `Launch` the CUDA launch code makes for one
      decoder evaluation: the decoder runs on meta tensors (no data, no device) with the dispatch functions of
      `ssdd_runtime.kernels` recorded for the duration; each recorded call goes through the op's own
      `*_launches` function (the one its CUDA launcher calls) with interpreter=False.
  compile_launch(launch, arch)  compiles one launch with Triton's own argument specialisation (the JIT's
      binder: pointer alignment and integer divisibility exactly as a real launch would see them) for
      sm_<arch>, then reads registers / spills from the ptxas log, shared memory from the metadata and
      instruction counts from the SASS (cuobjdump -sass). Results are cached as JSON, keyed by the source hash,
      specialisation, options, target and triton version.

Compiling needs triton's NVIDIA backend (ptxas and cuobjdump ship in the triton wheel); no GPU and no CUDA
driver. Kernels decorated under TRITON_INTERPRET=1 are recompiled from their Python function.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

import ssdd_runtime.kernels as kernels_ns
from ssdd_runtime.kernels import attention, group_norm, layer_norm
from ssdd_runtime.kernels._dispatch import INTERPRETED, Launch

ARCHS = (80, 90)
SIZES = ("XS", "S", "B", "M", "L", "XL", "H")
GRIDS = ((8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (12, 20))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OPS = ("window_attention", "ada_group_norm", "ada_layer_norm", "affine_layer_norm")  # model.py's fused-op calls


# ---------------------------------------------------------------------------------------------------------
# Which launches a decode makes


@functools.lru_cache(maxsize=16)
def _meta_decoder(size: str, channels_last: bool, stride: int):
    from ssdd_runtime import optimize
    from ssdd_runtime.model import UViTDecoder, decoder_config

    with torch.device("meta"):
        model = UViTDecoder(decoder_config(size), stride=stride)
    if channels_last:
        optimize.channels_last(model)
    return optimize.use_kernels(model, False)


@functools.lru_cache(maxsize=256)
def decoder_calls(size: str, grid: tuple[int, int], *, channels_last: bool, batch: int = 1,
                  stride: int = 8) -> tuple:
    """(op, args, kwargs) of every fused-op call of one fp32 decoder evaluation on meta tensors, as model.py
    makes them through the `ssdd_runtime.kernels` namespace (recorded for the duration of the trace only; never
    a way to swap an implementation at run time). Shapes and strides do not depend on the dtype."""
    model = _meta_decoder(size, channels_last, stride)
    calls = []

    def cl(a):  # meta convolutions do not propagate channels_last; CUDA's (cuDNN) do, so 4-D activations are NHWC
        return a.to(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a

    def recorder(op):
        def record(*args, **kwargs):
            if channels_last:
                args, kwargs = tuple(map(cl, args)), {k: cl(v) for k, v in kwargs.items()}
            calls.append((op, args, kwargs))
            return torch.empty_like(args[0])  # every op's output has its first input's shape and layout
        return record

    z_dim = model.cfg.z_dim
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(batch, 3, stride * grid[0], stride * grid[1], device="meta").to(memory_format=fmt)
    z = torch.empty(batch, z_dim, grid[0] * 8 // stride, grid[1] * 8 // stride, device="meta").to(memory_format=fmt)
    t = torch.empty(batch, device="meta")
    with mock.patch.multiple(kernels_ns, **{op: recorder(op) for op in OPS}), torch.no_grad():
        model(x, t, z)
    return tuple(calls)


def _as(a, dtype):
    """A meta tensor of `a`'s shape and strides in `dtype` (floating tensors only)."""
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return torch.empty_strided(a.shape, a.stride(), dtype=dtype, device="meta")
    return a


def decoder_launches(size: str, grid: tuple[int, int], dtype: torch.dtype, *, channels_last: bool,
                     batch: int = 1, stride: int = 8) -> list[tuple[str, Launch]]:
    """(op, Launch) of every fused-op call of one decoder evaluation of decoder `size` in `dtype` on a latent
    grid `grid` (image = stride * grid), as the CUDA launchers would issue them: each call goes through the
    op's `*_launches` function with interpreter=False. Unsupported inputs (the dispatcher would run the
    reference) make no launch."""
    out: list[tuple[str, Launch]] = []
    for op, args, kwargs in decoder_calls(size, tuple(grid), channels_last=channels_last, batch=batch,
                                          stride=stride):
        args = [_as(a, dtype) for a in args]
        kw = {k: _as(v, dtype) for k, v in kwargs.items() if k != "use_triton"}
        if op == "window_attention":
            q, k, v, table, g = args
            if attention._window_attention_unsupported(q, k, v, table, g) is None:
                out += [(op, ln) for ln in attention.window_attention_launches(q, k, v, table, list(g),
                                                                               interpreter=False)[1]]
        elif op == "ada_group_norm":
            x, groups, eps = args
            w, b, cm, tm = (kw.get(n) for n in ("weight", "bias", "ctx_mod", "time_mod"))
            if group_norm._ada_group_norm_unsupported(x, groups, w, b, cm, tm) is None:
                out += [(op, ln) for ln in group_norm.ada_group_norm_launches(
                    x, groups, float(eps), w, b, cm, tm, bool(kw.get("silu", False)), interpreter=False)[1]]
        elif op == "ada_layer_norm":
            x, mod, g, eps = args
            if layer_norm._layer_norm_unsupported(x, mod, g, None, None) is None:
                out += [(op, ln) for ln in layer_norm.layer_norm_launches(x, None, None, mod, list(g), float(eps),
                                                                          interpreter=False)[1]]
        else:  # affine_layer_norm
            x, w, b, eps = args
            if layer_norm._layer_norm_unsupported(x, None, None, w, b) is None:
                out += [(op, ln) for ln in layer_norm.layer_norm_launches(x, w, b, None, [1, x.shape[1]],
                                                                          float(eps), interpreter=False)[1]]
    return out


# ---------------------------------------------------------------------------------------------------------
# Compiling one launch and reading what ptxas and the SASS say


_JIT: dict = {}


def _jit_function(kernel):
    """The compilable JITFunction of a kernel (an interpreter-decorated one is rebuilt from its function)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    if kernel not in _JIT:
        opts = {k: v for k, v in kernel.kwargs.items() if k.startswith("do_not_specialize")}
        _JIT[kernel] = JITFunction(kernel.fn, **opts)
    return _JIT[kernel]


def _mock_arg(a):
    from triton.runtime.jit import MockTensor

    return MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a  # data_ptr 0: 16-byte aligned, as torch's


_BINDERS: dict = {}


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return ("T", a.dtype)
    return (type(a).__name__, a)


def _specialized(launch: Launch, arch: int):
    """((fn, target, source, options), compiled-kernel key), memoised on what the binder reads: tensor dtypes,
    integer values, constexprs, options."""
    memo = (launch.kernel, tuple(map(_arg_key, launch.args)), tuple(sorted(launch.constexprs.items())),
            launch.num_warps, launch.num_stages, arch)
    if memo not in _SPECIALIZED:
        spec = _specialize(launch, arch)
        _SPECIALIZED[memo] = spec, _cache_key(*spec)
    return _SPECIALIZED[memo]


def specialize(launch: Launch, arch: int):
    """(fn, target, source, options) for `launch` on sm_<arch> (see `_specialize`)."""
    return _specialized(launch, arch)[0]


def launch_key(launch: Launch, arch: int) -> str:
    """The key of the compiled kernel (source hash, specialisation, options, target, triton version)."""
    return _specialized(launch, arch)[1]


_SPECIALIZED: dict = {}


def _specialize(launch: Launch, arch: int):
    """(fn, target, source, options) for `launch` on sm_<arch>, through the JIT's own binder (the same
    signature, constexprs and divisibility attributes a real launch gets)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    if (fn, arch) not in _BINDERS:
        backend = make_backend(target)
        _BINDERS[fn, arch] = backend, create_function_from_signature(fn.signature, fn.params, backend)
    backend, binder = _BINDERS[fn, arch]
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    bound, spec, options = binder(*map(_mock_arg, launch.args), **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return fn, target, ASTSource(fn, signature, constexprs, attrs), options


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else name


PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGS = re.compile(r"Used (\d+) registers")
SASS_OPS = ("HGMMA", "HMMA", "FFMA", "LDGSTS", "LDG", "STG", "LDS", "STS", "LDSM", "LDL", "STL", "UTMALDG")


def parse_sass(sass: str) -> dict:
    """Instruction counts by opcode family, and global load/store counts by width (bits)."""
    ops = Counter()
    widths = {"LDG": Counter(), "STG": Counter(), "LDGSTS": Counter()}
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)", line)
        if not m:
            continue
        op, mods = m.group(1), m.group(2)
        ops[op] += 1
        if op in widths:
            w = re.search(r"\.(128|64|U16|S16|16|U8|S8|8)\b", mods)
            widths[op][{"U16": "16", "S16": "16", "U8": "8", "S8": "8"}.get(w.group(1), w.group(1))
                       if w else "32"] += 1
    counts = {k: ops.get(k, 0) for k in SASS_OPS}
    return {"ops": counts, "ldg_bits": dict(widths["LDG"]), "stg_bits": dict(widths["STG"]),
            "ldgsts_bits": dict(widths["LDGSTS"])}


def _cache_key(fn, target, src, options) -> str:
    import triton

    opts = json.dumps({k: repr(v) for k, v in sorted(options.__dict__.items())})
    return hashlib.sha256(f"{src.hash()}|{target}|{opts}|{triton.__version__}".encode()).hexdigest()[:32]


def compile_launch(launch: Launch, arch: int, cache_dir: str | os.PathLike | None = None) -> dict:
    """Compile `launch` for sm_<arch>; return its resources. Raises on a compile error. Cached in cache_dir."""
    import triton
    from triton import knobs

    fn, target, src, options = specialize(launch, arch)
    key = _cache_key(fn, target, src, options)
    path = Path(cache_dir) / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    log = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, knobs.cache.scope(), knobs.nvidia.scope():
        knobs.cache.dir = tmp  # fresh: a hit in Triton's own cache would skip ptxas and its log
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], check=True, capture_output=True,
                              text=True).stdout
    seconds = time.perf_counter() - t0
    ptxas = log.getvalue()
    spill = PTXAS_SPILL.search(ptxas)
    regs = PTXAS_REGS.search(ptxas)
    assert spill and regs, f"no register/spill line in the ptxas log of {fn.__name__}:\n{ptxas}"
    md = compiled.metadata
    result = {
        "kernel": fn.__name__, "arch": f"sm_{arch}", "triton": triton.__version__, "key": key,
        "constexprs": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                       for k, v in launch.constexprs.items()},
        "num_warps": md.num_warps, "num_stages": launch.num_stages,
        "signature": {k: v for k, v in src.signature.items() if v != "constexpr"},
        "registers": int(regs.group(1)), "stack_bytes": int(spill.group(1)),
        "spill_store_bytes": int(spill.group(2)), "spill_load_bytes": int(spill.group(3)),
        "shared_bytes": md.shared, **parse_sass(sass), "compile_s": round(seconds, 2),
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_suffix(f".{os.getpid()}.tmp")
        tmp_path.write_text(json.dumps(result))
        tmp_path.replace(path)
    return result


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@functools.lru_cache(maxsize=64)
def _traced(size, grid, dtype_name, channels_last, batch):
    return decoder_launches(size, grid, _dtype(dtype_name), channels_last=channels_last, batch=batch)


def _enumerate(trace, dtypes, archs):
    """[(key, case, index, arch, op)] of one trace (size, grid, channels_last, batch) in each dtype; a case is
    (size, grid, dtype name, channels_last, batch)."""
    size, grid, channels_last, batch = trace
    out = []
    for dtype in dtypes:
        case = (size, grid, dtype, channels_last, batch)
        for i, (op, launch) in enumerate(_traced(*case)):
            for arch in archs:
                out.append((launch_key(launch, arch), case, i, arch, op))
    return out


def _compile_case(item, cache_dir):
    key, case, i, arch = item
    _, launch = _traced(*case)[i]
    try:
        return key, compile_launch(launch, arch, cache_dir), None
    except Exception as e:  # noqa: BLE001  (reported per configuration; the gate fails on it)
        return key, None, f"{type(e).__name__}: {str(e)[-2000:]}"


def _map(fn, items, jobs):
    if jobs <= 1:
        return [fn(x) for x in items]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(fn, items, chunksize=max(1, len(items) // (8 * jobs))))


def check(sizes=SIZES, grids=GRIDS, dtypes=DTYPES, batches=(1, 32), archs=ARCHS, cache_dir=None,
          jobs: int = 1) -> list[dict]:
    """Compile every distinct kernel that the decoder sizes x grids x dtypes x (NCHW, channels_last) x batches
    launch, for each arch. One record per distinct compiled kernel: `result` (compile_launch's dict, None on a
    compile error), `error`, and `uses` (which cases launch it: op, size, grid, dtype, layout, batch)."""
    if INTERPRETED:
        raise RuntimeError("the ahead-of-time compile needs compiled (not interpreted) kernels: unset "
                           "TRITON_INTERPRET")
    traces = [(size, tuple(grid), cl, batch) for size in sizes for grid in grids for cl in (False, True)
              for batch in batches]
    names = tuple(str(dtype).removeprefix("torch.") for dtype in dtypes)
    found = [x for items in _map(functools.partial(_enumerate, dtypes=names, archs=archs), traces, jobs)
             for x in items]
    uses: dict[str, list] = {}
    first: dict[str, tuple] = {}
    for key, case, i, arch, op in found:
        size, grid, dtype, cl, batch = case
        uses.setdefault(key, []).append(dict(op=op, size=size,
                                             grid=list(grid), dtype=dtype,
                                             layout="channels_last" if cl else "NCHW", batch=batch))
        first.setdefault(key, (key, case, i, arch))
    compiled = _map(functools.partial(_compile_case, cache_dir=cache_dir), list(first.values()), jobs)
    records = []
    for key, result, error in compiled:
        ops = sorted({u["op"] for u in uses[key]})
        records.append(dict(key=key, result=result, error=error, ops=ops, uses=uses[key]))
    return records


def expected_mma(result: dict) -> str | None:
    """The tensor-core instruction a fp16/bf16 attention kernel must contain: HMMA (mma.sync) on sm_80; on
    sm_90 HGMMA (wgmma) when Triton can pick it (num_warps a multiple of 4 and a 64-row query tile), else
    HMMA. None for kernels without a 16-bit dot."""
    sig = result["signature"]
    if result["kernel"] != "_window_attention_kernel" or sig["Q"] not in ("*fp16", "*bf16"):
        return None
    if result["arch"] == "sm_90" and result["num_warps"] % 4 == 0 \
            and result["constexprs"]["TQ_H"] * result["constexprs"]["TQ_W"] % 64 == 0:
        return "HGMMA"
    return "HMMA"


def problems(records: list[dict]) -> list[str]:
    """What the gate rejects: compile errors, any spill, a fp16/bf16 attention kernel without its MMA."""
    out = []
    for r in records:
        res, use = r["result"], r["uses"][0]
        where = (f"{'/'.join(r['ops'])} ({len(r['uses'])} uses; first: size {use['size']} grid {use['grid']} "
                 f"{use['dtype']} {use['layout']} batch {use['batch']})")
        if res is None:
            out.append(f"compile error in {where}: {r['error']}")
            continue
        where = f"{res['kernel']} {res['arch']} {res['constexprs']} num_warps={res['num_warps']}, {where}"
        if res["spill_store_bytes"] or res["spill_load_bytes"]:
            out.append(f"spills {res['spill_store_bytes']} B stores / {res['spill_load_bytes']} B loads at "
                       f"{res['registers']} registers: {where}")
        mma = expected_mma(res)
        if mma is not None and res["ops"][mma] == 0:
            out.append(f"no {mma} instruction (ops {res['ops']}): {where}")
    return out


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file of the records")
    ap.add_argument("--cache", default=None, help="folder of cached compile results")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    args = ap.parse_args(argv)
    records = check(sizes=args.sizes, cache_dir=args.cache, jobs=args.jobs)
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(out)


if __name__ == "__main__":
    main()
