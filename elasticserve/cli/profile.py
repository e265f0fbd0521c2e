"""`elasticserve profile`: measure the latency profile of every shape on this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .args import add_model_arguments, model_options

if TYPE_CHECKING:
    from ..model.bundle import ModelBundle
    from ..policy.latency_profile import LatencyProfile


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `profile` subcommand."""
    p = subparsers.add_parser(
        "profile",
        help="measure step times of every shape on this machine (for the load/slo policies)",
        description=__doc__,
    )
    add_model_arguments(p)
    p.add_argument(
        "--max-batch",
        type=int,
        default=32,
        help="largest batch size measured: a loaded server's batch, which the policies forecast "
        "(a fit on small batches only mispredicts it: q4 rows cost more per row than bf16 on "
        "an AMX CPU)",
    )
    p.add_argument(
        "--out", default=None, help="where to write the JSON (default: beside --pack, else cache)"
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per step; the fastest is kept")
    p.add_argument("--context", default="16,96", help="short,long prompt lengths in tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (part of the key)")
    p.set_defaults(func=_profile)


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to and including `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch})


def _profile(args: argparse.Namespace) -> None:
    import torch

    from ..engine.profiler import profile
    from ..model.bundle import load_bundle

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    short, long = (int(x) for x in args.context.split(","))
    # the profile needs only short contexts: a small max_model_len keeps the KV pool small
    bundle = load_bundle(args.model, args.pack, max_model_len=1024, **model_options(args))
    measured = profile(
        bundle, batch_sizes(args.max_batch), context=(short, long), repeats=args.repeats
    )
    path = _save(measured, bundle, args)
    _report(measured, bundle, path)


def _save(measured: LatencyProfile, bundle: ModelBundle, args: argparse.Namespace) -> Path:
    from ..policy.latency_profile import profile_path

    if args.out is not None:
        return measured.save(args.out)
    try:
        return measured.save(profile_path(bundle, args.pack))
    except OSError:  # a read-only pack directory: the user cache is still found by the server
        return measured.save(profile_path(bundle))


def _report(measured: LatencyProfile, bundle: ModelBundle, path: Path) -> None:
    model = measured.model()
    sizes = measured.meta["batch_sizes"]
    print(f"{'shape':<12} " + " ".join(f"{f'B={b} ms':>9}" for b in sizes))
    decodes = {
        (s.load.shape, s.load.rows): s.seconds for s in measured.samples if s.kind == "decode"
    }
    for spec in bundle.specs:
        # the largest batch decodes with one more row: a request joins it to time a mixed step
        times = [decodes.get((spec.name, b), decodes.get((spec.name, b + 1))) for b in sizes]
        print(
            f"{spec.name:<12} " + " ".join(f"{t * 1000:>9.1f}" if t else f"{'-':>9}" for t in times)
        )
    for kind, e in measured.errors().items():
        print(
            f"held-out {kind}: {e['n']} steps, median error {e['median']:.0%}, "
            f"p90 {e['p90']:.0%}, max {e['max']:.0%}",
            file=sys.stderr,
        )
    print(f"{len(model.coefficients)} shapes fitted; profile written to {path}", file=sys.stderr)
