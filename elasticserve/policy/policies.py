"""Which shape serves each request: the `fixed`, `load` and `slo` policies.

Pure Python (no torch). The engine hands a `LoadState` snapshot to `decide()` once per step and
applies the returned `Decision`; `admit()` gives a new request its shape or a `Refuse`.

A step costs what its widest, deepest row costs (DESIGN.md), so the elastic policies pick one
*step shape*, a cap, and move the whole batch under it: waiting requests take any shape under the
cap (they hold no KV yet), running ones change width at once and may only drop layers. Pinned
requests keep their shape and a request's `min_shape` is a floor. Shrinking is immediate; growing
back waits until the better cap has been predicted to meet its target with slack for a while.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..model.shapes import ShapeSpec
from .step_time import StepLoad, StepTimeModel, attn_pairs, envelope

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


class LoadTracker:
    """Recent arrival rate and mean request size, fed by the engine."""

    def __init__(self, window_s: float = 3.0, smoothing: float = 0.1) -> None:
        self.window_s = window_s
        self.smoothing = smoothing
        self._arrivals: deque[float] = deque()
        self._burst_start = 0.0  # the first arrival after the window last ran empty
        self.mean_prompt_tokens = 0.0
        self.mean_output_tokens = 0.0
        self._outputs_seen = False

    def arrive(self, now: float, prompt_tokens: int, max_tokens: int) -> None:
        """Record an admitted request."""
        self.rate(now)  # forget what left the window
        if not self._arrivals:
            self._burst_start = now
        self._arrivals.append(now)
        first = len(self._arrivals) == 1 and self.mean_prompt_tokens == 0.0
        self.mean_prompt_tokens = self._mix(self.mean_prompt_tokens, prompt_tokens, first)
        if not self._outputs_seen:  # until a request finishes, max_tokens is the best guess
            self.mean_output_tokens = self._mix(self.mean_output_tokens, max_tokens, first)

    def finish(self, output_tokens: int) -> None:
        """Record a finished request's generated length."""
        first = not self._outputs_seen
        self._outputs_seen = True
        self.mean_output_tokens = self._mix(self.mean_output_tokens, output_tokens, first)

    def rate(self, now: float) -> float:
        """Arrivals per second over the last `window_s`, or since a burst after a quiet spell
        began if that is shorter (at least a second): the first seconds of a spike count as
        the spike's rate, not a third of it."""
        while self._arrivals and self._arrivals[0] <= now - self.window_s:
            self._arrivals.popleft()
        span = min(self.window_s, max(1.0, now - self._burst_start))
        return len(self._arrivals) / span

    def _mix(self, mean: float, value: float, first: bool) -> float:
        return float(value) if first else mean + self.smoothing * (value - mean)


class Grid:
    """The shape grid with a quality order and the per-request fit under a cap."""

    def __init__(self, specs: Sequence[ShapeSpec]) -> None:
        if not specs:
            raise ValueError("the shape grid is empty")
        self.specs = list(specs)
        # quality: the pack's held-out perplexity when every shape has one, else weight bytes
        if all(s.ppl is not None for s in specs):
            self.by_quality = sorted(specs, key=lambda s: (s.ppl or 0.0, -s.weight_fraction, s.id))
        else:
            self.by_quality = sorted(specs, key=lambda s: (-s.weight_fraction, s.id))
        self.rank = {s.id: i for i, s in enumerate(self.by_quality)}
        self.full = max(specs, key=lambda s: (s.shape.depth, s.shape.width))
        self.smallest = min(specs, key=lambda s: (s.weight_fraction, s.id))
        self._by_shape = {s.shape: s for s in specs}
        self._fits: dict[tuple[Any, ...], int] = {}

    def spec_of(self, shape_id: int) -> ShapeSpec:
        return self.specs[shape_id]

    def envelope(self, shape_ids: Sequence[int]) -> ShapeSpec:
        """The grid shape a step of these shapes costs like (the grid is depths x widths)."""
        shape = envelope(self.specs[i].shape for i in shape_ids)
        return self._by_shape.get(shape) or self.full

    def kind(self, view: RequestView) -> tuple[Any, ...]:
        """Requests of one kind fit the same shape under any cap."""
        if view.pinned:
            return ("pinned", view.shape_id)
        return (view.min_shape_id, view.layers if view.has_kv else None)

    def fit(self, view: RequestView, cap: ShapeSpec) -> int:
        """The best-quality shape for `view` under `cap`, honouring pin, min_shape and KV depth."""
        if view.pinned:
            return view.shape_id
        key = (cap.id, *self.kind(view))
        if key not in self._fits:
            self._fits[key] = self._fit(view, cap)
        return self._fits[key]

    def _fit(self, view: RequestView, cap: ShapeSpec) -> int:
        floor = self.specs[view.min_shape_id].shape if view.min_shape_id is not None else None
        depth, width = cap.shape.depth, cap.shape.width
        if floor is not None:  # a floor above the cap lifts the cap for this request only
            depth, width = max(depth, floor.depth), max(width, floor.width)
        held = set(view.layers) if view.has_kv else None

        def allowed(s: ShapeSpec) -> bool:
            if floor is not None and (s.shape.depth < floor.depth or s.shape.width < floor.width):
                return False
            return s.shape.width <= width and (held is None or set(s.layers) <= held)

        under = (s for s in self.by_quality if allowed(s) and s.shape.depth <= depth)
        # no depth under the cap keeps a subset of the held layers: keep them, follow the width
        same = (s for s in self.by_quality if allowed(s) and s.layers == view.layers)
        return next(under, next(same, self.specs[view.shape_id])).id


class Policy:
    """The interface the engine calls: `admit` at add_request, `decide` once per step."""

    name = "policy"

    def __init__(self, specs: Sequence[ShapeSpec], model: StepTimeModel | None = None) -> None:
        self.grid = Grid(specs)
        self.model = model
        if model is not None and (missing := model.covers(specs)):
            raise ValueError(
                f"the step-time model has no coefficients for shapes {missing[:5]}: "
                "profile this pack on this machine (elasticserve profile)"
            )

    def admit(self, request: RequestView, state: LoadState, now: float) -> int | Refuse:
        """The shape a new request starts at, or a refusal."""
        raise NotImplementedError

    def decide(self, state: LoadState, now: float) -> Decision:
        """The step shape and the in-flight shape changes before the next step."""
        raise NotImplementedError

    def observe(self, load: StepLoad, seconds: float) -> None:
        """Feed an observed step time to the step-time model's online correction."""
        if self.model is not None:
            self.model.observe(load, seconds)

    def moves(self, state: LoadState, cap: ShapeSpec) -> dict[str, int]:
        """Shape changes that bring every unpinned request under `cap`."""
        changes = {}
        for view in (*state.running, *state.waiting):
            target = self.grid.fit(view, cap)
            if target != view.shape_id:
                changes[view.request_id] = target
        return changes


class FixedPolicy(Policy):
    """The pinned shape, else one fixed shape (the full one); never changes, never refuses."""

    name = "fixed"

    def __init__(
        self,
        specs: Sequence[ShapeSpec],
        shape_id: int | None = None,
        model: StepTimeModel | None = None,
    ) -> None:
        super().__init__(specs, model)  # the model only tracks predicted vs observed here
        self.shape = self.grid.full if shape_id is None else self.grid.spec_of(shape_id)

    def admit(self, request: RequestView, state: LoadState, now: float) -> int | Refuse:
        return self.grid.fit(request, self.shape)

    def decide(self, state: LoadState, now: float) -> Decision:
        return Decision(self.shape.id)


class ElasticPolicy(Policy):
    """A cap chosen by a pressure (<= 1: the cap meets its target), with hysteresis."""

    def __init__(
        self,
        specs: Sequence[ShapeSpec],
        model: StepTimeModel,
        config: PolicyConfig | None = None,
    ) -> None:
        super().__init__(specs, model)
        self.step_model = model
        self.config = config or PolicyConfig()
        self.cap = self.grid.by_quality[0]
        self._grow_since: float | None = None
        self._grow_steps = 0
        self._refused_at: float | None = None  # the last admission refused for load

    @property
    def keep_margin(self) -> float:
        """The slack under which the current cap must stay predicted to be kept."""
        return 0.0

    def pressures(self, state: LoadState, now: float) -> Callable[[ShapeSpec], float]:
        """The predicted load on the target under a cap (<= 1 meets it), for this state."""
        raise NotImplementedError

    def admit(self, request: RequestView, state: LoadState, now: float) -> int | Refuse:
        if not (state.running or state.waiting):  # the engine does not step while idle
            self.cap = self._choose(state, now)
        return self.grid.fit(request, self.cap)

    def decide(self, state: LoadState, now: float) -> Decision:
        self.cap = self._choose(state, now)
        return Decision(self.cap.id, self.moves(state, self.cap))

    def _choose(self, state: LoadState, now: float) -> ShapeSpec:
        refusing = (
            self._refused_at is not None and now - self._refused_at < self.config.grow_after_s
        )
        if refusing and (state.running or state.waiting):
            # even the smallest shape was predicted too slow for this queue: anything wider
            # (say, once the queued requests are all past saving) lengthens what caused it
            self._hold_reset()
            return self.grid.smallest
        rank, pressure = self.grid.rank, self.pressures(state, now)
        seen: dict[int, float] = {}

        def meets(cap: ShapeSpec, margin: float) -> bool:
            if cap.id not in seen:
                seen[cap.id] = pressure(cap)
            return seen[cap.id] <= 1.0 - margin

        keep = self.keep_margin
        best = next((s for s in self.grid.by_quality if meets(s, keep)), None)
        if best is None:  # nothing meets: the best quality among the least loaded caps
            self._hold_reset()
            least = min(seen.values())
            return next(s for s in self.grid.by_quality if seen[s.id] <= least * 1.001)
        if not meets(self.cap, keep) or not (state.running or state.waiting):
            self._hold_reset()  # shrink at once; and nothing flaps while nothing runs
            return best
        margin = self.config.grow_margin
        target = next((s for s in self.grid.by_quality if meets(s, margin)), None)
        if target is None or rank[target.id] >= rank[self.cap.id]:
            self._hold_reset()
            return self.cap
        if self._grow_since is None:
            self._grow_since = now
        self._grow_steps += 1
        held = now - self._grow_since >= self.config.grow_after_s
        if held and self._grow_steps >= self.config.grow_after_steps:
            self._hold_reset()
            return target
        return self.cap

    def _hold_reset(self) -> None:
        self._grow_since, self._grow_steps = None, 0


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


class SloPolicy(ElasticPolicy):
    """The best-quality step shape whose predicted TTFT and TPOT meet the requests' SLOs."""

    name = "slo"

    def __init__(
        self,
        specs: Sequence[ShapeSpec],
        model: StepTimeModel,
        slo: SLO,
        config: PolicyConfig | None = None,
    ) -> None:
        super().__init__(specs, model, config)
        self.slo = slo

    @property
    def keep_margin(self) -> float:
        return self.config.shrink_margin

    def pressures(self, state: LoadState, now: float) -> Callable[[ShapeSpec], float]:
        outlook = Outlook(self.grid, self.step_model, state, now)
        tpots = [self._targets(r)[1] for r in (*state.running, *outlook.admitted)]
        tightest = min((t for t in tpots if t is not None), default=None)
        waits = []  # (waited, prefill steps, slot steps, TTFT target), all in seconds
        for r, waited, prefill_steps, slot_steps in outlook.queue:
            ttft = self._targets(r)[0]
            # a request already past its TTFT cannot be saved: it must not pin the cap down
            if ttft is not None and waited <= ttft / 1000:
                waits.append((waited, prefill_steps, slot_steps, ttft / 1000))

        def pressure(cap: ShapeSpec) -> float:
            f = outlook.forecast(cap)
            p, d = f.prefill_step_s, f.decode_step_s
            worst = f.tpot_s * 1000 / tightest if tightest is not None else 0.0
            return max(worst, max(((w + n * p + k * d) / t for w, n, k, t in waits), default=0.0))

        return pressure

    def admit(self, request: RequestView, state: LoadState, now: float) -> int | Refuse:
        with_it = replace(state, waiting=(*state.waiting, request))
        outlook = Outlook(self.grid, self.step_model, with_it, now)
        f = outlook.forecast(self.grid.smallest)
        ttft_s = outlook.ttft(outlook.queue[-1], f)
        slo = request.slo.over(self.slo)
        late_ttft = slo.ttft_ms is not None and ttft_s * 1000 > slo.ttft_ms
        late_tpot = slo.tpot_ms is not None and f.tpot_s * 1000 > slo.tpot_ms
        if late_ttft or late_tpot:
            refusal = self._refusal(request, state, now, slo, ttft_s if late_ttft else None, f)
            if refusal.under_load:  # not one whose SLO no shape could meet
                self._refused_at = now
            return refusal
        return super().admit(request, state, now)

    def _targets(self, r: RequestView) -> tuple[float | None, float | None]:
        """The request's (TTFT, TPOT) targets in ms, the server's default where it has none."""
        ttft = r.slo.ttft_ms if r.slo.ttft_ms is not None else self.slo.ttft_ms
        return ttft, r.slo.tpot_ms if r.slo.tpot_ms is not None else self.slo.tpot_ms

    def _refusal(
        self,
        request: RequestView,
        state: LoadState,
        now: float,
        slo: SLO,
        late_ttft_s: float | None,
        f: Forecast,
    ) -> Refuse:
        """A refusal whose Retry-After is when the smallest shape should meet the SLO again."""
        idle = LoadState(
            waiting=(request,),
            max_num_seqs=state.max_num_seqs,
            max_num_batched_tokens=state.max_num_batched_tokens,
        )
        alone = Outlook(self.grid, self.step_model, idle, now)
        alone_f = alone.forecast(self.grid.smallest)
        hopeless = (
            slo.ttft_ms is not None and alone.ttft(alone.queue[0], alone_f) * 1000 > slo.ttft_ms
        ) or (slo.tpot_ms is not None and alone_f.tpot_s * 1000 > slo.tpot_ms)
        if late_ttft_s is not None:
            wait = late_ttft_s - (slo.ttft_ms or 0.0) / 1000  # the queue must drain this much
            what = f"TTFT {late_ttft_s * 1000:.0f} ms > {slo.ttft_ms:g} ms"
        else:
            wait = sum(r.remaining for r in state.running) / max(1, len(state.running))
            wait *= f.decode_step_s  # until the running batch has thinned out
            what = f"TPOT {f.tpot_s * 1000:.0f} ms > {slo.tpot_ms:g} ms"
        where = "even on an idle server" if hopeless else "under the current load"
        return Refuse(
            retry_after_s=float(max(1, math.ceil(wait))),
            reason=f"even the smallest shape {self.grid.smallest.name} is predicted to miss "
            f"the SLO {where} ({what})",
            under_load=not hopeless,
        )


class LoadPolicy(ElasticPolicy):
    """The best-quality step shape whose predicted throughput keeps up with the arrival rate."""

    name = "load"

    def pressures(self, state: LoadState, now: float) -> Callable[[ShapeSpec], float]:
        grid, cfg, model = self.grid, self.config, self.step_model
        kinds = list({grid.kind(r): r for r in (*state.running, *state.waiting)}.values())
        prompt, output = _mean_sizes(state)
        batch = state.max_num_seqs  # capacity: what the engine sustains at its largest batch
        decode = StepLoad("", batch, batch, batch * (prompt + output / 2) / 1000)
        chunk = max(1, min(round(prompt), state.max_num_batched_tokens))
        prefill = StepLoad("", 1, chunk, attn_pairs(chunk, 0))
        queued_prompt = sum(r.uncomputed for r in state.waiting)
        queued_output = sum(r.remaining for r in state.waiting)
        kv = _KvUse(grid, state)

        def pressure(cap: ShapeSpec) -> float:
            shape = grid.envelope([cap.id, *(grid.fit(r, cap) for r in kinds)]).name
            decode_s = model.predict(replace(decode, shape=shape)) / batch
            prefill_s = model.predict(replace(prefill, shape=shape)) / chunk
            per_request = output * decode_s + prompt * prefill_s
            backlog = queued_prompt * prefill_s + queued_output * decode_s
            utilisation = state.arrival_rate * per_request + backlog / cfg.drain_s
            return max(utilisation / cfg.load_target, kv.after(cap) / cfg.kv_high)

        return pressure


class _KvUse:
    """KV cache use after moving the running batch under a cap (dropped layers free blocks)."""

    def __init__(self, grid: Grid, state: LoadState) -> None:
        self.grid, self.usage = grid, state.kv_usage
        self.held: dict[Any, tuple[RequestView, int]] = {}  # kind -> (request, cached tokens)
        for r in state.running:
            view, tokens = self.held.get(grid.kind(r), (r, 0))
            self.held[grid.kind(r)] = (view, tokens + r.computed_tokens)
        self.now = sum(tokens * len(v.layers) for v, tokens in self.held.values())

    def after(self, cap: ShapeSpec) -> float:
        if not self.now:
            return 0.0
        specs = self.grid.specs
        kept = sum(
            tokens * len(specs[self.grid.fit(v, cap)].layers) for v, tokens in self.held.values()
        )
        return self.usage * kept / self.now


def _mean_sizes(state: LoadState) -> tuple[float, float]:
    """Mean prompt and output tokens of recent requests, else of the ones in the engine."""
    if state.mean_prompt_tokens > 0:
        return state.mean_prompt_tokens, max(1.0, state.mean_output_tokens)
    views = (*state.running, *state.waiting)
    if not views:
        return 1.0, 1.0
    return (
        sum(r.prompt_tokens for r in views) / len(views),
        max(1.0, sum(r.max_tokens for r in views) / len(views)),
    )


def make_policy(
    name: str,
    specs: Sequence[ShapeSpec],
    model: StepTimeModel | None = None,
    slo: SLO | None = None,
    config: PolicyConfig | None = None,
) -> Policy:
    """Build `fixed`, `load` or `slo` over the grid; the elastic ones need a step-time model."""
    if name == "fixed":
        return FixedPolicy(specs, model=model)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use {', '.join(POLICIES)}")
    model = model or StepTimeModel.prior(specs)
    if name == "load":
        return LoadPolicy(specs, model, config)
    return SloPolicy(specs, model, slo or SLO(), config)
