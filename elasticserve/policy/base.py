"""The interface the engine calls: `admit` at add_request, `decide` once per step."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.shapes import ShapeSpec
from .grid import Grid
from .step_time import StepLoad, StepTimeModel
from .types import Decision, LoadState, Refuse, RequestView


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
