"""`ssdd bench`: SSDD vs KL-VAE decode throughput across backends (registered from ssdd_runtime.cli)."""
from __future__ import annotations

import argparse
import importlib.util

DESCRIPTION = """\
Time SSDD decoding against the KL-VAE decoder (diffusers AutoencoderKL, SD-VAE f8c4 configuration) on the
backends available here; unavailable backends are skipped with their reason. Weights are random unless
checkpoints are given: throughput does not depend on weight values. Runs offline.

--quick: SSDD-M 1-step vs KL-VAE, 256x256, batch 1, fp32 on CPU, eager (+ ONNX Runtime when installed),
1 warm-up + 3 timed calls each; prints the SSDD/KL-VAE images/s ratio."""


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _resolutions(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        h, _, w = item.lower().partition("x")
        try:
            out.append((int(h), int(w or h)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sizes like 256 or 256x384 (HxW), got {item!r}") from None
    return out


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers) -> None:
    """Add this package's subcommands to the `ssdd` parser. Each sets `func(args) -> int`."""
    p = subparsers.add_parser("bench", help="SSDD vs KL-VAE decode throughput across backends",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the 3-minute CPU check described above")
    p.add_argument("--models", type=_names, default=None,
                   help="comma-separated: ssdd-XS..ssdd-G, kl-vae (default ssdd-M,kl-vae)")
    p.add_argument("--steps", type=_ints, default=None, help="SSDD Euler steps, comma-separated (default 1)")
    p.add_argument("--backends", type=_names, default=None,
                   help="comma-separated: eager, triton, compile, cudagraphs, onnxruntime, tensorrt "
                        "(default: all; unavailable ones are skipped)")
    p.add_argument("--batch", type=_ints, default=None, help="batch sizes, comma-separated (default 1)")
    p.add_argument("--res", type=_resolutions, default=None,
                   help="image sizes, comma-separated, 256 or HxW like 256x384 (default 256)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights/activations dtype")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--channels-last", action="store_true", help="apply the channels_last transform to all models")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per workload, excluded (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per workload (default 5; --quick 3)")
    p.add_argument("--rotate", type=int, default=3, help="distinct input sets cycled through (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="SSDD .safetensors (default: random weights)")
    p.add_argument("--kl-vae-checkpoint", default=None, metavar="DIR",
                   help="local diffusers AutoencoderKL folder (default: random weights)")
    p.add_argument("--kl-vae-config", default=None, metavar="JSON",
                   help="AutoencoderKL config JSON for the baseline (default: the SD-VAE f8c4 config)")
    p.add_argument("--json", default=None, metavar="PATH", help="write {'env': ..., 'results': [...]} here")
    p.add_argument("--csv", default=None, metavar="PATH", help="write one CSV row per result here")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of images/s vs batch here")
    p.add_argument("--quiet", action="store_true", help="no per-call progress lines")
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace):
    import torch

    from ssdd_runtime.benchmarks.run import Config

    if args.quick:
        backends = ["eager"] + (["onnxruntime"] if importlib.util.find_spec("onnxruntime") else [])
        defaults = dict(models=["ssdd-M", "kl-vae"], backends=backends, batches=[1], resolutions=[(256, 256)],
                        steps=[1], device="cpu", warmup=1, repeats=3)
    else:
        defaults = dict(models=["ssdd-M", "kl-vae"], backends=["eager", "triton", "compile", "cudagraphs",
                                                                "onnxruntime", "tensorrt"],
                        batches=[1], resolutions=[(256, 256)], steps=[1],
                        device="cuda" if torch.cuda.is_available() else "cpu", warmup=1, repeats=5)
    pick = lambda name, key: getattr(args, name) if getattr(args, name) is not None else defaults[key]  # noqa: E731
    return Config(models=pick("models", "models"), backends=pick("backends", "backends"),
                  batches=pick("batch", "batches"), resolutions=pick("res", "resolutions"),
                  steps=pick("steps", "steps"), dtype=args.dtype, device=pick("device", "device"),
                  warmup=pick("warmup", "warmup"), repeats=pick("repeats", "repeats"), rotate=args.rotate,
                  channels_last=args.channels_last, checkpoint=args.checkpoint,
                  kl_vae_checkpoint=args.kl_vae_checkpoint, kl_vae_config=args.kl_vae_config)


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from ssdd_runtime.benchmarks import report as rp
    from ssdd_runtime.benchmarks import run as rn

    cfg = config_from_args(args)
    cfg.validate()  # unknown model/backend/dtype: one-line error before anything heavy
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    echo = (lambda s: None if s.startswith("  ") else print(s, flush=True)) if args.quiet else \
        (lambda s: print(s, flush=True))
    result = rn.run_benchmark(cfg, echo=echo)
    print()
    print(rp.table(result))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        rn.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.csv:
        rn.write_csv(result, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        rp.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0 if result["results"] else 1
