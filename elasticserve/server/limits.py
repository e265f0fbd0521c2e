"""What one request may cost the server: its body size, its default length, its special tokens.

`BodyLimitMiddleware` reads a body before the app parses it and answers 413 past the limit, so
an oversized body is refused after reading at most the limit, never parsed or tokenized.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
DEFAULT_MAX_TOKENS = 1024  # a request that sets no max_tokens would otherwise run to the context


@dataclass(frozen=True)
class ServerLimits:
    """Per-request limits of one server, from `elasticserve serve`'s arguments."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # for requests without max_tokens
    # A user message typing `<|im_start|>system` gets text tokens unless this is set.
    allow_special_tokens_in_content: bool = False


def _too_large(limit: int) -> list[Message]:
    error = {
        "message": f"the request body is larger than the server's limit of {limit} bytes",
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),  # the rest of the body is never read
    ]
    start = {"type": "http.response.start", "status": 413, "headers": headers}
    return [start, {"type": "http.response.body", "body": body}]


class BodyLimitMiddleware:
    """Answers 413 to a request body over `max_bytes` before any handler sees it."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        # Read the whole body here (the app would buffer it anyway) to count what really came.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                await self.app(scope, _replay([], message, receive), send)
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], None, receive), send)

    async def _refuse(self, send: Send) -> None:
        for message in _too_large(self.max_bytes):
            await send(message)


def _replay(messages: list[Message], last: Message | None, receive: Receive) -> Receive:
    """A receive that returns `messages` (then `last`), then reads on from `receive`."""
    queued = [*messages, *([last] if last is not None else [])]

    async def replayed() -> Message:
        if queued:
            return queued.pop(0)
        return await receive()

    return replayed
