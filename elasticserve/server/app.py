"""The OpenAI-compatible HTTP app (FastAPI) over an AsyncLLMEngine.

`model="<name>"` (or `<name>@auto`) lets the shape policy choose; `<name>@d24-w0.75` (or `@full`)
pins a shape. The served shape comes back as `<name>@<canonical shape>`: per chunk when streaming
(the shape that produced it), else the narrowest shape that produced any token, and in the
`x-elasticserve-shape` header. The endpoints live one family a module: completions.py (and
chat), models.py (models and shapes), health.py (health and metrics).
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import FastAPI

from elasticserve.engine.metrics import PREFIX as METRICS_PREFIX

from . import completions, health, models, tokens
from .async_engine import AsyncLLMEngine
from .errors import ApiKeyMiddleware, install_error_handlers
from .limits import BodyLimitMiddleware, ServerLimits
from .state import ServerState


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str | None = None,
    api_key: str | None = None,
    shape_latency: Mapping[str, Mapping[str, float]] | None = None,
    limits: ServerLimits | None = None,
    metrics_prefix: str = METRICS_PREFIX,
) -> FastAPI:
    """The FastAPI app serving `engine` as `served_model_name` (default: the bundle's name).

    `shape_latency` (shape name -> predicted {"ttft_ms", "tpot_ms"}) fills /v1/shapes' latency.
    """
    name = served_model_name or engine.bundle.name
    limits = limits or ServerLimits()
    server = ServerState(engine, name, shape_latency or {}, limits, metrics_prefix)
    app = FastAPI(title="elasticserve", summary="OpenAI-compatible elastic LLM server")
    app.state.server = server
    for endpoints in (models, completions, tokens, health):  # one module per endpoint family
        app.include_router(endpoints.router(server))
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_bytes)
    if api_key:  # outermost: a request without the key is refused before its body is read
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
