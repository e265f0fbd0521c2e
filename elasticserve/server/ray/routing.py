"""Routing across engine replicas: predicted wait, replica ranking, refusals, stream commit points.

Pure Python (no Ray, no torch), so the rules are unit-tested without a cluster; `router.py`
and `serve.py` apply them.

A replica reports (`ReplicaLoad`) its running batch, its queue and a linear step-time model at
its current step shape (`base + per_row * rows`, from its policy's step-time model, corrected
online by the steps it measures). The ingress predicts, for a new request, the seconds until its
first step on each replica and ranks the replicas by that; ties go round-robin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

REPLICA_HEADER = "x-elasticserve-replica"
# Statuses that mean "this replica cannot take it now; another one may": the engine's queue is
# full or its policy refused (429), or its engine is down (503).
TRY_ANOTHER = frozenset({429, 503})
TIE_RELATIVE, TIE_ABSOLUTE_S = 1.1, 0.001  # waits within 10 % + 1 ms of the least are a tie
UNKNOWN_STEP_S = 1.0  # any positive number: with no replica measured, only queue lengths matter


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica reports about its load (its `record_routing_stats`)."""

    replica: str
    running: int = 0
    waiting: int = 0
    step_base_s: float | None = None  # predicted step time of an empty batch; None: no model yet
    step_row_s: float = 0.0  # ... plus this per row (decode, at the recent context length)
    max_num_seqs: int = 64
    mean_output_tokens: float = 16.0  # of recent requests: how long a batch slot stays taken
    alive: bool = True  # the engine thread is running

    def to_stats(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_stats(cls, replica: str, stats: Mapping[str, Any] | None) -> ReplicaLoad:
        """The load in a stats dict; a replica that has not reported yet looks idle."""
        known = {f.name for f in fields(cls)} - {"replica"}
        return cls(replica, **{k: v for k, v in (stats or {}).items() if k in known})


def predicted_wait_s(load: ReplicaLoad, queued: int | None, unknown_step_s: float) -> float:
    """Seconds until a new request's first step here, behind the `queued` requests it holds.

    With a free batch slot the request joins the next step, which costs the step of the bigger
    batch; without one, the k-th request in line waits for k slots, and a slot frees every
    mean_output_tokens / max_num_seqs steps (a request holds its slot for its whole decode).
    """
    if not load.alive:
        return math.inf
    ahead = load.running + load.waiting if queued is None else queued
    slots = max(1, load.max_num_seqs)
    rows = min(ahead + 1, slots)
    base = unknown_step_s if load.step_base_s is None else load.step_base_s
    step_s = base + load.step_row_s * rows
    in_line = max(0, ahead + 1 - slots)
    steps = 1 + math.ceil(in_line * max(1.0, load.mean_output_tokens) / slots)
    return steps * step_s


def default_step_s(loads: Sequence[ReplicaLoad]) -> float:
    """The step time assumed for a replica with no model yet: the median of those with one."""
    known = sorted(x.step_base_s for x in loads if x.step_base_s is not None)
    return known[len(known) // 2] if known else UNKNOWN_STEP_S


def rank(
    loads: Sequence[ReplicaLoad],
    queued: Sequence[int | None],
    avoid: Collection[str] = (),
    turn: int = 0,
) -> list[int]:
    """Indices of `loads`, best first: not avoided, least predicted wait, ties round-robin.

    Waits within TIE of the least are a tie: step times measured on a shared machine are noisy,
    and noise must not send every request to one idle replica. Avoided replicas (already tried
    for this request) come last rather than not at all: when every replica was tried, the caller
    sees a repeat and knows it has asked them all.
    """
    unknown = default_step_s(loads)
    waits = [predicted_wait_s(x, q, unknown) for x, q in zip(loads, queued, strict=True)]
    by_id = sorted(range(len(loads)), key=lambda i: loads[i].replica)
    turns = {i: (k - turn) % len(loads) for k, i in enumerate(by_id)}
    open_ = [i for i in range(len(loads)) if loads[i].replica not in avoid]
    best = min((waits[i] for i in open_), default=math.inf)
    tied = {i for i in open_ if waits[i] <= best * TIE_RELATIVE + TIE_ABSOLUTE_S}
    return sorted(
        range(len(loads)),
        key=lambda i: (i not in tied, i not in open_, 0.0 if i in tied else waits[i], turns[i]),
    )


def retry_after(values: Sequence[str | None]) -> str:
    """The Retry-After of a refusal by every replica: the soonest any of them asked for."""
    seconds = []
    for value in values:
        try:
            seconds.append(max(0, math.ceil(float(value or ""))))
        except ValueError:
            continue
    return str(min(seconds)) if seconds else "1"


def has_token(chunk: bytes) -> bool:
    """Whether an SSE body chunk carries generated text (or an error) for the client.

    Until one does, a replica failure can be retried elsewhere: the client has seen no token.
    """
    for line in chunk.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return True
        try:
            event = json.loads(data)
        except ValueError:
            return True  # not ours to judge: pass it on
        if not isinstance(event, dict) or "error" in event:
            return True
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("text") or delta.get("content") or choice.get("finish_reason"):
                return True
    return False
