"""`ssdd export ...`: onnx, tensorrt, trtexec-cmd, triton-repo (registered from ssdd_runtime.cli)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add the `export` command group to the `ssdd` parser. Each subcommand sets `func(args) -> int`."""
    from ssdd_runtime.cli import EPILOG, add_checkpoint_args

    export = subparsers.add_parser("export", help="ONNX / TensorRT / Triton Inference Server export",
                                   description="Export SSDD graphs for ONNX Runtime, TensorRT and Triton.")
    sub = export.add_subparsers(dest="export_command", metavar="TARGET", required=True)

    p = sub.add_parser("onnx", help="checkpoint -> ONNX graph (decoder or encoder)", epilog=EPILOG,
                       description="Export the decoder (latent_sample, noise -> sample; a fixed number of Euler "
                                   "steps) or the encoder (image -> latent_mean, latent_logvar) with dynamic batch, "
                                   "height and width, then check it with onnx.checker and compare ONNX Runtime "
                                   "(CPU) with PyTorch at two shapes (one non-square).")
    add_checkpoint_args(p, runtime=False)
    p.add_argument("--part", choices=["decoder", "encoder"], default="decoder")
    p.add_argument("--steps", type=int, default=1, help="Euler steps unrolled into the decoder graph (default 1)")
    p.add_argument("--t-pow-shift", type=float, default=2.0, help="time-grid exponent (default 2.0)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset 18..20 (default 18)")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                   help="fp16: fp16 weights/activations, norm statistics and softmax in fp32, fp32 inputs/outputs")
    p.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto",
                   help="weights in <output>.data (auto: when above ~1.8 GB)")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.set_defaults(func=cmd_onnx)

    for name, func, helptext in (("tensorrt", cmd_tensorrt, "ONNX -> TensorRT engine (needs a GPU + tensorrt)"),
                                 ("trtexec-cmd", cmd_trtexec, "print the equivalent trtexec command")):
        p = sub.add_parser(name, help=helptext,
                           description="Shapes are image sizes BxHxW in pixels (both decoder inputs follow), or "
                                       "trtexec's per-input form latent_sample:BxCxhxw,noise:Bx3xHxW.")
        p.add_argument("--onnx", required=True, help="graph written by `ssdd export onnx`")
        p.add_argument("--engine", required=True, help="output engine (.plan)")
        p.add_argument("--precision", default="fp16", help="fp16, bf16 or fp32 (default fp16)")
        p.add_argument("--min-shape", required=True, help="e.g. 1x64x64")
        p.add_argument("--opt-shape", required=True, help="e.g. 1x256x256")
        p.add_argument("--max-shape", required=True, help="e.g. 8x512x512")
        p.add_argument("--timing-cache", default=None, help="timing cache file (read if present, then written)")
        p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
        p.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit in MiB")
        p.set_defaults(func=func)

    p = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository",
                       description="Write <repo>/<name>/config.pbtxt and <repo>/<name>/1/model.onnx|model.plan.")
    p.add_argument("--onnx", required=True, help="graph written by `ssdd export onnx` (names the tensors)")
    p.add_argument("--engine", default=None, help="TensorRT engine built from --onnx (backend tensorrt)")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--name", default=None, help="model name (default ssdd_<part>)")
    p.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default=None,
                   help="default: tensorrt when --engine is given, else onnxruntime")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--instances", type=int, default=1, help="model instances per device (instance_group count)")
    p.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU", "KIND_AUTO"], default="KIND_GPU")
    p.add_argument("--preferred-batch-sizes", default="", help="comma-separated, e.g. 4,8")
    p.add_argument("--max-queue-delay-us", type=int, default=100)
    p.set_defaults(func=cmd_triton_repo)


def cmd_onnx(args: argparse.Namespace) -> int:
    import torch

    from ssdd_runtime.cli import load_model_from_args
    from ssdd_runtime.export.onnx import check_export_args, export_onnx, verify_onnx

    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    check_export_args(args.part, args.steps, args.opset, dtype)  # fail before loading a checkpoint
    args.device, args.dtype = "cpu", "fp32"
    model = load_model_from_args(args)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    path = export_onnx(model, args.output, part=args.part, steps=args.steps, opset=args.opset, dtype=dtype,
                       t_pow_shift=args.t_pow_shift, external_data=external)
    print(f"wrote {path} (onnx.checker passed)")
    if not args.no_verify:
        F = model.stride
        for row in verify_onnx(model, path, latent_sizes=((8, 8), (8, 12))):
            h, w = row["shape"][-2:]
            size = f"{h}x{w}" if args.part == "encoder" else f"{h * F}x{w * F}"
            print(f"ONNX Runtime (CPU) vs PyTorch fp32 at {size}: max abs error {row['max_abs']:.3e}")
    return 0


def _profile(args):
    from ssdd_runtime.export.tensorrt import check_precision, profile_for_onnx

    check_precision(args.precision)
    return profile_for_onnx(args.onnx, args.min_shape, args.opt_shape, args.max_shape)


def cmd_trtexec(args: argparse.Namespace) -> int:
    from ssdd_runtime.export.tensorrt import format_command, trtexec_command

    cmd = trtexec_command(args.onnx, args.engine, precision=args.precision, profile=_profile(args),
                          timing_cache=args.timing_cache, optimization_level=args.opt_level,
                          workspace_mib=args.workspace_mib)
    print(format_command(cmd))
    return 0


def cmd_tensorrt(args: argparse.Namespace) -> int:
    from ssdd_runtime.export.tensorrt import build_engine

    path = build_engine(args.onnx, args.engine, precision=args.precision, profile=_profile(args),
                        timing_cache=args.timing_cache, optimization_level=args.opt_level,
                        workspace_mib=args.workspace_mib)
    print(f"wrote {path} and {path}.json")
    return 0


def cmd_triton_repo(args: argparse.Namespace) -> int:
    from ssdd_runtime.export.onnx import read_metadata
    from ssdd_runtime.export.triton_repo import write_triton_repo

    backend = args.backend or ("tensorrt" if args.engine else "onnxruntime")
    name = args.name or f"ssdd_{read_metadata(args.onnx).get('ssdd.part', 'model')}"
    try:
        preferred = [int(b) for b in args.preferred_batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--preferred-batch-sizes must be comma-separated integers, got "
                         f"{args.preferred_batch_sizes!r}") from None
    model_dir = write_triton_repo(args.repo, onnx_path=args.onnx, engine_path=args.engine, name=name,
                                  backend=backend, max_batch_size=args.max_batch_size,
                                  instance_count=args.instances, kind=args.kind, preferred_batch_sizes=preferred,
                                  max_queue_delay_us=args.max_queue_delay_us)
    print(f"wrote {model_dir}/config.pbtxt and {model_dir}/1/")
    return 0
