"""Errors in OpenAI's format: the exception, its handlers, and the API-key check."""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .protocol import (
    ErrorInfo,
    ErrorResponse,
    RequestError,
)

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's format with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


_STATUSES = {
    400: "an invalid request; `param` names the field",
    401: "a missing or wrong API key",
    404: "an unknown model",
    413: "a request body over the server's limit",
    429: "overloaded: retry after the Retry-After header's seconds",
    503: "the engine is not running or the server is shutting down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can answer these errors (OpenAI's format)."""
    return {s: {"model": ErrorResponse, "description": _STATUSES[s]} for s in statuses}


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a message may quote a lone surrogate, which UTF-8 cannot."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    info = ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    return _AsciiJSONResponse(
        ErrorResponse(error=info).model_dump(), status_code=exc.status, headers=exc.headers
    )


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict)$")
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")


def _validation_error(exc: RequestValidationError) -> APIError:
    """A 400 naming the first bad field of a body pydantic rejected (or the JSON error)."""
    err = exc.errors()[0]
    loc = [p for p in err["loc"] if p != "body"]
    if err["type"] == "json_invalid":
        detail = err.get("ctx", {}).get("error", err["msg"])
        return APIError(400, f"the request body is not valid JSON: {detail}")
    # Union members appear in the location as tags ('str', 'list[int]'); keep the field path.
    path = [
        str(p)
        for p in loc
        if isinstance(p, int) or (_FIELD.match(str(p)) and not _TYPE_TAG.match(str(p)))
    ]
    if not path:
        return APIError(400, "the request body must be a JSON object of request parameters")
    param = ".".join(path)
    if err["type"] == "missing":
        return APIError(400, f"missing required parameter '{param}'", param=param)
    got = repr(err.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return APIError(400, f"invalid value for '{param}': {err['msg']} (got {got})", param=path[0])


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(APIError(400, str(exc), param=exc.param))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error", "server_error"))


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer <key>` on /v1/*; /health and /metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
            valid = scheme.lower() == b"bearer" and secrets.compare_digest(given, self.expected)
            if not valid:
                exc = APIError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="elasticserve"'},
                )
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
