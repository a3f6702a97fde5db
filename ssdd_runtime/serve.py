"""Serving SSDD on Triton Inference Server: `ssdd serve`, the models it runs, the process that runs them, and
a small client.

Server: the `tritonserver` binary (2.51, Python backend only, CPU) that the `nvidia-pytriton` wheel bundles,
started on a model repository written here. Two models, each a Triton Python-backend model whose
`model.py` imports `TritonPythonModel` below (so the model runs in Triton's own backend process, one per
instance, next to the server's dynamic batcher, health endpoints and Prometheus metrics):

    ssdd_decode  latent FP32 [B, C, h, w] (required); seed INT64 [B, 1] | noise FP32 [B, 3, H, W];
                 steps INT32 [B, 1]; t_pow_shift FP32 [B, 1]           (optional; defaults seed 0, 1 step, 2.0)
                 -> image FP32 [B, 3, H, W] (nominally [-1, 1]), image_uint8 UINT8 [B, H, W, 3]
    ssdd_encode  image FP32 [B, 3, H, W] in [-1, 1] -> latent_mean, latent_logvar FP32 [B, C, H/F, W/F]

Item i of a request is `SSDD.decode(z[i:i+1], generator=torch.Generator().manual_seed(seed[i]))`, bit for
bit, whatever the dynamic batcher merged it with: the model runs each item on its own (batched convolutions
round differently from single ones, ~5e-6 here), so batching amortises queueing and transport, not compute.
Errors are per request (`pb_utils.InferenceResponse(error=...)`): a request with a non-finite latent or an
image over the size cap is refused and the requests merged with it are answered. Triton itself refuses
wrong dtypes, ranks, channel counts (dims are declared), data lengths, missing inputs and unknown models.
PyTriton's own `Triton.bind` is not used: its inference callable answers a merged batch with one error.

SIGTERM to `ssdd serve` is passed to tritonserver, which stops taking requests, finishes the in-flight ones
(up to --exit-timeout seconds), unloads the models and exits; `ssdd serve` then exits 0.
Verified here (tests/test_serve*.py): CPU, torch backend, loopback HTTP/gRPC. Not verified: GPUs, the
compile/openvino/tensorrt backends inside the server, other hosts, NVIDIA's container.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.utils.dlpack

log = logging.getLogger(__name__)

SERVE_HINT = "pip install 'ssdd-runtime[serve]' (nvidia-pytriton, tritonclient[all])"
CLIENT_HINT = "pip install 'tritonclient[all]'"
MODELS = ("ssdd_decode", "ssdd_encode")
BACKENDS = ("torch", "compile", "openvino", "tensorrt")
MAX_SIZE = 2048  # default cap on the image side in pixels (a 2048x2048 fp32 image is 48 MiB per item)
SHM_PREFIX = "ssdd_serve_"  # Python-backend shared-memory regions: /dev/shm/<prefix><pid>_<token>_...


# ---------------------------------------------------------------------------------------------------------
# The server process


def tritonserver_dist() -> Path:
    """The `tritonserver` folder inside the installed nvidia-pytriton package (bin/, backends/python/, stubs)."""
    import importlib.util

    # Located, not imported: only the bundled server is used, so PyTriton's own dependencies are not needed.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise ImportError(f"serving needs the nvidia-pytriton package (it bundles tritonserver): {SERVE_HINT}")
    dist = Path(spec.origin).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"{dist}/bin/tritonserver not found: reinstall nvidia-pytriton ({SERVE_HINT})")
    return dist


def python_stub() -> Path:
    """The Python-backend stub built for this interpreter's version (the wheel ships 3.8 .. 3.13)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = tritonserver_dist() / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python-backend stub for Python {version}")
    return stub


def server_env() -> dict[str, str]:
    """Environment of the tritonserver process. The stub embeds libpython: the running interpreter's lib folder
    goes first in LD_LIBRARY_PATH (else the system libpython loads: "'_thread.RLock' object has no attribute
    '_recursion_count'"), then the wheel's bundled libraries. The stub finds its sys.prefix by searching PATH
    for `python3`: this interpreter's bin folder goes first, so a virtualenv's packages (and .pth files) load."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise RuntimeError(f"the Triton Python backend needs a shared libpython; {sys.executable} is built "
                           "without one (e.g. pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)")
    env = os.environ.copy()
    libs = tritonserver_dist().parent.parent / "nvidia_pytriton.libs"  # the wheel's bundled shared libraries
    paths = [sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """The bundled `tritonserver` on a model repository, listening on `host` only. `start()` waits until the
    server and its models are ready; `stop()` sends SIGTERM (Triton drains in-flight requests, up to
    `exit_timeout_s`) and waits; a server that does not exit is killed. Ports default to free ones."""

    def __init__(self, repo, *, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, exit_timeout_s: int = 30,
                 log_path=None, extra_args=()):
        self.repo, self.host = Path(repo), host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.exit_timeout_s = int(exit_timeout_s)
        self.shm_prefix = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen | None = None
        self._backends: str | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def _backend_dir(self) -> Path:
        """A backends/python folder linking the wheel's Python backend and this interpreter's stub (Triton looks
        for the stub next to the backend library; PyTriton copies the whole server for the same reason)."""
        if self._backends is None:
            self._backends = tempfile.mkdtemp(prefix="ssdd_triton_backends_")
            python = Path(self._backends) / "python"
            python.mkdir()
            src = tritonserver_dist() / "backends" / "python"
            for f in ("libtriton_python.so", "triton_python_backend_utils.py"):
                (python / f).symlink_to(src / f)
            stub = python_stub()
            (python / stub.name).symlink_to(stub)
        return Path(self._backends)

    def command(self) -> list[str]:
        dist = tritonserver_dist()
        return [str(dist / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={self._backend_dir()}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                "--allow-metrics=true", "--allow-gpu-metrics=false", "--strict-readiness=true",
                f"--exit-timeout-secs={self.exit_timeout_s}",
                f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                *self.extra_args]

    def start(self, *, timeout_s: float = 120.0) -> TritonServer:
        out = open(self.log_path, "ab") if self.log_path else None  # None: Triton's log goes to our stdout
        try:
            self.proc = subprocess.Popen(self.command(), env=server_env(), stdout=out,
                                         stderr=None if out is None else subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)  # its own process group: the backend stubs
        finally:
            if self.log_path:
                out.close()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(f"tritonserver exited with status {code} while starting"
                                   + (f" (log: {self.log_path})" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver not ready after {timeout_s:.0f} s"
                                   + (f" (log: {self.log_path})" if self.log_path else ""))
            time.sleep(0.2)

    def stop(self, *, timeout_s: float | None = None) -> int | None:
        """SIGTERM, wait up to exit_timeout_s + 15 s, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            self._remove_backend_dir()
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.exit_timeout_s + 15 if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver (pid %d) did not exit: killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):  # stubs orphaned by a crash or kill
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group tritonserver led (start_new_session)
        self._remove_backend_dir()
        left = self.shm_files()  # a clean exit removes them; a crash or kill leaves them: the prefix is ours alone
        if left:
            log.warning("tritonserver (pid %d, status %s) left %d shared-memory regions: removing them",
                        self.proc.pid, self.proc.returncode, len(left))
            for name in left:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(Path("/dev/shm") / name)
        return self.proc.returncode

    def _remove_backend_dir(self) -> None:
        if self._backends is not None:
            shutil.rmtree(self._backends, ignore_errors=True)
            self._backends = None

    def shm_files(self) -> list[str]:
        """This server's Python-backend shared-memory regions still in /dev/shm."""
        shm = Path("/dev/shm")
        return sorted(p.name for p in shm.iterdir() if p.name.startswith(self.shm_prefix)) if shm.is_dir() else []

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------------------
# The model repository `ssdd serve` runs


_MODEL_PY = "from ssdd_runtime.serve import TritonPythonModel  # noqa: F401 (Triton looks the class up here)\n"


def _tensor(name: str, dtype: str, dims, optional: bool = False) -> str:
    return (f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]'
            + ("\n    optional: true" if optional else "") + "\n  }")


def serve_config(name: str, *, z_dim: int, options: dict, max_batch: int, max_queue_delay_us: int,
                 instances: int) -> str:
    """config.pbtxt of `ssdd_decode` or `ssdd_encode` (Python backend, dims without the batch dimension)."""
    if name == "ssdd_decode":
        inputs = [_tensor("latent", "TYPE_FP32", [z_dim, -1, -1]), _tensor("seed", "TYPE_INT64", [1], True),
                  _tensor("noise", "TYPE_FP32", [3, -1, -1], True), _tensor("steps", "TYPE_INT32", [1], True),
                  _tensor("t_pow_shift", "TYPE_FP32", [1], True)]
        outputs = [_tensor("image", "TYPE_FP32", [3, -1, -1]), _tensor("image_uint8", "TYPE_UINT8", [-1, -1, 3])]
    elif name == "ssdd_encode":
        inputs = [_tensor("image", "TYPE_FP32", [3, -1, -1])]
        outputs = [_tensor("latent_mean", "TYPE_FP32", [z_dim, -1, -1]),
                   _tensor("latent_logvar", "TYPE_FP32", [z_dim, -1, -1])]
    else:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    params = json.dumps({**options, "model": name}).replace("\\", "\\\\").replace('"', '\\"')
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(inputs) + "\n]", "output [\n" + ",\n".join(outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]",
        f'parameters: {{\n  key: "ssdd"\n  value: {{ string_value: "{params}" }}\n}}',
    ]) + "\n"


def check_serve_args(*, backend: str, max_batch: int, max_queue_delay_us: int, instances: int, max_size: int,
                     threads: int | None, engine=None, device=None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    for name, value, low in (("max_batch", max_batch, 1), ("instances", instances, 1), ("max_size", max_size, 1),
                             ("max_queue_delay_us", max_queue_delay_us, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if backend == "tensorrt":
        if engine is None:
            raise ValueError("backend tensorrt serves a decoder engine: pass engine= (--engine, built by "
                             "`ssdd export tensorrt`)")
        if not torch.cuda.is_available():
            raise ValueError("backend tensorrt needs an NVIDIA GPU (none here); or serve the exported model "
                             "in NVIDIA's Triton container (docs/guides/serving.md)")
    elif engine is not None:
        raise ValueError("engine= applies to backend tensorrt only")


def write_serve_repo(repo, *, checkpoint, backend: str = "torch", dtype: str = "fp32", device: str | None = None,
                     max_batch: int = 8, max_queue_delay_us: int = 2000, instances: int = 1,
                     max_size: int = MAX_SIZE, threads: int | None = None, engine=None) -> list[str]:
    """Write `ssdd_decode` (and `ssdd_encode` when the checkpoint has an encoder) into `repo`; returns their
    names. The checkpoint's header is read here (architecture, stride), so a bad file fails before a server."""
    from safetensors import safe_open

    from ssdd_runtime import weights

    check_serve_args(backend=backend, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                     instances=instances, max_size=max_size, threads=threads, engine=engine, device=device)
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    with safe_open(str(checkpoint), "pt") as f:  # shapes only: no tensor is read
        shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    enc, dec = weights.infer_config(shapes)
    names = ["ssdd_decode"] + (["ssdd_encode"] if enc is not None and backend != "tensorrt" else [])
    options = {"checkpoint": str(checkpoint), "backend": backend, "dtype": dtype, "device": device,
               "max_size": max_size, "threads": threads, "engine": None if engine is None else str(Path(engine))}
    for name in names:
        version = Path(repo) / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        (version / "model.py").write_text(_MODEL_PY, encoding="utf-8")
        (Path(repo) / name / "config.pbtxt").write_text(
            serve_config(name, z_dim=dec.z_dim, options=options, max_batch=max_batch,
                         max_queue_delay_us=max_queue_delay_us, instances=instances), encoding="utf-8")
    return names


def serve(*, checkpoint, backend: str = "torch", dtype: str = "fp32", device: str | None = None,
          max_batch: int = 8, max_queue_delay_us: int = 2000, instances: int = 1, max_size: int = MAX_SIZE,
          threads: int | None = None, engine=None, host: str = "127.0.0.1", http_port: int | None = None,
          grpc_port: int | None = None, metrics_port: int | None = None, exit_timeout_s: int = 30,
          ready=print) -> int:
    """Run the server until SIGTERM/SIGINT (raised here as KeyboardInterrupt by `ssdd`'s handler), then drain
    and stop it. Returns tritonserver's exit status (0 after a clean drain). The repository is a temporary
    folder removed on exit."""
    with tempfile.TemporaryDirectory(prefix="ssdd_serve_") as tmp:
        names = write_serve_repo(tmp, checkpoint=checkpoint, backend=backend, dtype=dtype, device=device,
                                 max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances,
                                 max_size=max_size, threads=threads, engine=engine)
        server = TritonServer(tmp, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                              exit_timeout_s=exit_timeout_s)
        try:
            server.start(timeout_s=600)
            ready(f"serving {', '.join(names)} (tritonserver pid {server.pid}): HTTP {server.http_url}, "
                  f"gRPC {server.grpc_url}, metrics {server.metrics_url}")
            while server.proc.poll() is None:
                time.sleep(0.5)
            return server.proc.returncode  # exited by itself
        except KeyboardInterrupt:
            code = server.stop()
            ready(f"tritonserver drained and exited with status {code}")
            return 0 if code == 0 else 1
        finally:
            server.stop()


# ---------------------------------------------------------------------------------------------------------
# The model, inside Triton's Python backend process


def load_served_model(options: dict):
    """The decoder/encoder object the backend runs: an `SSDD` (torch, compile), an OpenVINO model, or a
    `TensorRTDecoder`. Each has `.decode(z, steps=, noise=, generator=, t_pow_shift=)`."""
    from ssdd_runtime import SSDD, optimize

    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    backend = options["backend"]
    if backend == "tensorrt":
        from ssdd_runtime.export.tensorrt import TensorRTDecoder

        return TensorRTDecoder(options["engine"], device=options.get("device") or "cuda")
    model = SSDD.from_pretrained(options["checkpoint"], device=options.get("device") or "cpu",
                                 dtype=options.get("dtype") or "fp32",
                                 backend="openvino" if backend == "openvino" else "torch")
    if backend == "compile":
        model.decoder = optimize.compile(model.decoder, dynamic=True)
        if model.encoder is not None:
            model.encoder = optimize.compile(model.encoder, dynamic=True)
    return model


def _one(values: torch.Tensor, i: int):
    return values[i].reshape(-1)[0].item()  # item i of a (B, 1) input


class TritonPythonModel:
    """Triton Python-backend model (`ssdd_decode` or `ssdd_encode`, from the config's `ssdd` parameter).
    Each request is validated and answered on its own: an error answers that request only."""

    def initialize(self, args):
        import triton_python_backend_utils as pb

        self.pb = pb
        config = json.loads(args["model_config"])
        self.options = json.loads(config["parameters"]["ssdd"]["string_value"])
        self.name = self.options["model"]
        self.max_size = int(self.options["max_size"])
        self.model = load_served_model(self.options)
        self.stride = int(self.model.stride)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                outputs = self._decode(request) if self.name == "ssdd_decode" else self._encode(request)
                wanted = set(request.requested_output_names())
                responses.append(self.pb.InferenceResponse(output_tensors=[
                    self.pb.Tensor.from_dlpack(k, torch.utils.dlpack.to_dlpack(v.contiguous()))
                    for k, v in outputs.items() if not wanted or k in wanted]))
            except (ValueError, TypeError, RuntimeError, MemoryError, FloatingPointError) as e:
                text = f"{self.name}: " + (" ".join(str(e).split()) or type(e).__name__)
                # bad input -> INVALID_ARG (HTTP 400); a fault while decoding -> INTERNAL (HTTP 500)
                code = self.pb.TritonError.INVALID_ARG if isinstance(e, (ValueError, TypeError)) \
                    else self.pb.TritonError.INTERNAL
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(text, code)))
        return responses

    def _required(self, request, name: str) -> torch.Tensor:
        t = self._input(request, name)  # Triton lets a Python-backend request through without required inputs
        if t is None:
            raise ValueError(f"missing input {name!r}")
        return t

    def _input(self, request, name: str) -> torch.Tensor | None:
        # DLPack, not as_numpy()/Tensor(numpy): the wheel's stub reads numpy 1.x array descriptors (its numpy<2
        # pin); with numpy 2 it computes wrong byte sizes. DLPack carries dtype and shape without numpy.
        t = self.pb.get_input_tensor_by_name(request, name)
        return None if t is None else torch.utils.dlpack.from_dlpack(t.to_dlpack()).clone()

    def _check_size(self, H: int, W: int) -> None:
        if max(H, W) > self.max_size:
            raise ValueError(f"image {H}x{W} is over this server's size cap of {self.max_size} pixels per side")

    def _decode(self, request) -> dict:
        from ssdd_runtime.checks import _check_finite
        from ssdd_runtime.io import tensor_to_uint8

        z = self._required(request, "latent")
        B, _, h, w = z.shape
        self._check_size(h * self.stride, w * self.stride)
        _check_finite("latent", z)
        seed, noise = self._input(request, "seed"), self._input(request, "noise")
        steps, shift = self._input(request, "steps"), self._input(request, "t_pow_shift")
        if seed is not None and noise is not None:
            raise ValueError("send seed or noise, not both")
        for name, v in (("seed", seed), ("noise", noise), ("steps", steps), ("t_pow_shift", shift)):
            if v is not None and v.shape[0] != B:
                raise ValueError(f"{name} has batch {v.shape[0]}, latent has {B}")
        images = []
        for i in range(B):  # one item at a time: its image does not depend on what it was batched with
            kw = {}
            if steps is not None:
                kw["steps"] = _one(steps, i)
            if shift is not None:
                kw["t_pow_shift"] = _one(shift, i)
            if noise is not None:
                kw["noise"] = noise[i:i + 1]
            else:
                kw["generator"] = torch.Generator().manual_seed(0 if seed is None else _one(seed, i))
            image = self.model.decode(z[i:i + 1], **kw)
            if not bool(torch.isfinite(image).all()):
                raise FloatingPointError("the decoded image has non-finite values")
            images.append(image.float().cpu())
        image = torch.cat(images)
        return {"image": image, "image_uint8": torch.from_numpy(np.ascontiguousarray(tensor_to_uint8(image)))}

    def _encode(self, request) -> dict:
        from ssdd_runtime.checks import _check_finite

        x = self._required(request, "image")
        B, _, H, W = x.shape
        self._check_size(H, W)
        if H % self.stride or W % self.stride:
            raise ValueError(f"image {H}x{W} is not a multiple of the encoder's stride {self.stride}")
        _check_finite("image", x)
        means, logvars = [], []
        for i in range(B):
            post = self.model.encode(x[i:i + 1])
            means.append(post.mean.float().cpu())
            logvars.append(post.logvar.float().cpu())
        return {"latent_mean": torch.cat(means), "latent_logvar": torch.cat(logvars)}


# ---------------------------------------------------------------------------------------------------------
# Client


class Client:
    """A small client of `ssdd serve` (KServe v2 over HTTP with binary tensor data, or gRPC).

        with Client("http://127.0.0.1:8000") as c:
            images = c.decode(latents, seeds=[0, 1])      # (B, 3, H, W) fp32, item i seeded with seeds[i]

    url: "http://host:port", "grpc://host:port" or "host:port" (HTTP)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout_s: float = 600.0):
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "http", url
        if scheme not in ("http", "grpc"):
            raise ValueError(f"server URL must start with http:// or grpc://, got {url!r}")
        try:
            if scheme == "http":
                import tritonclient.http as tc

                self._client = tc.InferenceServerClient(rest, connection_timeout=timeout_s,
                                                        network_timeout=timeout_s)
            else:
                import tritonclient.grpc as tc

                self._client = tc.InferenceServerClient(rest)
        except ImportError as e:
            raise ImportError(f"the serving client needs tritonclient: {CLIENT_HINT}") from e
        self._tc, self.url, self.protocol, self.timeout_s = tc, url, scheme, timeout_s

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        tensors = []
        for name, a in inputs.items():
            t = self._tc.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
            t.set_data_from_numpy(a)
            tensors.append(t)
        requested = [self._tc.InferRequestedOutput(n) for n in outputs]
        try:
            kw = {} if self.protocol == "http" else {"client_timeout": self.timeout_s}
            result = self._client.infer(model, tensors, outputs=requested, **kw)
        except InferenceServerException as e:
            raise RuntimeError(f"{self.url}: {e.message()}") from None
        return {n: result.as_numpy(n).copy() for n in outputs}  # writable: tritonclient's buffers are read-only

    def decode(self, latents, *, seeds=None, noise=None, steps: int | None = None,
               t_pow_shift: float | None = None, uint8: bool = False) -> torch.Tensor:
        """latents (B, C, h, w) -> images (B, 3, H, W) fp32, or (B, H, W, 3) uint8 with uint8=True.
        seeds: one int per item (default 0 each) or None with `noise` (B, 3, H, W)."""
        z = np.ascontiguousarray(torch.as_tensor(latents).detach().cpu().numpy())
        if z.dtype != np.float32:
            raise TypeError(f"latents must be float32, got {z.dtype}")
        B = z.shape[0] if z.ndim else 0
        inputs = {"latent": z}
        if noise is not None:
            inputs["noise"] = np.ascontiguousarray(torch.as_tensor(noise).detach().cpu().numpy(), np.float32)
        if seeds is not None or noise is None:
            seeds = [0] * B if seeds is None else [int(s) for s in seeds]
            inputs["seed"] = np.asarray(seeds, dtype=np.int64).reshape(-1, 1)
        if steps is not None:
            inputs["steps"] = np.full((B, 1), steps, dtype=np.int32)
        if t_pow_shift is not None:
            inputs["t_pow_shift"] = np.full((B, 1), t_pow_shift, dtype=np.float32)
        name = "image_uint8" if uint8 else "image"
        return torch.from_numpy(self._infer("ssdd_decode", inputs, [name])[name])

    def encode(self, images):
        """images (B, 3, H, W) fp32 in [-1, 1] -> (latent_mean, latent_logvar)."""
        x = np.ascontiguousarray(torch.as_tensor(images).detach().cpu().numpy())
        out = self._infer("ssdd_encode", {"image": x}, ["latent_mean", "latent_logvar"])
        return torch.from_numpy(out["latent_mean"]), torch.from_numpy(out["latent_logvar"])

    def model_options(self, model: str = "ssdd_decode") -> dict:
        """The server's `ssdd` model parameters (checkpoint, backend, dtype, max_size, ...)."""
        cfg = self._client.get_model_config(model)
        if self.protocol == "grpc":
            return json.loads(cfg.config.parameters["ssdd"].string_value)
        return json.loads(cfg["parameters"]["ssdd"]["string_value"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
