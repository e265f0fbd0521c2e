"""/v1/completions and /v1/chat/completions: admit, then stream or answer whole."""

from __future__ import annotations

import asyncio
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
from .errors import APIError
from .formats import ChatFormat, CompletionFormat, Format, sse
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorInfo,
    ErrorResponse,
)
from .state import ServerState

SHAPE_HEADER = "x-elasticserve-shape"


def _engine_error_param(message: str, prompt_param: str) -> str | None:
    """Which parameter an engine ValueError is about (it names the value, not the field)."""
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


async def submit(
    server: ServerState, prompt: str | list[int], body: Any, request_id: str, prompt_param: str
) -> RequestStream:
    """Admit a request to the engine, mapping its refusals to HTTP errors."""
    shape = server.resolve_shape(body.model)
    params = body.to_sampling_params()
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
        raise APIError(500, out.error, "server_error")
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


def _chat_prompt(server: ServerState, body: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the model's chat template, as token ids."""
    messages = body.chat_messages()
    try:
        text = server.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.add_generation_prompt is not False
        )
    except Exception as exc:  # jinja2 errors: the template refused this conversation
        raise APIError(
            400, f"the chat template rejected the messages: {exc}", param="messages"
        ) from exc
    # The template writes the special tokens itself (a BOS added again would double it).
    return list(server.tokenizer(text, add_special_tokens=False)["input_ids"])


def router(server: ServerState) -> APIRouter:
    """The completion endpoints of `server`."""
    routes = APIRouter()

    @routes.post("/v1/completions", response_model=CompletionResponse)
    async def create_completion(body: CompletionRequest, request: Request):
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await submit(server, body.single_prompt(), body, request_id, "prompt")
        return await respond(stream, CompletionFormat(server, request_id, body), request)

    @routes.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt = _chat_prompt(server, body)
        stream = await submit(server, prompt, body, request_id, "messages")
        return await respond(stream, ChatFormat(server, request_id, body), request)

    return routes
