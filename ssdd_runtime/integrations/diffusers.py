"""SSDD as the `vae` of a diffusers pipeline: `SSDDVAE`, a drop-in for `AutoencoderKL`.

    from ssdd_runtime.integrations.diffusers import SSDDVAE
    vae = SSDDVAE.from_pretrained("facebook/SSDD", "F8C4/F8C4_M_256.safetensors")   # same arguments as SSDD
    pipe = DiTPipeline(transformer=..., vae=vae, scheduler=...)

What a pipeline gets (checked against diffusers 0.42 DiTPipeline and the img2img `retrieve_latents` helper):
* `decode(z, return_dict=True, generator=None)` -> `DecoderOutput(sample=(B, 3, h*F, w*F))` (or `(sample,)`),
  nominally in [-1, 1], unclamped, in the module's dtype like AutoencoderKL. `z` is the raw SSDD latent: the
  pipeline divides by `config.scaling_factor` (and adds `shift_factor`, SD3/Flux style) before calling it.
* `encode(x, return_dict=True)` -> `AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)`: diffusers'
  own distribution class, so `.sample(generator)`, `.mode()`, `.mean`, `.std` behave exactly as for a KL-VAE.
* `config`: `scaling_factor`, `shift_factor`, `latent_channels`, `block_out_channels` (the encoder's level widths:
  `2 ** (len - 1)` is the stride, 8 for f8, 16 for f16), `sample_size`, `force_upcast=False`, plus SSDD's own
  `encoder`, `decoder`, `decode_steps`, `t_pow_shift`, `noise_seed`.
* `enable_slicing()`: encode/decode one image at a time; exact, because the decode noise is drawn for the whole
  batch before slicing. `enable_tiling()` raises: no tile decomposition reproduces SSDD's decode (every
  GroupNorm takes statistics over the whole image, and the transformer's +-7 token window is stacked over 8-16
  layers), so tiling could only approximate and would silently change images.

Decoding noise (SSDD's decoder is a one-step diffusion model and needs a start noise x_T):
* `generator` given (a torch.Generator, or a list with one per image as diffusers passes them): x_T is drawn from
  it in fp32 on the generator's device, so runs repeat with the same seeds.
* `generator=None` (what DiTPipeline passes): with `noise_seed` an int (default 0), every image gets the same x_T
  drawn from `torch.Generator().manual_seed(noise_seed)` on the CPU. Decoding is then a deterministic function
  of each latent, as with a KL-VAE decoder: independent of batch size, slicing, device and the global RNG.
  `noise_seed=None` draws from the global RNG instead (the official code's behaviour).
* `decode_steps` (default 1, the single-step mode) and `t_pow_shift` (default `sampler.T_POW_SHIFT`, 2.0) set
  the Euler sampler; `decode(..., steps=k)` overrides the steps for one call.

This module imports diffusers (a missing one raises ImportError with the install hint); `ssdd_runtime` and
`ssdd_runtime.integrations` never import it. `save_pretrained` writes diffusers' usual
config.json + weights, but `SSDDVAE.from_pretrained` reads SSDD checkpoints (the SSDD arguments), not such a
folder: rebuild the VAE from the SSDD checkpoint and pass it to the pipeline.
"""
from __future__ import annotations

import os

import torch

try:
    # Absolute imports: this module is ssdd_runtime.integrations.diffusers, `diffusers` is the real package.
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
except ImportError as e:
    raise ImportError("SSDDVAE needs diffusers: pip install 'ssdd-runtime[diffusers]'") from e

from ssdd_runtime.api import SSDD
from ssdd_runtime.integrations.latent_stats import known_file, latent_normalization
from ssdd_runtime.model import encoder_config
from ssdd_runtime.sampler import T_POW_SHIFT, per_image_noise, randn, seeded_noise
from ssdd_runtime.weights import KNOWN_FILES


class SSDDVAE(ModelMixin, ConfigMixin):
    """SSDD encoder + single-step diffusion decoder behind the AutoencoderKL interface (module docstring)."""

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, encoder: str = "f8c4", decoder: str = "M", scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, sample_size: int = 256, decode_steps: int = 1,
                 t_pow_shift: float = T_POW_SHIFT, noise_seed: int | None = 0, latent_channels: int | None = None,
                 block_out_channels: tuple[int, ...] | None = None, force_upcast: bool = False):
        super().__init__()
        enc = encoder_config(encoder)
        derived = dict(latent_channels=enc.z_dim,
                       block_out_channels=tuple(enc.base_dim * m for m in enc.ch_mult))
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
        self.register_to_config(**derived)
        self.ssdd = SSDD(encoder, decoder)  # randomly initialised; the factories below swap in loaded weights
        self.use_slicing = False
        self.use_tiling = False

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, filename: str | None = None, *,
                        revision: str | None = None, encoder: str | None = None, decoder: str | None = None,
                        device=None, dtype=None, local_files_only: bool = False,
                        cache_dir: str | os.PathLike | None = None, use_triton: bool | None = None,
                        **vae_options) -> SSDDVAE:
        """`SSDD.from_pretrained` arguments, then the `from_model` options (scaling_factor, shift_factor,
        latent_stats, sample_size, decode_steps, t_pow_shift, noise_seed)."""
        model = SSDD.from_pretrained(source, filename, revision=revision, encoder=encoder, decoder=decoder,
                                     device=device, dtype=dtype, local_files_only=local_files_only,
                                     cache_dir=cache_dir, use_triton=use_triton)
        return cls.from_model(model, **vae_options)

    @classmethod
    def from_model(cls, model: SSDD, *, scaling_factor: float | None = None, shift_factor: float | None = None,
                   latent_stats: str | os.PathLike | dict | None = None, sample_size: int | None = None,
                   decode_steps: int = 1, t_pow_shift: float = T_POW_SHIFT, noise_seed: int | None = 0) -> SSDDVAE:
        """Wrap a loaded `SSDD` (shares its weights). scaling/shift: explicit values, else `latent_stats` (a
        JSON from `ssdd stats`), else 1.0 / 0.0 (see latent_stats.py)."""
        if not isinstance(model, SSDD):
            raise TypeError(f"model must be an ssdd_runtime.SSDD (from SSDD.from_pretrained / from_state_dict), "
                            f"got {type(model).__name__}")
        scale, shift = latent_normalization(stats=latent_stats, scaling_factor=scaling_factor,
                                            shift_factor=shift_factor)
        name = known_file(getattr(model, "checkpoint", None))
        if sample_size is None:
            sample_size = KNOWN_FILES[name].resolution if name else 256
        with torch.device("meta"):  # placeholder weights cost nothing; replaced by `model` just below
            vae = cls(encoder=model.encoder_config.name, decoder=model.decoder_config.size,
                      scaling_factor=scale, shift_factor=shift, sample_size=int(sample_size),
                      decode_steps=decode_steps, t_pow_shift=float(t_pow_shift), noise_seed=noise_seed)
        vae.ssdd = model
        return vae.eval().requires_grad_(False)

    # -- diffusers switches -------------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode/decode one image at a time (less memory). Same results: noise is drawn for the whole batch."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "SSDDVAE does not tile: every decoder GroupNorm normalises with statistics of the whole image and "
            "the transformer stacks 8-16 windowed-attention layers, so tiles cannot reproduce the full decode. "
            "Use enable_slicing() (exact) or decode fewer images at once.")

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # -- encode / decode ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """x: (B, 3, H, W) in [-1, 1] -> AutoencoderKLOutput(latent_dist) in this module's dtype."""
        post = self.ssdd.encode(x, batch_size=1 if self.use_slicing else None)  # fp32 mean / logvar
        dist = DiagonalGaussianDistribution(torch.cat([post.mean, post.logvar], dim=1).to(self.dtype))
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None, *, steps: int | None = None):
        """z: raw SSDD latents (B, C, h, w) -> DecoderOutput(sample=(B, 3, h*F, w*F)) in this module's dtype."""
        noise = self.decode_noise(z, generator)
        img = self.ssdd.decode(z, steps=self.config.decode_steps if steps is None else steps, noise=noise,
                               t_pow_shift=self.config.t_pow_shift, batch_size=1 if self.use_slicing else None)
        img = img.to(self.dtype)
        return DecoderOutput(sample=img) if return_dict else (img,)

    def decode_noise(self, z: torch.Tensor, generator=None) -> torch.Tensor | None:
        """The fp32 start noise x_T that `decode(z, generator=generator)` uses (None: the global RNG)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            raise ValueError(f"latents must be a (B, C, h, w) tensor, got {getattr(z, 'shape', type(z))}")
        B, _, h, w = z.shape
        shape = (3, h * self.ssdd.stride, w * self.ssdd.stride)
        device = self.ssdd.device
        if generator is None:
            if self.config.noise_seed is None:
                return None
            return seeded_noise(shape, self.config.noise_seed, B, device=device)
        if isinstance(generator, (list, tuple)):
            if len(generator) != B or not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError(f"generator list must hold one torch.Generator per image ({B}), "
                                 f"got {len(generator)} items")
            return per_image_noise(shape, generator, device=device)
        if isinstance(generator, torch.Generator):
            return randn((B, *shape), generator=generator, device=device)
        raise TypeError(f"generator must be a torch.Generator, a list of them, or None; "
                        f"got {type(generator).__name__}")

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator=None):
        """AutoencoderKL.forward: encode, take the posterior sample or mode, decode."""
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator=generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict, generator=generator)
