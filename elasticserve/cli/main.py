"""The `elasticserve` command: generate, shapes, serve, calibrate, eval, finetune, distill-data,
export, profile, bench.

Building the parser imports no torch, transformers or server: each subcommand imports what it
needs when it runs, so `elasticserve --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, calibrate, finetune, generate, profile, serve


def build_parser() -> argparse.ArgumentParser:
    """All subcommands."""
    parser = argparse.ArgumentParser(prog="elasticserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for family in (generate, serve, calibrate, finetune, profile, bench):
        family.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `elasticserve` command."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a run records as its command
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"elasticserve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
