"""SSDD as the `vae` of a diffusers pipeline: `SSDDVAE`, a drop-in for `AutoencoderKL`.

    from ssdd_runtime.integrations.diffusers import SSDDVAE
    vae = SSDDVAE.from_pretrained("facebook/SSDD", "F8C4/F8C4_M_256.safetensors")   # an SSDD checkpoint
    vae = SSDDVAE.from_pretrained("saved/vae")             # a folder written by vae/pipe.save_pretrained
    pipe = DiTPipeline(transformer=..., vae=vae, scheduler=...)

What a pipeline gets (checked against diffusers 0.42 DiTPipeline and the img2img `retrieve_latents` helper):
* `decode(z, return_dict=True, generator=None)` -> `DecoderOutput(sample=(B, 3, h*F, w*F))` (or `(sample,)`),
  nominally in [-1, 1], unclamped, in the module's dtype like AutoencoderKL. `z` is the raw SSDD latent: the
  pipeline divides by `config.scaling_factor` (and adds `shift_factor`, SD3/Flux style, or un-normalises with
  `latents_mean`/`latents_std`, SDXL style) before calling it.
* `encode(x, return_dict=True)` -> `AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)`: diffusers'
  own distribution class, so `.sample(generator)`, `.mode()`, `.mean`, `.std` behave exactly as for a KL-VAE.
  Both carry diffusers' `apply_forward_hook`, so `pipe.enable_model_cpu_offload()` moves the VAE on encode/decode.
* `config`: `scaling_factor`, `shift_factor`, `latents_mean`/`latents_std` (per channel, or None),
  `latent_channels`, `block_out_channels` (level widths: `2 ** (len - 1)` is the stride, 8 for f8, 16 for f16),
  `sample_size`, `force_upcast=False`, plus SSDD's own: `encoder` ("f8c4"..., "sdvae" or None: decode-only),
  `decoder`, `checkpoint` (the file it came from, for latent metadata), `sdvae_config` (the AutoencoderKL config
  of the "sdvae" encoder), `decode_steps`, `t_pow_shift`, `noise_seed`.
* `save_pretrained(dir)` / `from_pretrained(dir)`: diffusers' config.json + diffusion_pytorch_model.safetensors.
  The state dict is `ssdd.*` (the SSDD weights, official names under the prefix) plus `sdvae.*` (the AutoencoderKL
  encoder half, for encoder="sdvae"), so a folder rebuilds exactly with no network; `pipe.save_pretrained` and
  `DiTPipeline.from_pretrained(dir)` go through the same two calls (model_index.json names this module).
  `from_pretrained(source, filename)` (or a `.safetensors` path) reads an SSDD checkpoint instead.
* `enable_slicing()`: encode/decode one image at a time; exact, because the decode noise is drawn for the whole
  batch before slicing. `enable_tiling()`: decode through `SSDD.decode(tile=...)` (an approximation: every
  GroupNorm takes whole-image statistics and the transformer's +-7 token window is stacked over 8-16 layers).
  `enable_layerwise_casting()` raises: SSDD casts its activations to the weights' dtype itself.
* Precision: the SD-VAE encoder (encoder="sdvae") stays fp32 under `.to(dtype)` and `torch_dtype=` (sdvae.py,
  diffusers' `force_upcast` for that VAE); the SSDD weights take the dtype.

Decoding noise (SSDD's decoder is a one-step diffusion model and needs a start noise x_T):
* `generator` given (a torch.Generator, or a list with one per image as diffusers passes them): x_T is drawn from
  it in fp32 on the generator's device, so runs repeat with the same seeds.
* `generator=None` (what DiTPipeline passes): with `noise_seed` an int (default 0), every image gets the same x_T
  drawn from `torch.Generator().manual_seed(noise_seed)` on the CPU. Decoding is then a deterministic function
  of each latent, as with a KL-VAE decoder: independent of batch size, slicing, device and the global RNG.
  That noise is drawn once per image size and kept (`sample_size` is drawn at construction), so the decode of a
  drawn size creates no torch.Generator: `torch.compile(vae.decode, fullgraph=True)` traces it. Under compile
  the data-dependent input checks and the non-finite fp32 retry of `SSDD.decode` are skipped (they branch on
  tensor values), slicing and tiling do not apply, and another size needs `decode(z, noise=vae.decode_noise(z))`
  or one eager decode first. `noise_seed=None` draws from the global RNG instead (the official code's behaviour).
* `decode_steps` and `t_pow_shift` set the Euler sampler (defaults: the checkpoint's KNOWN_FILES values where
  recorded, else 1 step and `sampler.T_POW_SHIFT`); `decode(..., steps=k)` overrides the steps for one call.

This module imports diffusers (a missing one raises ImportError with the install hint); `ssdd_runtime` and
`ssdd_runtime.integrations` never import it.
"""
from __future__ import annotations

import inspect
import json
import math
import numbers
import os
from pathlib import Path

import torch

try:
    # Absolute imports: this module is ssdd_runtime.integrations.diffusers, `diffusers` is the real package.
    from diffusers import AutoencoderKL, ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.utils import is_accelerate_available
    from diffusers.utils.accelerate_utils import apply_forward_hook
except ImportError as e:
    raise ImportError("SSDDVAE needs diffusers: pip install 'ssdd-runtime[diffusers]'") from e

from ssdd_runtime.api import SSDD
from ssdd_runtime.integrations.latent_stats import known_file, latent_normalization
from ssdd_runtime.latents import checkpoint_id
from ssdd_runtime.model import SSDDModule, encoder_config
from ssdd_runtime.sampler import T_POW_SHIFT, per_image_noise, randn, seeded_noise
from ssdd_runtime.sdvae import SDVAEEncoder
from ssdd_runtime.weights import KNOWN_FILES, check_keys

NOISE_CACHE_SIZES = 8  # image sizes whose seeded start noise is kept (3*H*W fp32 each)


def _has_tiled_decode() -> bool:  # SSDD.decode(tile=) comes from the tiled-decode work
    return "tile" in inspect.signature(SSDD.decode).parameters


class SSDDVAE(ModelMixin, ConfigMixin):
    """SSDD encoder + single-step diffusion decoder behind the AutoencoderKL interface (module docstring)."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False
    # from_pretrained(torch_dtype=) loads the SD-VAE encoder in fp32. Only with accelerate: without it diffusers
    # loads into the constructed modules (fp32 for the SD-VAE, see SDVAEEncoder) and refuses a keep list.
    _keep_in_fp32_modules = ["sdvae"] if is_accelerate_available() else None

    @register_to_config
    def __init__(self, encoder: str | None = "f8c4", decoder: str = "M", scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, latents_mean: list[float] | None = None,
                 latents_std: list[float] | None = None, sample_size: int = 256, decode_steps: int = 1,
                 t_pow_shift: float = T_POW_SHIFT, noise_seed: int | None = 0, checkpoint: str | None = None,
                 sdvae_config: dict | None = None, latent_channels: int | None = None,
                 block_out_channels: tuple[int, ...] | None = None, force_upcast: bool = False):
        super().__init__()
        if encoder == "sdvae":
            if not isinstance(sdvae_config, dict):
                raise ValueError("encoder='sdvae' needs sdvae_config: the AutoencoderKL config of the SD-VAE "
                                 "(SSDDVAE.from_model records it from the loaded encoder)")
            vae = AutoencoderKL.from_config({k: v for k, v in sdvae_config.items() if not k.startswith("_")})
            vae.decoder = None  # encode only, as sdvae.load_encoder
            vae.post_quant_conv = None
            external = SDVAEEncoder(vae, str(sdvae_config.get("_name_or_path", "sdvae_config")))
            self.ssdd = SSDD(None, decoder, stride=external.config.stride)
            self.ssdd.encoder = external  # plain attribute of the SSDD module (sdvae.py) ...
            self.sdvae = vae  # ... and a submodule here: saved, loaded and moved with the VAE
            stride, z_dim, widths = external.config.stride, external.config.z_dim, vae.config.block_out_channels
        elif encoder is None:  # decode-only (a decoder-only file without its encoder)
            if sdvae_config is not None:
                raise ValueError("sdvae_config is only read with encoder='sdvae'")
            self.ssdd, self.sdvae = SSDD(None, decoder), None
            stride, z_dim = self.ssdd.stride, self.ssdd.decoder_config.z_dim
            widths = _widths(encoder_config(f"f{stride}c{z_dim}"))
        else:
            if sdvae_config is not None:
                raise ValueError("sdvae_config is only read with encoder='sdvae'")
            enc = encoder_config(encoder)
            self.ssdd, self.sdvae = SSDD(enc, decoder), None
            stride, z_dim, widths = enc.stride, enc.z_dim, _widths(enc)
        derived = dict(latent_channels=z_dim, block_out_channels=tuple(widths))
        given = dict(latent_channels=latent_channels,
                     block_out_channels=None if block_out_channels is None else tuple(block_out_channels))
        for key, value in derived.items():  # accepted back from a saved config, but they must agree
            if given[key] is not None and given[key] != value:
                raise ValueError(f"{key}={given[key]!r} does not match encoder {encoder!r} ({value!r})")
        if force_upcast:
            raise ValueError("force_upcast must be False: SSDD keeps norms, softmax and the sampler state in "
                             "fp32 itself, so bf16/fp16 weights need no upcast")
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps must be an integer >= 1, got {decode_steps!r}")
        if noise_seed is not None and (isinstance(noise_seed, bool) or not isinstance(noise_seed, int)):
            raise TypeError(f"noise_seed must be an int or None, got {type(noise_seed).__name__}")
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if values is not None and len(values) != z_dim:
                raise ValueError(f"{name} must hold one value per latent channel ({z_dim}), got {len(values)}")
        if (latents_mean is None) != (latents_std is None):
            raise ValueError("latents_mean and latents_std go together (pipelines read both or neither)")
        for name, value in (("scaling_factor", scaling_factor), ("shift_factor", shift_factor),
                            ("t_pow_shift", t_pow_shift)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not scaling_factor > 0 or not t_pow_shift > 0:
            raise ValueError(f"scaling_factor and t_pow_shift must be positive, got {scaling_factor!r} and "
                             f"{t_pow_shift!r}")
        for name, values in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if values is not None and not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                              and math.isfinite(v) for v in values):
                raise ValueError(f"{name} must hold finite numbers, got {list(values)}")
        if latents_std is not None and not all(s > 0 for s in latents_std):
            raise ValueError(f"latents_std must be positive, got {latents_std}")
        if isinstance(sample_size, bool) or not isinstance(sample_size, numbers.Integral) or sample_size < 1:
            raise ValueError(f"sample_size must be a positive integer (image pixels), got {sample_size!r}")
        self.register_to_config(**derived)
        self.ssdd.checkpoint = checkpoint  # what latent metadata names (latents.checkpoint_id)
        self.ssdd.eval().requires_grad_(False)
        self.use_slicing = False
        self.use_tiling = False
        self.tile_latent_size = None
        self._noise_cache: dict[tuple, torch.Tensor] = {}  # image shape -> (1, 3, H, W) fp32 on the CPU
        if noise_seed is not None:  # the pipeline's size: its decode never creates a generator (compile)
            self._seeded_noise((3, sample_size, sample_size), "cpu")

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, filename: str | None = None, *,
                        subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
                        revision: str | None = None, encoder=None, decoder: str | None = None, device=None,
                        dtype=None, local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                        use_triton: bool | None = None, **options) -> SSDDVAE:
        """Two sources:
        * a folder or Hub repo written by `save_pretrained` (no `filename`, not a .safetensors path): diffusers'
          `ModelMixin.from_pretrained` (its `subfolder`, `torch_dtype`, `revision`, ... options; other keyword
          options override config fields, e.g. `scaling_factor=`);
        * an SSDD checkpoint: `SSDD.from_pretrained` arguments (`subfolder` is joined to `filename`,
          `torch_dtype` is `dtype`), then the `from_model` options (scaling_factor, shift_factor, latents_mean,
          latents_std, latent_stats, sample_size, decode_steps, t_pow_shift, noise_seed)."""
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one")
        dtype = torch_dtype if dtype is None else dtype
        if filename is None and not str(source).endswith(".safetensors"):
            if encoder is not None or decoder is not None or use_triton is not None:
                raise ValueError("encoder=/decoder=/use_triton= apply to SSDD checkpoints (with filename=); a "
                                 f"saved SSDDVAE folder ({source}) records its architecture in config.json")
            folder = Path(source) / (subfolder or "")
            if Path(source).is_dir() and not (folder / cls.config_name).is_file():
                raise FileNotFoundError(f"{folder} has no {cls.config_name}: pass a folder written by "
                                        "SSDDVAE.save_pretrained, or an SSDD checkpoint (a .safetensors path, or "
                                        "a folder/Hub repo plus filename=)")
            if folder.is_dir():
                _check_weights_file(folder, options.get("variant"))
            loading_info = options.pop("output_loading_info", False)
            # Strict, as SSDD.from_pretrained: diffusers only logs missing keys and leaves them on `meta` (or
            # freshly initialised), which decodes a finite, wrong image. Its loading report decides here.
            try:
                vae, info = super().from_pretrained(source, subfolder=subfolder, torch_dtype=dtype,
                                                    revision=revision, local_files_only=local_files_only,
                                                    cache_dir=cache_dir, output_loading_info=True, **options)
            except ValueError as e:  # diffusers: "Cannot load  because <key> expected shape ..."
                if "expected shape" not in str(e):
                    raise
                why = str(e).split(" because ", 1)[-1].split(". ", 1)[0]
                raise ValueError(f"{folder} ({_weights_name(options.get('variant'))}) does not match its "
                                 f"{cls.config_name} (an edited config, or weights of another size?): {why}") from None
            check_keys(f"{folder} ({_weights_name(options.get('variant'))})", missing=info["missing_keys"],
                       unexpected=info["unexpected_keys"], wrong=info["mismatched_keys"])
            on_meta = [k for k, t in vae.state_dict().items() if t.is_meta]
            check_keys(f"{folder} ({_weights_name(options.get('variant'))})", missing=on_meta)
            vae = vae if device is None else vae.to(device)
            return (vae, info) if loading_info else vae
        if subfolder:
            if filename is None:
                raise ValueError(f"subfolder={subfolder!r} needs filename= (the checkpoint inside it)")
            filename = f"{subfolder.strip('/')}/{filename}"
        model = SSDD.from_pretrained(source, filename, revision=revision, encoder=encoder, decoder=decoder,
                                     device=device, dtype=dtype, local_files_only=local_files_only,
                                     cache_dir=cache_dir, use_triton=use_triton)
        return cls.from_model(model, **options)

    @classmethod
    def from_model(cls, model: SSDD, *, scaling_factor: float | None = None, shift_factor: float | None = None,
                   latents_mean: list[float] | None = None, latents_std: list[float] | None = None,
                   latent_stats: str | os.PathLike | dict | None = None, sample_size: int | None = None,
                   decode_steps: int | None = None, t_pow_shift: float | None = None,
                   noise_seed: int | None = 0) -> SSDDVAE:
        """Wrap a loaded `SSDD` (shares its weights). scaling/shift: explicit values, else `latent_stats` (a JSON
        from `ssdd stats`: it also fills latents_mean/latents_std from its per-channel statistics), else the
        checkpoint's KNOWN_FILES scaling factor (0.18215 for the SDVAE files) / 0.0, else 1.0 / 0.0. Sampler
        defaults: the KNOWN_FILES values where recorded, else 1 step, t_pow_shift 2.0."""
        if not isinstance(model, SSDD):
            raise TypeError(f"model must be an ssdd_runtime.SSDD (from SSDD.from_pretrained / from_state_dict), "
                            f"got {type(model).__name__}")
        if latent_stats is not None and not isinstance(latent_stats, dict):
            latent_stats = _read_stats(latent_stats)
        name = known_file(getattr(model, "checkpoint", None))
        entry = KNOWN_FILES.get(name)
        if scaling_factor is None and latent_stats is None and entry is not None:
            scaling_factor = entry.scaling_factor
        scale, shift = latent_normalization(stats=latent_stats, scaling_factor=scaling_factor,
                                            shift_factor=shift_factor)
        if latent_stats is not None and latents_mean is None and latents_std is None:
            latents_mean, latents_std = latent_stats.get("channel_mean"), latent_stats.get("channel_std")
        if decode_steps is None:
            decode_steps = entry.steps if entry is not None and entry.steps is not None else 1
        if t_pow_shift is None:
            t_pow_shift = entry.t_pow_shift if entry is not None and entry.t_pow_shift is not None else T_POW_SHIFT
        if sample_size is None:
            sample_size = entry.resolution if entry is not None else 256
        sdvae_config = None
        if model.encoder_name == "sdvae":
            sdvae_config = {k: v for k, v in model.encoder.vae.config.items() if not k.startswith("_")}
            sdvae_config["_name_or_path"] = model.encoder.config.source
        with torch.device("meta"):  # placeholder weights cost nothing; replaced by `model` just below
            vae = cls(encoder=model.encoder_name, decoder=model.decoder_config.size, scaling_factor=scale,
                      shift_factor=shift, latents_mean=_floats(latents_mean), latents_std=_floats(latents_std),
                      sample_size=_plain(sample_size), decode_steps=_plain(decode_steps),
                      t_pow_shift=_plain(t_pow_shift), noise_seed=_plain(noise_seed), sdvae_config=sdvae_config,
                      checkpoint=checkpoint_id(getattr(model, "checkpoint", None)) or None)
        vae.ssdd = model
        vae.sdvae = model.encoder.vae if sdvae_config is not None else None
        return vae.eval().requires_grad_(False)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """diffusers' save_pretrained (config.json + diffusion_pytorch_model.safetensors), except that a
        `save_directory` that is an existing file is an error (diffusers logs it and returns, saving nothing)."""
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise FileExistsError(f"cannot save into {save_directory}: it is an existing file, not a folder")
        super().save_pretrained(save_directory, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        """`.to()`, `.half()`, `.cuda()`...: as nn.Module, except that the SD-VAE encoder only follows the device
        and stays fp32 (module docstring), never rounded through the new dtype."""
        if recurse:
            for child in self.children():
                if child is not getattr(self, "sdvae", None):
                    child._apply(fn)
                    continue
                target = fn(torch.zeros((), device=next(child.parameters()).device)).device  # where fn sends it
                child._apply(lambda t: t.to(target))
        return super()._apply(fn, recurse=False)

    # -- diffusers switches -------------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode/decode one image at a time (less memory). Same results: noise is drawn for the whole batch."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_latent_size: int | None = None) -> None:
        """Decode in latent tiles of `tile_latent_size` (default: `sample_size // stride`) through
        `SSDD.decode(tile=...)`. Approximate: see the module docstring."""
        if not _has_tiled_decode():
            raise NotImplementedError("SSDDVAE tiling needs SSDD.decode(tile=), which this ssdd_runtime lacks; "
                                      "use enable_slicing() (exact) or decode fewer images at once")
        from ssdd_runtime.tiled import check_tile

        if tile_latent_size is None:
            tile_latent_size = max(1, self.config.sample_size // self.ssdd.stride)
        try:
            tile_latent_size = check_tile(tile_latent_size)  # SSDD.decode's rule: numpy integers too
        except ValueError:
            raise ValueError(f"tile_latent_size must be a positive integer, got {tile_latent_size!r}") from None
        self.use_tiling, self.tile_latent_size = True, tile_latent_size

    def disable_tiling(self) -> None:
        self.use_tiling, self.tile_latent_size = False, None

    def enable_layerwise_casting(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "SSDDVAE does not support layerwise casting: SSDD casts its activations to the weights' dtype and keeps "
            "norm statistics, softmax and the sampler state in fp32 itself, so fp8 weight storage would run fp8 "
            "activations. Use vae.to(torch.bfloat16) or from_pretrained(..., torch_dtype=torch.bfloat16)")

    # -- encode / decode ----------------------------------------------------------------------------------

    @apply_forward_hook
    @torch.no_grad()
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x: (B, 3, H, W) in [-1, 1] -> AutoencoderKLOutput(latent_dist) in this module's dtype."""
        post = self.ssdd.encode(x, batch_size=1 if self.use_slicing else None)  # fp32 mean / logvar
        dist = DiagonalGaussianDistribution(torch.cat([post.mean, post.logvar], dim=1).to(self.dtype))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    @apply_forward_hook
    @torch.no_grad()
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, *, steps: int | None = None,
               noise: torch.Tensor | None = None):
        """z: raw SSDD latents (B, C, h, w) -> DecoderOutput(sample=(B, 3, h*F, w*F)) in this module's dtype.
        `noise`: the fp32 start noise (B, 3, h*F, w*F), instead of drawing it (see `decode_noise`)."""
        steps = self.config.decode_steps if steps is None else steps
        if noise is None:
            noise = self.decode_noise(z, generator)
        elif generator is not None:
            raise ValueError("pass noise= or generator=, not both")
        if torch.compiler.is_compiling():  # the traced path: SSDD.decode's value checks would break the graph
            if noise is None:
                noise = torch.randn(z.shape[0], 3, z.shape[2] * self.ssdd.stride, z.shape[3] * self.ssdd.stride)
            device = self.ssdd.device
            img = SSDDModule.sample(self.ssdd, z.to(device, self.ssdd.dtype), noise.to(device, torch.float32),
                                    steps=steps, t_pow_shift=float(self.config.t_pow_shift))
        else:
            tile = {"tile": self.tile_latent_size} if self.use_tiling else {}
            img = self.ssdd.decode(z, steps=steps, noise=noise, t_pow_shift=self.config.t_pow_shift,
                                   batch_size=1 if self.use_slicing else None, **tile)
        img = img.to(self.dtype)
        return DecoderOutput(sample=img) if return_dict else (img,)

    def decode_noise(self, z: torch.Tensor, generator=None) -> torch.Tensor | None:
        """The fp32 start noise x_T that `decode(z, generator=generator)` uses (None: the global RNG)."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor (B, C, h, w), got {type(z).__module__}."
                            f"{type(z).__name__} (convert with torch.from_numpy)")
        if z.dim() != 4:
            raise ValueError(f"latents must be a (B, C, h, w) tensor, got shape {tuple(z.shape)}")
        B, _, h, w = z.shape
        shape = (3, h * self.ssdd.stride, w * self.ssdd.stride)
        device = self.ssdd.device
        if generator is None:
            if self.config.noise_seed is None:
                return None
            return self._seeded_noise(shape, device).expand(B, *shape)
        if isinstance(generator, (list, tuple)):
            if len(generator) != B or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"generator list must hold one torch.Generator per image ({B}), "
                                 f"got {len(generator)} items")
            return per_image_noise(shape, generator, device=device)
        if isinstance(generator, torch.Generator):
            return randn((B, *shape), generator=generator, device=device)
        raise TypeError(f"generator must be a torch.Generator, a list of them, or None; "
                        f"got {type(generator).__name__}")

    def _seeded_noise(self, shape: tuple[int, int, int], device) -> torch.Tensor:
        """(1, *shape) noise of `noise_seed` on `device`. Drawn once per image shape on the CPU and kept, so under
        torch.compile a kept one is read (no generator in the graph); a new shape there is an error naming the
        way round it."""
        noise = self._noise_cache.get(shape)
        if noise is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(f"no start noise drawn yet for images of shape {shape}: under torch.compile "
                                   "pass decode(z, noise=vae.decode_noise(z)), or decode this size once eagerly")
            noise = seeded_noise(shape, self.config.noise_seed, 1)  # CPU, as the eager default always drew it
            if len(self._noise_cache) >= NOISE_CACHE_SIZES:
                self._noise_cache.pop(next(iter(self._noise_cache)))  # oldest first
            self._noise_cache[shape] = noise
        return noise.to(device)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator=None):
        """AutoencoderKL.forward: encode, take the posterior sample or mode, decode."""
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator=generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict, generator=generator)


def _read_stats(path) -> dict:
    """A latent-statistics JSON written by `ssdd stats`; errors name the file."""
    try:
        stats = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"latent_stats file not found: {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"latent_stats {path} is not a JSON file from `ssdd stats`: {e}") from None
    if not isinstance(stats, dict):
        raise ValueError(f"latent_stats {path} must hold a JSON object (from `ssdd stats`), got "
                         f"{type(stats).__name__}")
    return stats


def _weights_name(variant: str | None) -> str:
    return "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"


def _check_weights_file(folder: Path, variant: str | None) -> None:
    """A saved SSDDVAE folder holds its weights as safetensors (one file, or shards with an index); say which
    file is missing, rather than diffusers' fallback to pickled `.bin` weights ("unsafe serialization")."""
    name = _weights_name(variant)
    if not ((folder / name).is_file() or (folder / f"{name}.index.json").is_file()):
        raise FileNotFoundError(f"{folder / name} not found: a folder written by SSDDVAE.save_pretrained holds "
                                f"config.json and {name} (or its shards with {name}.index.json)")


def _widths(enc) -> tuple[int, ...]:
    return tuple(enc.base_dim * m for m in enc.ch_mult)


def _floats(values) -> list[float] | None:
    return None if values is None else [_plain(v) for v in values]


def _plain(value):
    """numpy/torch scalars -> int/float for the JSON config; anything else unchanged (refused by __init__)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)
