"""One request's state as the scheduler sees it: tokens, progress, kept layers and KV blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .block_manager import CachedBlock


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        """True for every FINISHED_* status."""
        return self.name.startswith("FINISHED")


@dataclass(eq=False)
class Sequence:
    """A request: prompt + generated tokens, how many are in the KV cache, and where."""

    seq_id: str
    prompt_token_ids: list[int]
    layers: tuple[int, ...]  # kept decoder layers, ascending; may only shrink in flight
    max_tokens: int  # max new tokens
    priority: int = 0  # lower is served first
    arrival_time: float = 0.0
    stop_token_ids: frozenset[int] = frozenset()  # sampled tokens that end it (EOS, stop ids)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # leading tokens whose KV is in the cache
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[list[int]] = field(default_factory=list)  # [kept layer][logical block]
    num_preemptions: int = 0
    # prefix caching: the key its full blocks are registered and looked up under (the shape id,
    # or with precision sharing the id of its dense sibling; None: never), the registered
    # entries of its leading blocks, and the prompt tokens its first admission found cached
    cache_key: int | None = None
    cached_chain: list[CachedBlock] = field(default_factory=list)
    num_cached_tokens: int = 0
    skip_reading_prefix_cache: bool = False  # its prompt needs every row's logits (vLLM's name)
    pending_forks: int = 0  # parallel sampling: children it forks once its prompt is computed

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if any(a >= b for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"layers of {self.seq_id!r} must be strictly ascending: {self.layers}")

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True unless the next step feeds exactly one token after at least one was sampled."""
        return self.num_uncomputed_tokens > 1 or not self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        """Record one sampled token (its KV is computed by the next step)."""
        self.output_token_ids.append(token_id)
