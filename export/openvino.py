"""OpenVINO (CPU) runners for SSDD: the decoder network and the encoder, behind `SSDD.decode`/`encode` semantics.

Graphs (converted with `openvino.convert_model` straight from the PyTorch module, inputs/outputs fp32):
    decoder network, ONE evaluation: x (B, 3, H, W), t (B,) in [0, 1000], z (B, C, H/F, W/F) -> v (B, 3, H, W)
    encoder: image (B, 3, H, W) -> latent_mean, latent_logvar (B, C, H/F, W/F) (logvar clamped as in `encode`)
B, H, W are dynamic in the converted and compiled model: one compiled model serves every batch and resolution,
non-square included. (A static reshape of the decoder IR crashes OpenVINO 2026.4.1's CPU compile with a
segfault here, so no static mode is offered.) N-step decodes run `sampler.euler_sample` with the compiled
network as `net`, so the time grid, the fp32 Euler state and the noise are the PyTorch path's own.

Conversion path: `convert_model` on the torch module of `onnx.prepare_for_export(model)` (a plain fp32 copy;
OpenVINO fuses its MatMul-Softmax-MatMul attention into ScaledDotProductAttention either way). Measured against
OpenVINO reading the graph of `export_onnx(steps=1)`: same accuracy (max abs ~9e-6 vs PyTorch), the direct path
~13% faster for SSDD-S 128x128 here (0.210 vs 0.243 s, f32, 2 threads) and ~6x quicker to convert (7.7 s vs
46 s), and the ONNX graph is the unrolled sampler, not the one evaluation the Euler loop needs.

Precision: INFERENCE_PRECISION_HINT is always passed (the CPU plugin defaults to bf16 where the CPU has it).
"f32" matches PyTorch fp32 to ~1e-5; "bf16" runs matmuls/convs in bf16 (~45 dB PSNR vs f32 on test weights);
"int8" (NNCF post-training quantization, `calibration=` latents required) is a stretch option whose quality on
real weights is unverified. A bf16/int8 result with non-finite values is retried once in f32 (as `SSDD` does).

Disk cache (default `$XDG_CACHE_HOME/ssdd-runtime/openvino`, else `~/.cache/ssdd-runtime/openvino`):
    ir/<part>-<enc>-<dec>-<weights sha256[:16]>-v<FORMAT>.xml/.bin   converted model, written atomically
    ir/<IR stem>.sha256                                             sha256 of the .xml and .bin + OpenVINO version
    compiled/<IR stem>-dynamic-<precision>/                          OpenVINO's CACHE_DIR for the compiled blob
    compiled/<IR stem>-dynamic-<precision>.sha256                    sha256 of the blob files after the compile
The cache key names the weights, but a file can change under its name (disk errors, a partial copy, another
OpenVINO version writing the cache). Every cached file is therefore checked against its recorded sha256
(`verified_cache`) before use: an IR that fails is rebuilt, a compiled blob that fails is deleted and recompiled,
each with a RuntimeWarning naming the file.
Verified here (AMD Zen 5, OpenVINO 2026.4.1): tests/test_export_openvino.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from ssdd_runtime.checks import (_check_finite, _check_tensor, _chunks, check_image_range, check_sampler_args,
                                 refuse_tile, start_noise)
from ssdd_runtime.model import DiagonalGaussian, SSDDModule
from ssdd_runtime.sampler import T_POW_SHIFT, TIMESCALE, euler_sample, randn

log = logging.getLogger(__name__)

OPENVINO_HINT = "pip install 'ssdd-runtime[openvino]'"
PRECISIONS = {"f32": "f32", "fp32": "f32", "float32": "f32", torch.float32: "f32",
              "bf16": "bf16", "bfloat16": "bf16", torch.bfloat16: "bf16", "int8": "int8"}
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
PARTS = ("decoder", "encoder")
FORMAT = 2  # 2: IR files carry a .sha256 record. Bump when the graphs change: old IR files are never read again
DECODER_INPUTS, ENCODER_INPUTS = ("x", "t", "z"), ("image",)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_cache(record: Path, files: list[Path]) -> None:
    """Write `record` (JSON: the OpenVINO version and the sha256 of each file, by name) atomically."""
    import json

    from ssdd_runtime.io import write_text_atomic

    ov = _require_openvino()
    write_text_atomic(record, json.dumps({"openvino": ov.__version__,
                                          "files": {f.name: _sha256(f) for f in files}}, indent=1) + "\n")


def verified_cache(record: Path, files: list[Path]) -> str | None:
    """The one check of a cached file set against its `record_cache` record: None if every file is present and
    matches, with the same OpenVINO version; else why not (the caller rebuilds and warns)."""
    import json

    ov = _require_openvino()
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        version, digests = saved["openvino"], saved["files"]
    except FileNotFoundError:
        return f"{record.name} (its sha256 record) is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{record} is unreadable ({type(e).__name__})"
    if version != ov.__version__:
        return f"it was written by OpenVINO {version}, this is {ov.__version__}"
    if sorted(digests) != sorted(f.name for f in files):
        return f"its files {sorted(f.name for f in files)} differ from those recorded in {record.name}"
    for f in files:
        try:
            if _sha256(f) != digests[f.name]:
                return f"{f} does not match its recorded sha256 (corrupted?)"
        except OSError as e:
            return f"{f} is unreadable ({e.strerror or type(e).__name__})"
    return None


def _drop(paths, why: str, what: str) -> None:
    """Warn that a cached `what` fails verification and delete its files (their rebuild follows)."""
    import shutil

    warnings.warn(f"OpenVINO cache: the {what} is rebuilt because {why}", RuntimeWarning, stacklevel=3)
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _cached_ir(xml: Path) -> bool:
    """True if the IR `xml` (+ .bin) is cached and verified. A damaged one is removed with a warning, together
    with the compiled blobs made from it, so the caller converts again."""
    files = [xml, xml.with_suffix(".bin")]
    record = xml.with_suffix(".sha256")
    if not any(f.exists() for f in files + [record]):
        return False
    why = verified_cache(record, files)
    if why is None:
        return True
    blobs = list((xml.parent.parent / "compiled").glob(f"{xml.stem}-dynamic-*"))
    _drop(files + [record] + blobs, why, f"converted model {xml} ({xml.parent})")
    return False


def _require_openvino():
    try:
        import openvino as ov
    except ImportError as e:
        raise ImportError(f"the OpenVINO backend needs the `openvino` package: {OPENVINO_HINT}") from e
    return ov


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: expected f32, bf16 or int8 (fp16 is not offered: "
                         "OpenVINO's CPU plugin has no fp16 compute on this hardware class)")
    return PRECISIONS[precision]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssdd-runtime" / "openvino"


def weights_hash(module: nn.Module) -> str:
    """sha256 over names, shapes, dtypes and bytes of `module`'s state dict: the checkpoint part of the cache key."""
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Conversion (PyTorch -> OpenVINO IR on disk) and compilation


class DecoderNet(nn.Module):
    """(x, t, z) -> v: one evaluation of the decoder network, the graph the Euler loop calls."""

    def __init__(self, model: SSDDModule):
        super().__init__()
        self.decoder = model.decoder

    def forward(self, x, t, z):
        return self.decoder(x, t, z)


class EncoderNet(nn.Module):
    """image -> (latent_mean, latent_logvar), logvar clamped to [-30, 20] as in `encode`."""

    def __init__(self, model: SSDDModule):
        super().__init__()
        self.model = model

    def forward(self, image):
        post = self.model.encode(image)
        return post.mean, post.logvar


def ir_path(model: SSDDModule, part: str, cache_dir=None) -> Path:
    if part not in PARTS:
        raise ValueError(f"part must be 'decoder' or 'encoder', got {part!r}")
    digest = weights_hash(model.decoder if part == "decoder" else model.encoder)
    name = f"{part}-{model.encoder_config.name}-{model.decoder_config.size}-{digest}-v{FORMAT}.xml"
    return Path(cache_dir or default_cache_dir()) / "ir" / name


def convert(model: SSDDModule, part: str = "decoder", *, cache_dir=None) -> Path:
    """The OpenVINO IR (.xml + .bin, fp32 weights, dynamic B/H/W) of `part`, converted unless already cached."""
    from ssdd_runtime.export.onnx import prepare_for_export

    ov = _require_openvino()
    xml = ir_path(model, part, cache_dir)
    if _cached_ir(xml):
        return xml
    m = prepare_for_export(model)
    F, C = m.stride, m.decoder_config.z_dim
    # Example sizes != 1 and non-square so that nothing is specialised by the tracer.
    if part == "decoder":
        net = DecoderNet(m)
        example = (torch.randn(2, 3, 4 * F, 6 * F), torch.full((2,), 500.0), torch.randn(2, C, 4, 6))
        shapes = [[-1, 3, -1, -1], [-1], [-1, C, -1, -1]]
        names = DECODER_INPUTS
    else:
        net = EncoderNet(m)
        example = (torch.rand(2, 3, 4 * F, 6 * F) * 2 - 1,)
        shapes = [[-1, 3, -1, -1]]
        names = ENCODER_INPUTS
    ov_model = convert_module(net, example, shapes=shapes, names=names)
    ov_model.set_rt_info(part, ["ssdd", "part"])
    ov_model.set_rt_info(str(F), ["ssdd", "stride"])
    _save_atomic(ov, ov_model, xml)
    log.info("converted %s (%s/%s) to %s", part, m.encoder_config.name, m.decoder_config.size, xml)
    return xml


def convert_module(net: nn.Module, example: tuple[torch.Tensor, ...], *, shapes=None, names=None):
    """`openvino.convert_model` of a torch module (traced on `example`) -> ov.Model, fp32, in memory.

    shapes: one partial shape per input (-1 = dynamic); default: batch, height and width dynamic
    ((B, C, H, W) -> [-1, C, -1, -1], (B,) -> [-1]). names: tensor names of the inputs. Also used by the
    benchmark's `openvino` backends (SSDD decoder, KL-VAE decoder, encoder)."""
    ov = _require_openvino()
    if shapes is None:
        shapes = [[-1, a.shape[1], -1, -1] if a.dim() == 4 else [-1] * a.dim() for a in example]
    # convert_model traces the module. The TracerWarnings are the kernels' shape-constraint checks, which hold
    # for every valid input (the dynamic-shape tests run other sizes through the same graph).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        ov_model = ov.convert_model(net.eval(), example_input=example,
                                    input=[ov.PartialShape(s) for s in shapes])
    for port, name in zip(ov_model.inputs, names or ()):
        port.get_tensor().set_names({name})
    return ov_model


def _save_atomic(ov, ov_model, xml: Path) -> None:
    """Write `xml` and its .bin under temporary names in the same folder, then rename (.bin first, so a
    complete .xml always has its weights), then their sha256 record (`_cached_ir` reads it)."""
    xml.parent.mkdir(parents=True, exist_ok=True)
    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.xml")
    try:
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)  # save_model compresses to fp16 by default
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
        record_cache(xml.with_suffix(".sha256"), [xml, xml.with_suffix(".bin")])  # last: a complete IR is recorded
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)


def compile_config(precision: str, *, threads: int | None = None, hint: str = "LATENCY",
                   cache_dir=None) -> dict:
    """The CPU plugin properties: explicit precision, hint, threads, and the CACHE_DIR of the compiled blob."""
    precision = check_precision(precision)
    if hint not in HINTS:
        raise ValueError(f"unknown performance hint {hint!r}: expected one of {', '.join(HINTS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    # int8: the quantized ops run int8 (VNNI); everything NNCF left in float stays f32.
    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision, "PERFORMANCE_HINT": hint}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def compile_ir(xml, *, precision: str = "f32", threads: int | None = None, hint: str = "LATENCY",
               cache: bool = True):
    """Compile an IR written by `convert` (or `quantize`) for the CPU, shapes dynamic. With cache=True the blob
    goes to compiled/<IR stem>-dynamic-<precision>/ beside the IR folder and is reused by later compiles.
    `xml` may also be an in-memory ov.Model (`convert_module`), compiled without a blob cache."""
    ov = _require_openvino()
    precision = check_precision(precision)
    if isinstance(xml, ov.Model):
        return ov.Core().compile_model(xml, "CPU", compile_config(precision, threads=threads, hint=hint))
    xml = Path(xml)
    blob_dir = xml.parent.parent / "compiled" / f"{xml.stem}-dynamic-{precision}" if cache else None
    config = compile_config(precision, threads=threads, hint=hint, cache_dir=blob_dir)
    record = blob_dir.with_name(f"{blob_dir.name}.sha256") if cache else None
    if cache and blob_dir.is_dir() and any(blob_dir.iterdir()):
        why = verified_cache(record, _blob_files(blob_dir))
        if why is not None:
            _drop([blob_dir, record], why, f"compiled model in {blob_dir}")
    try:
        # From the file, not an ov.Model: a cache hit then skips reading the IR.
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise RuntimeError(f"OpenVINO could not compile {xml}: {first}. If the cache is damaged, delete "
                           f"{xml.parent.parent} (it is rebuilt on the next load)") from e
    if cache and blob_dir.is_dir() and any(blob_dir.iterdir()):  # verified above, or just written: record
        record_cache(record, _blob_files(blob_dir))  # (another thread count adds a blob to the same folder)
    return compiled


def _blob_files(blob_dir: Path) -> list[Path]:
    return sorted(f for f in blob_dir.iterdir() if f.is_file() and not f.name.startswith("."))


# ---------------------------------------------------------------------------------------------------------
# Runners


class OpenVINONetwork:
    """A compiled model called with torch tensors: fp32 CPU numpy in, torch fp32 out. Thread-safe (one infer
    request per call). Decoder: `net(x, t, z) -> v`; encoder: `net(image) -> (mean, logvar)`."""

    def __init__(self, compiled, precision: str):
        self.compiled, self.precision = compiled, precision

    @property
    def inference_precision(self) -> str:
        """The precision the plugin computes in ("f32", "bf16"): the CPU plugin runs a "bf16" request in f32 on a
        CPU without bf16 instructions (no BF16 in OPTIMIZATION_CAPABILITIES)."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    @property
    def loaded_from_cache(self) -> bool:
        return bool(self.compiled.get_property("LOADED_FROM_CACHE"))

    def __call__(self, *inputs: torch.Tensor):
        feeds = [t.detach().to("cpu", torch.float32).contiguous().numpy() for t in inputs]
        out = self.compiled.create_infer_request().infer(feeds)
        outs = [torch.from_numpy(out[port]) for port in self.compiled.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)


class _Part:
    """Shared by decoder and encoder: the compiled network plus the lazily compiled f32 twin used when a
    bf16/int8 result is non-finite."""

    def __init__(self, xml, *, precision="f32", threads=None, hint="LATENCY", stride=None, cache=True,
                 fp32_xml=None):
        self.xml, self.stride = Path(xml), stride
        self.precision = check_precision(precision)
        self._options = dict(threads=threads, hint=hint, cache=cache)
        self._fp32_xml = Path(fp32_xml) if fp32_xml is not None else self.xml
        self.net = OpenVINONetwork(compile_ir(self.xml, precision=self.precision, **self._options), self.precision)
        if self.precision == "bf16" and self.net.inference_precision != "bf16":
            caps = ", ".join(_require_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            warnings.warn(f"OpenVINO precision 'bf16' runs in {self.net.inference_precision} on this CPU (no bf16 "
                          f"support; OPTIMIZATION_CAPABILITIES: {caps}): the output is the f32 result",
                          RuntimeWarning, stacklevel=3)
        self._fp32_net = self.net if self.precision == "f32" else None
        self._lock = threading.Lock()

    def _fp32(self) -> OpenVINONetwork:
        with self._lock:
            if self._fp32_net is None:
                self._fp32_net = OpenVINONetwork(compile_ir(self._fp32_xml, precision="f32", **self._options), "f32")
            return self._fp32_net

    def _with_fp32_fallback(self, what: str, fn):
        out = fn(self.net)
        if _all_finite(out):
            return out
        if self.precision == "f32":
            raise FloatingPointError(f"{what} produced non-finite values in f32 from finite inputs")
        warnings.warn(f"OpenVINO {what} in {self.precision} produced non-finite values; retrying this batch in f32",
                      RuntimeWarning, stacklevel=3)
        out = fn(self._fp32())
        if not _all_finite(out):
            raise FloatingPointError(f"{what} produced non-finite values even in f32")
        return out


def _all_finite(out) -> bool:
    tensors = out if isinstance(out, tuple) else (out,)
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class OpenVINODecoder(_Part):
    """`decode` of `SSDD` on a compiled OpenVINO decoder network (one evaluation per Euler step)."""

    def __init__(self, xml, *, z_dim: int, **kwargs):
        super().__init__(xml, **kwargs)
        self.z_dim = z_dim

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, steps: int = 1, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None, t_pow_shift: float = T_POW_SHIFT,
               batch_size: int | None = None, tile: int | None = None) -> torch.Tensor:
        """z: (B, C, h, w) -> images (B, 3, h*F, w*F) fp32 (see `SSDD.decode`). Tensors come back on the CPU.
        `tile` is refused: the compiled network evaluates whole images (tiled decoding runs the PyTorch decoder
        layer by layer with whole-image GroupNorm statistics, tiled.py); bound memory with `batch_size`."""
        refuse_tile(tile, "OpenVINO")
        _check_tensor("latent", z, rank=4)
        if z.shape[1] != self.z_dim:
            raise ValueError(f"latent must have {self.z_dim} channels (B, {self.z_dim}, h, w), "
                             f"got shape {tuple(z.shape)}")
        _check_finite("latent", z)
        steps, t_pow_shift = check_sampler_args(steps, t_pow_shift, generator)
        noise = start_noise(z, self.stride, noise, generator, "cpu")
        z, noise = z.to("cpu", torch.float32), noise.to("cpu", torch.float32)
        out = [self._with_fp32_fallback("decode", lambda net: euler_sample(net, zb, nb, steps=steps,
                                                                           t_pow_shift=float(t_pow_shift)))
               for zb, nb in zip(_chunks(z, batch_size), _chunks(noise, batch_size))]
        return torch.cat(out)


class OpenVINOEncoder(_Part):
    """`encode` of `SSDD` on a compiled OpenVINO encoder."""

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, batch_size: int | None = None) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of the stride -> fp32 latent distribution (CPU)."""
        _check_tensor("image", x, rank=4)
        if x.shape[1] != 3:
            raise ValueError(f"image must have 3 channels (B, 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(f"image height and width must be multiples of the encoder stride {self.stride}, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        _check_finite("image", x)
        check_image_range(x)
        moments = [self._with_fp32_fallback("encode", lambda net: net(xb)) for xb in _chunks(x, batch_size)]
        mean = torch.cat([m for m, _ in moments])
        logvar = torch.cat([lv for _, lv in moments])
        return DiagonalGaussian(mean, logvar)


class OpenVINOModel:
    """`SSDD`'s encode/decode on OpenVINO (CPU). Build with `to_openvino`. Parts are compiled on first use."""

    def __init__(self, encoder_config, decoder_config, xml: dict[str, Path], options: dict,
                 fp32_xml: dict[str, Path] | None = None):
        self.encoder_config, self.decoder_config = encoder_config, decoder_config
        self.xml, self.options = xml, options
        self.fp32_xml = fp32_xml or xml
        self.precision = options["precision"]
        self.checkpoint: str | None = None  # the source file, as `SSDD.checkpoint`
        self._parts: dict[str, _Part] = {}
        self._lock = threading.Lock()

    @property
    def stride(self) -> int:
        return self.encoder_config.stride

    @property
    def encoder_name(self) -> str | None:  # as SSDD.encoder_name (latent metadata, CLI)
        return self.encoder_config.name if self.encoder_config is not None else None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def part(self, name: str) -> _Part:
        with self._lock:
            if name not in self._parts:
                cls, extra = ((OpenVINODecoder, {"z_dim": self.decoder_config.z_dim}) if name == "decoder"
                              else (OpenVINOEncoder, {}))
                self._parts[name] = cls(self.xml[name], stride=self.stride, fp32_xml=self.fp32_xml[name],
                                        **extra, **self.options)
            return self._parts[name]

    def decode(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.part("decoder").decode(z, **kwargs)

    def encode(self, x: torch.Tensor, **kwargs) -> DiagonalGaussian:
        return self.part("encoder").encode(x, **kwargs)

    def __repr__(self) -> str:
        return (f"OpenVINOModel(encoder={self.encoder_config.name}, decoder={self.decoder_config.size}, "
                f"precision={self.precision})")


def to_openvino(model: SSDDModule, *, precision="f32", threads: int | None = None, hint: str = "LATENCY",
                cache_dir=None, cache: bool = True,
                calibration: torch.Tensor | None = None) -> OpenVINOModel:
    """`model` (an `SSDD` or `SSDDModule`, any device/dtype) on OpenVINO's CPU plugin.

    precision: "f32" | "bf16" | "int8" (int8 needs `calibration`, a (N, C, h, w) batch of latents, and nncf).
    threads: INFERENCE_NUM_THREADS (None: the plugin's default, one per physical core). hint: PERFORMANCE_HINT.
    cache_dir: IR and compiled-blob cache (default `default_cache_dir()`); cache=False skips the compiled blobs.
    The IRs are converted here (once per checkpoint); each part is compiled on its first encode/decode.
    """
    if not isinstance(model, SSDDModule):
        raise TypeError(f"model must be an SSDD or SSDDModule, got {type(model).__name__}")
    if model.encoder_config is None:
        raise ValueError("to_openvino converts SSDD's own encoder and decoder; this model is decoder-only (or has "
                         "an external encoder), which the OpenVINO backend does not support yet")
    precision = check_precision(precision)
    if precision == "int8" and calibration is None:
        raise ValueError("precision='int8' needs calibration=latents (N, C, h, w) for NNCF's quantization")
    if precision != "int8" and calibration is not None:
        raise ValueError("calibration= is only used with precision='int8'")
    compile_config(precision, threads=threads, hint=hint)  # validate before the (slow) conversion
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise NotADirectoryError(f"OpenVINO cache_dir {cache_dir} is a file, expected a folder")
    xml = {part: convert(model, part, cache_dir=cache_dir) for part in PARTS}
    fp32_xml = dict(xml)
    if precision == "int8":
        xml["decoder"] = quantize(xml["decoder"], calibration, stride=model.stride)
    options = dict(precision=precision, threads=threads, hint=hint, cache=cache)
    out = OpenVINOModel(model.encoder_config, model.decoder_config, xml, options, fp32_xml)
    out.checkpoint = getattr(model, "checkpoint", None)
    return out


def quantize(xml, calibration: torch.Tensor, *, stride: int, seed: int = 0) -> Path:
    """int8 decoder IR from NNCF post-training quantization (stretch; quality on real weights unverified).

    calibration: (N, C, h, w) latents; each gives one sample of the single-step decoder input (x = noise drawn
    from Generator(seed + i), t = 1000, z). Multi-step decodes see other (x, t) and are not calibrated for.
    Written next to `xml` as <stem>-int8-<sha256 of the calibration latents and seed>.xml, once.
    """
    ov = _require_openvino()
    try:
        import nncf
    except ImportError as e:
        raise ImportError(f"precision='int8' needs the `nncf` package: pip install nncf ({OPENVINO_HINT})") from e
    _check_tensor("calibration", calibration, rank=4)
    _check_finite("calibration", calibration)
    z = calibration.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(z.numpy().tobytes() + f":{seed}".encode()).hexdigest()[:12]
    out = Path(xml).with_name(f"{Path(xml).stem}-int8-{digest}.xml")
    if _cached_ir(out):
        return out
    N, _, h, w = z.shape
    samples = []
    for i in range(N):
        noise = randn((1, 3, h * stride, w * stride), generator=torch.Generator().manual_seed(seed + i))
        samples.append([noise.numpy(), (torch.ones(1) * TIMESCALE).numpy(), z[i:i + 1].numpy()])
    model = ov.Core().read_model(str(xml))
    quantized = nncf.quantize(model, nncf.Dataset(samples), subset_size=N, model_type=nncf.ModelType.TRANSFORMER)
    _save_atomic(ov, quantized, out)
    log.info("quantized %s to int8 with %d calibration latents: %s", xml, N, out)
    return out
