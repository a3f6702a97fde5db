"""Subcommands of `ssdd` contributed by this package (registered from ssdd_runtime.cli): stats, tokenize,
detokenize. Thin argparse wrappers over latent_stats.compute_latent_stats and ray.tokenize / ray.detokenize."""
from __future__ import annotations

import json
import sys
from pathlib import Path

RAY_EPILOG = ("Ray: without --address a local Ray instance is started (all local CPUs/GPUs); --address auto joins "
              "the cluster this node belongs to, ray://HEAD:10001 a remote one. Inputs and a local --checkpoint must "
              "be readable on every node; OUTDIR is written by the driver only. Exit status 1: the job finished "
              "but some items failed (listed on stderr and recorded in the shards).")


def register(subparsers) -> None:
    """Add this package's subcommands to the `ssdd` parser. Each sets `func(args) -> int`."""
    from ssdd_runtime.cli import EPILOG, add_checkpoint_args

    p = subparsers.add_parser("stats", help="latent mean/std over images -> JSON (scaling_factor, shift_factor)",
                              epilog=EPILOG,
                              description="Encode images (folders are searched recursively) and write the mean "
                                          "and std of their latents, globally and per channel, with the diffusers "
                                          "normalisation scaling_factor = 1/std and shift_factor = mean.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="JSON file to write")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    add_checkpoint_args(p)
    p.set_defaults(func=cmd_stats)

    p = subparsers.add_parser("tokenize", help="images -> latent shards with Ray Data (resumable)",
                              epilog=EPILOG + " " + RAY_EPILOG,
                              description="Encode a folder, image files or parquet files of image bytes to latent "
                                          "means, written as parquet or safetensors shards. Shards already in "
                                          "OUTDIR are skipped; unreadable images are reported and counted.")
    p.add_argument("inputs", nargs="+", help="folders, image files or .parquet files")
    p.add_argument("-o", "--output", required=True, help="output folder (OUTDIR)")
    p.add_argument("--format", choices=["parquet", "safetensors"], default="parquet", help="shard format")
    p.add_argument("--shard-size", type=int, default=256, help="items per shard (default 256)")
    p.add_argument("--image-column", default="image", help="parquet column with image bytes (default image)")
    p.add_argument("--key-column", default=None, help="parquet column with unique item keys (default: row index)")
    _add_ray_args(p)
    add_checkpoint_args(p, runtime=False)
    p.set_defaults(func=cmd_tokenize)

    p = subparsers.add_parser("detokenize", help="latent shards -> PNGs with Ray Data (resumable)",
                              epilog=EPILOG + " " + RAY_EPILOG,
                              description="Decode every latent of the shards written by `ssdd tokenize` to "
                                          "OUTDIR/<key>.png; existing PNGs are skipped.")
    p.add_argument("latents", help="folder of shard-*.parquet / shard-*.safetensors")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=1, help="Euler steps (default 1)")
    p.add_argument("--t-pow-shift", type=float, default=2.0, help="time-grid exponent (default 2.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoding noise (default 0)")
    _add_ray_args(p)
    add_checkpoint_args(p, runtime=False)
    p.set_defaults(func=cmd_detokenize)


def _add_ray_args(p) -> None:
    g = p.add_argument_group("ray")
    g.add_argument("--address", default=None, help="Ray cluster address (auto, ray://HOST:10001); default: local")
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    g.add_argument("--batch-size", type=int, default=8, help="images per actor call (default 8)")
    g.add_argument("--concurrency", type=int, default=None, help="actors, one model each (default: one per GPU, "
                                                                  "or 1 on CPU)")
    g.add_argument("--num-gpus-per-actor", type=float, default=None,
                   help="GPUs per actor (default 1 if the cluster has GPUs, else 0 = CPU)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")


def _expand_images(inputs: list[str]) -> list[Path]:
    from ssdd_runtime.io import IMAGE_SUFFIXES

    paths: list[Path] = []
    for src in inputs:
        p = Path(src)
        if p.is_dir():
            paths += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"input not found: {src}")
    if not paths:
        raise ValueError(f"no images found in {inputs}")
    return paths


def cmd_stats(args) -> int:
    from ssdd_runtime.cli import load_model_from_args
    from ssdd_runtime.integrations.latent_stats import checkpoint_id, compute_latent_stats

    model = load_model_from_args(args)
    stats = compute_latent_stats(model, _expand_images(args.inputs), batch_size=args.batch_size)
    if model.checkpoint:
        stats["checkpoint"] = checkpoint_id(model.checkpoint)
    Path(args.output).write_text(json.dumps(stats, indent=1), encoding="utf-8")
    print(f"{stats['num_images']} images ({stats['num_errors']} unreadable): latent mean {stats['mean']:.6g}, "
          f"std {stats['std']:.6g} -> scaling_factor {stats['scaling_factor']:.6g}, shift_factor "
          f"{stats['shift_factor']:.6g}; wrote {args.output}")
    for path, err in stats["errors"].items():
        print(f"  skipped {path}: {err}", file=sys.stderr)
    return 0


def _checkpoint(args) -> dict:
    if args.repo is not None and not args.filename:
        raise ValueError("--repo needs --filename (e.g. F8C4/F8C4_M_256.safetensors)")
    return dict(checkpoint=args.checkpoint if args.checkpoint is not None else args.repo, filename=args.filename,
                revision=args.revision)


def _ray_kwargs(args) -> dict:
    return dict(batch_size=args.batch_size, concurrency=args.concurrency, num_gpus_per_actor=args.num_gpus_per_actor,
                dtype=args.dtype, address=args.address, num_cpus=args.num_cpus)


def _print_report(report) -> None:
    print(report.summary())
    for key, err in report.errors.items():
        print(f"  failed {key}: {err}", file=sys.stderr)


def cmd_tokenize(args) -> int:
    from ssdd_runtime.integrations.ray import tokenize

    report = tokenize(args.inputs, args.output, **_checkpoint(args), format=args.format, shard_size=args.shard_size,
                      image_column=args.image_column, key_column=args.key_column, **_ray_kwargs(args))
    _print_report(report)
    return 1 if report.failed else 0  # the job finished and its shards are written; 1 flags failed items


def cmd_detokenize(args) -> int:
    from ssdd_runtime.integrations.ray import detokenize

    report = detokenize(args.latents, args.output, **_checkpoint(args), steps=args.steps,
                        t_pow_shift=args.t_pow_shift, seed=args.seed, **_ray_kwargs(args))
    _print_report(report)
    return 1 if report.failed else 0
