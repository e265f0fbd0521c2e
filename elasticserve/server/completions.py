"""/v1/completions and /v1/chat/completions: admit, then stream or answer whole."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from elasticserve.engine.outputs import RequestOutput
from elasticserve.policy.types import Overloaded

from .async_engine import (
    EngineDeadError,
    QueueFullError,
    RequestStream,
    collect_final,
)
from .errors import APIError, error_responses
from .formats import ChatFormat, CompletionFormat, Format, sse
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
    RequestError,
)
from .state import ServerState

SHAPE_HEADER = "x-elasticserve-shape"
ERROR_RESPONSES = error_responses(400, 401, 404, 413, 429, 503)


def _engine_error_param(message: str, prompt_param: str) -> str | None:
    """Which parameter an engine ValueError is about (it names the value, not the field)."""
    if message.startswith("logit_bias"):
        return "logit_bias"
    if "max_tokens" in message:
        return "max_tokens"
    if "shape" in message:
        return "model"
    if "prompt" in message:
        return prompt_param
    return None


async def _wait_disconnect(request: Request) -> None:
    """Return when the client hangs up (the body is read; only http.disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _with_length(server: ServerState, params: Any, prompt_tokens: int) -> Any:
    """`params` with the server's default max_tokens where the request set none."""
    if params.max_tokens is not None:
        return params
    room = max(1, server.bundle.max_model_len - prompt_tokens)
    try:  # re-validated: min_tokens must not exceed the max_tokens it now has
        return dataclasses.replace(params, max_tokens=min(server.limits.default_max_tokens, room))
    except ValueError as exc:
        raise RequestError(f"{exc} (the default max_tokens)", "min_tokens") from exc


async def _prompt_ids(server: ServerState, body: Any) -> list[int]:
    """The request's prompt as token ids, tokenized off the event loop."""
    if isinstance(body, ChatCompletionRequest):
        generation = body.add_generation_prompt is not False
        return await server.prompts.chat(body.chat_messages(), generation)
    prompt = body.single_prompt()
    if isinstance(prompt, str):
        return await server.prompts.text(prompt)
    return server.prompts.token_ids(prompt)


async def submit(
    server: ServerState, body: Any, request_id: str, prompt_param: str
) -> RequestStream:
    """Tokenize and admit a request to the engine, mapping its refusals to HTTP errors."""
    shape = server.resolve_shape(body.model)
    params = body.to_sampling_params()
    prompt = await _prompt_ids(server, body)
    params = _with_length(server, params, len(prompt))
    slo = body.slo.model_dump(exclude_none=True) if body.slo is not None else None
    try:
        return await server.engine.generate(
            prompt, params, shape, request_id, body.priority or 0, slo=slo
        )
    except (QueueFullError, Overloaded) as exc:
        retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
        raise APIError(429, str(exc), "rate_limit_error", code="overloaded", headers=retry) from exc
    except EngineDeadError as exc:
        raise APIError(503, str(exc), "server_error") from exc
    except ValueError as exc:
        param = _engine_error_param(str(exc), prompt_param)
        raise APIError(400, str(exc), param=param) from exc


async def respond(stream: RequestStream, fmt: Format, request: Request) -> Response:
    """The whole response, or an SSE stream of chunks when the request asked for one."""
    if fmt.body.stream:
        headers = {SHAPE_HEADER: fmt.model(stream.shape)}
        events = _events(stream, fmt)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    out = await _final(stream, request)
    if out is None:  # the client hung up; nobody reads this
        return Response(status_code=499)
    if out.error is not None:
        engine = request.app.state.server.engine
        raise APIError(503 if not engine.is_running else 500, out.error, "server_error")
    body = fmt.response(out).model_dump(mode="json")
    return JSONResponse(body, headers={SHAPE_HEADER: fmt.model(out.narrowest_shape)})


async def _final(stream: RequestStream, request: Request) -> RequestOutput | None:
    """The final output; None (the request aborted) if the client disconnects first."""
    collect = asyncio.ensure_future(collect_final(stream))
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not collect.done():
            collect.cancel()  # cancelling the read aborts the request in the engine
            with contextlib.suppress(asyncio.CancelledError):
                await collect  # a cancelled task has no result until it has run its cancel
    return None if collect.cancelled() else collect.result()


async def _events(stream: RequestStream, fmt: Format) -> AsyncIterator[str]:
    last = None
    try:
        for chunk in fmt.opening_chunks(stream.shape):
            yield sse(chunk)
        async for out in stream:
            if out.error is not None:
                info = ErrorInfo(message=out.error, type="server_error", param=None, code=None)
                yield sse(ErrorResponse(error=info))
                break
            last = out
            for chunk in fmt.chunks(out):
                yield sse(chunk)
        else:
            if last is not None and fmt.body.include_usage:
                yield sse(fmt.usage_chunk(last))
        yield sse("[DONE]")
    finally:
        stream.abort()  # a no-op once finished; frees the KV blocks of a client gone early


def router(server: ServerState) -> APIRouter:
    """The completion endpoints of `server`."""
    routes = APIRouter()

    @routes.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
    async def create_completion(body: CompletionRequest, request: Request):
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await submit(server, body, request_id, "prompt")
        return await respond(stream, CompletionFormat(server, request_id, body), request)

    @routes.post(
        "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES
    )
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await submit(server, body, request_id, "messages")
        return await respond(stream, ChatFormat(server, request_id, body), request)

    return routes
