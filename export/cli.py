"""Subcommands of `ssdd` contributed by this package (registered from ssdd_runtime.cli)."""


def register(subparsers) -> None:
    """Add this package's subcommands to the `ssdd` parser. Each sets `func(args) -> int`."""
