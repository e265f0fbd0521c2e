"""Engine outputs as OpenAI responses: whole bodies, or the chunks of an SSE stream."""

from __future__ import annotations

import time
from typing import Any

from elasticserve.engine.outputs import CompletionOutput, RequestOutput

from .protocol import (
    ChatChoice,
    ChatCompletionChunk,
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
    PromptTokensDetails,
    TopLogProb,
    UsageInfo,
)
from .state import ServerState

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports impossible tokens like this


def usage_info(out: RequestOutput) -> UsageInfo:
    """Token counts: the prompt once, every returned choice's tokens, the cached prompt tokens."""
    prompt = len(out.prompt_token_ids)
    completion = sum(c.num_tokens for c in out.outputs)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens),
        shape_tokens=dict(out.shape_tokens),
    )


def sse(chunk: Any) -> str:
    data = chunk if isinstance(chunk, str) else chunk.model_dump_json(exclude_unset=True)
    return f"data: {data}\n\n"


class Format:
    """Turns one request's cumulative outputs into OpenAI chunks (deltas) or a whole response.

    A request with n > 1 has a choice per index; a stream sends each choice's chunks apart.
    """

    chunk_type: type[CompletionChunk] | type[ChatCompletionChunk]

    def __init__(self, server: ServerState, request_id: str, body: Any):
        self.server, self.request_id, self.body = server, request_id, body
        self.created = int(time.time())
        self.sent_tokens: dict[int, int] = {}  # per choice: tokens whose log-probs went out
        self.sent_finish: set[int] = set()  # choices whose finish_reason went out

    def model(self, shape: str) -> str:
        return f"{self.server.name}@{shape}"

    def _token(self, token_id: int) -> str:
        return str(self.server.tokenizer.decode([token_id]))

    def _new_logprobs(self, completion: CompletionOutput) -> list[tuple[int, dict[int, float]]]:
        """(token id, {token: logprob} of it and the top-n) for the tokens not yet reported."""
        if completion.logprobs is None:
            return []
        # token_ids and logprobs are the engine's own lists, which its thread may have grown
        # since: this output's token count decides how far to read.
        start = self.sent_tokens.get(completion.index, 0)
        stop = self.sent_tokens[completion.index] = completion.num_tokens
        ids = completion.token_ids[start:stop]
        return list(zip(ids, completion.logprobs[start:stop], strict=True))

    def _chunk(self, shape: str, choices: list[Any]) -> Any:
        return self.chunk_type(
            id=self.request_id, created=self.created, model=self.model(shape), choices=choices
        )

    def opening_chunks(self, shape: str) -> list[Any]:
        return []

    def chunks(self, out: RequestOutput) -> list[Any]:
        """A chunk per choice with new text (or log-probs, or its finish); none if none has."""
        chunks = []
        for completion in out.outputs:
            text, index = completion.text_delta, completion.index
            finishing = completion.finish_reason is not None and index not in self.sent_finish
            has_logprobs = completion.logprobs is not None
            new_tokens = completion.num_tokens > self.sent_tokens.get(index, 0)
            if not text and not finishing and not (has_logprobs and new_tokens):
                continue
            if finishing:
                self.sent_finish.add(index)
            chunk = self._chunk(out.shape, [self.stream_choice(completion, text)])
            if self.body.continuous_usage:
                chunk.usage = usage_info(out)
            elif self.body.include_usage:
                chunk.usage = None  # OpenAI sends an explicit null until the final usage chunk
            chunks.append(chunk)
        return chunks

    def usage_chunk(self, out: RequestOutput) -> Any:
        chunk = self._chunk(out.narrowest_shape, [])
        chunk.usage = usage_info(out)
        return chunk

    def stream_choice(self, completion: CompletionOutput, text: str) -> Any:
        raise NotImplementedError

    def response(self, out: RequestOutput) -> Any:
        raise NotImplementedError


class CompletionFormat(Format):
    chunk_type = CompletionChunk

    def __init__(self, server: ServerState, request_id: str, body: CompletionRequest):
        super().__init__(server, request_id, body)
        self.text_offset: dict[int, int] = {}  # per choice: logprobs.text_offset of its next token

    def logprobs(self, completion: CompletionOutput) -> CompletionLogProbs | None:
        if self.body.logprobs is None:
            return None
        # explicit lists: chunks are serialised with exclude_unset, and [] must not vanish
        result = CompletionLogProbs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        offset = self.text_offset.get(completion.index, 0)
        for token_id, entry in self._new_logprobs(completion):
            text = self._token(token_id)
            result.tokens.append(text)
            result.token_logprobs.append(max(entry[token_id], _MIN_LOGPROB))
            top = sorted(entry.items(), key=lambda kv: -kv[1])
            result.top_logprobs.append({self._token(t): max(lp, _MIN_LOGPROB) for t, lp in top})
            result.text_offset.append(offset)
            offset += len(text)
        self.text_offset[completion.index] = offset
        return result

    def stream_choice(self, completion: CompletionOutput, text: str) -> CompletionChoice:
        return CompletionChoice(
            index=completion.index,
            text=text,
            logprobs=self.logprobs(completion),
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )

    def response(self, out: RequestOutput) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model(out.narrowest_shape),
            choices=[self.stream_choice(c, c.text) for c in out.outputs],
            usage=usage_info(out),
        )


class ChatFormat(Format):
    chunk_type = ChatCompletionChunk

    def logprobs(self, completion: CompletionOutput) -> ChatLogProbs | None:
        if not self.body.logprobs:
            return None
        n_top = self.body.top_logprobs or 0
        content = []
        for token_id, entry in self._new_logprobs(completion):
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
        """OpenAI opens a chat stream with the assistant's role and empty content, per choice."""
        chunks = []
        for index in range(self.body.n or 1):
            delta = DeltaMessage(role="assistant", content="")
            choice = ChatStreamChoice(index=index, delta=delta, logprobs=None, finish_reason=None)
            chunk = self._chunk(shape, [choice])
            if self.body.include_usage:
                chunk.usage = None
            chunks.append(chunk)
        return chunks

    def stream_choice(self, completion: CompletionOutput, text: str) -> ChatStreamChoice:
        choice = ChatStreamChoice(
            index=completion.index,
            delta=DeltaMessage(content=text) if text else DeltaMessage(),
            logprobs=self.logprobs(completion),
            finish_reason=completion.finish_reason,
        )
        if completion.stop_reason is not None:
            choice.stop_reason = completion.stop_reason
        return choice

    def response(self, out: RequestOutput) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=c.text),
                logprobs=self.logprobs(c),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in out.outputs
        ]
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model(out.narrowest_shape),
            choices=choices,
            usage=usage_info(out),
        )
