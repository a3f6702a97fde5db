"""TensorRT engines from the exported ONNX graphs: optimisation profiles, the equivalent `trtexec` command, an
engine builder on the TensorRT 10 Python API, `TensorRTRunner` (the project's one way to run an engine: the
benchmark's tensorrt backend uses it too), and `TensorRTDecoder`, which runs a decoder engine behind
`SSDD.decode`'s signature.

Status: written against the documented TensorRT 10 API (`trt.Builder`, `create_network(0)`, `OnnxParser`,
`IBuilderConfig.builder_optimization_level`, `create_timing_cache`/`set_timing_cache`,
`add_optimization_profile`, `build_serialized_network`, `Runtime.deserialize_cuda_engine`,
`IExecutionContext.set_input_shape`/`set_tensor_address`/`execute_async_v3`) and trtexec's flags. Building and
running engines is UNVERIFIED: no GPU and no TensorRT where this was written. Verified on CPU: shape parsing,
profile computation and checks, the trtexec command line, and the errors raised without TensorRT
(tests/test_export_tensorrt.py).

Shapes: profiles are given as image sizes `BxHxW` (pixels) and turned into one (min, opt, max) per graph input:
decoder latent_sample (B, C, H/F, W/F) and noise (B, 3, H, W) (no noise input for a graph exported with
noise="graph"); encoder image (B, 3, H, W) (`sample` in optimum's names). The trtexec form
`name:BxCxHxW,name:...` is accepted too.
"""
from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch

from ssdd_runtime.io import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
TENSORRT_HINT = ("pip install 'ssdd-runtime[tensorrt]' (the `tensorrt` wheel, 10.0 or newer, needs an NVIDIA GPU "
                 "and driver; see https://docs.nvidia.com/deeplearning/tensorrt/)")
Shape = tuple[int, ...]


def _require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"building or running TensorRT engines needs the `tensorrt` package: {TENSORRT_HINT}") from e
    return trt


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


# ---------------------------------------------------------------------------------------------------------
# Optimisation profiles


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: for each graph input, its (min, opt, max) shape."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def trtexec_flags(self) -> list[str]:
        def spec(i):
            return ",".join(f"{name}:{'x'.join(map(str, s[i]))}" for name, s in self.shapes.items())

        return [f"--minShapes={spec(0)}", f"--optShapes={spec(1)}", f"--maxShapes={spec(2)}"]

    def check(self, name: str, shape: Shape) -> None:
        """ValueError unless `shape` of input `name` lies within this profile."""
        if name not in self.shapes:
            raise ValueError(f"no input named {name!r} in the profile (inputs: {', '.join(self.shapes)})")
        lo, _, hi = self.shapes[name]
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(lo) or any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise ValueError(f"{name} shape {shape} is outside the engine's optimisation profile: min {lo}, max {hi} "
                             f"(rebuild the engine with a wider --min-shape/--max-shape)")


def parse_dims(text: str) -> Shape:
    """'1x256x256' -> (1, 256, 256)."""
    try:
        dims = tuple(int(d) for d in text.strip().lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a shape like 1x256x256, got {text!r}") from None
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"shape dimensions must be positive integers, got {text!r}")
    return dims


def _parse_spec(text: str, inputs: dict[str, Shape], part: str, stride: int, z_dim: int) -> dict[str, Shape]:
    """An image size 'BxHxW' or trtexec's 'name:BxCxHxW,...' -> {input name: full shape}."""
    if ":" in text:
        shapes = {}
        for item in text.split(","):
            name, _, dims = item.partition(":")
            shapes[name.strip()] = parse_dims(dims)
        if set(shapes) != set(inputs):
            raise ValueError(f"shape spec {text!r} names {sorted(shapes)}; the graph's inputs are {sorted(inputs)}")
        return shapes
    dims = parse_dims(text)
    if len(dims) != 3:
        raise ValueError(f"expected an image size BxHxW (batch x height x width in pixels), got {text!r}")
    B, H, W = dims
    if H % stride or W % stride:
        raise ValueError(f"image size {H}x{W} must be a multiple of the encoder stride {stride} in both directions")
    full = {"latent_sample": (B, z_dim, H // stride, W // stride), "noise": (B, 3, H, W), "image": (B, 3, H, W),
            "sample": (B, 3, H, W), "seed": (B, 1)}
    return {name: full[name] for name in inputs}


def make_profile(min_shape: str, opt_shape: str, max_shape: str, *, part: str = "decoder", stride: int = 8,
                 z_dim: int = 4, inputs: tuple[str, ...] | None = None) -> Profile:
    """Profile for the decoder or encoder graph from three shape specs (image sizes 'BxHxW' or trtexec form).
    inputs: the graph's input names (default: latent_sample + noise for the decoder, image for the encoder)."""
    if part not in ("decoder", "encoder"):
        raise ValueError(f"part must be 'decoder' or 'encoder', got {part!r}")
    if inputs is None:
        inputs = ("latent_sample", "noise") if part == "decoder" else ("image",)
    known = ("latent_sample", "noise", "seed") if part == "decoder" else ("image", "sample")
    if not inputs or any(n not in known for n in inputs):
        raise ValueError(f"{part} graph inputs must be among {', '.join(known)}, got {list(inputs)}")
    inputs = dict.fromkeys(inputs, ())
    specs = [_parse_spec(s, inputs, part, stride, z_dim) for s in (min_shape, opt_shape, max_shape)]
    shapes = {}
    for name in inputs:
        lo, opt, hi = (s[name] for s in specs)
        if not len(lo) == len(opt) == len(hi):
            raise ValueError(f"{name}: min/opt/max shapes have different ranks: {lo}, {opt}, {hi}")
        if any(not a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise ValueError(f"{name}: need min <= opt <= max in every dimension, got {lo}, {opt}, {hi}")
        shapes[name] = (lo, opt, hi)
    if part == "decoder" and "noise" in shapes:  # both inputs must describe the same images
        (lz, oz, hz), (ln, on, hn) = shapes["latent_sample"], shapes["noise"]
        for z, n in ((lz, ln), (oz, on), (hz, hn)):
            if z[0] != n[0] or z[2] * stride != n[2] or z[3] * stride != n[3]:
                raise ValueError(f"latent_sample {z} and noise {n} do not match: noise must be "
                                 f"(B, 3, h*{stride}, w*{stride}) for latent_sample (B, C, h, w)")
    return Profile(shapes)


def profile_for_onnx(onnx_path, min_shape: str, opt_shape: str, max_shape: str) -> Profile:
    """`make_profile` with part, stride and latent channels read from the graph's `ssdd.*` metadata."""
    from ssdd_runtime.export.onnx import check_onnx_file

    meta = check_onnx_file(onnx_path)
    if meta["ssdd.part"] == "decoder":
        inputs = ("latent_sample", "seed") if meta.get("ssdd.noise") == "graph" else ("latent_sample", "noise")
    else:
        inputs = ("sample",) if meta.get("ssdd.names") == "optimum" else ("image",)
    return make_profile(min_shape, opt_shape, max_shape, part=meta["ssdd.part"], stride=int(meta["ssdd.stride"]),
                        z_dim=int(meta["ssdd.z_dim"]), inputs=inputs)


# ---------------------------------------------------------------------------------------------------------
# trtexec and the builder


def trtexec_command(onnx_path, engine_path, *, precision: str = "fp16", profile: Profile,
                    timing_cache=None, optimization_level: int | None = 3,
                    workspace_mib: int | None = None) -> list[str]:
    """argv of the trtexec call equivalent to `build_engine` (print it with shlex.join)."""
    check_precision(precision)
    cmd = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine_path}", *profile.trtexec_flags()]
    if precision != "fp32":
        cmd.append(f"--{precision}")  # --fp16 / --bf16: allow those kernels; fp32 stays allowed
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    if optimization_level is not None:
        _check_level(optimization_level)
        cmd.append(f"--builderOptimizationLevel={optimization_level}")
    if workspace_mib is not None:
        cmd.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
    return cmd


def _check_level(level: int) -> None:
    if not isinstance(level, int) or not 0 <= level <= 5:
        raise ValueError(f"builder optimisation level must be an integer 0..5, got {level!r}")


def build_engine(onnx_path, engine_path, *, precision: str = "fp16", profile: Profile, timing_cache=None,
                 optimization_level: int = 3, workspace_mib: int | None = None,
                 keep_norms_fp32: bool = True) -> Path:
    """Build a serialized engine (`.plan`) with the TensorRT Python API; returns its path. UNVERIFIED (see top).

    precision fp16/bf16 enables those kernels; with keep_norms_fp32 the normalisation, reduction and softmax
    layers are pinned to fp32 (OBEY_PRECISION_CONSTRAINTS), as in the fp16 ONNX variant. timing_cache: a file
    read if it exists and written back after the build. Next to the engine, `<engine>.json` records the graph's
    ssdd.* metadata and the profile, which `TensorRTDecoder` reads.
    """
    check_precision(precision)
    _check_level(optimization_level)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    trt = _require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(profile.shapes):
        raise ValueError(f"profile inputs {sorted(profile.shapes)} do not match the network's {sorted(inputs)}")

    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if precision != "fp32" and keep_norms_fp32:
        keep = {trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE, trt.LayerType.SOFTMAX}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in keep:
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)

    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)

    log.info("building TensorRT engine %s (%s, optimisation level %d)", engine_path, precision, optimization_level)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(engine_path, bytes(serialized))
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    write_engine_info(engine_path, onnx_path, precision, profile)
    return engine_path


def write_engine_info(engine_path, onnx_path, precision: str, profile: Profile) -> Path:
    """`<engine>.json`: the ONNX graph's ssdd.* metadata, the precision and the profile."""
    from ssdd_runtime.export.onnx import read_metadata

    info = {"onnx": str(onnx_path), "precision": precision, "metadata": read_metadata(onnx_path),
            "profile": {name: [list(s) for s in shapes] for name, shapes in profile.shapes.items()}}
    path = Path(str(engine_path) + ".json")
    write_text_atomic(path, json.dumps(info, indent=2))
    return path


# ---------------------------------------------------------------------------------------------------------
# Running engines


class TensorRTRunner:
    """One deserialized engine and execution context: `runner(*tensors)` (or `runner.run({name: tensor})`) sets
    the input shapes and addresses, allocates the outputs at the shapes TensorRT infers, and executes on the
    current CUDA stream; returns the outputs in engine order (one tensor when there is one). UNVERIFIED (no
    GPU/TensorRT where written)."""

    def __init__(self, engine_path, *, device: str | torch.device = "cuda"):
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"TensorRT engines run on a CUDA device; got {self.device} "
                             f"(CUDA available: {torch.cuda.is_available()})")
        trt = _require_tensorrt()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path} (built by another TensorRT version "
                               "or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = self.engine.get_tensor_mode
        self.inputs = [n for n in names if mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, *args: torch.Tensor):
        if len(args) != len(self.inputs):
            raise ValueError(f"the engine takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(args)}")
        outs = self.run(dict(zip(self.inputs, args)))
        return outs[0] if len(outs) == 1 else outs

    def run(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        trt = self._trt
        keep = []
        for name in self.inputs:
            t = feeds[name].to(self.device).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16,
                     trt.bfloat16: torch.bfloat16}[self.engine.get_tensor_dtype(name)]
            out = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outs


class TensorRTDecoder:
    """A decoder engine behind `SSDD.decode`'s signature: decode(z, *, steps, noise, generator, t_pow_shift,
    batch_size) -> fp32 (B, 3, h*F, w*F) on the GPU. The number of steps is fixed by the exported graph; an
    engine built from a noise="graph" export draws its own noise (then `noise`/`generator` must be None).
    Inputs are validated as `SSDD.decode` validates them. UNVERIFIED (no GPU/TensorRT where written)."""

    def __init__(self, engine_path, *, device: str | torch.device = "cuda"):
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
        info_path = Path(str(engine_path) + ".json")
        if not info_path.is_file():
            raise FileNotFoundError(f"{info_path} not found: build the engine with `ssdd export tensorrt` "
                                    "(it records the graph's stride, latent channels and steps there)")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        meta = info["metadata"]
        if meta.get("ssdd.part") != "decoder":
            raise ValueError(f"{engine_path} was built from a {meta.get('ssdd.part')!r} graph, not a decoder")
        self.stride, self.z_dim = int(meta["ssdd.stride"]), int(meta["ssdd.z_dim"])
        self.steps, self.t_pow_shift = int(meta["ssdd.steps"]), float(meta["ssdd.t_pow_shift"])
        self.graph_noise = meta.get("ssdd.noise") == "graph"
        self.profile = Profile({k: tuple(tuple(s) for s in v) for k, v in info["profile"].items()})
        self.runner = TensorRTRunner(engine_path, device=device)
        self.device = self.runner.device

    def decode(self, z: torch.Tensor, *, steps: int | None = None, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None, t_pow_shift: float | None = None,
               batch_size: int | None = None, tile: int | None = None) -> torch.Tensor:
        from ssdd_runtime.checks import _check_finite, _check_tensor, check_batch_size, refuse_tile, start_noise

        refuse_tile(tile, "TensorRT")
        batch_size = check_batch_size(batch_size)  # a negative one decoded nothing
        if steps is not None and steps != self.steps:
            raise ValueError(f"this engine decodes with {self.steps} step(s) (fixed at export); got steps={steps}")
        if t_pow_shift is not None and float(t_pow_shift) != self.t_pow_shift:
            raise ValueError(f"this engine uses t_pow_shift={self.t_pow_shift} (fixed at export); got {t_pow_shift}")
        _check_tensor("latent", z, rank=4)
        if z.shape[1] != self.z_dim:
            raise ValueError(f"latent must have {self.z_dim} channels (B, {self.z_dim}, h, w), got shape "
                             f"{tuple(z.shape)}")
        _check_finite("latent", z)
        B = z.shape[0]
        if self.graph_noise:
            if noise is not None or generator is not None:
                raise ValueError("this engine draws its noise in the graph (exported with noise='graph'): "
                                 "pass neither noise nor generator")
        else:
            noise = start_noise(z, self.stride, noise, generator, self.device)
        max_batch = self.profile.shapes["latent_sample"][2][0]
        step = min(batch_size or max_batch, max_batch)
        out = [self._run(z[i:i + step], None if noise is None else noise[i:i + step]) for i in range(0, B, step)]
        return torch.cat(out)

    def _run(self, z: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        feeds = {"latent_sample": z.to(self.device, torch.float32)}
        if noise is not None:
            feeds["noise"] = noise.to(self.device, torch.float32)
        for name, t in feeds.items():
            self.profile.check(name, t.shape)
        outs = self.runner.run(feeds)  # a noise="graph" engine also returns the noise it drew
        return outs[self.runner.outputs.index("sample")]
