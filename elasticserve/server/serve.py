"""`elasticserve serve`: load the model off the main thread, start the engine, serve HTTP."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from elasticserve.engine.llm_engine import EngineConfig, LLMEngine
from elasticserve.engine.stat_logger import startup_lines
from elasticserve.model.bundle import ModelBundle, load_bundle
from elasticserve.policy.factory import policy_for
from elasticserve.policy.latency_profile import LatencyProfile
from elasticserve.policy.types import SLO

from .app import build_app
from .async_engine import (
    AsyncLLMEngine,
)
from .limits import ServerLimits

log = logging.getLogger(__name__)


T = TypeVar("T")


def off_main_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a short-lived thread, which has exited when this returns.

    The server's torch work runs on the engine thread; if the main thread (which stays alive for
    uvicorn) had run OpenMP regions first, every later region on the engine thread runs at about
    0.6x the speed (decode 34 vs 56 tok/s, bench/bench_engine_thread.py). Loading on a thread
    that then exits leaves the engine thread at full speed.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="elasticserve-load") as pool:
        return pool.submit(fn).result()


def build_server(args: argparse.Namespace) -> tuple[AsyncLLMEngine, FastAPI]:
    """The engine (running) and app that `elasticserve serve` serves for `args`."""
    bundle, engine, profile = off_main_thread(partial(_load_engine, args))
    latency = profile.shape_latency(bundle.specs) if profile else None
    for line in startup_lines(engine.engine):
        log.info(line)
    where = "its pack's latency profile" if profile else "no latency profile"
    log.info("policy %s, with %s", args.policy, where)
    limits = ServerLimits(
        max_request_bytes=args.max_request_bytes,
        default_max_tokens=args.default_max_tokens,
        allow_special_tokens_in_content=args.allow_special_tokens_in_content,
    )
    app = build_app(
        engine,
        bundle.name,
        api_key=args.api_key,
        shape_latency=latency,
        limits=limits,
        metrics_prefix=args.metrics_prefix,
    )
    return engine, app


def _load_engine(
    args: argparse.Namespace,
) -> tuple[ModelBundle, AsyncLLMEngine, LatencyProfile | None]:
    """(bundle, running engine, latency profile or None) for `args`."""
    bundle = load_bundle(
        args.model,
        args.pack,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        name=args.served_model_name,
        cpu_kernels=args.cpu_kernels,
        precisions=args.precisions,
        lora=not args.no_lora,
    )
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms)
    if args.policy == "slo" and slo == SLO():
        log.warning(
            "--policy slo without --slo-ttft-ms/--slo-tpot-ms: only requests that carry their "
            "own `slo` give the policy a target to shrink for"
        )
    policy, profile = policy_for(bundle, args.policy, slo, pack_dir=args.pack)
    if profile is None and args.policy != "fixed":
        log.warning(
            "no latency profile for this model, pack and device: the %s policy starts from a "
            "rough prior; `elasticserve profile` measures one",
            args.policy,
        )
    config = EngineConfig(
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        prefix_cache_sharing=args.prefix_cache_sharing,
    )
    engine = AsyncLLMEngine(LLMEngine(bundle, config, policy=policy), args.max_waiting)
    return bundle, engine, profile


# After the drain deadline the engine fails what is left; its handlers then need a moment to
# write the error event or body before uvicorn cancels them.
_ERROR_GRACE_S = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn that, on SIGTERM, drains in-flight requests for `drain_s`, then fails the rest.

    uvicorn stops listening and closes idle connections; the engine refuses new requests (503)
    and, at the deadline, ends the rest with an error (an SSE error event and [DONE], or OpenAI
    error JSON), so no client sees a cut connection.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, drain_s: float):
        super().__init__(config)
        self.engine, self.drain_s = engine, drain_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain()
        deadline = asyncio.get_running_loop().call_later(self.drain_s, self.engine.stop)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def run_serve(args: argparse.Namespace) -> None:
    """Load the model, start the engine thread and serve HTTP until interrupted."""
    engine, app = build_server(args)
    log.info(
        "serving the OpenAI API at http://%s:%d/v1 (also /tokenize, /health, /metrics)",
        args.host,
        args.port,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(args.shutdown_timeout + _ERROR_GRACE_S),
    )
    try:
        GracefulServer(config, engine, args.shutdown_timeout).run()
    finally:
        engine.shutdown()
