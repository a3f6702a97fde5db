"""`ssdd` command line: the one argparse front end over keyword-only library functions.

Shared flags are parent parsers (checkpoint source, runtime, sampler, decode, batch size); every command reads
its model through `load_model`. Library modules (export/, integrations/, benchmarks/) never import this one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

import torch

from ssdd_runtime.api import BACKENDS, MAX_STEPS, SSDD, check_device
from ssdd_runtime.io import (atomic_output, atomic_output_folder, check_output, confined_path, list_images,
                             load_image, load_latents, psnr, same_shape_batches, save_image, save_latents,
                             unique_names, write_text_atomic)
from ssdd_runtime.latents import check_latent_metadata, latent_metadata
from ssdd_runtime.sampler import T_POW_SHIFT

EPILOG = ("Checkpoints: --checkpoint PATH (a local .safetensors) or --repo facebook/SSDD --filename "
          "F8C4/F8C4_M_256.safetensors [--revision R] (Hugging Face cache; HF_HUB_OFFLINE=1 works offline).")
RAY_EPILOG = ("Ray: without --address a local Ray instance is started (all local CPUs/GPUs); --address auto joins "
              "the cluster this node belongs to, ray://HEAD:10001 a remote one. Inputs and a local --checkpoint must "
              "be readable on every node; OUTDIR is written by the driver only. Exit status 1: the job finished "
              "but some items failed (listed on stderr and recorded in the shards).")
BENCH_DESCRIPTION = """\
Time SSDD decoding against the KL-VAE decoder (diffusers AutoencoderKL, SD-VAE f8c4 configuration) on the
backends available here; unavailable backends are skipped with their reason. Weights are random unless
checkpoints are given: throughput does not depend on weight values. Runs offline.

--quick: SSDD-M 1-step vs KL-VAE, 256x256, batch 1, on CPU: the fastest available CPU backend (openvino-bf16,
openvino, onnxruntime, eager: the first installed) and eager fp32, 1 warm-up + 3 timed calls each; prints
SSDD's images/s over the KL-VAE's on the same backend and over the KL-VAE's in eager PyTorch, warns when the
load average is above the core count, and writes the plot (--plot, default ssdd_bench_quick.png)."""
BENCH_BACKENDS = ["eager", "triton", "compile", "cudagraphs", "onnxruntime", "tensorrt", "openvino", "openvino-bf16"]
QUICK_PLOT = "ssdd_bench_quick.png"
DTYPES = ["fp32", "bf16", "fp16"]


# -- shared flags ---------------------------------------------------------------------------------------------


class _Items(argparse.Action):
    """A list flag: `--batch 1 4 16` or, as the README writes it, `--batch 1,4,16`; `item` converts each value
    and raises ValueError with the message argparse shows."""

    def __init__(self, option_strings, dest, *, item=str, **kwargs):
        super().__init__(option_strings, dest, nargs="+", **kwargs)
        self.item = item

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            items = [self.item(v.strip()) for value in values for v in value.split(",") if v.strip()]
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        setattr(namespace, self.dest, items)


def _checked(convert, ok, expected: str):
    """An argparse `type`: convert(text), refused unless ok(value); argparse names the flag in the message."""
    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected
    return parse


_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
_nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_steps = _checked(int, lambda v: 1 <= v <= MAX_STEPS, f"an integer in 1..{MAX_STEPS}")
_seed = _checked(int, lambda v: 0 <= v < 2 ** 64, "an integer in 0..2**64-1")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive finite number")
_nonneg_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")


def _device(text: str) -> str:
    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected integers, got {text!r}") from None


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        return int(h), int(w or h)
    except ValueError:
        raise ValueError(f"expected sizes like 256 or 256x384 (HxW), got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit 2, like every other error of `ssdd`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parent() -> argparse.ArgumentParser:
    return _Parser(add_help=False)


def _debug_flag() -> argparse.ArgumentParser:
    p = _parent()
    # `ssdd --debug CMD` or `ssdd CMD --debug`; SUPPRESS keeps the top-level value when the command has none.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on error, show the Python traceback (also SSDD_DEBUG=1)")
    return p


def _checkpoint_flags(*, required: bool = True) -> argparse.ArgumentParser:
    p = _parent()
    g = p.add_argument_group("checkpoint")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--checkpoint", metavar="PATH", help="local SSDD .safetensors file")
    src.add_argument("--repo", metavar="ID", help="Hugging Face Hub repo id, e.g. facebook/SSDD")
    g.add_argument("--filename", metavar="F", help="file inside --repo, e.g. F8C4/F8C4_M_256.safetensors")
    g.add_argument("--revision", metavar="R", help="Hub branch, tag or commit (default: main)")
    return p


def _runtime_flags(*, device: bool = True, backend: bool = False) -> argparse.ArgumentParser:
    p = _parent()
    g = p.add_argument_group("runtime")
    if device:
        g.add_argument("--device", default=None, type=_device,
                       help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights/activations dtype (default fp32)")
    if backend:
        g.add_argument("--backend", default="torch", choices=BACKENDS,
                       help="torch (default) or openvino (CPU; --dtype fp32 or bf16 picks its precision)")
    return p


def _sampler_flags(*, seed: bool = True) -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--steps", type=_steps, default=1, help="Euler steps (1 = single-step decoding; default 1)")
    p.add_argument("--t-pow-shift", type=_positive_float, default=T_POW_SHIFT,
                   help=f"time-grid exponent (default {T_POW_SHIFT})")
    if seed:
        p.add_argument("--seed", type=_seed, default=0, help="seed of the decoding noise (default 0)")
    return p


def _batch_flag(default: int | None, *, per: str = "forward pass") -> argparse.ArgumentParser:
    p = _parent()
    p.add_argument("--batch-size", type=_positive_int, default=default,
                   help=f"images per {per} (default {'all' if default is None else default})")
    return p


def checkpoint_source(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """The checkpoint flags -> (source, filename, revision) as `SSDD.from_pretrained` takes them."""
    if args.repo is not None and not args.filename:
        raise ValueError("--repo needs --filename (e.g. F8C4/F8C4_M_256.safetensors)")
    return (args.checkpoint if args.checkpoint is not None else args.repo), args.filename, args.revision


def load_model(args: argparse.Namespace, *, device: str | None = None, dtype: str | None = None) -> SSDD:
    """The model the checkpoint flags name, on `device`/`dtype` if given, else --device/--dtype (default: cuda if
    available, else cpu; fp32)."""
    source, filename, revision = checkpoint_source(args)
    backend, dtype = getattr(args, "backend", "torch"), dtype or getattr(args, "dtype", None)
    if backend == "openvino" and dtype == "fp16":
        raise ValueError("--backend openvino runs --dtype fp32 or bf16 (no fp16 on OpenVINO's CPU plugin)")
    cuda = torch.cuda.is_available() and backend == "torch"
    device = device or getattr(args, "device", None) or ("cuda" if cuda else "cpu")
    return SSDD.from_pretrained(source, filename, revision=revision, device=device, dtype=dtype, backend=backend)


# -- the parser -----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ckpt, runtime, decode, batch = _checkpoint_flags(), _runtime_flags(), _sampler_flags(), _batch_flag(None)
    model = [ckpt, _runtime_flags(backend=True)]  # encode, decode, reconstruct
    parser = _Parser(prog="ssdd", description="SSDD image tokenizer runtime: encode images to "
                     "latents and decode them with the single-step diffusion decoder.",
                     epilog="Errors are one line on stderr with exit status 2; --debug (or SSDD_DEBUG=1) shows the "
                            "traceback instead.")
    parser.add_argument("--debug", action="store_true", help="on error, show the Python traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name, func, helptext, *, parents=(), **kw):
        p = sub.add_parser(name, help=helptext, parents=[_debug_flag(), *parents], **kw)
        p.set_defaults(func=func)
        return p

    p = command("encode", cmd_encode, "images -> latents file", parents=[*model, batch],
                epilog=EPILOG, description="Encode images (same size; center-cropped to multiples of the encoder "
                "stride) to their latent means, saved as one (B, C, h, w) tensor.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--output", required=True, help="latents file: .safetensors, .npy or .pt")

    p = command("decode", cmd_decode, "latents file -> PNG images",
                parents=[_checkpoint_flags(required=False), _runtime_flags(backend=True), decode, batch],
                epilog=EPILOG, description="Decode a latents file (written by `ssdd encode` or any (B, C, h, w) "
                "tensor) to PNGs named after the encoded images when known. With --server the images are decoded "
                "by a running `ssdd serve` (image i with seed --seed + i, --batch-size items per request, default "
                "1) instead of a local checkpoint.")
    p.add_argument("--server", metavar="URL", default=None,
                   help="decode on a running `ssdd serve`: http://HOST:PORT or grpc://HOST:PORT")
    p.add_argument("latents", help="latents file: .safetensors, .npy or .pt")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="decode even when the file records another encoder than this checkpoint reads")

    p = command("reconstruct", cmd_reconstruct, "images -> encode -> decode -> PNGs, with PSNR",
                parents=[*model, decode, batch], epilog=EPILOG,
                description="Round-trip images through the tokenizer and print the PSNR of each.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--output", required=True, help="output folder")

    p = command("demo", cmd_demo, "offline demo: reconstruct the bundled sample with test weights",
                description="Reconstructs a bundled sample image with deterministic *test* weights (no "
                            "download): it shows the pipeline runs, not SSDD's quality.")
    p.add_argument("-o", "--output", default="demo_out", help="output folder (default demo_out)")

    _add_export(sub.add_parser("export", help="ONNX / TensorRT / Triton Inference Server export",
                               parents=[_debug_flag()],
                               description="Export SSDD graphs for ONNX Runtime, TensorRT and Triton."),
                ckpt)

    p = command("serve", cmd_serve, "serve ssdd_decode / ssdd_encode on Triton Inference Server",
                parents=[ckpt], epilog=EPILOG, description="Serve the checkpoint on the tritonserver bundled by "
                "nvidia-pytriton (pip install 'ssdd-runtime[serve]'): models ssdd_decode (latent [B,C,h,w] FP32, "
                "optional seed [B,1] INT64 / noise, steps, t_pow_shift -> image FP32 [B,3,H,W], image_uint8) and "
                "ssdd_encode, KServe v2 over HTTP (JSON or binary) and gRPC, dynamic batching of same-size "
                "requests (each item decoded on its own: batching never changes an image), Triton's health, "
                "readiness and Prometheus metrics. SIGTERM or Ctrl-C drains in-flight requests, then exits 0. "
                "See docs/guides/serving.md.")
    g = p.add_argument_group("runtime")
    g.add_argument("--backend", default="torch", choices=["torch", "compile", "openvino", "tensorrt"],
                   help="torch (default), compile (torch.compile), openvino (CPU), tensorrt (--engine, GPU)")
    g.add_argument("--engine", default=None, help="TensorRT decoder engine (--backend tensorrt)")
    g.add_argument("--device", default=None, type=_device, help="torch device (default cpu)")
    g.add_argument("--dtype", default="fp32", choices=DTYPES, help="weights/activations dtype (default fp32)")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch threads per instance")
    g = p.add_argument_group("server")
    g.add_argument("--max-batch", type=_positive_int, default=8, help="dynamic batching limit (default 8)")
    g.add_argument("--max-queue-delay-us", type=_nonneg_int, default=2000,
                   help="how long a request may wait for others to batch with (default 2000)")
    g.add_argument("--instances", type=_positive_int, default=1, help="model instances (processes) per model")
    g.add_argument("--max-size", type=_positive_int, default=2048, help="cap on the image side in pixels")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    for name, default in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        g.add_argument(f"--{name}-port", type=_checked(int, lambda v: 1 <= v <= 65535, "a port 1..65535"),
                       default=default, help=f"default {default}")
    g.add_argument("--exit-timeout", type=_nonneg_int, default=30,
                   help="seconds SIGTERM waits for in-flight requests (default 30)")

    p = command("bench", cmd_bench, "SSDD vs KL-VAE decode throughput across backends", parents=[runtime],
                description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 3-minute CPU check described above")
    p.add_argument("--models", action=_Items, default=["ssdd-M", "kl-vae"],
                   help="ssdd-XS..ssdd-G, kl-vae (default ssdd-M,kl-vae)")
    p.add_argument("--steps", action=_Items, item=_int, default=[1], help="SSDD Euler steps (default 1)")
    p.add_argument("--backends", action=_Items, default=None,
                   help=f"{', '.join(BENCH_BACKENDS)} (default: all; unavailable ones are skipped)")
    p.add_argument("--batch", action=_Items, item=_int, default=[1], help="batch sizes (default 1)")
    p.add_argument("--res", action=_Items, item=_size, default=[(256, 256)],
                   help="image sizes, 256 or HxW like 256x384 (default 256)")
    p.add_argument("--channels-last", action="store_true", help="apply the channels_last transform to all models")
    p.add_argument("--warmup", type=_nonneg_int, default=1, help="warm-up calls per workload, excluded (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed calls per workload (default 5; --quick 3)")
    p.add_argument("--rotate", type=_positive_int, default=3, help="distinct input sets cycled through (default 3)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="SSDD .safetensors (default: random weights)")
    p.add_argument("--kl-vae-checkpoint", default=None, metavar="DIR",
                   help="local diffusers AutoencoderKL folder (default: random weights)")
    p.add_argument("--kl-vae-config", default=None, metavar="JSON",
                   help="AutoencoderKL config JSON for the baseline (default: the SD-VAE f8c4 config)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                   help="PSNR / max / mean abs error of every SSDD path against the fp32 eager decode of the same "
                        "latents and noise (default: on with --checkpoint)")
    p.add_argument("--eval-images", default=None, metavar="DIR",
                   help="--quality on the fp32 encodings of these images (needs --checkpoint) instead of random "
                        "latents")
    p.add_argument("--quality-plot", default=None, metavar="PATH",
                   help="write a PNG of quality (PSNR vs fp32 eager) against images/s, one point per path")
    p.add_argument("--json", default=None, metavar="PATH", help="write {'env': ..., 'results': [...]} here")
    p.add_argument("--csv", default=None, metavar="PATH", help="write one CSV row per result here")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of images/s vs batch here")
    p.add_argument("--quiet", action="store_true", help="no per-call progress lines")

    p = command("eval", cmd_eval, "reconstruction quality: rFID, PSNR, SSIM, LPIPS with the paper's protocol",
                parents=[_checkpoint_flags(required=False), _runtime_flags(backend=True), decode, _batch_flag(8)],
                epilog=EPILOG + " Needs pip install 'ssdd-runtime[eval]' (torch-fidelity, lpips, scikit-image). "
                "See docs/guides/evaluate.md.",
                description="Reconstruct the images of DATA (an ImageFolder tree or a flat folder, sorted relative "
                "paths) with the paper's protocol: short side resized to --res (bilinear), centre crop, encode, "
                "decode with seeded noise, both sides quantised to 8 bits; print one row per model and write the "
                "metrics (n, psnr pooled, psnr_mean, ssim, lpips, fid, mse_x1000, mae) to --json. --compare REF "
                "REC instead scores two folders matched by relative path (no resize). Metric weights missing "
                "offline (HF_HUB_OFFLINE=1): a one-line error before any decoding.")
    p.add_argument("data", nargs="?", help="image folder (ImageFolder tree or flat)")
    p.add_argument("--res", type=_positive_int, default=256, help="resize short side + centre crop (default 256)")
    p.add_argument("--limit", type=_positive_int, default=None, help="the first N images in sorted order")
    p.add_argument("--metrics", action=_Items, default=None,
                   help="psnr,ssim,lpips,fid,mse,mae (default all)")
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (default: its download cache)")
    p.add_argument("--baseline", metavar="kl-vae:SRC", default=None,
                   help="add a KL-VAE row: kl-vae:<diffusers AutoencoderKL folder or Hub id>, e.g. "
                        "kl-vae:stabilityai/sd-vae-ft-ema")
    p.add_argument("--compare", nargs=2, metavar=("REF_DIR", "REC_DIR"), default=None,
                   help="score REC_DIR against REF_DIR (same relative paths, same sizes; no checkpoint)")
    p.add_argument("--save", metavar="DIR", default=None,
                   help="write the 8-bit crops (DIR/inputs) and reconstructions (DIR/<model>) the metrics saw")
    p.add_argument("--json", metavar="PATH", default=None, help="write the result JSON here")
    p.add_argument("--note", action="append", default=[], metavar="TEXT",
                   help="a note recorded in the JSON (e.g. which weights these are); repeatable")

    p = command("stats", cmd_stats, "per-channel latent mean/std -> JSON (shard folder or images)",
                parents=[_checkpoint_flags(required=False), runtime, _batch_flag(8)], epilog=EPILOG,
                description="Write the mean and std of latents, globally and per channel (latents_mean / "
                            "latents_std, read by LatentDataset(normalize=...)), with the diffusers normalisation "
                            "scaling_factor = 1/std and shift_factor = mean. Given one folder written by `ssdd "
                            "tokenize`, read its shards (no checkpoint, no re-encoding; default output "
                            "OUT/.ssdd/latent_stats.json); else encode the images (folders searched recursively) "
                            "with the checkpoint.")
    p.add_argument("inputs", nargs="+", help="a `ssdd tokenize` output folder, or image files or folders")
    p.add_argument("-o", "--output", default=None,
                   help="JSON file to write (required for images; default for shards: OUT/.ssdd/latent_stats.json)")

    ray = [ckpt, _runtime_flags(device=False, backend=True), _batch_flag(8, per="actor call"), _ray_flags()]
    p = command("tokenize", cmd_tokenize, "images -> latent shards with Ray Data (resumable)", parents=ray,
                epilog=EPILOG + " " + RAY_EPILOG,
                description="Encode a folder, image files or parquet files of images (bytes or Hugging Face "
                            "{bytes, path} structs) to training-ready latent shards: key, label, latent (C, h, w) "
                            "[, latent_flip, logvar], one latent shape per shard (ssdd_runtime.data documents the "
                            "format; LatentDataset reads it). Shards already in OUTDIR are skipped; unreadable "
                            "images are reported and counted, never fatal.")
    p.add_argument("inputs", nargs="+", help="folders, image files or .parquet files")
    p.add_argument("-o", "--output", required=True, help="output folder (OUTDIR)")
    p.add_argument("--format", choices=["parquet", "safetensors"], default="parquet", help="shard format")
    p.add_argument("--shard-size", type=_positive_int, default=256, help="items per shard (default 256)")
    p.add_argument("--image-column", default="image",
                   help="parquet column with image bytes or Hugging Face {bytes, path} structs (default image)")
    p.add_argument("--key-column", default=None, help="parquet column with unique item keys (default: row index)")
    p.add_argument("--resolution", type=_positive_int, default=None, metavar="N",
                   help="ADM center crop + resize to NxN (fast-DiT/LightningDiT recipe); default: keep each image's "
                        "size (cropped to the stride), shards grouped by latent shape")
    p.add_argument("--flip", action="store_true", help="also store the horizontally flipped image's latent")
    p.add_argument("--store", choices=["mode", "moments"], default="mode",
                   help="mode: the latent mean; moments: mean and logvar (default mode)")
    p.add_argument("--labels", default="none", metavar="folder|COLUMN|none",
                   help="class labels: 'folder' (ImageFolder class sub-folders), a parquet column, or none "
                        "(label -1; default)")

    p = command("detokenize", cmd_detokenize, "latent shards -> PNGs with Ray Data (resumable)",
                parents=[*ray, decode], epilog=EPILOG + " " + RAY_EPILOG,
                description="Decode every latent of the shards written by `ssdd tokenize` to OUTDIR/<key>.png; "
                            "existing PNGs are skipped.")
    p.add_argument("latents", help="folder of shard-*.parquet / shard-*.safetensors")
    p.add_argument("-o", "--output", required=True, help="output folder")
    return parser


def _add_export(export: argparse.ArgumentParser, ckpt: argparse.ArgumentParser) -> None:
    sub = export.add_subparsers(dest="export_command", metavar="TARGET", required=True)
    p = sub.add_parser("onnx", help="checkpoint -> ONNX graph (decoder or encoder)",
                       parents=[_debug_flag(), ckpt, _sampler_flags(seed=False)], epilog=EPILOG,
                       description="Export the decoder (latent_sample, noise -> sample; --steps Euler steps unrolled "
                                   "into the graph) or the encoder (image -> latent_mean, latent_logvar) with dynamic "
                                   "batch, height and width, then check it with onnx.checker and compare ONNX "
                                   "Runtime (CPU) with PyTorch at two shapes (one non-square).")
    p.add_argument("--part", choices=["decoder", "encoder"], default="decoder")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset 18..20 (default 18)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: fp16 weights/activations, norm statistics and softmax in fp32, fp32 inputs/outputs")
    p.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                   help="weights in <output>.data (auto: when above ~1.8 GB)")
    p.add_argument("--noise", choices=["input", "graph"], default="input",
                   help="decoder start noise: an input (default) or drawn inside the graph from a per-item `seed` "
                        "input (B, 1) int64 (clients send latent_sample and seed; the drawn noise is a second output)")
    p.add_argument("--names", choices=["ssdd", "optimum"], default="ssdd",
                   help="encoder output names: ssdd (latent_mean, latent_logvar) or optimum (latent_parameters)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.set_defaults(func=cmd_export_onnx)

    engine = _parent()
    engine.add_argument("--onnx", required=True, help="graph written by `ssdd export onnx`")
    engine.add_argument("--engine", required=True, help="output engine (.plan)")
    engine.add_argument("--precision", default="fp16", help="fp16, bf16 or fp32 (default fp16)")
    engine.add_argument("--min-shape", required=True, help="e.g. 1x64x64")
    engine.add_argument("--opt-shape", required=True, help="e.g. 1x256x256")
    engine.add_argument("--max-shape", required=True, help="e.g. 8x512x512")
    engine.add_argument("--timing-cache", default=None, help="timing cache file (read if present, then written)")
    engine.add_argument("--opt-level", type=_checked(int, lambda v: 0 <= v <= 5, "an integer in 0..5"), default=3,
                        help="builder optimisation level 0..5 (default 3)")
    engine.add_argument("--workspace-mib", type=_positive_int, default=None, help="builder workspace limit in MiB")
    shapes = ("Shapes are image sizes BxHxW in pixels (both decoder inputs follow), or trtexec's per-input form "
              "latent_sample:BxCxhxw,noise:Bx3xHxW.")
    for name, func, helptext in (("tensorrt", cmd_export_tensorrt, "ONNX -> TensorRT engine (needs a GPU + tensorrt)"),
                                 ("trtexec-cmd", cmd_export_trtexec, "print the equivalent trtexec command")):
        sub.add_parser(name, help=helptext, parents=[_debug_flag(), engine], description=shapes).set_defaults(func=func)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository", parents=[_debug_flag()],
                       description="Write <repo>/<name>/config.pbtxt and <repo>/<name>/1/model.onnx|model.plan.")
    p.add_argument("--onnx", required=True, help="graph written by `ssdd export onnx` (names the tensors)")
    p.add_argument("--engine", default=None, help="TensorRT engine built from --onnx (backend tensorrt)")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--name", default=None, help="model name (default ssdd_<part>)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default=None,
                   help="default: tensorrt when --engine is given, else onnxruntime")
    p.add_argument("--max-batch-size", type=_positive_int, default=8)
    p.add_argument("--instances", type=_positive_int, default=1,
                   help="model instances per device (instance_group count)")
    p.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU", "KIND_AUTO"], default="KIND_GPU")
    p.add_argument("--preferred-batch-sizes", action=_Items, item=_int, default=[], help="e.g. 4 8 or 4,8")
    p.add_argument("--max-queue-delay-us", type=_nonneg_int, default=100)
    p.set_defaults(func=cmd_export_triton_repo)


def _ray_flags() -> argparse.ArgumentParser:
    p = _parent()
    g = p.add_argument_group("ray")
    g.add_argument("--address", default=None, help="Ray cluster address (auto, ray://HOST:10001); default: local")
    g.add_argument("--num-cpus", type=_positive_int, default=None, help="CPUs of a locally started Ray (default: all)")
    g.add_argument("--concurrency", type=_positive_int, default=None,
                   help="actors, one model each (default: one per GPU; on CPU: the cores divided by "
                        "--num-cpus-per-actor, one node-sized actor per node when neither is given)")
    g.add_argument("--num-cpus-per-actor", type=_positive_float, default=None,
                   help="CPUs per actor; torch threads follow (default: 1 with GPUs; on CPU all cores of a node, "
                        "or the cores divided by --concurrency)")
    g.add_argument("--num-gpus-per-actor", type=_nonneg_float, default=None,
                   help="GPUs per actor (default 1 if the cluster has GPUs, else 0 = CPU)")
    return p


# -- outputs: checked before any work, written through io's atomic writer ------------------------------------


def _output_file(path: str, *, inputs=(), reserved=(), suffixes=None, flag: str = "-o") -> Path:
    """Check an output file path before any work: not a folder, its folder exists and is writable, an allowed
    suffix, not one of the inputs nor inside a job's own files (io.check_output). The file itself is written
    later with io.atomic_output."""
    p = Path(path)
    if suffixes is not None and p.suffix not in suffixes:
        raise ValueError(f"{flag} {path}: unknown file type {p.suffix!r}; use {', '.join(suffixes)}")
    if p.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder, expected a file name")
    folder = p.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: output folder {folder} is not writable")
    return check_output(p, inputs=inputs, reserved=reserved, flag=flag)


def _output_dir(path: str, *, flag: str = "-o") -> Path:
    """Check (and create) an output folder before any work: not a file, creatable, writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{flag} {path} is a file, expected a folder")
    existing = next((a for a in (p, *p.parents) if a.exists()), Path("."))
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: {existing} is not writable")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _output_paths(out: Path, names: list[str], *, inputs=()) -> list[Path]:
    """`out/<name>` for each name: confined to `out` (no '..', no absolute names, no symlinked folder leading
    out), unique (deterministic -1, -2 suffixes) and never the path of an input file."""
    root = out.resolve()
    taken = []
    for i in inputs:
        try:
            taken.append(Path(i).resolve().relative_to(root).as_posix())
        except ValueError:
            pass  # the input is outside the output folder
    paths = []
    for name in unique_names(names, taken=taken):
        if "\0" in name:
            raise ValueError(f"output name {name!r} holds a NUL character")
        dest = confined_path(out, name)
        if any(len(part.encode()) > 255 for part in dest.relative_to(out).parts):
            raise ValueError(f"output name {name!r} is too long for a file name (255 bytes per part)")
        if not dest.parent.resolve().is_relative_to(root):
            raise ValueError(f"output name {name!r} leads outside the output folder {out} (through a symlink)")
        paths.append(dest)
    return paths


def _names(meta: dict, count: int, *, source: str, default: str) -> list[str]:
    """Image names stored in a latents file's metadata (validated), else `<default>_0000`, ..."""
    names = meta.get("names")
    if not names:
        return [f"{default}_{i:04d}" for i in range(count)]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{source}: metadata 'names' must be a list of non-empty strings")
    if len(names) != count:
        raise ValueError(f"{source}: {len(names)} names in metadata for {count} latents")
    return names


# -- images and latents ---------------------------------------------------------------------------------------


def _progress(iterable, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), **kw)


def _load_images(paths, multiple_of: int) -> list[tuple[str, torch.Tensor]]:
    """Every input read (and checked) before any output is written."""
    return [(p, load_image(p, multiple_of=multiple_of)) for p in paths]


def cmd_encode(args) -> int:
    checkpoint_source(args)  # flag errors first
    out = _output_file(args.output, inputs=args.images, suffixes=(".safetensors", ".npy", ".pt"))
    model = load_model(args)
    images = _load_images(args.images, model.stride)
    shapes = {tuple(x.shape[-2:]) for _, x in images}
    if len(shapes) > 1:
        raise ValueError(f"all images must have the same size to share one latents file, got sizes "
                         f"{sorted(shapes)}; encode them separately")
    batches = same_shape_batches(images, args.batch_size)
    z = torch.cat([model.encode(x).mode() for _, x in _progress(batches, desc="encode", unit="batch")])
    names = unique_names([Path(p).stem for p in args.images])  # a/x.png, b/x.png -> x, x-1
    save_latents(out, z, {"names": names, "checkpoint": model.checkpoint,
                          "encoder": model.encoder_name, "decoder": model.decoder_config.size,
                          **latent_metadata(model)})
    print(f"wrote {tuple(z.shape)} latents to {out}")
    return 0


def cmd_decode(args) -> int:
    local = args.checkpoint is not None or args.repo is not None
    if args.server is not None and local:
        raise ValueError("--server decodes with the server's model: drop --checkpoint/--repo")
    if args.server is None and not local:
        raise ValueError("one of --checkpoint, --repo or --server is required")
    checkpoint_source(args)
    z, meta = load_latents(args.latents)
    names = _names(meta, len(z), source=args.latents, default=Path(args.latents).stem)
    out = _output_dir(args.output)
    dests = _output_paths(out, [f"{n}.png" for n in names], inputs=[args.latents])
    if args.server is not None:
        return _decode_on_server(args, z, dests, out)
    model = load_model(args)
    check_latent_metadata(meta, model, force=args.force)  # another encoder's latents decode to garbage
    gen = torch.Generator().manual_seed(args.seed)
    step = args.batch_size or len(z)
    written = 0
    for i in _progress(range(0, len(z), step), desc="decode", unit="batch"):
        imgs = model.decode(z[i:i + step], steps=args.steps, t_pow_shift=args.t_pow_shift, generator=gen)
        for dest, img in zip(dests[i:i + step], imgs):
            dest.parent.mkdir(parents=True, exist_ok=True)  # names may hold sub-folders (confined to out)
            save_image(img, dest)
            written += 1
    print(f"wrote {written} images to {out}")
    return 0


def _decode_on_server(args, z: torch.Tensor, dests: list[Path], out: Path) -> int:
    from ssdd_runtime.serve import Client

    step = args.batch_size or 1
    written = 0
    with Client(args.server) as client:
        for i in _progress(range(0, len(z), step), desc="decode", unit="request"):
            zb = z[i:i + step].float().contiguous()
            imgs = client.decode(zb, seeds=[args.seed + i + k for k in range(len(zb))], steps=args.steps,
                                 t_pow_shift=args.t_pow_shift)
            for dest, img in zip(dests[i:i + step], imgs):
                dest.parent.mkdir(parents=True, exist_ok=True)
                save_image(img, dest)
                written += 1
    print(f"wrote {written} images to {out} (decoded by {args.server})")
    return 0


def cmd_reconstruct(args) -> int:
    checkpoint_source(args)
    out = _output_dir(args.output)
    dests = _output_paths(out, [f"{Path(p).stem}.png" for p in args.images], inputs=args.images)
    return _reconstruct(load_model(args), args.images, dests, steps=args.steps, t_pow_shift=args.t_pow_shift,
                        seed=args.seed, batch_size=args.batch_size)


def _reconstruct(model, paths, dests: list[Path], *, steps=1, t_pow_shift=T_POW_SHIFT, seed=0,
                 batch_size=None) -> int:
    images = [((p, d), x) for (p, x), d in zip(_load_images(paths, model.stride), dests)]  # all read first
    gen = torch.Generator().manual_seed(seed)
    for group, x in _progress(same_shape_batches(images, batch_size), desc="reconstruct", unit="batch"):
        y = model.decode(model.encode(x).mode(), steps=steps, t_pow_shift=t_pow_shift, generator=gen)
        for (path, dest), yi, db in zip(group, y, psnr(x, y)):
            save_image(yi, dest)
            print(f"{path}: PSNR {db:.2f} dB -> {dest}")
    return 0


def cmd_demo(args) -> int:
    from importlib.resources import files

    from ssdd_runtime.testing import test_state_dict

    out = _output_dir(args.output)
    print("ssdd demo: SSDD-S (f8c4) with deterministic *test* weights, 1-step decode, CPU. The test weights "
          "are not trained,\nso the reconstruction is noise: this checks the pipeline runs offline. Real "
          "weights come from the Hub:\n  ssdd reconstruct IMG.png -o out --repo facebook/SSDD --filename "
          "F8C4/F8C4_M_256.safetensors")
    model = SSDD.from_state_dict(test_state_dict("f8c4", "S"), device="cpu")
    sample = str(files("ssdd_runtime") / "assets" / "sample.png")
    return _reconstruct(model, [sample], _output_paths(out, ["sample.png"], inputs=[sample]))


def cmd_stats(args) -> int:
    from ssdd_runtime.data import MANIFEST, SIDECAR, STATS, job_file, list_shards
    from ssdd_runtime.io import scan_folder
    from ssdd_runtime.integrations.latent_stats import checkpoint_id, compute_latent_stats, shard_latent_stats

    folder = Path(args.inputs[0])
    shards = len(args.inputs) == 1 and folder.is_dir() and any(
        f.suffix in (".parquet", ".safetensors") for f in folder.glob("shard-*"))
    if shards:
        default = folder / SIDECAR / STATS
        output = _output_file(args.output, inputs=[*list_shards(folder), folder / SIDECAR / MANIFEST]
                              ) if args.output else default
        if job_file(output, folder) and output.resolve() != default.resolve():  # would pass for a shard later
            raise ValueError(f"-o {output} is a name the shards' job owns (shard-* or .ssdd/); write elsewhere")
        stats = shard_latent_stats(folder)
        output.parent.mkdir(parents=True, exist_ok=True)
    else:
        checkpoint_source(args)  # flag errors first
        if len(args.inputs) == 1 and folder.is_dir() and not scan_folder(folder):
            raise ValueError(f"{folder} holds no shards (shard-*.parquet / shard-*.safetensors of `ssdd tokenize`) "
                             "and no images: nothing to compute statistics from")
        if args.checkpoint is None and args.repo is None:
            raise ValueError("encoding images needs --checkpoint PATH or --repo ID --filename F (or give one folder "
                             "written by `ssdd tokenize`)")
        if args.output is None:
            raise ValueError("-o/--output is required when encoding images")
        paths = list_images(args.inputs)
        output = _output_file(args.output, inputs=paths)
        model = load_model(args)
        stats = compute_latent_stats(model, paths, batch_size=args.batch_size)
        if model.checkpoint:
            stats["checkpoint"] = checkpoint_id(model.checkpoint)
    write_text_atomic(output, json.dumps(stats, indent=1, allow_nan=False))  # never a NaN statistic on disk
    print(f"{stats['num_images']} {'latents' if shards else 'images'} ({stats['num_errors']} unreadable): latent "
          f"mean {stats['mean']:.6g}, std {stats['std']:.6g} -> scaling_factor {stats['scaling_factor']:.6g}, "
          f"shift_factor {stats['shift_factor']:.6g}; wrote {output}")
    for path, err in stats["errors"].items():
        print(f"  skipped {path}: {err}", file=sys.stderr)
    return 0


# -- Ray ------------------------------------------------------------------------------------------------------


def _ray_job(args) -> dict:
    source, filename, revision = checkpoint_source(args)
    return dict(checkpoint=source, filename=filename, revision=revision, batch_size=args.batch_size,
                concurrency=args.concurrency, num_gpus_per_actor=args.num_gpus_per_actor,
                num_cpus_per_actor=args.num_cpus_per_actor, dtype=args.dtype, address=args.address,
                num_cpus=args.num_cpus, backend=args.backend)


def _print_report(report) -> int:
    print(report.summary())
    for key, err in report.errors.items():
        print(f"  failed {key}: {err}", file=sys.stderr)
    return 1 if report.failed else 0  # the job finished and its outputs are written; 1 flags failed items


def _check_ray_paths(inputs, output: str) -> None:
    """Up front, before Ray starts: the inputs exist and -o can be the output folder."""
    for src in inputs:
        if not Path(src).exists():
            raise FileNotFoundError(f"input not found: {src}")
    p = Path(output)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"-o {output} is a file, expected a folder")


def cmd_tokenize(args) -> int:
    from ssdd_runtime.integrations.ray import tokenize

    checkpoint_source(args)
    _check_ray_paths(args.inputs, args.output)
    return _print_report(tokenize(args.inputs, args.output, format=args.format, shard_size=args.shard_size,
                                  resolution=args.resolution, flip=args.flip, store=args.store, labels=args.labels,
                                  image_column=args.image_column, key_column=args.key_column, **_ray_job(args)))


def cmd_detokenize(args) -> int:
    from ssdd_runtime.integrations.ray import detokenize

    checkpoint_source(args)
    _check_ray_paths([args.latents], args.output)
    if not Path(args.latents).is_dir():
        raise NotADirectoryError(f"{args.latents} is a file, expected the folder of shards `ssdd tokenize` wrote")
    return _print_report(detokenize(args.latents, args.output, steps=args.steps, t_pow_shift=args.t_pow_shift,
                                    seed=args.seed, **_ray_job(args)))


# -- export ---------------------------------------------------------------------------------------------------


def cmd_export_onnx(args) -> int:
    from ssdd_runtime.export.onnx import check_export_args, export_onnx, verify_onnx

    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    check_export_args(args.part, args.steps, args.opset, dtype, noise=args.noise,
                      names=args.names)  # fail before loading a checkpoint
    checkpoint_source(args)
    out = _output_file(args.output, inputs=[args.checkpoint] if args.checkpoint else [])  # never onto the weights
    model = load_model(args, device="cpu", dtype="fp32")
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    # Export (graph + any <name>.data) into a temp folder next to -o, verify there, then rename into place:
    # a failed or interrupted export leaves no graph under the final name.
    with atomic_output_folder(out.parent, last=out.name) as tmp:
        path = export_onnx(model, tmp / out.name, part=args.part, steps=args.steps, opset=args.opset, dtype=dtype,
                           t_pow_shift=args.t_pow_shift, external_data=external, noise=args.noise,
                           names=args.names)
        rows = [] if args.no_verify else verify_onnx(model, path, latent_sizes=((8, 8), (8, 12)))
        bad = [r for r in rows if not math.isfinite(r["max_abs"])]
        if bad:
            raise FloatingPointError(f"the exported graph gives non-finite outputs at {bad[0]['shape']} "
                                     "(ONNX Runtime vs PyTorch); nothing written")
    print(f"wrote {out} (onnx.checker passed)")
    F = model.stride
    for row in rows:
        h, w = row["shape"][-2:]
        size = f"{h}x{w}" if args.part == "encoder" else f"{h * F}x{w * F}"
        print(f"ONNX Runtime (CPU) vs PyTorch fp32 at {size}: max abs error {row['max_abs']:.3e}")
    return 0


def _engine_options(args) -> dict:
    from ssdd_runtime.export.tensorrt import check_precision, profile_for_onnx

    check_precision(args.precision)
    return dict(precision=args.precision,
                profile=profile_for_onnx(args.onnx, args.min_shape, args.opt_shape, args.max_shape),
                timing_cache=args.timing_cache, optimization_level=args.opt_level, workspace_mib=args.workspace_mib)


def cmd_export_trtexec(args) -> int:
    from ssdd_runtime.export.tensorrt import trtexec_command

    print(shlex.join(trtexec_command(args.onnx, args.engine, **_engine_options(args))))
    return 0


def cmd_export_tensorrt(args) -> int:
    from ssdd_runtime.export.tensorrt import build_engine

    out = _output_file(args.engine, inputs=[args.onnx], flag="--engine")
    options = _engine_options(args)
    with atomic_output_folder(out.parent, last=out.name) as tmp:  # the engine and its .json, renamed at the end
        build_engine(args.onnx, tmp / out.name, **options)
    print(f"wrote {out} and {out}.json")
    return 0


def cmd_export_triton_repo(args) -> int:
    from ssdd_runtime.export.onnx import check_onnx_file
    from ssdd_runtime.export.triton_repo import check_model_name, write_triton_repo

    if Path(args.repo).exists() and not Path(args.repo).is_dir():
        raise NotADirectoryError(f"--repo {args.repo} is a file, expected a folder")
    backend = args.backend or ("tensorrt" if args.engine else "onnxruntime")
    name = check_model_name(args.name) if args.name is not None else f"ssdd_{check_onnx_file(args.onnx)['ssdd.part']}"
    model_dir = write_triton_repo(args.repo, onnx_path=args.onnx, engine_path=args.engine, name=name,
                                  backend=backend, max_batch_size=args.max_batch_size,
                                  instance_count=args.instances, kind=args.kind,
                                  preferred_batch_sizes=args.preferred_batch_sizes,
                                  max_queue_delay_us=args.max_queue_delay_us)
    print(f"wrote {model_dir}/config.pbtxt and {model_dir}/1/")
    return 0


def cmd_serve(args) -> int:
    from ssdd_runtime import weights
    from ssdd_runtime.serve import check_serve_args, serve

    check_serve_args(backend=args.backend, max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
                     instances=args.instances, max_size=args.max_size, threads=args.threads, engine=args.engine,
                     device=args.device)  # before reading a checkpoint
    source, filename, revision = checkpoint_source(args)
    path = weights.resolve_checkpoint(source, filename, revision=revision)
    return serve(checkpoint=path, backend=args.backend, engine=args.engine, dtype=args.dtype, device=args.device,
                 threads=args.threads, max_batch=args.max_batch, max_queue_delay_us=args.max_queue_delay_us,
                 instances=args.instances, max_size=args.max_size, host=args.host, http_port=args.http_port,
                 grpc_port=args.grpc_port, metrics_port=args.metrics_port, exit_timeout_s=args.exit_timeout,
                 ready=lambda line: print(line, flush=True))


# -- bench ----------------------------------------------------------------------------------------------------


def cmd_bench(args) -> int:
    from ssdd_runtime.benchmarks import report, run

    if args.quick:
        backends, device, repeats = run.quick_backends(), "cpu", 3
        args.plot = args.plot or QUICK_PLOT
    else:
        backends, device, repeats = BENCH_BACKENDS, "cuda" if torch.cuda.is_available() else "cpu", 5
    cfg = run.Config(models=args.models, backends=backends if args.backends is None else args.backends,
                     batches=args.batch, resolutions=args.res, steps=args.steps, dtype=args.dtype,
                     device=args.device or device, warmup=args.warmup,
                     repeats=repeats if args.repeats is None else args.repeats, rotate=args.rotate,
                     channels_last=args.channels_last, checkpoint=args.checkpoint,
                     kl_vae_checkpoint=args.kl_vae_checkpoint, kl_vae_config=args.kl_vae_config,
                     quality=(args.checkpoint is not None or args.eval_images is not None) if args.quality is None
                     else args.quality, eval_images=args.eval_images)
    if args.quality_plot and not cfg.quality:
        raise ValueError("--quality-plot needs --quality (on by default with --checkpoint)")
    cfg.validate()  # unknown model/backend/dtype: one-line error before anything heavy
    check_device(cfg.device)
    outputs = [(_output_file(path, flag=flag), write) for path, flag, write in (
        (args.json, "--json", run.write_json), (args.csv, "--csv", run.write_csv), (args.plot, "--plot", report.plot),
        (args.quality_plot, "--quality-plot", report.quality_plot)) if path]
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def echo(line: str) -> None:
        if not (args.quiet and line.startswith("  ")):  # --quiet drops the indented per-call lines
            print(line, flush=True)

    result = run.run_benchmark(cfg, echo=echo)
    print()
    print(report.table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.quick:
        for line in run.quick_summary(result):
            print(line)
        warning = run.load_warning()
        if warning:
            print(warning)
    for path, write in outputs:  # the writers are benchmarks/'; the atomic rename is ours
        with atomic_output(path) as tmp:
            write(result, str(tmp))
        print(f"wrote {path}")
    return 0 if result["results"] else 1


# -- eval -----------------------------------------------------------------------------------------------------


def cmd_eval(args) -> int:
    from ssdd_runtime import evaluation

    metrics = evaluation.check_metrics(args.metrics or evaluation.METRICS)
    if args.compare is not None:  # flag errors first, then the metric weights, then any file or model
        if (args.data is not None or args.checkpoint is not None or args.repo is not None or args.save is not None
                or args.baseline is not None):
            raise ValueError("--compare REF_DIR REC_DIR takes no DATA folder, checkpoint, --save or --baseline")
    else:
        if args.data is None:
            raise ValueError("give an image folder DATA (or --compare REF_DIR REC_DIR)")
        if args.checkpoint is None and args.repo is None:
            raise ValueError("one of --checkpoint or --repo is required (or --compare REF_DIR REC_DIR)")
        source, filename, _ = checkpoint_source(args)
        if args.baseline is not None:
            evaluation.parse_baseline(args.baseline)
    evaluation.check_weights(metrics, args.inception_weights)  # before any model is loaded
    out = _output_file(args.json, flag="--json") if args.json else None
    save = _output_dir(args.save, flag="--save") if args.save else None
    if args.compare is not None:
        report = evaluation.compare(*args.compare, device=args.device, batch_size=args.batch_size, metrics=metrics,
                                    inception_weights=args.inception_weights)
    else:
        evaluation.list_images(args.data, args.limit)  # a bad folder before loading anything
        model = load_model(args)
        report = evaluation.evaluate(args.data, model=model, checkpoint=source if filename is None else None,
                                     res=args.res, limit=args.limit, steps=args.steps, t_pow_shift=args.t_pow_shift,
                                     seed=args.seed, device=args.device, dtype=args.dtype, backend=args.backend,
                                     batch_size=args.batch_size, metrics=metrics,
                                     inception_weights=args.inception_weights, baseline=args.baseline, save=save,
                                     notes=args.note)
    print(evaluation.table(report))
    data = report["data"]
    if data["bad_images"]:
        print(f"skipped {data['n_bad']} unreadable image(s): "
              + ", ".join(b["path"] for b in data["bad_images"][:5]) + (" ..." if data["n_bad"] > 5 else ""))
    if out is not None:
        from ssdd_runtime.benchmarks.schema import write_json

        write_json(report, out)
        print(f"wrote {out}")
    return 0


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C, so io.atomic_output removes its temp files on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


# Errors the command line reports as one line: bad input (ValueError/TypeError), files and devices (OSError,
# ImportError for missing extras), numerics (FloatingPointError), torch/runtime faults (out of memory, a device
# that fails mid-run: RuntimeError, MemoryError). PIL's DecompressionBombError is not an OSError: see _pil_errors.
REPORTED = (ValueError, TypeError, OSError, ImportError, FloatingPointError, RuntimeError, MemoryError)


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("SSDD_DEBUG", "") not in ("", "0")
    # Ray installs its own signal handling in the driver; signal handlers can only be set from the main thread.
    own_signals = (args.command not in ("tokenize", "detokenize")
                   and threading.current_thread() is threading.main_thread())
    previous = signal.signal(signal.SIGTERM, _interrupt) if own_signals else None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"ssdd {args.command}: interrupted ({signal.Signals(signum).name}); completed outputs are kept, "
              "no partial file is left", file=sys.stderr)
        return 128 + signum
    except Exception as e:
        if debug or not isinstance(e, REPORTED + _pil_errors()):
            raise
        print(f"ssdd {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _pil_errors() -> tuple:
    image = sys.modules.get("PIL.Image")
    return (image.DecompressionBombError,) if image is not None else ()


if __name__ == "__main__":
    sys.exit(main())
