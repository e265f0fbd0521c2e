"""Engine outputs as OpenAI responses: whole bodies, or the chunks of an SSE stream."""

from __future__ import annotations

import time
from typing import Any

from elasticserve.engine.outputs import RequestOutput

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
    TopLogProb,
    UsageInfo,
)
from .state import ServerState

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports impossible tokens like this


def usage_info(out: RequestOutput) -> UsageInfo:
    prompt, completion = len(out.prompt_token_ids), out.outputs[0].num_tokens
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        shape_tokens=dict(out.shape_tokens),
    )


def sse(chunk: Any) -> str:
    data = chunk if isinstance(chunk, str) else chunk.model_dump_json(exclude_unset=True)
    return f"data: {data}\n\n"


class Format:
    """Turns one request's cumulative outputs into OpenAI chunks (deltas) or a whole response."""

    chunk_type: type[CompletionChunk] | type[ChatCompletionChunk]

    def __init__(self, server: ServerState, request_id: str, body: Any):
        self.server, self.request_id, self.body = server, request_id, body
        self.created = int(time.time())
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
        # token_ids and logprobs are the engine's own lists, which its thread may have grown
        # since: this output's token count decides how far to read.
        start, self.sent_tokens = self.sent_tokens, completion.num_tokens
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
        text = completion.text_delta
        has_logprobs = completion.logprobs is not None
        if not text and not out.finished and not (has_logprobs and self._has_new_tokens(out)):
            return []
        chunk = self._chunk(out.shape, [self.stream_choice(out, text)])
        if self.body.continuous_usage:
            chunk.usage = usage_info(out)
        elif self.body.include_usage:
            chunk.usage = None  # OpenAI sends an explicit null until the final usage chunk
        return [chunk]

    def _has_new_tokens(self, out: RequestOutput) -> bool:
        return out.outputs[0].num_tokens > self.sent_tokens

    def usage_chunk(self, out: RequestOutput) -> Any:
        chunk = self._chunk(out.narrowest_shape, [])
        chunk.usage = usage_info(out)
        return chunk

    def stream_choice(self, out: RequestOutput, text: str) -> Any:
        raise NotImplementedError

    def response(self, out: RequestOutput) -> Any:
        raise NotImplementedError


class CompletionFormat(Format):
    chunk_type = CompletionChunk

    def __init__(self, server: ServerState, request_id: str, body: CompletionRequest):
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
            usage=usage_info(out),
        )


class ChatFormat(Format):
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
            shape, [ChatStreamChoice(index=0, delta=delta, logprobs=None, finish_reason=None)]
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
            usage=usage_info(out),
        )
