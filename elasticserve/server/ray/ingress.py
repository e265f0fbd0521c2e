"""The ingress on Ray Serve: one OpenAI endpoint relaying to the engine replicas.

Serve calls `Ingress` for every HTTP request. It answers /health and /metrics itself and relays
every other path to a replica through the engine deployment's handle (whose router, router.py,
picks the replica), holding each response back to its commit point (its first token, or its
whole body) so that a replica failing before it can be retried once elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from ..protocol import ErrorInfo, ErrorResponse
from .routing import (
    REPLICA_HEADER,
    TRY_ANOTHER,
    ReplicaLoad,
    default_step_s,
    has_token,
    predicted_wait_s,
    retry_after,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

log = logging.getLogger(__name__)

# Per-connection headers: the ingress's HTTP server sets its own on the way out.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade"})
REPLACED_HEADERS = HOP_HEADERS | {"content-length", "date", "server"}
MAX_ATTEMPTS = 64  # bounds the walk over replicas when every one of many refuses
VISIT_TIMEOUT_S = 5.0  # /health and /metrics must answer even while no replica is up


class IngressMetrics:
    """The ingress's own counters, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "elasticserve:ingress_requests",
            "Requests answered, by serving replica and HTTP status.",
            ["replica", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "elasticserve:ingress_retries",
            "Requests sent to another replica: refused (429/503) or replica_failed.",
            ["reason"],
            registry=self.registry,
        )
        self.stream_errors = Counter(
            "elasticserve:ingress_stream_errors",
            "Streams cut by a replica failure after their first token.",
            registry=self.registry,
        )
        self.wait = Gauge(
            "elasticserve:replica_predicted_wait_seconds",
            "Predicted wait of a new request, by replica, at its latest report.",
            ["replica"],
            registry=self.registry,
        )

    def observe_loads(self, loads: Sequence[ReplicaLoad]) -> None:
        """Set the predicted-wait gauges to these replicas' (and forget any others)."""
        self.wait.clear()
        unknown = default_step_s(loads)
        for load in loads:
            wait = predicted_wait_s(load, None, unknown)
            self.wait.labels(load.replica).set(wait if math.isfinite(wait) else -1.0)


class _Families:
    """A prometheus collector of already-built metric families."""

    def __init__(self, families: Iterable[Metric]):
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_metrics(replicas: Sequence[tuple[str, str]]) -> bytes:
    """Several replicas' Prometheus text as one exposition, each sample labelled `replica`."""
    families: dict[str, Metric] = {}
    for replica, text in replicas:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                merged.samples.append(sample._replace(labels=labels))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)


@dataclass
class _Opened:
    """A replica's response held back to its commit point (see the module docstring)."""

    hello: dict[str, Any]
    head: dict[str, Any]
    chunks: list[bytes]
    rest: DeploymentResponseGenerator | None  # None: the body has ended

    @property
    def replica(self) -> str:
        return str(self.hello["replica"])

    @property
    def status(self) -> int:
        return int(self.head["status"])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.head["headers"] if k.lower() == name), None)


class ReplicaFailed(RuntimeError):
    """The replica died or failed before its response reached the client."""


class NoReplica(ReplicaFailed):
    """No replica took the request in time (retrying would only wait as long again)."""


def _error(status: int, message: str, code: str) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type="server_error", code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _sse_error(message: str) -> bytes:
    info = ErrorInfo(message=message, type="server_error", code="replica_failed")
    return f"data: {ErrorResponse(error=info).model_dump_json()}\n\ndata: [DONE]\n\n".encode()


async def _incoming(request: Request) -> dict[str, Any]:
    """The parts of an HTTP request a replica's app needs (plain data: it crosses Ray)."""
    return {
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query,
        "headers": [(k, v) for k, v in request.headers.items() if k not in HOP_HEADERS],
        "body": await request.body(),
        "client": list(request.client) if request.client else None,
    }


class Ingress:
    """The OpenAI endpoint in front of the engine replicas (Serve calls it per HTTP request)."""

    def __init__(self, engine: DeploymentHandle, route_timeout_s: float = 60.0):
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        self.engine = engine.options(stream=True)
        self.route_timeout_s = route_timeout_s
        self.failures: tuple[type[BaseException], ...] = (RayError, RayServeException)
        self.counters = IngressMetrics()

    async def __call__(self, request: Request) -> Response:
        """Serve's HTTP entry: /health and /metrics are the ingress's own, the rest a replica's."""
        if request.method == "GET" and request.url.path == "/health":
            return await self.health()
        if request.method == "GET" and request.url.path == "/metrics":
            return await self.metrics()
        return await self.forward(request)

    async def health(self) -> Response:
        """200 while any replica is healthy; lists every replica's own /health."""
        visited = await self._visit("/health")
        replicas = [
            {
                "replica": o.replica,
                "actor": o.hello["actor"],
                "status_code": o.status,
                "running": _load(o).running,
                "waiting": _load(o).waiting,
            }
            for o in visited
        ]
        ok = any(o.status == 200 for o in visited)
        status = {"status": "ok" if ok else "unavailable", "replicas": replicas}
        return JSONResponse(status, status_code=200 if ok else 503)

    async def metrics(self) -> Response:
        """The ingress's metrics, then every replica's, labelled by replica."""
        visited = await self._visit("/metrics")
        self.counters.observe_loads([_load(o) for o in visited])
        texts = [(o.replica, b"".join(o.chunks).decode()) for o in visited if o.status == 200]
        body = generate_latest(self.counters.registry) + merge_metrics(texts)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def forward(self, request: Request) -> Response:
        """Every other path: served by the replica with the least predicted wait."""
        opened = await self._open(await _incoming(request))
        if isinstance(opened, Response):
            return opened
        self.counters.requests.labels(opened.replica, str(opened.status)).inc()
        headers = {k: v for k, v in opened.head["headers"] if k.lower() not in REPLACED_HEADERS}
        headers[REPLICA_HEADER] = opened.replica
        if opened.rest is None:
            return Response(b"".join(opened.chunks), opened.status, headers=headers)
        return StreamingResponse(self._relay(opened), opened.status, headers=headers)

    async def _open(self, request: dict[str, Any]) -> _Opened | Response:
        """Try replicas, best first, until one takes the request (or all refused, or two died)."""
        tried: list[str] = []
        refusals: list[str | None] = []
        failed = False
        for _ in range(MAX_ATTEMPTS):
            try:
                opened = await self._attempt(request, tried)
            except NoReplica as exc:
                return _error(503, str(exc), "no_replica")
            except ReplicaFailed as exc:
                if failed:
                    return _error(503, f"{exc}; retried once already", "replica_failed")
                failed = True
                self.counters.retries.labels("replica_failed").inc()
                continue
            if opened.status not in TRY_ANOTHER:
                return opened
            refusals.append(opened.header("retry-after"))
            if opened.replica in tried:  # the router had nobody left: every replica refused
                return self._refused(opened, refusals)
            tried.append(opened.replica)
            self.counters.retries.labels("refused").inc()
            _cancel(opened)
        return _error(503, "no replica took the request", "no_replica")

    def _refused(self, opened: _Opened, refusals: Sequence[str | None]) -> _Opened:
        """The last refusal, with the soonest Retry-After any replica gave."""
        kept = [(k, v) for k, v in opened.head["headers"] if k.lower() != "retry-after"]
        if opened.status == 429:
            kept.append(("retry-after", retry_after(refusals)))
        opened.head = {**opened.head, "headers": kept}
        return opened

    async def _attempt(
        self, request: dict[str, Any], avoid: Sequence[str], timeout_s: float | None = None
    ) -> _Opened:
        """Send to the router's pick and read its response up to the commit point."""
        response = self.engine.http.remote(request, avoid=tuple(avoid))
        stream = cast("DeploymentResponseGenerator", response)
        try:
            return await self._read(stream, timeout_s or self.route_timeout_s)
        except BaseException:
            stream.cancel()  # it failed, timed out, or the client left: the replica must stop
            raise

    async def _read(self, stream: DeploymentResponseGenerator, timeout_s: float) -> _Opened:
        """The hello (within `timeout_s`), then the response up to its commit point."""
        hello: dict[str, Any] = {}
        try:
            hello = await asyncio.wait_for(anext(stream), timeout_s)
            return await _read_to_commit(hello, stream)
        except TimeoutError:
            raise NoReplica(f"no engine replica took the request within {timeout_s:g} s") from None
        except self.failures as exc:
            who = f"engine replica {hello['replica']}" if hello else "the engine replica"
            raise ReplicaFailed(f"{who} failed: {_first_line(exc)}") from exc

    async def _relay(self, opened: _Opened) -> AsyncIterator[bytes]:
        """The held-back chunks, then the rest of the stream; an error event if the replica dies."""
        assert opened.rest is not None
        try:
            for chunk in opened.chunks:
                yield chunk
            async for chunk in opened.rest:
                yield chunk
        except self.failures as exc:
            self.counters.stream_errors.inc()
            message = f"engine replica {opened.replica} failed mid-stream: {_first_line(exc)}"
            log.warning(message)
            yield _sse_error(message)
        finally:
            opened.rest.cancel()  # a no-op once finished; else the client left: abort the request

    async def _visit(self, path: str) -> list[_Opened]:
        """GET `path` from every live replica, one after the other until the router repeats."""
        request = {"method": "GET", "path": path, "query": "", "headers": [], "body": b""}
        seen: dict[str, _Opened] = {}
        failures = 0
        while len(seen) + failures < MAX_ATTEMPTS:
            try:
                opened = await self._attempt(request, list(seen), VISIT_TIMEOUT_S)
            except NoReplica:
                break
            except ReplicaFailed as exc:
                # The router drops a replica whose actor died: the next attempt finds the rest.
                log.warning("visiting replicas for %s: %s", path, exc)
                failures += 1
                if failures > 2:
                    break
                continue
            if opened.replica in seen:
                break
            seen[opened.replica] = opened
        return list(seen.values())


async def _read_to_commit(hello: dict[str, Any], stream: Any) -> _Opened:
    """Read a response until a client may see it: its first token, else its whole body."""
    try:
        head = await anext(stream)
    except StopAsyncIteration:
        raise ReplicaFailed(f"engine replica {hello['replica']} sent no response") from None
    streaming = any(
        k.lower() == "content-type" and v.startswith("text/event-stream")
        for k, v in head["headers"]
    )
    chunks: list[bytes] = []
    while True:
        try:
            chunk = await anext(stream)
        except StopAsyncIteration:
            return _Opened(hello, head, chunks, None)
        chunks.append(chunk)
        if streaming and has_token(chunk):
            return _Opened(hello, head, chunks, stream)


def _first_line(exc: BaseException) -> str:
    """Ray's errors carry tracebacks; a client needs their first line."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), repr(exc))


def _load(opened: _Opened) -> ReplicaLoad:
    return ReplicaLoad.from_stats(opened.replica, opened.hello.get("load"))


def _cancel(opened: _Opened) -> None:
    if opened.rest is not None:
        opened.rest.cancel()
