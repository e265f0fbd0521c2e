"""OpenAI protocol models (pydantic v2), with vLLM's extra sampling fields and elasticserve's SLO.

Requests validate strictly (a string is not an integer) and ignore unknown fields, as vLLM does;
`to_sampling_params` turns a request into engine SamplingParams and raises `RequestError` naming
the parameter for what the engine does not support.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from elasticserve.engine.sampling import SamplingParams

# Anything wider cannot reach torch (an int64) and no sane request needs it.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
MAX_TOP_LOGPROBS = 20


class RequestError(ValueError):
    """A request the server cannot serve as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- requests ------------------------------------------------------------------------------------


class SLO(_Request):
    """A request's latency targets; the shape policy picks a shape predicted to meet them."""

    ttft_ms: Annotated[float, Field(gt=0)] | None = None
    tpot_ms: Annotated[float, Field(gt=0)] | None = None


class StreamOptions(_Request):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM: usage in every chunk


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    # Every field takes an explicit null as "the default": some SDKs send all of them.
    model: str | None = None  # None: the base model, the policy picks the shape
    n: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Count | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Count] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: Int64 | None = None  # lower is served first
    # elasticserve
    slo: SLO | None = None

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", "logit_bias")
        try:
            return self._build_params(max_tokens, logprobs)
        except ValueError as exc:  # SamplingParams names the field first: "top_p must be ..."
            field = str(exc).split(" ", 1)[0]
            raise RequestError(
                str(exc), field if field in type(self).model_fields else None
            ) from exc

    def _build_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=_or(self.n, 1),
            max_tokens=max_tokens,
            min_tokens=_or(self.min_tokens, 0),
            temperature=_or(self.temperature, 1.0),
            top_p=_or(self.top_p, 1.0),
            top_k=_or(self.top_k, 0),
            min_p=_or(self.min_p, 0.0),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=_or(self.ignore_eos, False),
            logprobs=logprobs,
            repetition_penalty=_or(self.repetition_penalty, 1.0),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            skip_special_tokens=_or(self.skip_special_tokens, True),
            include_stop_str_in_output=_or(self.include_stop_str_in_output, False),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[Count] | list[str] | list[list[Count]]
    max_tokens: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    echo: bool | None = None
    best_of: Int64 | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request (text or token ids); batches are refused."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return cast(str | list[int], prompt)
        if len(prompt) != 1:
            raise RequestError(
                f"one prompt per request is supported, got {len(prompt)}; "
                "send them as separate requests",
                "prompt",
            )
        return cast(str | list[int], prompt[0])

    def to_sampling_params(self) -> SamplingParams:
        """Engine sampling parameters; RequestError for what the server does not support."""
        if self.echo:
            raise RequestError("echo is not supported; omit it or set it to false", "echo")
        if self.best_of not in (None, 1):
            raise RequestError(f"best_of must be 1, got {self.best_of}", "best_of")
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        return self._sampling_params(self.max_tokens, self.logprobs)


class TextPart(_Request):
    """One part of a message's content; only text parts can be served."""

    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; RequestError for non-text parts (images, audio)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise RequestError(
                    f"only text content parts are supported, got type {part.type!r}", "messages"
                )
        return "".join(part.text or "" for part in self.content)


class ResponseFormat(_Request):
    type: str = "text"


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None  # None: to the context
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool | None = None  # vLLM; None: True

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation as the tokenizer's chat template takes it."""
        out = []
        for message in self.messages:
            entry = {"role": message.role, "content": message.text()}
            if message.name is not None:
                entry["name"] = message.name
            out.append(entry)
        return out

    def to_sampling_params(self) -> SamplingParams:
        """Engine sampling parameters; RequestError for what the server does not support."""
        if self.tools:
            raise RequestError("tool calling is not supported", "tools")
        if self.response_format is not None and self.response_format.type != "text":
            raise RequestError(
                f"response_format {self.response_format.type!r} is not supported; use 'text'",
                "response_format",
            )
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs)


# -- responses -----------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Response):
    error: ErrorInfo


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    shape_tokens: dict[str, int] = Field(default_factory=dict)  # generated tokens per shape


class CompletionLogProbs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop token id or string that ended it


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogProb(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProb(TopLogProb):
    top_logprobs: list[TopLogProb] = Field(default_factory=list)


class ChatLogProbs(_Response):
    content: list[ChatLogProb] | None = None


class ChatResponseMessage(_Response):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Response):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(_Response):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _Chunk(_Response):
    """A streamed chunk; serialised with exclude_unset, so fields left unset stay out of it."""

    def model_post_init(self, context: Any) -> None:
        self.model_fields_set.update({"object", "created"})  # always sent, as OpenAI does


class ChatCompletionChunk(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "elasticserve"
    root: str
    parent: str | None = None  # the base model, for a shape
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ShapeCard(_Response):
    """One shape of the grid: where it sits, how much it reads, how good and fast it is."""

    id: str  # the model id that pins it: <name>@<shape>
    object: Literal["shape"] = "shape"
    shape: str
    shape_id: int
    depth: int
    width: float
    weight_fraction: float
    ppl: float | None = None  # held-out perplexity from the pack
    latency: dict[str, float] | None = None  # measured TTFT/TPOT, when the pack has a profile


class ShapeList(_Response):
    object: Literal["list"] = "list"
    data: list[ShapeCard]
