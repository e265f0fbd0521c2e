"""What the engine hands out: vLLM's RequestOutput / CompletionOutput plus the served shape, and
the views of its load and of one request that callers outside it (the server) read."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..model.shapes import ShapeSpec


@dataclass(frozen=True)
class Logprob:
    """A token's log-prob and its rank in the distribution (1: the most likely), as vLLM's."""

    logprob: float
    rank: int


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative
    # cumulative, and the engine's own list, not a copy: complete once the request has finished;
    # until then it may have grown past this output on the engine's thread (see num_tokens)
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: chosen + top-n; the engine's list
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text_delta: str = ""  # the text this output adds to the previous one (what a stream sends)
    num_tokens: int = -1  # tokens generated up to this output; -1: len(token_ids) at creation

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            self.num_tokens = len(self.token_ids)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    shape: str  # the shape that produced this output's newest tokens
    narrowest_shape: str  # the narrowest shape that produced any of its tokens
    shape_tokens: dict[str, int] = field(default_factory=dict)  # generated tokens per shape
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # per prompt token (None for the first): it and the top-k when the request asked for them;
    # the engine's own list, complete once the prompt is computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    # prefix cache, since start: prompt tokens of admitted sequences looked up / found
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


@dataclass(frozen=True)
class RequestSnapshot:
    """What a caller outside the engine sees of one unfinished request."""

    prompt: str | None
    prompt_token_ids: list[int]  # the engine's own list: read, do not change
    spec: ShapeSpec  # the shape it runs at now
    running: bool  # admitted to the running batch (else waiting)
