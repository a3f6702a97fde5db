"""What a latents file must record so it is decoded by a model that can read it, and the check at decode time.

Latents are only meaningful to a decoder trained on the same encoder: f8 latents fed to an f16 checkpoint (or
4-channel latents to an F16C16 one) decode to noise without any error from the shapes alone, because the
decoder runs at any latent size. `latent_metadata(model)` gives the fields an encode step writes next to the
tensors; `check_latent_metadata(meta, model)` raises before decoding when they disagree.

Fields (all strings, so they fit safetensors metadata as they are):
    ssdd.encoder     "f8c4"..., or "sdvae" (the SD-VAE paired with the SDVAE decoders)
    ssdd.z_dim       latent channels
    ssdd.stride      image pixels per latent pixel
    ssdd.checkpoint  the checkpoint that encoded: its Hub file name when it is a known one, else the file name
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

KEYS = ("ssdd.encoder", "ssdd.z_dim", "ssdd.stride", "ssdd.checkpoint")


def checkpoint_id(checkpoint) -> str:
    """A path-independent name for a checkpoint: the KNOWN_FILES name it ends with (Hub cache paths keep the repo
    layout), else its file name; "" when the model was not loaded from a file."""
    from ssdd_runtime.weights import KNOWN_FILES

    if checkpoint is None:
        return ""
    p = Path(checkpoint).as_posix()
    return next((name for name in KNOWN_FILES if p == name or p.endswith("/" + name)), Path(checkpoint).name)


def latent_metadata(model) -> dict[str, str]:
    """The metadata a latents file encoded by `model` (an `ssdd_runtime.SSDD`) records."""
    if model.encoder_name is None:
        raise ValueError("a decode-only model encodes nothing: it has no latent metadata to record")
    return {"ssdd.encoder": model.encoder_name, "ssdd.z_dim": str(model.decoder_config.z_dim),
            "ssdd.stride": str(model.stride), "ssdd.checkpoint": checkpoint_id(getattr(model, "checkpoint", None))}


def _encoder_read_by(model) -> str | None:
    """The encoder whose latents `model` decodes: its own or paired one; for a decode-only model the encoder its
    known Hub file was trained on (the SDVAE files: "sdvae"); None when unknown (then only shapes are checked)."""
    from ssdd_runtime.weights import KNOWN_FILES

    if model.encoder_name is not None:
        return model.encoder_name
    entry = KNOWN_FILES.get(checkpoint_id(getattr(model, "checkpoint", None)))
    return entry.encoder if entry is not None else None


def check_latent_metadata(meta: dict[str, str] | None, model, *, force: bool = False) -> None:
    """Raise ValueError when latents recorded with `meta` cannot be decoded by `model`: another encoder, stride or
    channel count. `force=True` logs the mismatch as a warning instead (the caller knows better). Missing
    metadata (older files) and a different checkpoint id are logged, not raised: the id is advisory (SSDD's
    encoders are trained with their decoders, so another checkpoint's latents usually decode badly even with the
    same f<F>c<C>; the SDVAE decoders all share one encoder)."""
    if not meta or not any(k in meta for k in KEYS):
        log.info("latents carry no ssdd.* metadata: cannot check they come from an encoder this model reads")
        return
    expected = {"ssdd.encoder": _encoder_read_by(model), "ssdd.z_dim": str(model.decoder_config.z_dim),
                "ssdd.stride": str(model.stride)}
    wrong = [f"{k.split('.')[1]} {meta[k]!r} (this model: {v!r})" for k, v in expected.items()
             if k in meta and v is not None and str(meta[k]) != v]
    if wrong:
        where = checkpoint_id(getattr(model, "checkpoint", None)) or "this model"
        msg = (f"latents were encoded with {', '.join(wrong)}: {where} decodes {expected['ssdd.encoder'] or 'its'} "
               f"latents ({expected['ssdd.z_dim']} channels, stride {expected['ssdd.stride']}). Decode them with the "
               f"checkpoint that encoded them ({meta.get('ssdd.checkpoint') or 'unknown'}), or force it")
        if not force:
            raise ValueError(msg)
        log.warning("forced: %s", msg)
        return
    ours = checkpoint_id(getattr(model, "checkpoint", None))
    theirs = meta.get("ssdd.checkpoint", "")
    if ours and theirs and ours != theirs and meta.get("ssdd.encoder") != "sdvae":
        log.warning("latents were encoded by %s but are decoded by %s: SSDD encoders are trained with their "
                    "decoders, so expect a poor reconstruction", theirs, ours)
