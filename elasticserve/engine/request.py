"""One request's engine-side state around its scheduler `Sequence`, and the group of sequences
a parallel-sampling request (n > 1 or best_of > 1) runs as."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.shapes import ShapeSpec
from ..policy.types import SLO
from .detokenize import IncrementalDetokenizer
from .guided import Guide
from .outputs import Logprob
from .sampling import SamplingParams
from .sequence import Sequence


@dataclass(eq=False)
class Request:
    """What the engine keeps of a request beyond its tokens: params, text, log-probs, shapes."""

    seq: Sequence
    prompt: str | None
    params: SamplingParams
    spec: ShapeSpec
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    logprobs: list[dict[int, float]] | None
    # prompt_logprobs requested: [None] (the first token has none), grown as the prompt runs
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    shape_tokens: dict[str, int] = field(default_factory=dict)
    narrowest: ShapeSpec | None = None
    # what the shape policy must respect
    pinned: bool = False  # an explicit shape: the policy never changes it
    min_shape: ShapeSpec | None = None  # the policy never goes below it in depth or width
    slo: SLO = field(default_factory=SLO)
    guide: Guide | None = None  # the grammar of a structured-output request
    # parallel sampling: this sequence's choice index and the group it belongs to
    index: int = 0
    group: RequestGroup | None = None


@dataclass(eq=False)
class RequestGroup:
    """The sequences of one parallel-sampling request; members[0] is the parent.

    The parent prefills the prompt; when its prompt is computed, the engine forks the other
    `size - 1` members off it, sharing its KV blocks.
    """

    request_id: str
    n: int  # choices returned
    size: int  # sequences sampled: best_of, else n
    members: list[Request] = field(default_factory=list)
    deltas: dict[int, str] = field(default_factory=dict)  # per index: text since the last output

    @property
    def finished(self) -> bool:
        """Every member forked and finished."""
        return len(self.members) == self.size and all(
            m.finish_reason is not None for m in self.members
        )
