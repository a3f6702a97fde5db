"""Backends: ways to run a workload's network. Each turns the plain `net` into a callable `run(*inputs)`.

    eager        PyTorch eager, SSDD on its reference path (dense-mask attention, no kernels: official-style)
    triton       PyTorch eager with the Triton kernels (CUDA); the KL-VAE has no kernels and runs eager
    compile      torch.compile (inductor, freezing on); compile time is the first warm-up call
    cudagraphs   one network call captured as a CUDA graph (Triton kernels on where they apply)
    onnxruntime  torch.onnx.export(dynamo=True, opset 18) at static shapes, ONNX Runtime with all graph
                 optimisations (CPU, or the CUDA execution provider on a CUDA device)
    tensorrt     the same ONNX file built into a TensorRT engine (CUDA)

`unavailable_reason(name, device)` says why a backend cannot run here (None when it can); the CLI prints
it and skips the backend.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from ssdd_runtime import optimize

log = logging.getLogger(__name__)

BACKENDS = ("eager", "triton", "compile", "cudagraphs", "onnxruntime", "tensorrt")
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
    return None


def prepare(name: str, net: nn.Module, example_inputs: tuple[torch.Tensor, ...], *, is_ssdd: bool,
            workdir: str | None = None) -> tuple[Callable[..., torch.Tensor], dict]:
    """Build the callable for backend `name`. Returns (run, info); info holds `prepare_s` (export/engine build
    time; torch.compile compiles lazily, so its cost shows in the first warm-up call) and notes."""
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
    else:
        workdir = workdir or tempfile.mkdtemp(prefix="ssdd-bench-")
        os.makedirs(workdir, exist_ok=True)
        path = export_onnx(net, example_inputs, os.path.join(workdir, "net.onnx"))
        info["export_s"] = time.perf_counter() - t0
        run = _ort_runner(path, example_inputs) if name == "onnxruntime" else _trt_runner(path, example_inputs)
    info["prepare_s"] = time.perf_counter() - t0
    return run, info


def export_onnx(net: nn.Module, example_inputs: tuple[torch.Tensor, ...], path: str) -> str:
    """Minimal static-shape export for the benchmark (torch.onnx.export, dynamo=True, opset 18).
    The project's full exporter (dynamic axes, validation) lives in ssdd_runtime.export."""
    names = ["x_t", "t", "z"] if len(example_inputs) == 3 else ["z"]
    with torch.no_grad():
        program = torch.onnx.export(net, tuple(example_inputs), dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=names, output_names=["out"], verbose=False)
    program.save(path)
    return path


def _ort_runner(path: str, example_inputs) -> Callable[..., torch.Tensor]:
    import numpy as np
    import onnxruntime as ort

    device = example_inputs[0].device
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = torch.get_num_threads()
    providers = ["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(path, so, providers=providers)
    in_names = [i.name for i in session.get_inputs()]
    out_name = session.get_outputs()[0].name

    if device.type != "cuda":
        def run_cpu(*args: torch.Tensor) -> torch.Tensor:
            feeds = {n: a.contiguous().numpy() for n, a in zip(in_names, args)}
            return torch.from_numpy(session.run([out_name], feeds)[0])

        return run_cpu

    np_types = {torch.float32: np.float32, torch.float16: np.float16}
    out_shape = tuple(session.get_outputs()[0].shape)

    def run_cuda(*args: torch.Tensor) -> torch.Tensor:  # device buffers through io_binding: no host copies
        binding = session.io_binding()
        args = [a.contiguous() for a in args]
        for n, a in zip(in_names, args):
            binding.bind_input(n, "cuda", device.index or 0, np_types[a.dtype], tuple(a.shape), a.data_ptr())
        out = torch.empty(out_shape, dtype=args[-1].dtype, device=device)
        binding.bind_output(out_name, "cuda", device.index or 0, np_types[out.dtype], out_shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    return run_cuda


def _trt_runner(path: str, example_inputs) -> Callable[..., torch.Tensor]:  # unverified: no GPU in CI
    """Build with the project's engine builder (`ssdd_runtime.export.tensorrt.build_engine`) on a static
    profile at the example shapes, then run on the current CUDA stream."""
    import onnx
    import tensorrt as trt

    from ssdd_runtime.export.tensorrt import Profile, build_engine

    names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
    profile = Profile({n: (tuple(a.shape),) * 3 for n, a in zip(names, example_inputs)})
    precision = "fp16" if any(a.dtype == torch.float16 for a in example_inputs) else "fp32"
    engine_path = build_engine(path, path + ".plan", precision=precision, profile=profile)
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    (output,) = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)
                 if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT]
    out_shape = tuple(engine.get_tensor_shape(output))
    device = example_inputs[0].device

    def run(*args: torch.Tensor) -> torch.Tensor:
        args = [a.contiguous() for a in args]
        for n, a in zip(names, args):
            context.set_tensor_address(n, a.data_ptr())
        out = torch.empty(out_shape, dtype=args[-1].dtype, device=device)
        context.set_tensor_address(output, out.data_ptr())
        context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream)
        return out

    return run
