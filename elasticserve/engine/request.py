"""One request's engine-side state around its scheduler `Sequence`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.shapes import ShapeSpec
from ..policy.types import SLO
from .detokenize import IncrementalDetokenizer
from .guided import Guide
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
