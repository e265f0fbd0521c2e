"""OpenAI protocol models (pydantic v2), with vLLM's extra sampling fields and elasticserve's SLO.

Requests validate strictly (a string is not an integer); `to_sampling_params` turns a request
into engine SamplingParams and raises `RequestError` naming the parameter for anything the server
does not implement: an unknown field, or a vLLM/OpenAI one it lacks sent with a value that is not
its "off" value (vLLM logs and ignores unknown fields; a silent default is worse than a 400).
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from elasticserve.engine.guided import GuidedDecodingParams
from elasticserve.engine.sampling import SamplingParams

# Anything wider cannot reach torch (an int64) and no sane request needs it.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
MAX_TOP_LOGPROBS = 20
# Every stop string is looked for after every token: bound how many and how long (OpenAI takes 4).
MAX_STOPS = 64
MAX_STOP_CHARS = 1024
Stop = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Bias = Annotated[float, Field(ge=-100, le=100)]  # OpenAI's logit_bias range
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


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


# vLLM / OpenAI request fields not implemented here, each with the value that means "off"; sent
# with that value (or null) they are accepted, with any other a 400 names them.
UNSUPPORTED_FIELDS: dict[str, object] = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "early_stopping": False,
    "truncate_prompt_tokens": None,
    "allowed_token_ids": None,
    "bad_words": [],
    "logits_processors": None,
    "guided_whitespace_pattern": None,
    "return_tokens_as_token_ids": False,
    "return_token_ids": False,
    "spaces_between_special_tokens": True,
    "prompt_embeds": None,
    "chat_template": None,
    "chat_template_kwargs": {},
    "documents": None,
    "continue_final_message": False,
    "functions": None,
    "function_call": None,
    "audio": None,
    "modalities": ["text"],
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
    "mm_processor_kwargs": None,
    "kv_transfer_params": None,
    "vllm_xargs": None,
    "cache_salt": None,
    "add_special_tokens": True,  # completions' default; chat has the field (its default: false)
}
# Fields that change nothing a request gets back: accepted and ignored, as OpenAI's own server.
IGNORED_FIELDS = frozenset(
    {"store", "metadata", "service_tier", "parallel_tool_calls", "request_id"}
)
GUIDED_BACKENDS = ("auto", "xgrammar")


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` (its newer name for the guided_* fields)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


class _SamplingRequest(_Request):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    # extra fields are kept, to be refused by name (`_refuse_unsupported`), never dropped
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    # Every field takes an explicit null as "the default": some SDKs send all of them.
    model: str | None = None  # None: the base model, the policy picks the shape
    n: Int64 | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Int64 | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Bias] | None = None  # token id (a decimal string) -> bias
    user: str | None = None
    # vLLM extras
    top_k: Annotated[int, Field(ge=-1, le=2**63 - 1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    min_tokens: Count | None = None
    ignore_eos: bool | None = None
    stop_token_ids: Annotated[list[Count], Field(max_length=MAX_STOPS)] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    priority: Int64 | None = None  # lower is served first
    prompt_logprobs: TopLogprobs | None = None  # per prompt token: its log-prob and the top-k
    # structured output: one of these at most (vLLM's guided_* fields, OpenAI's response_format)
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    structured_outputs: StructuredOutputs | None = None
    # elasticserve
    slo: SLO | None = None

    def _refuse_unsupported(self) -> None:
        """RequestError naming the first field sent that the server does not implement."""
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS:
                continue
            if name not in UNSUPPORTED_FIELDS:
                raise RequestError(f"unknown parameter '{name}'", name)
            if value is not None and value != UNSUPPORTED_FIELDS[name]:
                raise RequestError(f"{name} is not supported (got {_short(value)}); omit it", name)

    def guided_decoding(self) -> GuidedDecodingParams | None:
        """The request's structured-output constraint; RequestError if it sets two."""
        given: list[tuple[str, dict[str, Any]]] = []
        if self.response_format is not None and self.response_format.type != "text":
            given.append(("response_format", self._response_format_constraint()))
        for field, key in [
            ("guided_json", "json"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ]:
            if getattr(self, field) is not None:
                given.append((field, {key: getattr(self, field)}))
        if self.structured_outputs is not None:
            so = self.structured_outputs
            fields: dict[str, Any] = {"json": so.json_, "regex": so.regex, "choice": so.choice}
            fields |= {"grammar": so.grammar, "json_object": so.json_object or None}
            given += [("structured_outputs", {k: v}) for k, v in fields.items() if v is not None]
        backend = self.guided_decoding_backend
        if backend is not None and backend not in GUIDED_BACKENDS:
            raise RequestError(
                f"guided_decoding_backend {backend!r} is not available; use one of "
                f"{', '.join(GUIDED_BACKENDS)}",
                "guided_decoding_backend",
            )
        if not given:
            return None
        if len(given) > 1:
            names = " and ".join(name for name, _ in given[:2])
            raise RequestError(f"set one structured-output constraint, got {names}", given[1][0])
        field, constraint = given[0]
        try:
            return GuidedDecodingParams(**constraint)
        except ValueError as exc:
            raise RequestError(f"{field}: {exc}", field) from exc

    def _response_format_constraint(self) -> dict[str, Any]:
        fmt = self.response_format
        assert fmt is not None
        if fmt.type == "json_object":
            return {"json_object": True}
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise RequestError(
                "response_format json_schema needs json_schema.schema", "response_format"
            )
        return {"json": fmt.json_schema.schema_}

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        self._refuse_unsupported()
        if self.stream and self.prompt_logprobs is not None:
            # vLLM refuses k > 0 and drops 0 silently; a stream has no field to carry them
            raise RequestError(
                "prompt_logprobs are not available when stream is true", "prompt_logprobs"
            )
        guided = self.guided_decoding()
        try:
            params = self._build_params(max_tokens, logprobs)
        except ValueError as exc:  # SamplingParams names the field first: "top_p must be ..."
            field = str(exc).split(" ", 1)[0]
            raise RequestError(
                str(exc), field if field in type(self).model_fields else None
            ) from exc
        params.guided_decoding = guided
        return params

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
            prompt_logprobs=self.prompt_logprobs,
            logit_bias=self._logit_bias(),
            repetition_penalty=_or(self.repetition_penalty, 1.0),
            presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0),
            skip_special_tokens=_or(self.skip_special_tokens, True),
            include_stop_str_in_output=_or(self.include_stop_str_in_output, False),
        )

    def _logit_bias(self) -> dict[int, float] | None:
        """logit_bias keyed by int token ids; RequestError for a key that is not one."""
        if not self.logit_bias:
            return None
        for key in self.logit_bias:
            if not re.fullmatch(r"[0-9]{1,12}", key):
                raise RequestError(
                    f"logit_bias keys must be token ids (decimal strings), got {_short(key)}",
                    "logit_bias",
                )
        return {int(key): bias for key, bias in self.logit_bias.items()}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[Count] | list[str] | list[list[Count]]
    max_tokens: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = 16  # 0: only with echo
    logprobs: TopLogprobs | None = None
    echo: bool | None = None  # the prompt before each choice's text (and its log-probs)
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

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the answer is the prompt alone (one token is run and dropped)."""
        return bool(self.echo) and self.max_tokens == 0

    def to_sampling_params(self) -> SamplingParams:
        """Engine sampling parameters; RequestError for what the server does not support."""
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens must be >= 1 (0 only with echo)", "max_tokens")
        if self.echo_only and self.min_tokens:
            raise RequestError(
                f"min_tokens must be 0 when max_tokens is 0, got {self.min_tokens}", "min_tokens"
            )
        params = self._sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:  # the echoed prompt's log-probs (vLLM)
            wanted = max(self.logprobs, self.prompt_logprobs or 0)
            params = dataclasses.replace(params, prompt_logprobs=wanted)
        if self.best_of is None:
            return params
        if self.best_of < params.n:
            raise RequestError(f"best_of must be >= n ({params.n}), got {self.best_of}", "best_of")
        if self.stream and self.best_of != params.n:
            raise RequestError("best_of must equal n when streaming", "best_of")
        return dataclasses.replace(params, best_of=self.best_of)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None  # None: to the context
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    echo: bool | None = None  # vLLM: the last message, if the assistant's, before each answer
    add_special_tokens: bool | None = None  # vLLM (default false): not implemented for true
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

    def echoed(self) -> str:
        """What `echo` puts before each answer: the last message's text if the assistant's."""
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""

    def to_sampling_params(self) -> SamplingParams:
        """Engine sampling parameters; RequestError for what the server does not support."""
        if self.tools:
            raise RequestError("tool calling is not supported", "tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise RequestError("tool calling is not supported", "tool_choice")
        if self.add_special_tokens:
            raise RequestError(
                "add_special_tokens is not supported: the chat template writes them",
                "add_special_tokens",
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


class PromptTokensDetails(_Response):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    shape_tokens: dict[str, int] = Field(default_factory=dict)  # generated tokens per shape


class CompletionLogProbs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptLogprob(_Response):
    """vLLM's Logprob, one entry of `prompt_logprobs`."""

    logprob: float
    rank: int | None = None  # 1: the most likely token at that position
    decoded_token: str | None = None


# per prompt token, None for the first: {token id: its PromptLogprob} for it and the top-k
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(_Response):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop token id or string that ended it
    prompt_logprobs: PromptLogprobs | None = None  # vLLM: when the request set prompt_logprobs


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
    prompt_logprobs: PromptLogprobs | None = None  # vLLM: when the request set prompt_logprobs


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


class ModelPermission(_Response):
    """vLLM's (and OpenAI's former) permission entry: what a client may do with the model."""

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=_now)
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "elasticserve"
    root: str
    parent: str | None = None  # the base model, for a shape
    max_model_len: int
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


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
    precision: str  # "" (the model's dtype), "q8" or "q4"
    weight_fraction: float
    weight_bytes: int  # weight bytes one decode step reads (LM head included)
    ppl: float | None = None  # held-out perplexity from the pack
    adapter: bool = False  # a fine-tuned LoRA adapter of the pack applies to it
    # mean KL to the full shape and greedy agreement with it on held-out chat, from the pack
    chat_kl: float | None = None
    chat_agree: float | None = None
    latency: dict[str, float] | None = None  # measured TTFT/TPOT, when the pack has a profile


class ShapeList(_Response):
    object: Literal["list"] = "list"
    data: list[ShapeCard]


# -- tokenizer endpoints (vLLM's /tokenize and /detokenize) ---------------------------------------


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = None  # None: True, as a completion's prompt
    return_token_strs: bool | None = None


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = None  # None: True
    return_token_strs: bool | None = None


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Count]


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str
