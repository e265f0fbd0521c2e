"""The OpenAI-compatible HTTP server (FastAPI): endpoints, errors, and `elasticserve serve`.

`model="<name>"` (or `<name>@auto`) lets the shape policy choose; `<name>@d24-w0.75` (or `@full`)
pins a shape. The served shape comes back as `<name>@<canonical shape>`: per chunk when streaming
(the shape that produced it), else the narrowest shape that produced any token, and in the
`x-elasticserve-shape` header.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import logging
import math
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from elasticserve.engine.metrics import EngineMetrics
from elasticserve.engine.outputs import RequestOutput
from elasticserve.model.shapes import ShapeSpec
from elasticserve.policy.policies import POLICIES, Overloaded
from elasticserve.policy.step_time import StepTimeModel, step_load

from .async_engine import (
    AsyncLLMEngine,
    EngineDeadError,
    QueueFullError,
    RequestStream,
    collect_final,
)
from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProb,
    ChatLogProbs,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionChunk,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    RequestError,
    ShapeCard,
    ShapeList,
    TopLogProb,
    UsageInfo,
)

log = logging.getLogger(__name__)

SHAPE_HEADER = "x-elasticserve-shape"
_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports impossible tokens like this

# -- errors --------------------------------------------------------------------------------------


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


def error_response(exc: APIError) -> JSONResponse:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    info = ErrorInfo(message=exc.message, type=exc.type, param=exc.param, code=exc.code)
    return JSONResponse(
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


def _install_error_handlers(app: FastAPI) -> None:
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
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                exc = APIError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    "invalid_request_error",
                    code="invalid_api_key",
                )
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- formatting outputs --------------------------------------------------------------------------


def _usage(out: RequestOutput) -> UsageInfo:
    prompt, completion = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        shape_tokens=dict(out.shape_tokens),
    )


def _sse(chunk: Any) -> str:
    data = chunk if isinstance(chunk, str) else chunk.model_dump_json(exclude_unset=True)
    return f"data: {data}\n\n"


class _Format:
    """Turns one request's cumulative outputs into OpenAI chunks (deltas) or a whole response."""

    chunk_type: type[CompletionChunk] | type[ChatCompletionChunk]

    def __init__(self, server: _Server, request_id: str, body: Any):
        self.server, self.request_id, self.body = server, request_id, body
        self.created = int(time.time())
        self.sent_text = 0  # characters of the output text already streamed
        self.sent_tokens = 0  # tokens whose log-probs were already reported

    def model(self, shape: str) -> str:
        return f"{self.server.name}@{shape}"

    def _token(self, token_id: int) -> str:
        return str(self.server.tokenizer.decode([token_id]))

    def _new_logprobs(self, out: RequestOutput) -> list[tuple[int, dict[int, float]]]:
        """(token id, {token: logprob} of it and the top-n) for the tokens not yet reported."""
        completion = out.outputs[0]
        if completion.logprobs is None:
            return []
        # token_ids is a copy, but logprobs is the engine's own list, which its thread may have
        # grown since: the tokens of this output decide how far to read.
        start, self.sent_tokens = self.sent_tokens, len(completion.token_ids)
        ids = completion.token_ids[start : self.sent_tokens]
        return list(zip(ids, completion.logprobs[start : self.sent_tokens], strict=True))

    def _chunk(self, shape: str, choices: list[Any]) -> Any:
        return self.chunk_type(
            id=self.request_id, created=self.created, model=self.model(shape), choices=choices
        )

    def opening_chunks(self, shape: str) -> list[Any]:
        return []

    def chunks(self, out: RequestOutput) -> list[Any]:
        """The chunk for `out`'s new text (or log-probs, or finish); none if it brings nothing."""
        completion = out.outputs[0]
        text = completion.text[self.sent_text :]
        self.sent_text = len(completion.text)
        has_logprobs = completion.logprobs is not None
        if not text and not out.finished and not (has_logprobs and self._has_new_tokens(out)):
            return []
        chunk = self._chunk(out.shape, [self.stream_choice(out, text)])
        if self.body.continuous_usage:
            chunk.usage = _usage(out)
        elif self.body.include_usage:
            chunk.usage = None  # OpenAI sends an explicit null until the final usage chunk
        return [chunk]

    def _has_new_tokens(self, out: RequestOutput) -> bool:
        return len(out.outputs[0].token_ids) > self.sent_tokens

    def usage_chunk(self, out: RequestOutput) -> Any:
        chunk = self._chunk(out.narrowest_shape, [])
        chunk.usage = _usage(out)
        return chunk

    def stream_choice(self, out: RequestOutput, text: str) -> Any:
        raise NotImplementedError

    def response(self, out: RequestOutput) -> Any:
        raise NotImplementedError


class _CompletionFormat(_Format):
    chunk_type = CompletionChunk

    def __init__(self, server: _Server, request_id: str, body: CompletionRequest):
        super().__init__(server, request_id, body)
        self.text_offset = 0  # logprobs.text_offset of the next token

    def logprobs(self, out: RequestOutput) -> CompletionLogProbs | None:
        if self.body.logprobs is None:
            return None
        # explicit lists: chunks are serialised with exclude_unset, and [] must not vanish
        result = CompletionLogProbs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for token_id, entry in self._new_logprobs(out):
            text = self._token(token_id)
            result.tokens.append(text)
            result.token_logprobs.append(max(entry[token_id], _MIN_LOGPROB))
            top = sorted(entry.items(), key=lambda kv: -kv[1])
            result.top_logprobs.append({self._token(t): max(lp, _MIN_LOGPROB) for t, lp in top})
            result.text_offset.append(self.text_offset)
            self.text_offset += len(text)
        return result

    def stream_choice(self, out: RequestOutput, text: str) -> CompletionChoice:
        completion = out.outputs[0]
        return CompletionChoice(
            index=0,
            text=text,
            logprobs=self.logprobs(out),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )

    def response(self, out: RequestOutput) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model(out.narrowest_shape),
            choices=[self.stream_choice(out, out.outputs[0].text)],
            usage=_usage(out),
        )


class _ChatFormat(_Format):
    chunk_type = ChatCompletionChunk

    def logprobs(self, out: RequestOutput) -> ChatLogProbs | None:
        if not self.body.logprobs:
            return None
        n_top = self.body.top_logprobs or 0
        content = []
        for token_id, entry in self._new_logprobs(out):
            top = sorted(entry.items(), key=lambda kv: -kv[1])[:n_top]
            chosen = self._logprob(token_id, entry[token_id])
            top_logprobs = [self._logprob(t, lp) for t, lp in top]
            content.append(ChatLogProb(**chosen.model_dump(), top_logprobs=top_logprobs))
        return ChatLogProbs(content=content)

    def _logprob(self, token_id: int, logprob: float) -> TopLogProb:
        text = self._token(token_id)
        return TopLogProb(
            token=text, logprob=max(logprob, _MIN_LOGPROB), bytes=list(text.encode("utf-8"))
        )

    def opening_chunks(self, shape: str) -> list[Any]:
        """OpenAI opens a chat stream with the assistant's role and empty content."""
        delta = DeltaMessage(role="assistant", content="")
        chunk = self._chunk(
            shape, [ChatStreamChoice(delta=delta, logprobs=None, finish_reason=None)]
        )
        if self.body.include_usage:
            chunk.usage = None
        return [chunk]

    def stream_choice(self, out: RequestOutput, text: str) -> ChatStreamChoice:
        completion = out.outputs[0]
        choice = ChatStreamChoice(
            index=0,
            delta=DeltaMessage(content=text) if text else DeltaMessage(),
            logprobs=self.logprobs(out),
            finish_reason=completion.finish_reason,
        )
        if completion.stop_reason is not None:
            choice.stop_reason = completion.stop_reason
        return choice

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        completion = out.outputs[0]
        choice = ChatChoice(
            message=ChatResponseMessage(content=completion.text),
            logprobs=self.logprobs(out),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model(out.narrowest_shape),
            choices=[choice],
            usage=_usage(out),
        )


# -- serving -------------------------------------------------------------------------------------


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


@dataclasses.dataclass
class _Server:
    """What the endpoints share: the engine, the served name and a tokenizer of their own."""

    engine: AsyncLLMEngine
    name: str
    shape_latency: Mapping[str, Mapping[str, float]]  # shape -> predicted {"ttft_ms", "tpot_ms"}

    def __post_init__(self) -> None:
        self.bundle = self.engine.engine.bundle
        self.metrics = EngineMetrics(self.name, [spec.name for spec in self.bundle.specs])
        self.engine.attach_metrics(self.metrics)
        # The engine thread uses the bundle's tokenizer; a HF fast tokenizer is not safe to share.
        self.tokenizer = copy.deepcopy(self.bundle.tokenizer)

    def resolve_shape(self, model: str | None) -> str | None:
        """The shape a request's `model` pins; None (the engine's policy picks) for the base."""
        model = self.name if model is None else model
        if model == self.name:
            shape = "auto"
        elif model.startswith(self.name + "@"):
            shape = model[len(self.name) + 1 :]
        else:
            raise APIError(
                404,
                f"The model `{model}` does not exist: this server serves `{self.name}` and its "
                f"shapes as `{self.name}@<shape>` (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        if shape.strip().lower() == "auto":
            return None
        try:
            return self.bundle.spec(shape).name
        except ValueError as exc:
            raise APIError(400, str(exc), param="model", code="invalid_shape") from exc

    async def submit(
        self, prompt: str | list[int], body: Any, request_id: str, prompt_param: str
    ) -> RequestStream:
        """Admit a request to the engine, mapping its refusals to HTTP errors."""
        shape = self.resolve_shape(body.model)
        params = body.to_sampling_params()
        slo = body.slo.model_dump(exclude_none=True) if body.slo is not None else None
        try:
            return await self.engine.generate(
                prompt, params, shape, request_id, body.priority or 0, slo=slo
            )
        except (QueueFullError, Overloaded) as exc:
            retry = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
            raise APIError(
                429, str(exc), "rate_limit_error", code="overloaded", headers=retry
            ) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc), "server_error") from exc
        except ValueError as exc:
            param = _engine_error_param(str(exc), prompt_param)
            raise APIError(400, str(exc), param=param) from exc

    async def respond(self, stream: RequestStream, fmt: _Format, request: Request) -> Response:
        """The whole response, or an SSE stream of chunks when the request asked for one."""
        if fmt.body.stream:
            headers = {SHAPE_HEADER: fmt.model(stream.shape)}
            events = self._events(stream, fmt)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        out = await self._final(stream, request)
        if out is None:  # the client hung up; nobody reads this
            return Response(status_code=499)
        if out.error is not None:
            raise APIError(500, out.error, "server_error")
        body = fmt.response(out).model_dump(mode="json")
        return JSONResponse(body, headers={SHAPE_HEADER: fmt.model(out.narrowest_shape)})

    async def _final(self, stream: RequestStream, request: Request) -> RequestOutput | None:
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

    async def _events(self, stream: RequestStream, fmt: _Format) -> AsyncIterator[str]:
        last = None
        try:
            for chunk in fmt.opening_chunks(stream.shape):
                yield _sse(chunk)
            async for out in stream:
                if out.error is not None:
                    info = ErrorInfo(message=out.error, type="server_error", param=None, code=None)
                    yield _sse(ErrorResponse(error=info))
                    break
                last = out
                for chunk in fmt.chunks(out):
                    yield _sse(chunk)
            else:
                if last is not None and fmt.body.include_usage:
                    yield _sse(fmt.usage_chunk(last))
            yield _sse("[DONE]")
        finally:
            stream.abort()  # a no-op once finished; frees the KV blocks of a client gone early


def _model_cards(server: _Server) -> ModelList:
    max_len = server.bundle.max_model_len
    cards = [ModelCard(id=server.name, root=server.name, max_model_len=max_len)]
    for spec in server.bundle.specs:
        cards.append(
            ModelCard(
                id=f"{server.name}@{spec.name}",
                root=server.name,
                parent=server.name,
                max_model_len=max_len,
            )
        )
    return ModelList(data=cards)


def _shape_cards(server: _Server) -> ShapeList:
    return ShapeList(
        data=[
            ShapeCard(
                id=f"{server.name}@{spec.name}",
                shape=spec.name,
                shape_id=spec.id,
                depth=spec.shape.depth,
                width=spec.shape.width,
                weight_fraction=round(spec.weight_fraction, 6),
                ppl=spec.ppl,
                latency=dict(server.shape_latency[spec.name])
                if spec.name in server.shape_latency
                else None,
            )
            for spec in server.bundle.specs
        ]
    )


def _chat_prompt(server: _Server, body: ChatCompletionRequest) -> list[int]:
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


def _routes(server: _Server) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return _model_cards(server)

    @router.get("/v1/models/{model:path}", response_model=ModelCard)
    async def retrieve_model(model: str) -> ModelCard:
        for card in _model_cards(server).data:
            if card.id == model:
                return card
        raise APIError(404, f"The model `{model}` does not exist", code="model_not_found")

    @router.get("/v1/shapes", response_model=ShapeList)
    async def list_shapes() -> ShapeList:
        return _shape_cards(server)

    @router.post("/v1/completions", response_model=CompletionResponse)
    async def create_completion(body: CompletionRequest, request: Request):
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await server.submit(body.single_prompt(), body, request_id, "prompt")
        return await server.respond(stream, _CompletionFormat(server, request_id, body), request)

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        prompt = _chat_prompt(server, body)
        stream = await server.submit(prompt, body, request_id, "messages")
        return await server.respond(stream, _ChatFormat(server, request_id, body), request)

    @router.get("/health")
    async def health() -> Response:
        if not server.engine.is_running:
            raise APIError(503, "the engine is not running", "server_error")
        return JSONResponse({"status": "ok", **dataclasses.asdict(server.engine.stats())})

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router


def build_app(
    engine: AsyncLLMEngine,
    served_model_name: str | None = None,
    api_key: str | None = None,
    shape_latency: Mapping[str, Mapping[str, float]] | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` as `served_model_name` (default: the bundle's name).

    `shape_latency` (shape name -> predicted {"ttft_ms", "tpot_ms"}) fills /v1/shapes' latency.
    """
    name = served_model_name or engine.engine.bundle.name
    server = _Server(engine, name, shape_latency or {})
    app = FastAPI(title="elasticserve", summary="OpenAI-compatible elastic LLM server")
    app.state.server = server
    app.include_router(_routes(server))
    _install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app


# -- the `serve` command -------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS |= {f"{u}ib": v for u, v in _UNITS.items() if u not in ("", "b")}
_UNITS |= {f"{u}b": 10 ** (3 * i) for i, u in enumerate("kmgt", start=1)}


def parse_bytes(text: str) -> int:
    """'512MiB', '1.5GB', '2G' (binary), '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if match is None or unit not in _UNITS or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: write e.g. 512MiB, 2GiB, 1.5GB or a number of bytes"
        )
    return int(float(match[1]) * _UNITS[unit])


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `elasticserve serve`, --model/--pack/--dtype/--device included."""
    parser.add_argument(
        "--model", default=None, help="HF dir, .safetensors or .gguf (default: SmolLM2-135M)"
    )
    parser.add_argument("--pack", default=None, help="pack directory (default: the model's own)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: derived)"
    )
    parser.add_argument(
        "--policy",
        default="fixed",
        choices=POLICIES,
        help="shape policy for requests that pin no shape (fixed: the full shape)",
    )
    parser.add_argument(
        "--slo-ttft-ms", type=float, default=None, help="default time-to-first-token target"
    )
    parser.add_argument(
        "--slo-tpot-ms", type=float, default=None, help="default time-per-output-token target"
    )
    parser.add_argument(
        "--kv-cache-memory", type=parse_bytes, default=None, help="KV cache size, e.g. 512MiB"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="max running requests")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="token budget of one step"
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    parser.add_argument(
        "--max-waiting", type=int, default=256, help="queue length beyond which requests get 429"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")


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
    latency = predicted_latency(profile.model(), bundle.specs) if profile else None
    log.info("serving %s (%d shapes, policy %s)", bundle.name, len(bundle.specs), args.policy)
    return engine, build_app(engine, bundle.name, api_key=args.api_key, shape_latency=latency)


def _load_engine(args: argparse.Namespace) -> tuple[Any, AsyncLLMEngine, Any]:
    """(bundle, running engine, latency profile or None) for `args`."""
    from elasticserve.engine.llm_engine import EngineConfig, LLMEngine
    from elasticserve.model.bundle import load_bundle
    from elasticserve.policy.latency_profile import policy_for
    from elasticserve.policy.policies import SLO

    bundle = load_bundle(
        args.model,
        args.pack,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        name=args.served_model_name,
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
    )
    engine = AsyncLLMEngine(LLMEngine(bundle, config, policy=policy), args.max_waiting)
    return bundle, engine, profile


def run_serve(args: argparse.Namespace) -> None:
    """Load the model, start the engine thread and serve HTTP until interrupted."""
    import uvicorn

    engine, app = build_server(args)
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )
    finally:
        engine.shutdown()


def predicted_latency(
    model: StepTimeModel, specs: Sequence[ShapeSpec], prompt_tokens: int = 128
) -> dict[str, dict[str, float]]:
    """Each shape alone, per the profile: its prefill of `prompt_tokens` and a decode step, ms."""
    return {
        spec.name: {
            "ttft_ms": round(1000 * model.predict(step_load([(spec.shape, prompt_tokens, 0)])), 3),
            "tpot_ms": round(1000 * model.predict(step_load([(spec.shape, 1, prompt_tokens)])), 3),
        }
        for spec in specs
    }
