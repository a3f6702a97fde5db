"""Checkpoint files and the Hub: find, read, validate, infer the architecture from tensor shapes.

An official SSDD checkpoint is the complete model state dict (`encoder.*` + `decoder.*`, no prefix, fp32)
stored as `.safetensors` with no config inside (spec 1.4); the SDVAE files hold `decoder.*` only (their encoder
is diffusers' SD-VAE, spec 1.4b). The architecture is therefore read from the tensor shapes: encoder stride
from the number of `encoder.down.<i>` levels, latent channels from `encoder.conv_out` (or, decoder-only, from
`decoder.conv_in`), decoder size from the level widths, transformer depth and head count.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ssdd_runtime.model import DECODER_SIZES, ENCODER_STRIDES, DecoderConfig, EncoderConfig, decoder_config

log = logging.getLogger(__name__)

DEFAULT_REPO = "facebook/SSDD"


@dataclass(frozen=True)
class HubFile:
    encoder: str  # "f<F>c<C>": SSDD's own encoder, stored in the file; "sdvae": diffusers' AutoencoderKL, not stored
    z_dim: int  # latent channels
    decoder: str  # decoder size
    resolution: int  # training resolution (the decoder runs at any size, see README)
    scaling_factor: float  # what a diffusers pipeline divides its latents by before decode (pipeline convention)
    steps: int | None = None  # recommended Euler steps; None: not recorded anywhere we can read
    t_pow_shift: float | None = None  # recommended time-grid exponent; None: not recorded

    @property
    def decoder_only(self) -> bool:  # the file holds decoder.* tensors only; the encoder comes from elsewhere
        return self.encoder == "sdvae"


def _family(folder: str, encoder: str, z_dim: int, sizes: tuple[str, ...], scaling_factor: float):
    return {f"{folder}/{folder}_{s}_256.safetensors": HubFile(encoder, z_dim, s, 256, scaling_factor) for s in sizes}


# Files of the weights commit of facebook/SSDD ("Add SSDD model weights"; spec 1.4b): 24 files plus the demo. No
# H decoder was released. Advisory: loading never trusts a name; the architecture comes from the tensor shapes.
# scaling_factor: 0.18215 is Stable Diffusion's for its KL-f8 VAE (SD pipeline latents / 0.18215 are exactly what
# the SDVAE decoders read); 1.0 for SSDD's own encoders (raw posterior means, no statistics measured; see
# integrations/latent_stats.py). Sampler defaults: which files are distilled single-step decoders and which are
# multi-step teachers is not recorded in anything read here, so they stay None and every example passes `steps`.
# The one exception: the upstream demo notebook decodes the demo file with steps=8 through the API path, whose
# grid exponent is the official sampler default 2.0 (spec 1.1).
KNOWN_FILES: dict[str, HubFile] = {
    "demo_f8c4_M_128.safetensors": HubFile("f8c4", 4, "M", 128, 1.0, steps=8, t_pow_shift=2.0),
    **_family("F8C4", "f8c4", 4, ("S", "B", "M", "L", "XL"), 1.0),
    **_family("F16C4", "f16c4", 4, ("S", "B", "M", "L", "XL"), 1.0),
    **_family("F16C16", "f16c16", 16, ("S", "B", "M", "L", "XL"), 1.0),
    **_family("F32C64", "f32c64", 64, ("S", "B", "M", "L", "XL"), 1.0),
    **_family("SDVAE", "sdvae", 4, ("S", "B", "M", "L"), 0.18215),
}


def resolve_checkpoint(source: str | os.PathLike, filename: str | None = None, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """Local path of a checkpoint: `source` is a `.safetensors` file, a folder (+ `filename`), or a Hub repo id
    (+ `filename`), fetched through huggingface_hub (its cache, `revision`, HF_HUB_OFFLINE)."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint source must be a path or a Hub repo id string, got {type(source).__name__}")
    if filename is not None and (not isinstance(filename, (str, os.PathLike)) or not str(filename).strip()):
        raise ValueError(f"filename is empty ({filename!r}): name a .safetensors file, e.g. "
                         f"{next(iter(KNOWN_FILES))}")
    path = Path(source)
    if path.is_dir():
        if filename is None:
            raise ValueError(f"{path} is a folder: pass filename= (one of its .safetensors files)")
        path = path / filename
        if not path.is_file():
            _not_a_file(path)
    if path.is_file():
        return path
    if os.path.lexists(path):
        _not_a_file(path)
    if not _is_repo_id(str(source)):
        raise FileNotFoundError(f"checkpoint file not found: {path} (and {str(source)!r} is not a Hub repo id "
                                "like 'facebook/SSDD')")
    if filename is None:
        raise ValueError(f"Hub repo {source!r} needs filename=, e.g. one of: {', '.join(KNOWN_FILES)}")
    return _hub_download(str(source), filename, revision=revision, cache_dir=cache_dir,
                         local_files_only=local_files_only)


def _not_a_file(path: Path):
    """Raise the error that says what `path` is, when it is not a regular file: missing, a folder, a broken
    symlink, a symlink loop, a FIFO, a device or a socket (all of which `is_file()` reports as False)."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError(f"checkpoint {path} is a symlink loop (it resolves to itself)") from None
        if os.path.islink(path):
            raise FileNotFoundError(f"checkpoint {path} is a broken symlink (to {os.readlink(path)})") from None
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(f"checkpoint file not found: {path}") from None
        raise OSError(e.errno, f"cannot read checkpoint {path}: {e.strerror}") from None
    what = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    raise ValueError(f"checkpoint {path} is {what}, expected a .safetensors file")


def _is_repo_id(s: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not s.endswith((".safetensors", ".pt", ".pth"))


def _hub_download(repo_id: str, filename: str, *, revision, cache_dir, local_files_only) -> Path:
    import huggingface_hub
    from huggingface_hub.utils import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                       RevisionNotFoundError)

    where = f"{repo_id}/{filename}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                                    local_files_only=local_files_only))
    except LocalEntryNotFoundError as e:
        offline = local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE
        why = "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)" if offline else "the Hub is unreachable"
        raise FileNotFoundError(
            f"{where} is not in the Hugging Face cache ({cache_dir or huggingface_hub.constants.HF_HUB_CACHE}) and "
            f"{why}. Fetch it once with network access: `hf download {repo_id} {filename}"
            f"{' --revision ' + revision if revision else ''}`, or pass a local .safetensors path.") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id!r} not found (or private without a token)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"revision {revision!r} not found in Hub repo {repo_id!r}") from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{where} does not exist; known files: {', '.join(KNOWN_FILES)}") from e


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, on CPU. Errors name the file and what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, expected a .safetensors checkpoint file (or pass filename=)")
    if not path.is_file():
        _not_a_file(path)
    if not os.access(path, os.R_OK):  # safetensors would report this as "No such file or directory"
        raise PermissionError(f"cannot read checkpoint {path}: permission denied")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise ValueError(f"{path} is not a .safetensors file; SSDD checkpoints are loaded from safetensors only "
                         "(no pickle)")
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or another format?): {e}") from e


def infer_config(state_dict: dict[str, torch.Tensor]) -> tuple[EncoderConfig | None, DecoderConfig]:
    """Encoder and decoder configuration implied by the tensor shapes of an SSDD state dict. The encoder is None
    for a decoder-only file (`decoder.*` tensors only, e.g. the SDVAE decoders, whose encoder is external)."""
    need = ("decoder.conv_in.weight", "decoder.mid_block.proj_in.weight")
    missing = [k for k in need if k not in state_dict]
    if missing:
        parts = sorted({k.split(".")[0] for k in state_dict})
        raise ValueError(f"not an SSDD checkpoint (decoder.* tensors, optionally encoder.*): missing {missing}; "
                         f"top-level names found: {parts[:8]}")
    enc = None
    if any(k.startswith("encoder.") for k in state_dict):
        if "encoder.conv_out.weight" not in state_dict:
            raise ValueError("encoder.* tensors without encoder.conv_out.weight: a truncated or foreign encoder")
        levels = {int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.down\.(\d+)\.", k))}
        stride = 2 ** (len(levels) - 1)
        z_dim = state_dict["encoder.conv_out.weight"].shape[0] // 2
        if stride not in ENCODER_STRIDES:
            raise ValueError(f"encoder with {len(levels)} levels (stride {stride}) is not supported; "
                             f"expected strides {ENCODER_STRIDES}")
        enc = EncoderConfig(stride=stride, z_dim=z_dim)

    dec_z = state_dict["decoder.conv_in.weight"].shape[1] - 3  # conv_in reads [x_t (3), z_up (C)]
    widths = tuple(state_dict[f"decoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(4)
                   if f"decoder.down_blocks.{i}.resnets.0.conv1.weight" in state_dict)
    layers = len({int(m.group(1)) for k in state_dict
                  if (m := re.match(r"decoder\.mid_block\.transformer_blocks\.(\d+)\.", k))})
    table = state_dict.get("decoder.mid_block.transformer_blocks.0.relative_position_bias.relative_bias_table")
    heads = table.shape[-1] if table is not None else None
    for size in DECODER_SIZES:
        cfg = decoder_config(size, z_dim=dec_z)
        if (cfg.levels, cfg.mid_layers, cfg.num_heads) == (widths, layers, heads):
            return enc, cfg
    raise ValueError(f"decoder tensors match no known size (levels {widths}, {layers} transformer blocks, "
                     f"{heads} heads); known sizes: {', '.join(DECODER_SIZES)}")


def check_keys(source: str, *, missing=(), unexpected=(), wrong=()) -> None:
    """The strict-loading verdict shared by `check_state_dict` and `SSDDVAE.from_pretrained` (diffusers folders):
    ValueError naming the first few missing keys, unexpected keys and wrong shapes; nothing is loaded."""
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        items = list(items)
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {what}: {', '.join(map(str, items[:5]))}{more}")
    if problems:
        raise ValueError(f"{source} does not match the SSDD architecture: " + "; ".join(problems))


def check_state_dict(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], *, source: str) -> None:
    """Strict key and shape match, naming the first few offenders of each kind."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k}: expected {tuple(s)}, found {tuple(found[k].shape)}"
             for k, s in expected.items() if k in found and found[k].shape != s]
    check_keys(source, missing=missing, unexpected=unexpected, wrong=wrong)
    bad = [k for k, t in found.items() if not t.is_floating_point()]
    if bad:
        raise ValueError(f"{source}: non-floating-point tensors {bad[:5]}")
