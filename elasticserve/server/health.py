"""/health and /metrics: engine liveness and load, and the Prometheus registry."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import APIError
from .state import ServerState


def router(server: ServerState) -> APIRouter:
    """Liveness, load and metrics of `server`."""
    routes = APIRouter()

    @routes.get("/health")
    async def health() -> Response:
        if not server.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error")
        return JSONResponse({"status": "ok", **dataclasses.asdict(server.engine.stats())})

    @routes.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return routes
