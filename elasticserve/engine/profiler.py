"""The profiler: measured step times of every shape on this machine, from a real engine.

`profile()` drives an engine (so it times exactly what serving runs: build the step, forward,
sample) through prefill steps, decode steps at batch sizes 1..N and mixed prefill + decode steps,
for every shape of the grid; the policy's step-time model is fitted on them. Held-out
measurements (a batch size and context not fitted, and batches mixing two shapes) report how well
the model predicts. It lives with the engine because it runs one; what it makes, a
`LatencyProfile`, is the policy's (policy/latency_profile.py).
"""

from __future__ import annotations

import datetime
import itertools
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..model.bundle import ModelBundle
from ..model.shapes import ShapeSpec
from ..policy.latency_profile import LatencyProfile, device_name, dtype_name, grid_key
from ..policy.step_time import Sample
from . import kv_cache
from .llm_engine import EngineConfig, LLMEngine
from .sampling import SamplingParams


def profile(
    bundle: ModelBundle,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    context: tuple[int, int] = (16, 96),
    decode_steps: int = 3,
    repeats: int = 3,
    holdout: bool = True,
    progress: bool = True,
    timer: Callable[[], float] = time.perf_counter,
) -> LatencyProfile:
    """Time prefill, decode and mixed steps of every shape at these batch sizes; fit and check.

    `context` is the (short, long) prompt length: every batch size runs the short one, a batch of
    up to 2 the long one (to separate attention from per-row cost). Each step keeps the fastest
    of `repeats` runs: other processes only ever add time, and the online correction scales the
    uncontended profile to the machine's load while serving. `timer` measures each step (wall
    time; a single-threaded test may pass `time.thread_time`, which other processes cannot
    inflate).
    """
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1 or min(decode_steps, repeats, *context) < 1:
        raise ValueError(
            f"need batch sizes, decode_steps, repeats and contexts >= 1: {batch_sizes}, "
            f"{decode_steps}, {repeats}, {context}"
        )
    engine = _profile_engine(bundle, sizes[-1], context, decode_steps)
    runner = _Runner(engine, context, decode_steps, repeats, timer)
    checked = _holdout_shapes(bundle.specs) if holdout else []
    started = time.perf_counter()
    runner.batch([bundle.full] * sizes[-1], context[0])  # warm-up: allocator, thread pool
    samples: list[Sample] = []
    held: list[Sample] = []
    bar = tqdm(bundle.specs, desc="profile", unit="shape", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        samples += runner.shape(spec, sizes)
        if spec in checked:
            held += runner.holdout(spec, bundle.full, sizes)
    return LatencyProfile(
        device=device_name(bundle.model.device),
        dtype=dtype_name(bundle.model.dtype),
        fingerprint=bundle.pack.fingerprint,
        grid=grid_key(bundle.specs),
        samples=samples,
        holdout=held,
        meta={
            "model": bundle.name,
            "batch_sizes": sizes,
            "context": list(context),
            "decode_steps": decode_steps,
            "repeats": repeats,
            "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
    )


def _profile_engine(
    bundle: ModelBundle, max_batch: int, context: tuple[int, int], decode_steps: int
) -> LLMEngine:
    """An engine whose token budget fits each measured step and whose KV pool is just enough."""
    cfg, model = bundle.config, bundle.model
    block = 16
    longest = max(context) + decode_steps + 2
    per_token = kv_cache.block_bytes(cfg, 1, model.cache_dtype) * cfg.num_layers
    tokens = max(bundle.max_model_len, (max_batch + 2) * (longest + 2 * block))
    budget = max(512, (max_batch + 1) * max(context))
    config = EngineConfig(
        block_size=block,
        kv_cache_memory=per_token * tokens,
        max_num_seqs=max_batch + 2,
        max_num_batched_tokens=budget,
    )
    return LLMEngine(bundle, config)


def _holdout_shapes(specs: Sequence[ShapeSpec]) -> list[ShapeSpec]:
    """About six shapes spread over the grid, the full and the smallest included."""
    stride = max(1, len(specs) // 5)
    return sorted({*specs[::stride], specs[-1]}, key=lambda s: s.id)


class _Runner:
    """Runs batches of synthetic requests through the engine and records each step."""

    def __init__(
        self,
        engine: LLMEngine,
        context: tuple[int, int],
        decode_steps: int,
        repeats: int,
        timer: Callable[[], float],
    ) -> None:
        self.engine = engine
        self.context = context
        self.decode_steps = decode_steps
        self.repeats = repeats
        self.timer = timer
        self._vocab = min(engine.bundle.config.vocab_size, 32000)
        self._seed = 0

    def shape(self, spec: ShapeSpec, sizes: Sequence[int]) -> list[Sample]:
        """Fitting samples of one shape: each batch size, a long context, a prefill joining."""
        short, long = self.context
        steps: list[Sample] = []
        for size in sizes[:-1]:
            steps += self.fastest([spec] * size, short)
        steps += self.fastest([spec] * sizes[-1], short, join=spec)
        steps += self.fastest([spec] * min(2, sizes[-1]), long)
        return steps

    def holdout(self, spec: ShapeSpec, full: ShapeSpec, sizes: Sequence[int]) -> list[Sample]:
        """Steps the model was not fitted on: an unmeasured batch size and context, mixed shapes."""
        size = _unmeasured_size(sizes)
        uniform = self.fastest([spec] * size, sum(self.context) // 2)
        mixed = self.fastest([spec, full] * max(1, size // 2), self.context[0])
        return [*_relabel(uniform, "uniform"), *(_relabel(mixed, "mixed") if spec != full else [])]

    def fastest(
        self, specs: Sequence[ShapeSpec], ctx: int, join: ShapeSpec | None = None
    ) -> list[Sample]:
        """`batch` run `repeats` times; each step keeps its fastest run (the loads are equal)."""
        runs = [self.batch(specs, ctx, join) for _ in range(self.repeats)]
        return [min(same, key=lambda s: s.seconds) for same in zip(*runs, strict=True)]

    def batch(
        self, specs: Sequence[ShapeSpec], ctx: int, join: ShapeSpec | None = None
    ) -> list[Sample]:
        """Prefill `specs` together on `ctx`-token prompts, then decode; `join` adds one late."""
        engine = self.engine
        params = SamplingParams(temperature=0, max_tokens=self.decode_steps + 1, ignore_eos=True)
        for spec in specs:
            engine.add_request(self._prompt(ctx), params, spec)
        out: list[Sample] = []
        while engine.has_unfinished_requests():
            start = self.timer()
            engine.step()
            seconds = self.timer() - start
            if join is not None and len(out) == 0:
                engine.add_request(self._prompt(ctx), params, join)
            assert engine.last_step is not None
            load = engine.last_step[0]
            out.append(Sample(load, seconds, "decode" if load.tokens == load.rows else "prefill"))
        return out

    def _prompt(self, n: int) -> list[int]:
        self._seed += 1
        return [(self._seed * 7919 + i * 104729) % (self._vocab - 1) + 1 for i in range(n)]


def _relabel(samples: Sequence[Sample], kind: str) -> list[Sample]:
    return [Sample(s.load, s.seconds, kind) for s in samples]


def _unmeasured_size(sizes: Sequence[int]) -> int:
    """A batch size between two measured ones (3 for 1, 2, 4), else one past the largest."""
    for a, b in itertools.pairwise(sizes):
        if b - a > 1:
            return (a + b) // 2
    return sizes[-1] + 1
