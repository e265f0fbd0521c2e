"""The coming steps of a load state by the scheduler's rules, and their predicted times per cap."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..model.shapes import ShapeSpec
from .grid import Grid
from .step_time import StepLoad, StepTimeModel, attn_pairs
from .types import LoadState, RequestView


@dataclass(frozen=True)
class Forecast:
    """Predicted step times under one cap."""

    prefill_step_s: float  # the next step: decodes plus as many prefill tokens as fit
    decode_step_s: float  # a step once the admitted requests decode too
    tpot_s: float  # mean step time over the running requests' remaining tokens


@dataclass(frozen=True)
class _Rows:
    """A step's rows, tokens and attention work (cap-independent) and the kinds of its rows."""

    rows: int
    tokens: int
    attn: float
    kinds: tuple[RequestView, ...]  # one request per distinct fit under a cap


class Outlook:
    """The coming steps of a load state, by the scheduler's rules, computed once per state.

    Only a step's envelope depends on the cap, and it comes from a few kinds of request (pinned,
    floored, holding some layers), so trying every cap of the grid stays cheap.
    """

    def __init__(self, grid: Grid, model: StepTimeModel, state: LoadState, now: float) -> None:
        self.grid, self.model = grid, model
        decoding = [r for r in state.running if r.uncomputed <= 1 and r.output_tokens]
        prefilling = [r for r in state.running if not (r.uncomputed <= 1 and r.output_tokens)]
        self.admitted = state.waiting[: max(0, state.max_num_seqs - len(state.running))]
        per_step = max(1, state.max_num_batched_tokens - len(decoding))
        chunks: list[tuple[RequestView, int]] = []
        left, pending = per_step, 0
        for r in (*prefilling, *self.admitted):
            pending += r.uncomputed
            if left > 0:
                chunks.append((r, min(max(1, r.uncomputed), left)))
                left -= chunks[-1][1]
        rows = [(r, 1) for r in decoding] + chunks
        self.next_step = _rows(grid, [(r, n, r.computed_tokens) for r, n in rows])
        everyone = (*state.running, *self.admitted)
        self.decode_step = _rows(
            grid, [(r, 1, r.prompt_tokens + r.output_tokens) for r in everyone]
        )
        self.horizon = max(1.0, sum(r.remaining for r in everyone) / max(1, len(everyone)))
        self.heavy = min(self.horizon, math.ceil(pending / per_step))  # steps carrying prefill
        self.queue = _queue(state, now, per_step)
        # a decode step that also prefills one typical new prompt
        prompt = round(state.mean_prompt_tokens) if state.arrival_rate > 0 else 0
        self.rate = state.arrival_rate
        self.with_prompt = replace(
            self.decode_step,
            rows=self.decode_step.rows + 1,
            tokens=self.decode_step.tokens + prompt,
            attn=self.decode_step.attn + attn_pairs(prompt, 0),
        )

    def forecast(self, cap: ShapeSpec) -> Forecast:
        """Step times if every unpinned request moves under `cap` (new ones arrive at it).

        The prompts arriving while the running requests decode are prefilled in their steps: if
        each costs `e` seconds more than a decode step and they come at rate `r`, a share `r e`
        of the time goes to them and the decodes stretch by 1 / (1 - r e). `e` is corrected
        online like a step: a machine running slower than its profile (a shared VM's slow
        spells run 1.5-2x) is slower at prompts too, and near r e = 1 the stretch is steep.
        """
        if not self.next_step.rows:
            return Forecast(0.0, 0.0, 0.0)
        prefill, decode = self._predict(self.next_step, cap), self._predict(self.decode_step, cap)
        tpot = (self.heavy * prefill + (self.horizon - self.heavy) * decode) / self.horizon
        if self.with_prompt.tokens > self.decode_step.tokens:
            extra = self._predict(self.with_prompt, cap) - self._predict(self.decode_step, cap)
            busy = self.rate * max(0.0, extra)
            tpot = tpot / (1.0 - busy) if busy < 1.0 else math.inf
        return Forecast(prefill, decode, tpot)

    def fastest(self) -> tuple[ShapeSpec, Forecast]:
        """The cap with the shortest predicted TPOT here (the best quality of equals), and its
        forecast: the fewest bytes of some precision (`Grid.cheapest`), which one by the batch."""
        forecasts = [(self.forecast(cap), cap) for cap in self.grid.cheapest]
        f, cap = min(forecasts, key=lambda fc: (fc[0].tpot_s, self.grid.rank[fc[1].id]))
        return cap, f

    def ttft(self, wait: tuple[RequestView, float, int, int], f: Forecast) -> float:
        """Predicted TTFT (seconds since arrival) of one queue entry under a forecast."""
        _, elapsed, prefill_steps, slot_steps = wait
        return elapsed + prefill_steps * f.prefill_step_s + slot_steps * f.decode_step_s

    def _predict(self, rows: _Rows, cap: ShapeSpec) -> float:
        return self.model.predict(self._load(rows, cap))

    def _load(self, rows: _Rows, cap: ShapeSpec) -> StepLoad:
        shape = self.grid.envelope([cap.id, *(self.grid.fit(v, cap) for v in rows.kinds)])
        return StepLoad(shape.name, rows.rows, rows.tokens, rows.attn)


def _rows(grid: Grid, rows: Sequence[tuple[RequestView, int, int]]) -> _Rows:
    """Rows of (request, new tokens, cached tokens)."""
    kinds = {grid.kind(r): r for r, _, _ in rows}
    return _Rows(
        rows=len(rows),
        tokens=sum(n for _, n, _ in rows),
        attn=sum(attn_pairs(n, start) for _, n, start in rows),
        kinds=tuple(kinds.values()),
    )


def _queue(
    state: LoadState, now: float, per_step: int
) -> list[tuple[RequestView, float, int, int]]:
    """Per waiting request (FCFS): time waited, prefill steps and slot-wait steps until served."""
    out = []
    ahead = sum(r.uncomputed for r in state.running if not r.output_tokens)
    free = max(0, state.max_num_seqs - len(state.running))
    running = max(1, len(state.running))
    # a full batch frees a slot every lifetime / batch steps (lifetime: decode steps per request)
    lifetime = sum(r.max_tokens for r in state.running) / running
    if state.mean_output_tokens > 0:
        lifetime = min(lifetime, state.mean_output_tokens)  # most stop before max_tokens
    for k, r in enumerate(state.waiting):
        ahead += r.uncomputed
        slots = math.ceil((k - free + 1) * lifetime / running) if k >= free else 0
        out.append((r, now - r.arrival_time, math.ceil(ahead / per_step), slots))
    return out
