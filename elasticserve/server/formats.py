"""Engine outputs as OpenAI responses: whole bodies, or the chunks of an SSE stream."""

from __future__ import annotations

import time
from typing import Any

from elasticserve.engine.outputs import CompletionOutput, RequestOutput

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
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    TopLogProb,
    UsageInfo,
)
from .state import ServerState

_MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM reports impossible tokens like this


def usage_info(out: RequestOutput, generated: bool = True) -> UsageInfo:
    """Token counts: the prompt once, every returned choice's tokens (unless none is returned,
    `generated` false), the cached prompt tokens."""
    prompt = len(out.prompt_token_ids)
    completion = sum(c.num_tokens for c in out.outputs) if generated else 0
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens),
        shape_tokens=dict(out.shape_tokens) if generated else {},
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

    def prompt_logprobs(self, out: RequestOutput) -> PromptLogprobs | None:
        """vLLM's `prompt_logprobs`: per prompt token its entry and the k best, by token id."""
        k = self.body.prompt_logprobs
        if k is None or out.prompt_logprobs is None:
            return None
        result: PromptLogprobs = []
        for token, entry in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
            if entry is None:
                result.append(None)
                continue
            result.append(
                {
                    str(t): PromptLogprob(
                        logprob=max(lp.logprob, _MIN_LOGPROB),
                        rank=lp.rank,
                        decoded_token=self._token(t),
                    )
                    for t, lp in entry.items()
                    if t == token or lp.rank <= k  # the engine may hold more (echo's logprobs)
                }
            )
        return result

    def usage(self, out: RequestOutput) -> UsageInfo:
        return usage_info(out)

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
            chunk = self._chunk(out.shape, [self.stream_choice(out, completion, text)])
            if self.body.continuous_usage:
                chunk.usage = self.usage(out)
            elif self.body.include_usage:
                chunk.usage = None  # OpenAI sends an explicit null until the final usage chunk
            chunks.append(chunk)
        return chunks

    def usage_chunk(self, out: RequestOutput) -> Any:
        chunk = self._chunk(out.narrowest_shape, [])
        chunk.usage = self.usage(out)
        return chunk

    def stream_choice(self, out: RequestOutput, completion: CompletionOutput, text: str) -> Any:
        raise NotImplementedError

    def response(self, out: RequestOutput) -> Any:
        raise NotImplementedError


class CompletionFormat(Format):
    """With `echo`, a choice's first chunk (or its whole text) starts with the prompt, and its
    log-probs with the prompt tokens' (the first one's None), as OpenAI's legacy completions."""

    chunk_type = CompletionChunk
    body: CompletionRequest

    def __init__(self, server: ServerState, request_id: str, body: CompletionRequest):
        super().__init__(server, request_id, body)
        self.text_offset: dict[int, int] = {}  # per choice: logprobs.text_offset of its next token
        self.echoed: set[int] = set()  # choices whose prompt went out
        prompt = body.single_prompt() if body.echo else ""
        self.prompt_text = (
            prompt if isinstance(prompt, str) else str(server.tokenizer.decode(prompt))
        )

    def usage(self, out: RequestOutput) -> UsageInfo:
        return usage_info(out, generated=not self.body.echo_only)

    def logprobs(
        self, out: RequestOutput, completion: CompletionOutput, echo: bool
    ) -> CompletionLogProbs | None:
        if self.body.logprobs is None:
            return None
        # explicit lists: chunks are serialised with exclude_unset, and [] must not vanish
        result = CompletionLogProbs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        if echo:
            self._add_prompt_logprobs(out, result)
        offset = self.text_offset.get(completion.index, 0) + sum(map(len, result.tokens))
        if self.body.echo_only:  # the one token run for it is not part of the answer
            self.text_offset[completion.index] = offset
            return result
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

    def _add_prompt_logprobs(self, out: RequestOutput, result: CompletionLogProbs) -> None:
        """The prompt tokens' entries (None for the first), the body's `logprobs` best of each."""
        assert out.prompt_logprobs is not None and self.body.logprobs is not None
        offset, n_top = 0, self.body.logprobs
        for token, entry in zip(out.prompt_token_ids, out.prompt_logprobs, strict=True):
            text = self._token(token)
            result.tokens.append(text)
            result.text_offset.append(offset)
            offset += len(text)
            if entry is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(max(entry[token].logprob, _MIN_LOGPROB))
            top = sorted(
                ((t, lp.logprob) for t, lp in entry.items() if t == token or lp.rank <= n_top),
                key=lambda kv: -kv[1],
            )
            result.top_logprobs.append({self._token(t): max(lp, _MIN_LOGPROB) for t, lp in top})

    def stream_choice(
        self, out: RequestOutput, completion: CompletionOutput, text: str
    ) -> CompletionChoice:
        index, finish, stop = completion.index, completion.finish_reason, completion.stop_reason
        echo = bool(self.body.echo) and index not in self.echoed
        if echo:
            self.echoed.add(index)
        if self.body.echo_only:  # max_tokens 0: the prompt is the whole answer
            text, finish, stop = "", "length" if finish is not None else None, None
        return CompletionChoice(
            index=index,
            text=(self.prompt_text if echo else "") + text,
            logprobs=self.logprobs(out, completion, echo),
            finish_reason=finish,
            stop_reason=stop,
        )

    def response(self, out: RequestOutput) -> CompletionResponse:
        choices = [self.stream_choice(out, c, c.text) for c in out.outputs]
        prompt_logprobs = self.prompt_logprobs(out)
        for choice in choices:
            choice.prompt_logprobs = prompt_logprobs
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model(out.narrowest_shape),
            choices=choices,
            usage=self.usage(out),
        )


class ChatFormat(Format):
    """With `echo` (vLLM's), each answer starts with the last message if the assistant's."""

    chunk_type = ChatCompletionChunk
    body: ChatCompletionRequest

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
        """OpenAI opens a chat stream with the assistant's role and empty content, per choice;
        the echoed message follows (vLLM)."""
        chunks = []
        echoed = self.body.echoed()
        for index in range(self.body.n or 1):
            deltas = [DeltaMessage(role="assistant", content="")]
            deltas += [DeltaMessage(content=echoed)] if echoed else []
            for delta in deltas:
                choice = ChatStreamChoice(
                    index=index, delta=delta, logprobs=None, finish_reason=None
                )
                chunk = self._chunk(shape, [choice])
                if self.body.include_usage:
                    chunk.usage = None
                chunks.append(chunk)
        return chunks

    def stream_choice(
        self, out: RequestOutput, completion: CompletionOutput, text: str
    ) -> ChatStreamChoice:
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
        echoed = self.body.echoed()
        choices = [
            ChatChoice(
                index=c.index,
                message=ChatResponseMessage(content=echoed + c.text),
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
            usage=self.usage(out),
            prompt_logprobs=self.prompt_logprobs(out),
        )
