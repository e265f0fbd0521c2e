"""The `load` policy: the best-quality step shape whose throughput keeps up with the arrivals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ..model.shapes import ShapeSpec
from .elastic import ElasticPolicy
from .grid import Grid
from .step_time import StepLoad, attn_pairs
from .types import LoadState, RequestView


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
