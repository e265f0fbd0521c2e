"""Many engine replicas behind one OpenAI endpoint, on Ray Serve: `elasticserve serve --replicas N`.

Design: elasticserve runs on Ray Serve rather than on a cluster manager of its own.

- `EngineReplica` (replica.py; one deployment of N replicas, or `autoscaling_config`)
  holds what `elasticserve serve` holds: an AsyncLLMEngine and server/app.py's FastAPI app. Its
  `http` method runs one HTTP request through that app in-process (`asgi_exchange`) and streams
  back a hello (replica id and load), the response head, then the body chunks. So validation,
  chat templates, the shape policy, pinned shapes (`<name>@d3-w0.5` on any replica: they share
  one grid), SSE and OpenAI errors are the single server's code, once, not a copy; a bad request
  costs one hop.
- `Ingress` (ingress.py, a Serve HTTP deployment) answers /health and /metrics and relays
  every other path, bytes unchanged, through the engine deployment's handle. The handle's
  request router (`router.LeastWaitRouter`, in the ingress process) picks the replica with
  the least predicted wait from the load replicas report (`routing.py`);
  `x-elasticserve-replica` says which replica served a response.
- Refusals: a replica answering 429 (queue full, or its SLO policy refusing on its own load) or
  503 (engine down) is skipped for the next best; the client gets 429 only when every replica
  refused, with the soonest Retry-After any of them gave.
- Failure: Serve restarts a dead replica (`check_health` also fails once its engine thread has
  stopped). The ingress holds a response back until its first token (a streamed chunk with
  text) or, unstreamed, its whole body: a replica failing before that is retried once on
  another; after it, the stream ends with an OpenAI error event. A request no replica takes
  within `--route-timeout` gets 503. (So a chat stream's opening role chunk leaves with its
  first token.)
- Metrics: the ingress's /metrics holds its own counters, then every replica's metrics with a
  `replica` label; /health lists every replica's health and load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .args import add_ray_arguments
from .ingress import Ingress
from .replica import EngineReplica

if TYPE_CHECKING:
    from ray.serve import Application

INSTALL_HINT = "Ray Serve is not installed: pip install 'elasticserve[ray]'"
ROUTER = "elasticserve.server.ray.router.LeastWaitRouter"
APP_NAME = "elasticserve"
STATS_PERIOD_S = 0.5  # replica load reports; in-flight counts between them are Serve's own


def require_ray() -> Any:
    """The `ray.serve` module, or a RuntimeError saying how to install it."""
    try:
        from ray import serve
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    return serve


def init_local_ray(num_cpus: int | None) -> None:
    """Start a one-machine Ray head for this process, listening on 127.0.0.1 only, no dashboard.

    An exposed Ray head runs any job for whoever reaches it. Ray on Linux resolves even
    127.0.0.1 to the machine's interface address and binds its servers (GCS, raylet, agents,
    workers) to every interface; its "no cluster" mode (the default on macOS and Windows) keeps
    each of them on the loopback address, which is all a local head needs.
    """
    import ray
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this one, whose Ray read it at import
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        dashboard_host="127.0.0.1",
    )


def _plain(args: argparse.Namespace) -> dict[str, Any]:
    """The serve arguments as plain data (they travel to every replica)."""
    return {
        k: v for k, v in vars(args).items() if v is None or isinstance(v, str | int | float | bool)
    }


def _replica_resources(args: argparse.Namespace, local: bool) -> tuple[float, float]:
    """(CPUs, GPUs) per replica: the machine's cores split between replicas when local."""
    most = args.autoscale[1] if args.autoscale else (args.replicas or 1)
    cpus = args.replica_cpus or (max(1, (os.cpu_count() or 1) // most) if local else 1)
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if str(args.device).startswith("cuda") else 0.0
    return float(cpus), float(gpus)


def _autoscaling(args: argparse.Namespace) -> dict[str, Any] | None:
    """Ray Serve's autoscaling_config on ongoing requests (queue + batch) per replica."""
    if not args.autoscale:
        return None
    low, high = args.autoscale
    return {
        "min_replicas": low,
        "max_replicas": high,
        "initial_replicas": min(high, max(low, args.replicas or low)),
        "target_ongoing_requests": args.target_ongoing_requests or max(1, args.max_num_seqs // 2),
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 30.0,
    }


def build_application(args: argparse.Namespace, local: bool = True) -> Application:
    """The Serve application: engine replicas as `args` asks, behind one OpenAI ingress."""
    serve = require_ray()
    cpus, gpus = _replica_resources(args, local)
    scaling = _autoscaling(args)
    engine = serve.deployment(EngineReplica, name="engine").options(
        num_replicas=None if scaling else (args.replicas or 1),
        autoscaling_config=scaling,
        # The engine's own queue limit answers 429; Serve must not queue in front of it.
        max_ongoing_requests=args.max_num_seqs + args.max_waiting + 8,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
        health_check_period_s=2.0,
        graceful_shutdown_timeout_s=5.0,
        request_router_config={
            "request_router_class": ROUTER,
            "request_routing_stats_period_s": STATS_PERIOD_S,
            "request_routing_stats_timeout_s": 5.0,
        },
    )
    ingress = serve.deployment(Ingress, name="ingress").options(
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=10_000,  # it only relays: each request is a few coroutines
        ray_actor_options={"num_cpus": 0},
    )
    threads = max(1, int(cpus)) if gpus == 0 else None
    return ingress.bind(engine.bind(_plain(args), threads), args.route_timeout)


def start(args: argparse.Namespace) -> str:
    """Connect to (or start) Ray, deploy the application; returns the endpoint's URL."""
    serve = require_ray()
    import ray

    address = args.ray_address or "local"
    local = address == "local"
    if not ray.is_initialized():
        if local:
            init_local_ray(os.cpu_count())
        else:
            ray.init(address=address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_application(args, local), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{args.host}:{args.port}"


def run_ray_serve(args: argparse.Namespace) -> None:
    """`elasticserve serve --replicas N`: deploy on Ray Serve and serve until interrupted."""
    try:
        url = start(args)
    except RuntimeError as exc:
        if str(exc) == INSTALL_HINT:
            raise SystemExit(f"elasticserve serve: {INSTALL_HINT}") from None
        raise
    serve = require_ray()
    import ray

    print(f"elasticserve: serving {url} on Ray Serve; Ctrl+C stops it", file=sys.stderr)
    try:
        while True:
            time.sleep(1.0)
    finally:
        serve.delete(APP_NAME)
        if (args.ray_address or "local") == "local":
            serve.shutdown()
            ray.shutdown()


def app_builder(options: Mapping[str, str]) -> Application:
    """For `serve run elasticserve.server.ray.serve:app_builder model=... replicas=2`."""
    from ..args import add_serve_arguments

    parser = argparse.ArgumentParser(prog="serve run")
    add_serve_arguments(parser)
    add_ray_arguments(parser)
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    return build_application(parser.parse_args(argv), local=False)
