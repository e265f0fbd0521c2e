"""What `load` and `slo` share: a step-shape cap chosen by a pressure, with hysteresis."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..model.shapes import ShapeSpec
from .base import Policy
from .step_time import StepTimeModel
from .types import Decision, LoadState, PolicyConfig, Refuse, RequestView


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
        rank, pressure = self.grid.rank, self.pressures(state, now)
        if refusing and (state.running or state.waiting):
            # even the fastest shape was predicted too slow for this queue: anything slower
            # (say, once the queued requests are all past saving) lengthens what caused it
            self._hold_reset()
            return min(self.grid.cheapest, key=lambda s: (pressure(s), rank[s.id]))
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
