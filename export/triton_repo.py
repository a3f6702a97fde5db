"""A Triton Inference Server model repository for an exported SSDD graph (ONNX Runtime or TensorRT backend).

Layout written (Triton's convention):
    <repo>/<name>/config.pbtxt
    <repo>/<name>/1/model.onnx (+ its external-data file, if any)   backend "onnxruntime"
    <repo>/<name>/1/model.plan                                       backend "tensorrt"
A decoder exported with noise="graph" (export_onnx / convert_to_graph_noise) gives a config whose inputs are
`latent_sample` and `seed` (INT64 [1] per item; clients send 16 KiB per 256x256 image instead of 16 KiB + 768 KiB
of noise; an item's noise depends on its seed alone, so dynamic batching never changes an image) and whose
outputs are `sample` and the drawn `noise` (clients request the outputs they want). config.pbtxt declares the graph's
inputs and outputs by their ONNX names with the batch dimension left to
`max_batch_size` (dims exclude it; -1 = dynamic height/width), dynamic batching and an instance group.
Verified here: the text parses into Triton's `inference.ModelConfig` protobuf (tritonclient's generated
model_config_pb2) and matches the ONNX graph (tests/test_export_onnx.py); the repository loads in the real
tritonserver 2.51 bundled by nvidia-pytriton and answers with ONNX Runtime's outputs, the onnxruntime platform
stood in for by a Python-backend model running the same model.onnx (tests/test_triton_repo_server.py). Not
verified: the native onnxruntime/tensorrt backends (NVIDIA's container only), their own options and their
automatic config completion.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from ssdd_runtime.export.onnx import check_onnx_file, graph_io
from ssdd_runtime.io import atomic_output, write_text_atomic

BACKENDS = {"onnxruntime": "model.onnx", "tensorrt": "model.plan"}
KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")
# ONNX TensorProto elem_type -> Triton data type
TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 6: "TYPE_INT32", 7: "TYPE_INT64"}


def triton_config(onnx_path, *, name: str, backend: str = "onnxruntime", max_batch_size: int = 8,
                  instance_count: int = 1, kind: str = "KIND_GPU", preferred_batch_sizes=(),
                  max_queue_delay_us: int = 100) -> str:
    """config.pbtxt text for the graph at `onnx_path` (a TensorRT engine keeps its ONNX graph's tensor names)."""
    check_model_name(name)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown instance kind {kind!r}: expected one of {', '.join(KINDS)}")
    if backend == "tensorrt" and kind == "KIND_CPU":
        raise ValueError("the tensorrt backend runs on GPUs only: use kind KIND_GPU")
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if not isinstance(instance_count, int) or instance_count < 1:
        raise ValueError(f"instance_count must be an integer >= 1, got {instance_count!r}")
    preferred = sorted(set(int(b) for b in preferred_batch_sizes))
    if any(b < 1 or b > max_batch_size for b in preferred):
        raise ValueError(f"preferred batch sizes {preferred} must lie in 1..max_batch_size={max_batch_size}")
    meta = check_onnx_file(onnx_path)
    io = graph_io(onnx_path)

    def tensors(rows):
        out = []
        for tname, elem, dims in rows:
            if elem not in TRITON_TYPES:
                raise ValueError(f"{tname}: ONNX element type {elem} has no Triton data type here")
            if not dims or not isinstance(dims[0], str):
                raise ValueError(f"{tname}: dims {dims!r} do not start with a dynamic batch; "
                                 "export with ssdd_runtime.export.export_onnx")
            shape = ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims[1:])
            out.append(f'  {{\n    name: "{tname}"\n    data_type: {TRITON_TYPES[elem]}\n    dims: [ {shape} ]\n  }}')
        return ",\n".join(out)

    lines = [
        f"# SSDD {meta.get('ssdd.part', '?')} ({meta.get('ssdd.encoder', '?')} / {meta.get('ssdd.decoder', '?')}, "
        f"steps {meta.get('ssdd.steps', '-')}, {meta.get('ssdd.dtype', '?')} graph"
        + (f", noise drawn in the graph from the per-item seed input ({meta.get('ssdd.noise_rng')})"
           if meta.get("ssdd.noise") == "graph" else "") + "), written by ssdd export triton-repo",
        f'name: "{name}"',
        f'backend: "{backend}"',
        f"max_batch_size: {max_batch_size}",
        f"input [\n{tensors(io['inputs'])}\n]",
        f"output [\n{tensors(io['outputs'])}\n]",
        "dynamic_batching {" + (f"\n  preferred_batch_size: [ {', '.join(map(str, preferred))} ]" if preferred else "")
        + f"\n  max_queue_delay_microseconds: {int(max_queue_delay_us)}\n}}",
        f"instance_group [\n  {{\n    count: {instance_count}\n    kind: {kind}\n  }}\n]",
    ]
    return "\n".join(lines) + "\n"


def check_model_name(name) -> str:
    """A Triton model name is the name of one folder inside the repository: no path separators, not '.' or '..'
    (which would write outside `repo` or nest folders), no leading '.', printable."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or not name.isprintable():
        raise ValueError(f"invalid Triton model name {name!r}: it names one folder inside the repository (no '/' "
                         "or '\\', not '.' or '..', no leading '.'), e.g. ssdd_decoder")
    return name


def write_triton_repo(repo, *, onnx_path, engine_path=None, name: str = "ssdd_decoder",
                      backend: str = "onnxruntime", max_batch_size: int = 8, instance_count: int = 1,
                      kind: str = "KIND_GPU", preferred_batch_sizes=(), max_queue_delay_us: int = 100,
                      version: int = 1) -> Path:
    """Write `<repo>/<name>/` (config.pbtxt + version folder with the model); returns the model folder.

    backend "onnxruntime" copies `onnx_path` (and its external data); "tensorrt" copies `engine_path`, a plan
    built from `onnx_path` (whose tensor names and types the config declares). The engine's profile must
    cover batches up to max_batch_size.
    """
    check_model_name(name)
    onnx_path = Path(onnx_path)
    check_onnx_file(onnx_path)
    if backend == "tensorrt":
        if engine_path is None:
            raise ValueError("backend 'tensorrt' needs engine_path (a .plan built from onnx_path)")
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise FileNotFoundError(f"TensorRT engine not found: {engine_path}")
    text = triton_config(onnx_path, name=name, backend=backend, max_batch_size=max_batch_size,
                         instance_count=instance_count, kind=kind, preferred_batch_sizes=preferred_batch_sizes,
                         max_queue_delay_us=max_queue_delay_us)
    model_dir = Path(repo) / name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    # model files first, config last: Triton's repository poller never sees a config without its model
    if backend == "tensorrt":
        _copy_atomic(engine_path, version_dir / BACKENDS[backend])
    else:
        for data in _external_data_files(onnx_path):  # keep their names: the graph refers to them by name
            _copy_atomic(onnx_path.parent / data, version_dir / data)
        _copy_atomic(onnx_path, version_dir / BACKENDS[backend])
    write_text_atomic(model_dir / "config.pbtxt", text)
    return model_dir


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_output(dst) as tmp:
        shutil.copyfile(src, tmp)


def _external_data_files(onnx_path: Path) -> list[str]:
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    files = set()
    for tensor in proto.graph.initializer:  # SSDD graphs have no subgraphs
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            files.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(files)
