"""The encoder of the SDVAE decoders: Stable Diffusion's KL-f8 VAE (diffusers `AutoencoderKL`), used as is.

The released `SDVAE/SDVAE_<size>_256.safetensors` files hold SSDD decoders trained on the latents of
`stabilityai/sd-vae-ft-mse` (spec 1.4b). The official code calls `vae.encode(x).latent_dist` and feeds its raw
mean to the decoder: no scaling factor (so a Stable Diffusion pipeline's latents divided by 0.18215 are what these
decoders read). Stride 8, 4 latent channels. The VAE is kept outside the SSDD module tree, so the SSDD state
dict stays `decoder.*` only and loads strictly.

Precision: the VAE runs in fp32 whatever the SSDD weights' dtype (diffusers marks this VAE `force_upcast`: its
activations overflow fp16). It follows the device of the images it is given. Only `encode` is used: the VAE's
own decoder is dropped after loading.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from ssdd_runtime.model import DiagonalGaussian

DEFAULT_SOURCE = "stabilityai/sd-vae-ft-mse"
INSTALL_HINT = "pip install 'ssdd-runtime[diffusers]'"


@dataclass(frozen=True)
class SDVAEConfig:
    source: str  # Hub id or local folder it was loaded from
    stride: int = 8
    z_dim: int = 4
    name: str = "sdvae"


class SDVAEEncoder:
    """`encode(x) -> DiagonalGaussian` through a diffusers AutoencoderKL. Deliberately not an nn.Module, so an
    SSDD model holding it as `model.encoder` neither saves it in its state dict nor casts it with `.to()`."""

    def __init__(self, vae: torch.nn.Module, source: str):
        stride = 2 ** (len(vae.config.block_out_channels) - 1)
        if stride != 8 or vae.config.latent_channels != 4:
            raise ValueError(f"{source}: the SDVAE decoders read stride-8, 4-channel latents; this AutoencoderKL "
                             f"has stride {stride} and {vae.config.latent_channels} latent channels")
        self.vae = vae.float().eval().requires_grad_(False)
        self.config = SDVAEConfig(source=source, stride=stride, z_dim=vae.config.latent_channels)
        self._lock = threading.Lock()  # device moves are shared state

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:  # x: (B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8)
        with self._lock:
            if next(self.vae.parameters()).device != x.device:
                self.vae.to(x.device)
        post = self.vae.encode(x.float()).latent_dist  # raw moments: no scaling_factor, as the official code
        return DiagonalGaussian(post.mean.float(), post.logvar.float())  # clamped to [-30, 20] like ours

    def __repr__(self) -> str:
        return f"SDVAEEncoder({self.config.source!r})"


def load_encoder(source: str | os.PathLike = DEFAULT_SOURCE, *, revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                 subfolder: str | None = None) -> SDVAEEncoder:
    """The SD-VAE encoder from a local diffusers folder or a Hub id, through huggingface_hub (its cache,
    `revision`, HF_HUB_OFFLINE / `local_files_only`), as `AutoencoderKL.from_pretrained` does."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError(f"the SD-VAE encoder needs diffusers: {INSTALL_HINT}") from e
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"SD-VAE source must be a folder path or a Hub repo id, got {type(source).__name__}")
    where = f"{source}" + (f" (revision {revision})" if revision else "")
    try:
        vae = AutoencoderKL.from_pretrained(source, revision=revision, cache_dir=cache_dir,
                                            local_files_only=local_files_only, subfolder=subfolder)
    except OSError as e:  # diffusers' EnvironmentError for a missing folder, repo, revision or offline cache miss
        raise FileNotFoundError(
            f"cannot load the SD-VAE encoder from {where}: {e}. Pass a local diffusers AutoencoderKL folder, or "
            f"fetch it once with network access: `hf download {source}`") from e
    vae.decoder = None  # only encode() runs: free the VAE decoder's weights
    vae.post_quant_conv = None
    return SDVAEEncoder(vae, str(source))
