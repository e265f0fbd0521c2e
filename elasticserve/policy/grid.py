"""The shape grid as a policy sees it: quality order, envelopes, the best fit under a cap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..model.shapes import ShapeSpec
from .step_time import envelope
from .types import RequestView


class Grid:
    """The shape grid with a quality order and the per-request fit under a cap."""

    def __init__(self, specs: Sequence[ShapeSpec]) -> None:
        if not specs:
            raise ValueError("the shape grid is empty")
        self.specs = list(specs)
        # quality: the pack's held-out perplexity when every shape has one, else weight bytes
        if all(s.ppl is not None for s in specs):
            quality = self._quality(self.specs)
            self.by_quality = sorted(specs, key=lambda s: (quality[s.id], -s.weight_fraction, s.id))
        else:
            self.by_quality = sorted(specs, key=lambda s: (-s.weight_fraction, s.id))
        self.rank = {s.id: i for i, s in enumerate(self.by_quality)}
        self.full = max(specs, key=lambda s: (s.shape.depth, s.shape.width, s.shape.bits))
        self.smallest = min(specs, key=lambda s: (s.weight_fraction, s.id))
        # the fastest step is one of these, which one depends on the batch: at one row the
        # fewest bytes win, in a large batch a q4 row can cost more than a bf16 one (AMX Xeon)
        least: dict[str, ShapeSpec] = {}
        for s in sorted(specs, key=lambda s: (s.weight_fraction, s.id)):
            least.setdefault(s.shape.precision, s)
        self.cheapest = list(least.values())
        self._by_shape = {s.shape: s for s in specs}
        self._fits: dict[tuple[Any, ...], int] = {}

    @staticmethod
    def _quality(specs: Sequence[ShapeSpec]) -> dict[int, float]:
        """Perplexity by shape id, a quantized shape's never below its dense sibling's (same
        depth and width): a q4 copy of the GGUF's own weights measures within noise of the bf16
        one, sometimes 0.1 % lower, and ranked above it the policy would move requests to q4
        under a dense cap, though q4 costs more per row than bf16 in a batch on some CPUs (AMX
        Xeon: BENCHMARKS.md, "Policies under a rate sweep"), and a step of two precisions runs
        both. Tied, the dense shape ranks first (more weight bytes); a quantized cap is still
        chosen where the dense one misses the target."""
        dense = {(s.shape.depth, s.shape.width): s.ppl for s in specs if not s.shape.precision}
        out = {}
        for s in specs:
            sibling = dense.get((s.shape.depth, s.shape.width)) if s.shape.precision else None
            out[s.id] = max(s.ppl or 0.0, sibling or 0.0)
        return out

    def spec_of(self, shape_id: int) -> ShapeSpec:
        return self.specs[shape_id]

    def envelope(self, shape_ids: Sequence[int]) -> ShapeSpec:
        """The grid shape a step of these shapes costs like (the grid is depths x widths x
        precisions)."""
        shape = envelope(self.specs[i].shape for i in shape_ids)
        return self._by_shape.get(shape) or self.full

    def kind(self, view: RequestView) -> tuple[Any, ...]:
        """Requests of one kind fit the same shape under any cap."""
        if view.pinned:
            return ("pinned", view.shape_id)
        return (view.min_shape_id, view.layers if view.has_kv else None)

    def fit(self, view: RequestView, cap: ShapeSpec) -> int:
        """The best-quality shape for `view` under `cap` (no deeper, wider or more bytes per
        weight), honouring pin, min_shape and KV depth."""
        if view.pinned:
            return view.shape_id
        key = (cap.id, *self.kind(view))
        if key not in self._fits:
            self._fits[key] = self._fit(view, cap)
        return self._fits[key]

    def _fit(self, view: RequestView, cap: ShapeSpec) -> int:
        floor = self.specs[view.min_shape_id].shape if view.min_shape_id is not None else None
        depth, width, bits = cap.shape.depth, cap.shape.width, cap.shape.bits
        if floor is not None:  # a floor above the cap lifts the cap for this request only
            depth, width = max(depth, floor.depth), max(width, floor.width)
            bits = max(bits, floor.bits)
        held = set(view.layers) if view.has_kv else None

        def allowed(s: ShapeSpec) -> bool:
            if floor is not None and (
                s.shape.depth < floor.depth
                or s.shape.width < floor.width
                or s.shape.bits < floor.bits
            ):
                return False
            fits = s.shape.width <= width and s.shape.bits <= bits
            return fits and (held is None or set(s.layers) <= held)

        under = (s for s in self.by_quality if allowed(s) and s.shape.depth <= depth)
        # no depth under the cap keeps a subset of the held layers: keep them, follow the width
        same = (s for s in self.by_quality if allowed(s) and s.layers == view.layers)
        return next(under, next(same, self.specs[view.shape_id])).id
