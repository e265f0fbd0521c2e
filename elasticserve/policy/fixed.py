"""The `fixed` policy: the pinned shape, else one fixed shape; never changes, never refuses."""

from __future__ import annotations

from collections.abc import Sequence

from ..model.shapes import ShapeSpec
from .base import Policy
from .step_time import StepTimeModel
from .types import Decision, LoadState, Refuse, RequestView


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
