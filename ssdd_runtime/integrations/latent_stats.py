"""Latent normalisation for latent-diffusion users: scaling/shift factors and the statistics behind `ssdd stats`.

SSDD latents are the raw means of the encoder's Gaussian (spec 1.2, 5): no scaling factor is applied anywhere
in SSDD itself. A diffusion model trained on them wants roughly unit-variance inputs, so diffusers-style
pipelines normalise with the VAE config's two numbers:

    z_diffusion = (z - shift_factor) * scaling_factor        # before training / after encode
    z           = z_diffusion / scaling_factor + shift_factor # before decode (SD3/Flux style; DiT and SD1.x
                                                              # pipelines only divide by scaling_factor)

With measured latent statistics (mean m, std s over a dataset) the natural choice is shift_factor = m and
scaling_factor = 1 / s; `compute_latent_stats` / `ssdd stats` measure them. No statistics are published for
the facebook/SSDD checkpoints, so every checkpoint defaults to 1.0 / 0.0 (no normalisation) until a user supplies
a stats JSON or explicit numbers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_SCALING_FACTOR = 1.0
DEFAULT_SHIFT_FACTOR = 0.0


def known_file(checkpoint: str | os.PathLike | None) -> str | None:
    """The KNOWN_FILES name a checkpoint path ends with (Hub cache paths keep the repo layout), else None."""
    from ssdd_runtime.weights import KNOWN_FILES

    if checkpoint is None:
        return None
    p = Path(checkpoint).as_posix()
    return next((name for name in KNOWN_FILES if p == name or p.endswith("/" + name)), None)


def latent_normalization(*, stats: str | os.PathLike | dict | None = None, scaling_factor: float | None = None,
                         shift_factor: float | None = None) -> tuple[float, float]:
    """(scaling_factor, shift_factor). Priority: explicit numbers, then a stats JSON written by `ssdd stats` (or its
    dict), then 1.0 / 0.0 (no checkpoint has published statistics)."""
    scale, shift = DEFAULT_SCALING_FACTOR, DEFAULT_SHIFT_FACTOR
    if stats is not None:
        d = stats if isinstance(stats, dict) else json.loads(Path(stats).read_text(encoding="utf-8"))
        if "scaling_factor" not in d or "shift_factor" not in d:
            raise ValueError(f"latent stats must hold 'scaling_factor' and 'shift_factor' (from `ssdd stats`), "
                             f"got keys {sorted(d)}")
        scale, shift = float(d["scaling_factor"]), float(d["shift_factor"])
    if scaling_factor is not None:
        scale = float(scaling_factor)
    if shift_factor is not None:
        shift = float(shift_factor)
    if not scale > 0 or scale == float("inf"):
        raise ValueError(f"scaling_factor must be a positive finite number, got {scale!r}")
    if not math.isfinite(shift):
        raise ValueError(f"shift_factor must be a finite number, got {shift!r}")
    return scale, shift


def checkpoint_id(path: str | os.PathLike) -> str:
    """`<file name>@sha256:<16 hex>` of a checkpoint file: identifies the weights, whatever the path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return f"{Path(path).name}@sha256:{h.hexdigest()[:16]}"


@dataclass
class LatentStats:
    """Running mean/variance in float64 (Chan et al. pairwise merge: no E[x^2]-E[x]^2 cancellation)."""

    channels: int
    count: int = 0  # values per channel
    mean: torch.Tensor = field(default=None)  # (C,) float64
    m2: torch.Tensor = field(default=None)  # (C,) float64 sum of squared deviations

    def __post_init__(self):
        if self.mean is None:
            self.mean = torch.zeros(self.channels, dtype=torch.float64)
            self.m2 = torch.zeros(self.channels, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> None:  # z: (B, C, h, w)
        if z.dim() != 4 or z.shape[1] != self.channels:  # a reshape would mix channels silently
            raise ValueError(f"expected latents (B, {self.channels}, h, w), got {tuple(z.shape)}")
        v = z.detach().double().cpu().transpose(0, 1).reshape(self.channels, -1)  # (C, N)
        n = v.shape[1]
        if n == 0:
            return
        mean_b = v.mean(1)
        m2_b = ((v - mean_b[:, None]) ** 2).sum(1)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta ** 2 * (self.count * n / total)
        self.count = total

    def summary(self) -> dict:
        if self.count < 2:
            raise ValueError(f"need at least 2 latent values per channel for a std, got {self.count}")
        if not bool(torch.isfinite(self.mean).all() & torch.isfinite(self.m2).all()):
            raise ValueError("latent statistics are not finite: the latents hold NaN/inf values or overflow float64")
        C, n = self.channels, self.count
        mean = float(self.mean.mean())  # every channel has n values: the global mean is the channel average
        m2 = float(self.m2.sum() + (n * (self.mean - mean) ** 2).sum())
        std = (m2 / (C * n - 1)) ** 0.5
        if not std > 0:
            raise ValueError(f"the {C * n} latent values are all equal (std 0): no scaling_factor = 1/std")
        return {"mean": mean, "std": std, "channel_mean": self.mean.tolist(),
                "channel_std": (self.m2 / (n - 1)).sqrt().tolist(), "values_per_channel": n,
                "scaling_factor": 1.0 / std, "shift_factor": mean,
                # diffusers' per-channel names (AutoencoderKL config latents_mean / latents_std), read by
                # ssdd_runtime.data.channel_stats and LatentDataset(normalize=...)
                "latents_mean": self.mean.tolist(), "latents_std": (self.m2 / (n - 1)).sqrt().tolist()}


def shard_latent_stats(folder: str | os.PathLike) -> dict:
    """The statistics of `compute_latent_stats` from the `latent` column of the shards `ssdd tokenize` wrote to
    `folder` (no re-encoding; flipped copies and log-variances are not included)."""
    from ssdd_runtime.data import list_shards, read_manifest, read_shard

    acc, num, non_finite, sources = None, 0, {}, {}
    for path in list_shards(folder):
        cols, info = read_shard(path, ("latent",))
        sources.setdefault(info.get("checkpoint"), path.name)
        if len(sources) > 1:  # statistics of two tokenizers' latents describe neither
            raise ValueError(f"the shards in {folder} come from different checkpoints: {sources}")
        z = cols["latent"]
        finite = torch.isfinite(z.flatten(1)).all(1) if len(z) else torch.ones(0, dtype=torch.bool)
        for key in (k for k, ok in zip(cols["key"], finite.tolist()) if not ok):  # skipped and counted, not averaged
            non_finite[key] = f"non-finite latent (NaN or inf) in {path.name}: left out of the statistics"
        z = z[finite]
        if acc is None and len(z):
            acc = LatentStats(z.shape[1])
        if len(z):
            if z.shape[1] != acc.channels:
                raise ValueError(f"shard {path} holds {z.shape[1]}-channel latents, the other shards "
                                 f"{acc.channels}-channel ones")
            acc.update(z)
            num += len(z)
    if acc is None:
        raise ValueError(f"the shards in {folder} hold no finite latents"
                         + (f" ({len(non_finite)} non-finite skipped)" if non_finite else ""))
    manifest = read_manifest(folder) or {}
    if manifest.get("checkpoint") not in (None, *sources):
        raise ValueError(f"the manifest of {folder} names checkpoint {manifest['checkpoint']}, its shards were "
                         f"encoded with {next(iter(sources))}: the manifest belongs to another job")
    errors = {**manifest.get("errors", {}), **non_finite}
    out = acc.summary()
    out.update(num_images=num, num_errors=len(errors), num_non_finite=len(non_finite), errors=errors,
               encoder=manifest.get("encoder"), checkpoint=manifest.get("checkpoint"), source=str(folder))
    return out


def compute_latent_stats(model, paths: list[str | os.PathLike], *, batch_size: int = 8) -> dict:
    """Encode images (center-cropped to multiples of the stride) with `model.encode(x).mode()` and return the
    latent mean/std (global and per channel) plus `scaling_factor = 1/std`, `shift_factor = mean`.
    Unreadable images are skipped and listed under "errors" (path -> message); they never stop the run."""
    from ssdd_runtime.io import load_image, same_shape_batches

    if not paths:
        raise ValueError("no images given")
    acc = LatentStats(model.decoder_config.z_dim)
    errors: dict[str, str] = {}

    def readable():
        for p in paths:
            try:
                yield p, load_image(p, multiple_of=model.stride)
            except (ValueError, FileNotFoundError) as e:
                log.warning("skipping %s: %s", p, e)
                errors[str(p)] = str(e)

    num_images = 0
    for names, x in same_shape_batches(readable(), batch_size):
        acc.update(model.encode(x).mode())
        num_images += len(names)
    if num_images == 0:
        raise ValueError(f"none of the {len(paths)} images could be read: {errors}")
    out = acc.summary()
    out.update(num_images=num_images, num_errors=len(errors), errors=errors,
               encoder=model.encoder_config.name, decoder=model.decoder_config.size,
               checkpoint=getattr(model, "checkpoint", None))
    return out
