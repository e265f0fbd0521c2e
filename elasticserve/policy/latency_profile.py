"""The latency profile: measured step times of every shape on this machine, and where they live.

`profile()` drives a real engine (so it times exactly what serving runs: build the step, forward,
sample) through prefill steps, decode steps at batch sizes 1..N and mixed prefill + decode steps,
for every shape of the grid, and fits the step-time model (stepmodel.py) on them. Held-out
measurements (a batch size and context not fitted, and batches mixing two shapes) report how well
the model predicts. A profile is keyed by device (CPU model and threads, or GPU name) and dtype,
and stored beside the pack (`<pack>/latency-<device>-<dtype>.json`) or in the user cache.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs
import torch
from tqdm.auto import tqdm

from ..engine import kv_cache
from ..engine.llm_engine import EngineConfig, LLMEngine
from ..engine.sampling import SamplingParams
from ..model.bundle import ModelBundle, default_pack_path
from ..model.device import cpu_model
from ..model.shapes import ShapeSpec
from .policies import SLO, Policy, PolicyConfig, make_policy
from .step_time import Sample, StepTimeModel, error_summary

FORMAT_VERSION = 1


@dataclass
class LatencyProfile:
    """Step-time measurements of one model + pack on one device and dtype."""

    device: str
    dtype: str
    fingerprint: str  # the model's
    grid: str  # grid_key() of the pack's shapes
    samples: list[Sample]  # what the model is fitted on
    holdout: list[Sample]  # what it is checked against
    meta: dict[str, Any] = field(default_factory=dict)

    def model(self, alpha: float = 0.1) -> StepTimeModel:
        """The step-time model fitted on the samples."""
        return StepTimeModel.fit(self.samples, alpha)

    def errors(self) -> dict[str, dict[str, float]]:
        """Relative error of the fitted model on the held-out steps, uniform and mixed shapes."""
        model = self.model()
        return {
            kind: error_summary(model.relative_errors(s for s in self.holdout if s.kind == kind))
            for kind in ("uniform", "mixed")
        }

    def matches(self, bundle: ModelBundle) -> bool:
        """Measured for this model, pack grid, device and dtype."""
        return (
            self.fingerprint == bundle.pack.fingerprint
            and self.grid == grid_key(bundle.specs)
            and self.device == device_name(bundle.model.device)
            and self.dtype == dtype_name(bundle.model.dtype)
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the profile as JSON (atomically); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format_version": FORMAT_VERSION,
            "device": self.device,
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
            "grid": self.grid,
            "model": self.model().to_dict(),
            "errors": self.errors(),
            "meta": self.meta,
            "samples": [s.to_dict() for s in self.samples],
            "holdout": [s.to_dict() for s in self.holdout],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyProfile:
        """Read a profile written by `save`."""
        data = json.loads(Path(path).read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"latency profile {path} has format version {data.get('format_version')}, "
                f"this elasticserve reads version {FORMAT_VERSION}"
            )
        return cls(
            device=data["device"],
            dtype=data["dtype"],
            fingerprint=data["fingerprint"],
            grid=data["grid"],
            samples=[Sample.from_dict(s) for s in data["samples"]],
            holdout=[Sample.from_dict(s) for s in data["holdout"]],
            meta=dict(data.get("meta", {})),
        )


# -- keys and locations ---------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """What the timings depend on: the GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def grid_key(specs: Sequence[ShapeSpec]) -> str:
    """A short hash of the shape grid (names, layers, per-layer widths): timings depend on it."""
    rows = [[s.name, list(s.layers), list(s.heads), list(s.mlp)] for s in specs]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def profile_filename(bundle: ModelBundle) -> str:
    """`latency-<device>-<dtype>.json`, the device slugged."""
    device = re.sub(r"[^a-z0-9]+", "-", device_name(bundle.model.device).lower()).strip("-")
    return f"latency-{device}-{dtype_name(bundle.model.dtype)}.json"


def profile_path(bundle: ModelBundle, pack_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `elasticserve profile` writes: beside a pack directory, else in the user cache.

    Never into the package's own packs/ (package data: a machine's timings must not ship).
    """
    if pack_dir is not None:
        return Path(pack_dir) / profile_filename(bundle)
    cache = Path(platformdirs.user_cache_dir("elasticserve")) / "latency"
    key = f"{bundle.pack.fingerprint}-{grid_key(bundle.specs)}"
    return cache / key / profile_filename(bundle)


def profile_locations(
    bundle: ModelBundle, pack_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Where a profile is searched: the pack dir, the built-in pack's, the user cache."""
    paths = [profile_path(bundle, pack_dir)] if pack_dir is not None else []
    if (default := default_pack_path(bundle.name)) is not None:
        paths.append(default / profile_filename(bundle))
    return [*paths, profile_path(bundle)]


def load_profile(
    bundle: ModelBundle, pack_dir: str | os.PathLike[str] | None = None
) -> LatencyProfile | None:
    """The stored profile for this model, grid, device and dtype, if one was measured."""
    for path in profile_locations(bundle, pack_dir):
        if path.is_file():
            found = LatencyProfile.load(path)
            if found.matches(bundle):
                return found
    return None


def policy_for(
    bundle: ModelBundle,
    name: str,
    slo: SLO | None = None,
    pack_dir: str | os.PathLike[str] | None = None,
    config: PolicyConfig | None = None,
) -> tuple[Policy, LatencyProfile | None]:
    """The named policy over the bundle's grid, predicting from its stored profile if any.

    Without a profile the elastic policies start from `StepTimeModel.prior` and rely on the
    online correction; the caller should warn and suggest `elasticserve profile`.
    """
    found = load_profile(bundle, pack_dir)
    model = found.model() if found else StepTimeModel.prior(bundle.specs)
    return make_policy(name, bundle.specs, model, slo, config), found


# -- measuring ------------------------------------------------------------------------------------


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
