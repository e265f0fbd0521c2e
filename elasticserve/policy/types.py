"""What the engine and a policy exchange: SLOs, request views, load snapshots, decisions."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

POLICIES = ("fixed", "load", "slo")


@dataclass(frozen=True)
class SLO:
    """Latency targets of a request, in milliseconds; None: no target."""

    ttft_ms: float | None = None  # time to first token
    tpot_ms: float | None = None  # time per output token after the first

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if value is not None and not (number and 0 < value < math.inf):
                raise ValueError(
                    f"slo.{name} must be a positive number of milliseconds, got {value!r}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> SLO:
        """Parse `{"ttft_ms": ..., "tpot_ms": ...}` (the API's `slo` field) with clear errors."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"slo must be an object with ttft_ms and/or tpot_ms, got {d!r}")
        unknown = set(d) - {"ttft_ms", "tpot_ms"}
        if unknown:
            raise ValueError(f"unknown slo field(s) {sorted(unknown)}: use ttft_ms, tpot_ms")
        return cls(d.get("ttft_ms"), d.get("tpot_ms"))

    def over(self, default: SLO) -> SLO:
        """This SLO's targets, the default's where this one has none."""
        return SLO(
            self.ttft_ms if self.ttft_ms is not None else default.ttft_ms,
            self.tpot_ms if self.tpot_ms is not None else default.tpot_ms,
        )


@dataclass(frozen=True)
class RequestView:
    """What a policy sees of one request."""

    request_id: str
    shape_id: int
    layers: tuple[int, ...]  # kept layers now
    has_kv: bool  # KV is cached: depth may only shrink
    prompt_tokens: int
    output_tokens: int = 0
    computed_tokens: int = 0  # tokens whose KV is cached
    max_tokens: int = 16
    arrival_time: float = 0.0
    pinned: bool = False
    min_shape_id: int | None = None
    slo: SLO = SLO()

    @property
    def uncomputed(self) -> int:
        return self.prompt_tokens + self.output_tokens - self.computed_tokens

    @property
    def remaining(self) -> int:
        """Tokens it may still generate (an upper bound: it may stop earlier)."""
        return max(0, self.max_tokens - self.output_tokens)


@dataclass(frozen=True)
class LoadState:
    """A snapshot of the engine's load, taken before a step."""

    waiting: tuple[RequestView, ...] = ()  # in admission order
    running: tuple[RequestView, ...] = ()
    kv_usage: float = 0.0  # fraction of KV blocks in use
    arrival_rate: float = 0.0  # requests per second, recently
    mean_prompt_tokens: float = 0.0  # of recent requests
    mean_output_tokens: float = 0.0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512


@dataclass(frozen=True)
class Decision:
    """The step shape for new admissions, and shape changes for unpinned requests."""

    step_shape: int
    changes: Mapping[str, int] = field(default_factory=dict)  # request id -> shape id


@dataclass(frozen=True)
class Refuse:
    """Admission refused: even the smallest allowed shape is predicted to miss the SLO."""

    retry_after_s: float
    reason: str
    under_load: bool = True  # False: the request's SLO is out of reach even on an idle server


class Overloaded(RuntimeError):
    """Raised by the engine for a refused request; the server answers 429 with Retry-After."""

    def __init__(self, refuse: Refuse) -> None:
        super().__init__(refuse.reason)
        self.retry_after_s = refuse.retry_after_s


@dataclass(frozen=True)
class PolicyConfig:
    # `slo`: keep a cap while it is predicted to meet the SLOs with this slack, else shrink:
    # per-request TPOTs scatter around the predicted mean, so a cap predicted at exactly the
    # SLO misses it for many requests (`load` has its own slack, load_target)
    shrink_margin: float = 0.2
    grow_margin: float = 0.35  # grow only to a cap predicted to meet its target with this slack
    grow_after_s: float = 2.0  # ... for at least this long
    grow_after_steps: int = 4  # ... and this many steps
    load_target: float = 0.85  # `load`: highest predicted utilisation
    drain_s: float = 5.0  # `load`: the queue should drain within this time
    kv_high: float = 0.9  # `load`: shrink depth when the KV cache would be fuller than this

    def __post_init__(self) -> None:
        if not 0.0 <= self.shrink_margin <= self.grow_margin < 1.0:
            raise ValueError(f"need 0 <= shrink_margin <= grow_margin < 1: {self}")
        if not 0.0 < self.load_target <= 1.0:
            raise ValueError(f"load_target must be in (0, 1]: {self}")
        if self.grow_after_s < 0 or self.grow_after_steps < 0 or self.drain_s <= 0:
            raise ValueError(f"hysteresis times must be >= 0 and drain_s > 0: {self}")
