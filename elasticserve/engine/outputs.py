"""What the engine returns: vLLM's RequestOutput / CompletionOutput, plus the served shape."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative
    token_ids: list[int]  # cumulative
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: chosen + top-n, when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


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
