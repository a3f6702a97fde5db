"""`ssdd` command line: a thin argparse front end over keyword-only library functions."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = ("Checkpoints: --checkpoint PATH (a local .safetensors) or --repo facebook/SSDD --filename "
          "F8C4/F8C4_M_256.safetensors [--revision R] (Hugging Face cache; HF_HUB_OFFLINE=1 works offline).")


def add_checkpoint_args(parser: argparse.ArgumentParser, *, runtime: bool = True) -> None:
    """--checkpoint PATH | --repo ID --filename F [--revision R], plus --device/--dtype when runtime=True."""
    g = parser.add_argument_group("checkpoint")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="PATH", help="local SSDD .safetensors file")
    src.add_argument("--repo", metavar="ID", help="Hugging Face Hub repo id, e.g. facebook/SSDD")
    g.add_argument("--filename", metavar="F", help="file inside --repo, e.g. F8C4/F8C4_M_256.safetensors")
    g.add_argument("--revision", metavar="R", help="Hub branch, tag or commit (default: main)")
    if runtime:
        r = parser.add_argument_group("runtime")
        r.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
        r.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype")


def load_model_from_args(args: argparse.Namespace):
    import torch

    from ssdd_runtime.api import SSDD

    if args.repo is not None and not args.filename:
        raise ValueError("--repo needs --filename (e.g. F8C4/F8C4_M_256.safetensors)")
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    source = args.checkpoint if args.checkpoint is not None else args.repo
    return SSDD.from_pretrained(source, args.filename, revision=args.revision, device=device,
                                dtype=getattr(args, "dtype", None))


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=1, help="Euler steps (1 = single-step decoding; default 1)")
    p.add_argument("--t-pow-shift", type=float, default=2.0, help="time-grid exponent (default 2.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoding noise (default 0)")


def _add_batch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default: all)")


def build_parser() -> argparse.ArgumentParser:
    from ssdd_runtime.benchmarks.cli import register as register_bench
    from ssdd_runtime.export.cli import register as register_export
    from ssdd_runtime.integrations.cli import register as register_integrations

    parser = argparse.ArgumentParser(prog="ssdd", description="SSDD image tokenizer runtime: encode images to "
                                     "latents and decode them with the single-step diffusion decoder.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("encode", help="images -> latents file", epilog=EPILOG,
                       description="Encode images (same size; center-cropped to multiples of the encoder stride) "
                                   "to their latent means, saved as one (B, C, h, w) tensor.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--output", required=True, help="latents file: .safetensors, .npy or .pt")
    add_checkpoint_args(p)
    _add_batch_arg(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="latents file -> PNG images", epilog=EPILOG,
                       description="Decode a latents file (written by `ssdd encode` or any (B, C, h, w) tensor) "
                                   "to PNGs named after the encoded images when known.")
    p.add_argument("latents", help="latents file: .safetensors, .npy or .pt")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_checkpoint_args(p)
    _add_decode_args(p)
    _add_batch_arg(p)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="images -> encode -> decode -> PNGs, with PSNR", epilog=EPILOG,
                       description="Round-trip images through the tokenizer and print the PSNR of each.")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("-o", "--output", required=True, help="output folder")
    add_checkpoint_args(p)
    _add_decode_args(p)
    _add_batch_arg(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("demo", help="offline demo: reconstruct the bundled sample with test weights",
                       description="Reconstructs a bundled sample image with deterministic *test* weights "
                                   "(no download): it shows the pipeline runs, not SSDD's quality.")
    p.add_argument("-o", "--output", default="demo_out", help="output folder (default demo_out)")
    p.set_defaults(func=cmd_demo)

    register_export(sub)
    register_bench(sub)
    register_integrations(sub)
    return parser


def _progress(iterable, **kw):
    from tqdm import tqdm

    return tqdm(iterable, disable=not sys.stderr.isatty(), **kw)


def _read_images(paths: list[str], stride: int):
    from ssdd_runtime.io import load_image

    return [load_image(p, multiple_of=stride) for p in paths]


def _batches(items: list, batch_size: int | None):
    """Consecutive groups of equal-shaped tensors, at most batch_size each."""
    groups: list[list] = []
    for item in items:
        g = groups[-1] if groups else None
        if g and g[-1][1].shape == item[1].shape and (batch_size is None or len(g) < batch_size):
            g.append(item)
        else:
            groups.append([item])
    return groups


def _generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def cmd_encode(args) -> int:
    import torch

    from ssdd_runtime.io import save_latents

    model = load_model_from_args(args)
    xs = _read_images(args.images, model.stride)
    shapes = {tuple(x.shape[-2:]) for x in xs}
    if len(shapes) > 1:
        raise ValueError(f"all images must have the same size to share one latents file, got sizes "
                         f"{sorted(shapes)}; encode them separately")
    zs = [model.encode(x).mode() for x in _progress(torch.cat(xs).split(args.batch_size or len(xs)),
                                                    desc="encode", unit="batch")]
    z = torch.cat(zs)
    save_latents(args.output, z, {"names": [Path(p).stem for p in args.images], "checkpoint": model.checkpoint,
                                  "encoder": model.encoder_config.name, "decoder": model.decoder_config.size})
    print(f"wrote {tuple(z.shape)} latents to {args.output}")
    return 0


def cmd_decode(args) -> int:
    from ssdd_runtime.io import load_latents, save_image

    model = load_model_from_args(args)
    z, meta = load_latents(args.latents)
    names = meta.get("names") or [f"{Path(args.latents).stem}_{i:04d}" for i in range(len(z))]
    if len(names) != len(z):
        raise ValueError(f"{args.latents}: {len(names)} names in metadata for {len(z)} latents")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    gen = _generator(args.seed)
    step = args.batch_size or len(z)
    for i in _progress(range(0, len(z), step), desc="decode", unit="batch"):
        imgs = model.decode(z[i:i + step], steps=args.steps, t_pow_shift=args.t_pow_shift, generator=gen)
        for name, img in zip(names[i:i + step], imgs):
            save_image(img, out / f"{name}.png")
    print(f"wrote {len(z)} images to {out}")
    return 0


def cmd_reconstruct(args) -> int:
    model = load_model_from_args(args)
    return _reconstruct(model, args.images, Path(args.output), steps=args.steps, t_pow_shift=args.t_pow_shift,
                        seed=args.seed, batch_size=args.batch_size)


def _reconstruct(model, paths, out: Path, *, steps=1, t_pow_shift=2.0, seed=0, batch_size=None) -> int:
    import torch

    from ssdd_runtime.io import psnr, save_image

    out.mkdir(parents=True, exist_ok=True)
    items = list(zip(paths, _read_images(paths, model.stride)))
    gen = _generator(seed)
    for group in _progress(_batches(items, batch_size), desc="reconstruct", unit="batch"):
        x = torch.cat([x for _, x in group])
        y = model.decode(model.encode(x).mode(), steps=steps, t_pow_shift=t_pow_shift, generator=gen)
        for (path, _), xi, yi, db in zip(group, x, y, psnr(x, y)):
            save_image(yi, out / f"{Path(path).stem}.png")
            print(f"{path}: PSNR {db:.2f} dB -> {out / (Path(path).stem + '.png')}")
    return 0


def cmd_demo(args) -> int:
    from importlib.resources import files

    from ssdd_runtime.api import SSDD
    from ssdd_runtime.testing import test_state_dict

    print("ssdd demo: SSDD-S (f8c4) with deterministic *test* weights, 1-step decode, CPU. The test weights "
          "are not trained,\nso the reconstruction is noise: this checks the pipeline runs offline. Real "
          "weights come from the Hub:\n  ssdd reconstruct IMG.png -o out --repo facebook/SSDD --filename "
          "F8C4/F8C4_M_256.safetensors")
    model = SSDD.from_state_dict(test_state_dict("f8c4", "S"), device="cpu")
    sample = str(files("ssdd_runtime") / "assets" / "sample.png")
    return _reconstruct(model, [sample], Path(args.output))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError, FloatingPointError) as e:
        print(f"ssdd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
