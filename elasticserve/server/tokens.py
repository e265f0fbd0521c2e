"""/tokenize and /detokenize (vLLM's): a prompt or conversation as the server's token ids."""

from __future__ import annotations

from fastapi import APIRouter

from .errors import APIError
from .protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from .state import ServerState


def router(server: ServerState) -> APIRouter:
    """The tokenizer endpoints of `server`."""
    routes = APIRouter()

    @routes.post("/tokenize", response_model=TokenizeResponse)
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> TokenizeResponse:
        server.resolve_shape(body.model)  # an unknown model is a 404 here too
        # the ids the server would run: the same encoder (on its thread, length-checked, chat
        # content tokenized as text) as the completion and chat endpoints
        tokenizer = server.tokenizer
        if isinstance(body, TokenizeChatRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            add = body.add_generation_prompt is not False
            ids = await server.prompts.chat(messages, add_generation_prompt=add)
        else:
            special = body.add_special_tokens is not False
            ids = await server.prompts.text(body.prompt, add_special_tokens=special)
        strs = list(tokenizer.convert_ids_to_tokens(ids)) if body.return_token_strs else None
        return TokenizeResponse(
            count=len(ids),
            max_model_len=server.bundle.max_model_len,
            tokens=list(ids),
            token_strs=strs,
        )

    @routes.post("/detokenize", response_model=DetokenizeResponse)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        server.resolve_shape(body.model)
        vocab = server.bundle.config.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise APIError(
                400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens"
            )
        return DetokenizeResponse(prompt=str(server.tokenizer.decode(body.tokens)))

    return routes
