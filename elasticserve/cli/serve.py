"""`elasticserve serve`: the OpenAI-compatible server, on one process or on Ray Serve."""

from __future__ import annotations

import argparse
import logging

from ..server.args import add_serve_arguments
from ..server.ray.args import add_ray_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `serve` subcommand (its arguments need neither FastAPI nor Ray)."""
    serve = subparsers.add_parser(
        "serve", help="start the OpenAI-compatible server (--replicas N: on Ray Serve)"
    )
    add_serve_arguments(serve)
    add_ray_arguments(serve)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from ..server.ray.args import use_ray

    # vLLM's line format; the start-up and periodic stats lines are INFO
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.basicConfig(
        level=level,
        format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )

    if use_ray(args):
        from ..server.ray.serve import run_ray_serve

        run_ray_serve(args)
    else:
        from ..server.serve import run_serve

        run_serve(args)
