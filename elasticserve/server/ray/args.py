"""The Ray Serve options of `elasticserve serve` (argparse only: `--help` loads no Ray)."""

from __future__ import annotations

import argparse


def _min_max(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --autoscale {text!r}: write MIN:MAX") from None
    if not 0 <= low <= high or high < 1:
        raise argparse.ArgumentTypeError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return low, high


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: must be an integer >= 1")
    return int(text)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`--replicas`, `--ray-address` and the other options of serving on Ray Serve."""
    group = parser.add_argument_group("Ray Serve (needs: pip install 'elasticserve[ray]')")
    group.add_argument(
        "--replicas",
        type=_positive_int,
        default=None,
        help="engine replicas on Ray Serve behind one endpoint (default: one server, no Ray)",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="'local' (start Ray here; the default), 'auto' (the cluster `ray start` made), "
        "or a cluster address",
    )
    group.add_argument(
        "--replica-cpus", type=float, default=None, help="CPUs per replica (default: cores/N)"
    )
    group.add_argument(
        "--replica-gpus", type=float, default=None, help="GPUs per replica (default: 1 on cuda)"
    )
    group.add_argument(
        "--autoscale",
        type=_min_max,
        default=None,
        metavar="MIN:MAX",
        help="let Ray Serve scale replicas between MIN and MAX on ongoing requests per replica",
    )
    group.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="autoscaling target: requests (running + waiting) per replica (default: seqs/2)",
    )
    group.add_argument(
        "--ingress-replicas",
        type=_positive_int,
        default=1,
        help="ingress replicas: each relays about a thousand streamed tokens/s per core",
    )
    group.add_argument(
        "--route-timeout",
        type=float,
        default=60.0,
        help="seconds a request may wait for a replica to take it before a 503",
    )


def use_ray(args: argparse.Namespace) -> bool:
    """Whether `elasticserve serve` runs on Ray Serve (any Ray option given)."""
    return any(getattr(args, k, None) is not None for k in ("replicas", "ray_address", "autoscale"))
