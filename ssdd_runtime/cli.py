"""`ssdd` command line: a thin argparse front end over keyword-only library functions."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from ssdd_runtime.benchmarks.cli import register as register_bench
    from ssdd_runtime.export.cli import register as register_export
    from ssdd_runtime.integrations.cli import register as register_integrations

    parser = argparse.ArgumentParser(prog="ssdd", description="SSDD image tokenizer runtime")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_export(sub)
    register_bench(sub)
    register_integrations(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"ssdd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
