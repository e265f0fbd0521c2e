"""/health, /ping, /version and /metrics: liveness and load, version, the Prometheus registry."""

from __future__ import annotations

import dataclasses
import importlib.metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import APIError
from .protocol import VersionResponse
from .state import ServerState


def router(server: ServerState) -> APIRouter:
    """Liveness, load and metrics of `server`."""
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> Response:
        if not server.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error")
        return JSONResponse({"status": "ok", **dataclasses.asdict(server.engine.stats())})

    async def ping() -> Response:
        """vLLM's (and SageMaker's) liveness probe: 200 with no body while the engine runs."""
        if not server.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error")
        return Response(status_code=200)

    for method in ("GET", "POST"):  # one operation per method: OpenAPI ids must be unique
        routes.add_api_route("/ping", ping, methods=[method], operation_id=f"ping_{method.lower()}")

    @routes.get("/version", response_model=VersionResponse)
    async def version() -> VersionResponse:
        return VersionResponse(version=importlib.metadata.version("elasticserve"))

    @routes.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return routes
