"""The public `SSDD` class: loading, input validation, dtype policy, batching and noise around `SSDDModule`."""
from __future__ import annotations

import os
import threading
import warnings

import torch

from ssdd_runtime import optimize, tiled, weights
from ssdd_runtime.checks import (MAX_STEPS, _check_finite, _check_tensor, _chunks,  # noqa: F401 (re-exported)
                                 check_image_range, check_sampler_args, start_noise)
from ssdd_runtime.model import DiagonalGaussian, FusedOp, SSDDModule, decoder_config, encoder_config
from ssdd_runtime.sampler import T_POW_SHIFT

_FP32_LOCK = threading.Lock()  # guards the lazily built fp32 copy used by the non-finite fallback

BACKENDS = ("torch", "openvino")  # SSDD.to_backend / from_pretrained(backend=)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def check_device(device) -> torch.device | None:
    """`device` (None, a string or a torch.device) -> torch.device, ValueError if it is not a device this build
    and machine can use (an unknown type, CUDA on a CPU-only build, an index beyond the devices present)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; expected e.g. cpu, cuda, cuda:1, mps") from None
    if d.type == "meta":
        raise ValueError("device 'meta' holds no data: use cpu or cuda")
    try:
        torch.empty(0, device=d)
    except (RuntimeError, AssertionError) as e:  # torch's "not compiled with CUDA", "invalid device ordinal"
        raise ValueError(f"device {str(device)!r} is not available here: {str(e).strip().splitlines()[0]}") from None
    return d


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


class SSDD(SSDDModule):
    """SSDD image tokenizer: `encode` images to latents, `decode` latents to images.

    Weights run in fp32, bf16 or fp16; norm statistics, softmax, the time embedding, the noise and the Euler
    state stay fp32. Outputs (latent moments, images) are fp32. Build with `from_pretrained` or
    `from_state_dict`; the module is in eval mode with gradients off.
    """

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, filename: str | None = None, *, revision: str | None = None,
                        encoder=None, decoder: str | None = None, device=None,
                        dtype: torch.dtype | str | None = None, local_files_only: bool = False,
                        cache_dir: str | os.PathLike | None = None, use_triton: bool | None = None,
                        backend: str = "torch") -> SSDD:
        """Load an official SSDD checkpoint from a local `.safetensors` path or a Hub repo (`facebook/SSDD` +
        `filename`). The architecture comes from the tensor shapes; `encoder=`/`decoder=` are checked against it.
        backend="openvino": loaded in fp32 on the CPU, returned as `to_backend("openvino", precision=dtype)`.

        Decoder-only files (the SDVAE decoders) load as decode-only models, or paired with an external encoder:
        `encoder="sdvae"` loads diffusers' `stabilityai/sd-vae-ft-mse` (with this call's `cache_dir` and
        `local_files_only`); for another folder, Hub id or revision pass `ssdd_runtime.sdvae.load_encoder(...)`."""
        on_gpu = (_check_backend(backend) != "torch" and device is not None  # a bad device: check_device below
                  and torch.device(device).type != "cpu")
        precision = check_backend(backend, dtype, gpu=f"device={device!r}" if on_gpu else None)
        if backend != "torch":  # fp32 weights on the CPU; the backend takes the precision (fp16 failed above)
            model = cls.from_pretrained(source, filename, revision=revision, encoder=encoder, decoder=decoder,
                                        local_files_only=local_files_only, cache_dir=cache_dir, use_triton=False)
            return model.to_backend(backend, precision=precision)
        check_device(device)  # before reading a checkpoint
        path = weights.resolve_checkpoint(source, filename, revision=revision, cache_dir=cache_dir,
                                          local_files_only=local_files_only)
        state_dict = weights.read_state_dict(path)  # a bad file fails before the VAE is fetched
        if encoder == "sdvae" and not any(k.startswith("encoder.") for k in state_dict):  # else: refused below
            from ssdd_runtime import sdvae

            encoder = sdvae.load_encoder(cache_dir=cache_dir, local_files_only=local_files_only)
        model = cls.from_state_dict(state_dict, encoder=encoder, decoder=decoder, device=device,
                                    dtype=dtype, use_triton=use_triton, source=str(path))
        model.checkpoint = str(path)
        return model

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], *, encoder=None, decoder: str | None = None,
                        device=None, dtype: torch.dtype | str | None = None, use_triton: bool | None = None,
                        source: str = "state dict") -> SSDD:
        """`encoder`: None, an encoder name checked against the file ("f8c4"...), or for a decoder-only state
        dict "sdvae" / an external encoder object (`ssdd_runtime.sdvae.load_encoder()`) to pair with it."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
        device = check_device(device)
        enc, dec = weights.infer_config(state_dict)
        external = None
        if enc is None:  # decoder-only
            if encoder == "sdvae":
                from ssdd_runtime import sdvae

                encoder = sdvae.load_encoder()
            if isinstance(encoder, str):
                encoder_config(encoder)  # validates the name
                raise ValueError(f"encoder={encoder!r} was asked for but {source} holds decoder weights only (no "
                                 "encoder.* tensors); pair it with encoder='sdvae' (the SDVAE files) or load it "
                                 "decode-only (encoder=None)")
            if encoder is not None:
                cfg = getattr(encoder, "config", None)
                if not callable(getattr(encoder, "encode", None)) or cfg is None:
                    raise TypeError(f"encoder must be None, a name or an encoder object with .encode and .config "
                                    f"(ssdd_runtime.sdvae.load_encoder()), got {type(encoder).__name__}")
                if cfg.z_dim != dec.z_dim:
                    raise ValueError(f"{encoder!r} gives {cfg.z_dim}-channel latents but the decoder of {source} "
                                     f"reads {dec.z_dim} channels")
                external = encoder
        elif encoder is not None:
            if not isinstance(encoder, str) or encoder == "sdvae":
                raise ValueError(f"encoder={encoder!r} was asked for but {source} holds its own {enc.name} encoder "
                                 "(encoder.* tensors)")
            if encoder_config(encoder) != enc:
                raise ValueError(f"encoder={encoder!r} was asked for but {source} holds an {enc.name} encoder")
        if decoder is not None:
            decoder_config(decoder)  # validates the name
            if decoder != dec.size:
                raise ValueError(f"decoder={decoder!r} was asked for but {source} holds decoder size {dec.size!r}")
        with torch.device("meta"):
            model = cls(enc, dec, stride=None if external is None else external.config.stride)
        weights.check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state_dict, source=source)
        model.load_state_dict(state_dict, strict=True, assign=True)
        model.to(device=device, dtype=as_dtype(dtype)).eval().requires_grad_(False)
        optimize.use_kernels(model, use_triton)
        model.checkpoint = None
        if external is not None:
            model.encoder = external  # a plain attribute, not a submodule: the state dict stays decoder.* only
        return model

    def to_backend(self, name: str, *, precision=None, threads: int | None = None, cache_dir=None):
        """This model on an inference backend. "torch": `self`. "openvino": an `OpenVINOModel` (CPU) with the same
        encode/decode, from `export.openvino.to_openvino(self, precision=...)`; precision "f32" (default), "bf16"
        or a torch dtype; threads: OpenVINO's thread count; cache_dir: its IR and compiled-model cache."""
        if _check_backend(name) == "torch":
            if precision is not None or threads is not None or cache_dir is not None:
                raise ValueError("precision/threads/cache_dir apply to backend 'openvino'; for torch use .to(dtype)")
            return self
        from ssdd_runtime.export.openvino import to_openvino

        return to_openvino(self, precision="f32" if precision is None else precision, threads=threads,
                           cache_dir=cache_dir)

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def encoder_name(self) -> str | None:
        """"f8c4"... for SSDD's own encoder, "sdvae" for a paired SD-VAE, None for a decode-only model."""
        if self.encoder_config is not None:
            return self.encoder_config.name
        return None if self.encoder is None else self.encoder.config.name

    def extra_repr(self) -> str:
        enc = self.encoder_name or f"none (decode-only, stride {self.stride})"
        return f"encoder={enc}, decoder={self.decoder_config.size}"

    # -- encode -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, *, batch_size: int | None = None) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1], H and W multiples of the encoder stride -> latent distribution with
        fp32 `.mean`/`.logvar` of shape (B, C, H/F, W/F); `.mode()` is what the decoder consumes."""
        if self.encoder is None:
            raise ValueError(f"{self.checkpoint or 'this model'} is a decoder-only checkpoint (decoder.* tensors "
                             "only): it cannot encode. Pair it with an encoder: SSDD.from_pretrained(..., "
                             "encoder='sdvae') for the SDVAE decoders (or encoder=ssdd_runtime.sdvae.load_encoder("
                             "<folder or Hub id>))")
        _check_tensor("image", x, rank=4)
        if x.shape[1] != 3:
            raise ValueError(f"image must have 3 channels (B, 3, H, W), got shape {tuple(x.shape)}")
        F_ = self.stride
        if x.shape[2] % F_ or x.shape[3] % F_:
            raise ValueError(f"image height and width must be multiples of the encoder stride {F_}, "
                             f"got {x.shape[2]}x{x.shape[3]}")
        _check_finite("image", x)
        check_image_range(x)
        own = self.encoder_config is not None  # an external encoder keeps its own dtype (sdvae.py: fp32)
        moments = [self._with_fp32_fallback("encode", lambda m, xb: SSDDModule.encode(m, xb.to(m.dtype) if own
                                                                          else xb), xb.to(self.device))
                   for xb in _chunks(x, batch_size)]
        mean = torch.cat([m.mean.float() for m in moments]).contiguous()
        logvar = torch.cat([m.logvar.float() for m in moments]).contiguous()
        return DiagonalGaussian(mean, logvar)

    # -- decode -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, z: torch.Tensor, *, steps: int = 1, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None, t_pow_shift: float = T_POW_SHIFT,
               batch_size: int | None = None, tile: int | None = None) -> torch.Tensor:
        """z: (B, C, h, w) latents -> images (B, 3, h*F, w*F), fp32, nominally in [-1, 1] but unclamped.

        `steps` Euler steps on the time grid t_k = (1 - k/steps)^t_pow_shift (1 = the single-step mode).
        The start noise is `noise` if given, else drawn in fp32 from `generator` (or the global RNG).
        `tile`: decode in tiles of `tile` x `tile` latent pixels (memory of the full- and half-resolution layers
        bounded by the tile; GroupNorm statistics of the whole image; several passes per step: see tiled.py).
        """
        _check_tensor("latent", z, rank=4)
        C = self.decoder_config.z_dim
        if z.shape[1] != C:
            raise ValueError(f"latent must have {C} channels (B, {C}, h, w) for this "
                             f"{self.encoder_name or 'decode-only'} model, got shape {tuple(z.shape)}")
        _check_finite("latent", z)
        steps, t_pow_shift = check_sampler_args(steps, t_pow_shift, generator)
        if tile is not None:
            tiled.check_tile(tile)
        noise = start_noise(z, self.stride, noise, generator, self.device)  # whole batch first: chunk-invariant
        def run(m, zb, nb):
            if tile is not None:
                return tiled.sample(m.decoder, zb.to(m.dtype), nb, steps=steps, t_pow_shift=float(t_pow_shift),
                                    tile=tile)
            return SSDDModule.sample(m, zb.to(m.dtype), nb, steps=steps, t_pow_shift=float(t_pow_shift))

        out = [self._with_fp32_fallback("decode", run, zb.to(self.device, torch.float32),
                                        nb.to(self.device, torch.float32))
               for zb, nb in zip(_chunks(z, batch_size), _chunks(noise, batch_size))]
        return torch.cat(out)

    # -- precision --------------------------------------------------------------------------------------------

    def _with_fp32_fallback(self, what: str, fn, *args):
        """fn(module, *args) on this model; if a bf16/fp16 run gives non-finite values, warn and run once more on
        an fp32 copy of the weights. `args` are the caller's fp32 inputs (never the low-precision casts), and the
        shared model is never mutated, so concurrent callers are unaffected."""
        out = fn(self, *args)
        if _all_finite(out):
            return out
        if self.dtype != torch.float32:
            warnings.warn(f"{what} in {self.dtype} produced non-finite values; retrying this batch in float32",
                          RuntimeWarning, stacklevel=3)
            out = fn(self._fp32_copy(), *args)
            if _all_finite(out):
                return out
        raise FloatingPointError(_overflow_message(what, args[0]))

    def _fp32_copy(self) -> SSDDModule:
        """An fp32 SSDDModule with this model's weights and kernel switches, built once on first use. It is kept
        outside the module tree (not in state_dict, not moved by .to()); rebuilt if the device changes."""
        with _FP32_LOCK:
            twin = self.__dict__.get("_fp32_twin")
            if twin is None or twin.decoder.conv_in.weight.device != self.device:
                with torch.device("meta"):
                    twin = SSDDModule(self.encoder_config, self.decoder_config, stride=self.stride)
                twin.load_state_dict({k: v.float() for k, v in self.state_dict().items()}, strict=True, assign=True)
                twin.eval().requires_grad_(False)
                if self.encoder_config is None:
                    twin.encoder = self.encoder  # external (fp32 already) or None: shared, never a submodule
                self.__dict__["_fp32_twin"] = twin
            for mine, theirs in zip(self.modules(), twin.modules()):  # same tree: follow the current switches
                if isinstance(mine, FusedOp):
                    theirs.use_triton = mine.use_triton
            return twin


def _overflow_message(what: str, x: torch.Tensor) -> str:
    """Why a float32 run from finite inputs gave inf/NaN: inputs far outside the trained range (SSDD latents and
    images are O(1)) overflow the activations; from ordinary inputs it points at the weights."""
    amax = float(x.detach().abs().max())
    name = "latents" if what == "decode" else "images"
    if amax > 1e3:
        return (f"{what} overflows float32: the {name} reach |x| = {amax:.3g}, far outside the range this model "
                f"works in (O(1); check their scaling), so the result is not representable")
    return (f"{what} produced non-finite values in float32 from {name} within |x| <= {amax:.3g}: the checkpoint "
            "weights hold NaN/inf or overflow")


def _all_finite(out) -> bool:
    tensors = [out.mean, out.logvar] if isinstance(out, DiagonalGaussian) else [out]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _check_backend(name) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def check_backend(backend: str, dtype, *, gpu: str | None = None):
    """Before any weights load or work starts: a known backend and, off torch, a precision it runs on the CPU
    (gpu: how the caller asked for a GPU, e.g. "device='cuda'", refused). Returns the backend's precision (a
    torch dtype), None for torch."""
    if _check_backend(backend) == "torch":
        return None
    if gpu:
        raise ValueError(f"backend={backend!r} runs on the CPU; got {gpu}")
    from ssdd_runtime.export.openvino import check_precision

    precision = as_dtype(dtype)
    check_precision(precision)
    return precision
