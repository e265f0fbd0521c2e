"""One engine replica on Ray Serve: the single-process server's engine and app, reached by calls.

`EngineReplica.http` runs an HTTP request through the replica's own FastAPI app (server/app.py) with
`asgi_exchange`, so the replica answers exactly what `elasticserve serve` would; the ingress
(ingress.py) relays it. `record_routing_stats` reports the load the router ranks by.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from starlette.types import ASGIApp, Message

from ..serve import build_server
from .routing import ReplicaLoad

log = logging.getLogger(__name__)


def _scope(request: Mapping[str, Any]) -> dict[str, Any]:
    """The ASGI scope of a forwarded request (see `_incoming`)."""
    client = request.get("client")
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": request["method"],
        "scheme": "http",
        "path": request["path"],
        "raw_path": request["path"].encode(),
        "query_string": request["query"].encode("latin-1"),
        "root_path": "",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request["headers"]],
        "client": tuple(client) if client else None,
        "server": None,
    }


async def asgi_exchange(
    app: ASGIApp, request: Mapping[str, Any]
) -> AsyncIterator[dict[str, Any] | bytes]:
    """Run one HTTP request through an ASGI app in-process: yields the head, then body chunks.

    Closing the iterator early tells the app its client hung up (so the engine aborts the
    request and frees its KV blocks), then cancels it.
    """
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body = [request["body"]]

    async def receive() -> Message:
        if body:
            return {"type": "http.request", "body": body.pop(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(_scope(request), receive, sent.put)
        finally:
            sent.put_nowait(None)

    task = asyncio.create_task(run())
    started = False
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                headers = [
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]
                ]
                yield {"status": message["status"], "headers": headers}
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        await asyncio.wait({task})
        if not task.cancelled() and (exc := task.exception()) is not None:
            if not started:
                raise exc
            log.warning("the app failed after its response began: %r", exc)
    finally:
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=1.0)  # time to abort cleanly on the disconnect
            task.cancel()


class EngineReplica:
    """One engine replica: elasticserve's own app over an AsyncLLMEngine, reached via `http`."""

    def __init__(self, serve_args: Mapping[str, Any], threads: int | None = None):
        import ray
        import torch
        from ray import serve

        if threads:
            torch.set_num_threads(threads)
        self.engine, self.app = build_server(argparse.Namespace(**serve_args))
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.actor = ray.get_runtime_context().get_actor_name() or ""

    async def http(
        self, request: Mapping[str, Any], avoid: Sequence[str] = ()
    ) -> AsyncIterator[dict[str, Any] | bytes]:
        """A hello (who and how loaded), then the app's response head and body chunks."""
        # `avoid` is for the router (router.py), which reads it from the call's kwargs.
        yield {"replica": self.replica, "actor": self.actor, "load": self.record_routing_stats()}
        async for item in asgi_exchange(self.app, request):
            yield item

    def record_routing_stats(self) -> dict[str, Any]:
        """This replica's load for the router (Serve polls it)."""
        stats = self.engine.stats()
        engine = self.engine.engine
        base, per_row = engine.step_costs()
        return ReplicaLoad(
            replica=self.replica,
            running=stats.num_running,
            waiting=stats.num_waiting,
            step_base_s=base,
            step_row_s=per_row,
            max_num_seqs=engine.config.max_num_seqs,
            mean_output_tokens=engine.mean_output_tokens or 16.0,
            alive=self.engine.is_running,
        ).to_stats()

    def check_health(self) -> None:
        """Serve replaces a replica whose engine thread has stopped."""
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.replica}: the engine thread is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=5.0)
