"""Backends: ways to run a workload's network. Each turns the plain `net` into a callable `run(*inputs)`.

    eager        PyTorch eager, SSDD on its reference path (dense-mask attention, no kernels: official-style)
    triton       PyTorch eager with the Triton kernels (CUDA); the KL-VAE has no kernels and runs eager
    compile      torch.compile (inductor, freezing on); compile time is the first warm-up call
    cudagraphs   one network call captured as a CUDA graph (Triton kernels on where they apply)
    onnxruntime  the network exported by `export.onnx.export_module` (dynamo, opset 18) at static shapes, with the
                 SSDD attention in its export form (`export.onnx.export_attention`, as deployed), run by
                 `export.onnx.ort_session` / `ort_runner` with all graph optimisations (CPU, or CUDA EP)
    tensorrt     the same ONNX file built by `export.tensorrt.build_engine`, run by `TensorRTRunner` (CUDA)
    openvino     `openvino.convert_model` on the torch module (`export.openvino.convert_module`: batch, height and
                 width dynamic, SSDD attention in its export form, as `SSDD.to_backend("openvino")` deploys it),
                 compiled for the CPU with INFERENCE_PRECISION_HINT f32, LATENCY hint, torch's thread count
    openvino-bf16  the same with INFERENCE_PRECISION_HINT bf16 (matmuls/convs in bf16, AVX512_BF16/AMX where
                 present); inputs and outputs stay fp32, the row's dtype says bf16

The OpenVINO backends take the fp32 network (`--dtype fp32`): the precision is the backend's, not the
module's, as `to_openvino(precision=...)` takes it.

The ONNX file and engine live in a temporary folder removed once the session or engine is loaded (pass
`workdir` to keep them).

`unavailable_reason(name, device)` says why a backend cannot run here (None when it can); the CLI prints
it and skips the backend.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ssdd_runtime import optimize

log = logging.getLogger(__name__)

BACKENDS = ("eager", "triton", "compile", "cudagraphs", "onnxruntime", "tensorrt", "openvino", "openvino-bf16")
OPENVINO = {"openvino": "f32", "openvino-bf16": "bf16"}  # backend -> INFERENCE_PRECISION_HINT
CPU_BACKENDS = ("openvino-bf16", "openvino", "onnxruntime", "eager")  # --quick: the first available, fastest first
ONNX_OPSET = 18


def check_backend_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str | None:
    check_backend_name(name)
    cuda = device.type == "cuda"
    if name == "eager":
        return None
    if name in ("triton", "cudagraphs", "tensorrt") and not cuda:
        return f"{name} needs a CUDA device (running on {device.type})"
    if name == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'ssdd-runtime[triton]')"
    if name == "compile" and not cuda and not (shutil.which("g++") or shutil.which("c++")):
        return "torch.compile on CPU needs a C++ compiler (g++) on PATH"
    if name in ("onnxruntime", "tensorrt"):
        for mod, extra in (("onnx", "onnx"), ("onnxscript", "onnx")):
            if importlib.util.find_spec(mod) is None:
                return f"{mod} is not installed (pip install 'ssdd-runtime[{extra}]')"
        if dtype == torch.bfloat16:
            return f"{name}: bf16 inputs are not supported by this benchmark's ONNX path (use fp32 or fp16)"
    if name == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'ssdd-runtime[onnx]')"
        if cuda:
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return "onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'ssdd-runtime[tensorrt]')"
    if name in OPENVINO:
        if cuda:
            return f"{name} runs on the CPU (OpenVINO's CPU plugin); use --device cpu"
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed (pip install 'ssdd-runtime[openvino]')"
        if dtype != torch.float32:
            return (f"{name} converts the fp32 network and sets the precision itself (openvino = f32, "
                    "openvino-bf16 = bf16): use --dtype fp32")
        if OPENVINO[name] == "bf16" and not _cpu_has("avx512_bf16", "amx_bf16"):
            return f"{name}: this CPU has no bf16 dot-product instructions (avx512_bf16 / amx_bf16)"
    return None


def _cpu_has(*flags: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            have = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return True  # cannot tell: let OpenVINO decide (it falls back to f32 where bf16 is absent)
    return any(flag in have for flag in flags)


def prepare(name: str, net: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, is_ssdd: bool,
            workdir: str | None = None) -> tuple[Callable[..., torch.Tensor], dict]:
    """Build the callable for backend `name`. Returns (run, info); info holds `prepare_s` (export/engine build
    time; torch.compile compiles lazily, so its cost shows in the first warm-up call) and notes. ONNX and
    engine files go to `workdir` if given, else to a temporary folder deleted before returning."""
    check_backend_name(name)
    info: dict = {"notes": []}
    t0 = time.perf_counter()
    if is_ssdd:  # the one kernel switch; every other backend runs (compiles, exports) the reference path
        optimize.use_kernels(net, {"triton": True, "cudagraphs": None}.get(name, False))  # None: where they apply
    if name in ("triton", "cudagraphs") and not is_ssdd:
        info["notes"].append("no Triton kernels for this model: eager PyTorch ops")
    if name in ("eager", "triton"):
        run = net
    elif name == "compile":
        run = optimize.compile(net, freezing=True)
    elif name == "cudagraphs":
        with torch.inference_mode():
            run = optimize.cuda_graph(net, example_inputs)
    elif name in OPENVINO:
        run = _openvino_backend(name, net, example_inputs, is_ssdd, info, t0)
    elif workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        run = _onnx_backend(name, net, example_inputs, Path(workdir), is_ssdd, info, t0)
    else:
        with tempfile.TemporaryDirectory(prefix="ssdd-bench-") as tmp:
            run = _onnx_backend(name, net, example_inputs, Path(tmp), is_ssdd, info, t0)
    info["prepare_s"] = time.perf_counter() - t0
    return run, info


def _onnx_backend(name, net, example_inputs, folder: Path, is_ssdd: bool, info: dict, t0: float):
    """Export at the example shapes, then an ORT session or a TensorRT engine; both are loaded in memory, so the
    files may be deleted afterwards."""
    import onnx

    from ssdd_runtime.export import onnx as eo

    if is_ssdd:  # the deployed attention form; on a copy, so eager backends keep the model's own modules
        net = eo.export_attention(copy.deepcopy(net))
    names = ["x_t", "t", "z"] if is_ssdd else ["z"]
    proto = eo.export_module(net, example_inputs, input_names=names, output_names=["out"], opset=ONNX_OPSET)
    path = folder / "net.onnx"
    onnx.save_model(proto, str(path))
    info["export_s"] = time.perf_counter() - t0
    device = example_inputs[0].device
    if name == "onnxruntime":
        return eo.ort_runner(eo.ort_session(path, threads=torch.get_num_threads(), device=device), device)
    from ssdd_runtime.export.tensorrt import Profile, TensorRTRunner, build_engine

    profile = Profile({n: (tuple(a.shape),) * 3 for n, a in zip(names, example_inputs)})
    precision = "fp16" if any(a.dtype == torch.float16 for a in example_inputs) else "fp32"
    engine = build_engine(path, folder / "net.plan", precision=precision, profile=profile)
    return TensorRTRunner(engine, device=device)


# net -> {input shapes: ov.Model}: openvino and openvino-bf16 compile one conversion (minutes for SSDD-M on a
# loaded 2-core machine); weak keys, so a dropped workload drops its graphs.
_OV_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _openvino_backend(name, net, example_inputs, is_ssdd: bool, info: dict, t0: float):
    """convert_model in memory (no files; once per network and input shapes), then compile for the CPU at the
    backend's precision."""
    from ssdd_runtime.export import onnx as eo
    from ssdd_runtime.export import openvino as eov

    shapes = tuple(tuple(a.shape) for a in example_inputs)
    ov_model = _OV_MODELS.setdefault(net, {}).get(shapes)
    if ov_model is None:
        traced = eo.export_attention(copy.deepcopy(net)) if is_ssdd else net  # deployed attention form, on a copy
        ov_model = _OV_MODELS[net][shapes] = eov.convert_module(traced, example_inputs)
        info["export_s"] = time.perf_counter() - t0
    precision, threads = OPENVINO[name], torch.get_num_threads()
    compiled = eov.compile_ir(ov_model, precision=precision, threads=threads)
    info["dtype"] = "bf16" if precision == "bf16" else None  # the compute precision, for the row
    info["backend_options"] = {"precision": precision, "threads": threads}
    info["notes"].append(f"OpenVINO CPU plugin, INFERENCE_PRECISION_HINT {precision}, PERFORMANCE_HINT LATENCY, "
                         f"INFERENCE_NUM_THREADS {threads}, dynamic B/H/W; fp32 inputs and outputs")
    return eov.OpenVINONetwork(compiled, precision)
