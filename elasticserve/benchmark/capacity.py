"""Sustained SLO capacity: steady-state windows of Poisson arrivals and the search over rates.

A rate is sustained when, of the requests that *arrived* inside a window several times a
request's latency, at least `attainment` % met the SLO. The first requests (warm-up: an empty
server is kinder than a loaded one) are not measured, and arrivals go on past the window's end
(the tail) so its last requests still see the load; they are cancelled once every measured
request is done. Goodput is the measured requests that met the SLO over the window's length:
over arrivals, so a server that drains a backlog after the window earns nothing for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .datasets import with_unique_prefixes
from .serve import (
    BenchConfig,
    RequestResult,
    arrival_offsets,
    client_for,
    meets_slo,
    output_lengths,
    send_request,
    shape_mix,
)


@dataclass(frozen=True)
class Window:
    """Where a sustained run measures, in seconds of arrival time: warm-up, window, tail."""

    warmup_s: float
    window_s: float
    tail_s: float

    @property
    def span_s(self) -> float:
        return self.warmup_s + self.window_s + self.tail_s

    def measures(self, sent: float) -> bool:
        """Whether a request sent at `sent` (s from the start) is one the window measures."""
        return self.warmup_s <= sent < self.warmup_s + self.window_s


def slo_latency_s(slo_ttft_ms: float, slo_tpot_ms: float, output_len: int) -> float:
    """The longest a request that meets the SLO can take: TTFT + TPOT × (tokens − 1)."""
    return (slo_ttft_ms + slo_tpot_ms * (output_len - 1)) / 1000.0


def window_for(latency_s: float, rate: float, windows: float, min_requests: int) -> Window:
    """`windows` × `latency_s` of measured arrivals (at least `min_requests` of them at `rate`),
    one latency of warm-up before it and one of tail after it."""
    if latency_s <= 0 or rate <= 0 or windows <= 0:
        raise ValueError(f"latency ({latency_s}), rate ({rate}), windows ({windows}) must be > 0")
    return Window(latency_s, max(windows * latency_s, min_requests / rate), latency_s)


def steady_state(
    cfg: BenchConfig, results: list[RequestResult], window: Window, rate: float
) -> dict[str, Any]:
    """What the window measured: arrivals, how many met the SLO, attainment, goodput, lengths,
    served shapes."""
    measured = [r for r in results if window.measures(r.sent)]
    met = sum(meets_slo(r, cfg.slo_ttft_ms, cfg.slo_tpot_ms) for r in measured)
    n = len(measured)
    tpots = sorted(t for r in measured if r.ok and (t := r.tpot) is not None)
    ttfts = sorted(r.ttft for r in measured if r.ok and r.ttft is not None)
    return {
        "request_rate": rate,
        "window_s": round(window.window_s, 3),
        "warmup_s": round(window.warmup_s, 3),
        "measured": n,
        "met_slo": met,
        "failed": sum(not r.ok for r in measured),
        "slo_attainment_pct": round(100.0 * met / n, 2) if n else 0.0,
        "goodput": round(met / window.window_s, 4),
        "arrival_rate": round(n / window.window_s, 4),
        "ttft_p95_ms": _p95_ms(ttfts),
        "tpot_p95_ms": _p95_ms(tpots),
        **output_lengths(measured, cfg.output_len),
        "shape_mix": shape_mix(measured),  # the served shapes, by share of streamed tokens
    }


def _p95_ms(sorted_s: list[float]) -> float | None:
    # The order statistic the 95 % verdict turns on: the ceil(0.95 n)-th smallest.
    if not sorted_s:
        return None
    return round(1000.0 * sorted_s[math.ceil(0.95 * len(sorted_s)) - 1], 3)


def schedule(
    rate: float, window: Window, seed: int, min_requests: int = 0
) -> tuple[np.ndarray, Window]:
    """Seeded Poisson send times over the window's span, and the window, stretched if needed
    until at least `min_requests` of those times fall inside it."""
    n = math.ceil(rate * window.span_s * 1.5) + 2 * min_requests + 20
    offsets = arrival_offsets(n, rate, 1.0, seed)
    inside = offsets[offsets >= window.warmup_s]
    if min_requests and np.sum(inside < window.warmup_s + window.window_s) < min_requests:
        end = float(inside[min_requests - 1]) + 1e-9  # just past the min_requests-th
        window = Window(window.warmup_s, end - window.warmup_s, window.tail_s)
    return offsets[offsets < window.span_s], window


async def sustained_run(
    cfg: BenchConfig, offsets: np.ndarray, window: Window, bodies: list[str]
) -> list[RequestResult]:
    """Requests sent at `offsets` (s); the results of those the window measures and of whatever
    else finished before the last of them did (the rest, the tail, are cancelled)."""
    prompts = with_unique_prefixes([bodies[i % len(bodies)] for i in range(len(offsets))])
    async with client_for(cfg, len(offsets)) as client:
        t0 = time.perf_counter()

        async def paced(i: int) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + float(offsets[i]) - time.perf_counter()))
            result = await send_request(client, cfg, prompts[i], i, t0)
            result.sent = float(offsets[i])  # judged by its schedule, not a late wake-up
            return result

        tasks = [asyncio.create_task(paced(i)) for i in range(len(offsets))]
        measured = [t for t, at in zip(tasks, offsets, strict=True) if window.measures(float(at))]
        try:
            await asyncio.gather(*measured)
        finally:
            for task in tasks:
                task.cancel()  # the tail (and any straggler): the server sees a disconnect
            await asyncio.gather(*tasks, return_exceptions=True)
    return [t.result() for t in tasks if not t.cancelled() and t.exception() is None]


def measure_rate(
    cfg: BenchConfig,
    rate: float,
    window: Window,
    bodies: list[str],
    seed: int,
    min_requests: int = 0,
) -> dict[str, Any]:
    """One sustained run at `rate` (at least `min_requests` measured): its steady state."""
    offsets, window = schedule(rate, window, seed, min_requests)
    results = asyncio.run(sustained_run(cfg, offsets, window, bodies))
    return steady_state(cfg, results, window, rate)


@dataclass
class CapacitySearch:
    """The highest rate at which >= `attainment` % of a window's arrivals met the SLO.

    Rates rise by `step` from `start` while they pass and fall while they fail; the bracket
    between the highest passing rate and the lowest failing one above it is then halved
    (geometrically) until its ends are within `tolerance`; then each end is rerun until it has
    `1 + confirm` runs. A rate's verdict pools all its runs (met / measured), so a rerun that
    flips it moves the bracket and the search goes on. Stepped with `next_rate` and `record`,
    so the searches of several servers can take turns on one machine.
    """

    start: float
    step: float = 1.5
    tolerance: float = 0.1
    attainment: float = 95.0
    confirm: int = 1
    max_runs: int = 16
    floor: float = 0.0  # a server failing at every rate is given up below this one
    runs: list[Mapping[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.start <= 0 or self.step <= 1.0 or self.tolerance <= 0:
            raise ValueError(
                f"start ({self.start}) > 0, step ({self.step}) > 1 and tolerance "
                f"({self.tolerance}) > 0 required"
            )

    def pooled(self) -> dict[float, float]:
        """Per rate measured, the attainment (%) over all its runs' measured requests."""
        met: dict[float, list[int]] = {}
        for run in self.runs:
            counts = met.setdefault(float(run["request_rate"]), [0, 0])
            counts[0] += int(run["met_slo"])
            counts[1] += int(run["measured"])
        return {rate: 100.0 * m / n if n else 0.0 for rate, (m, n) in met.items()}

    def bracket(self) -> tuple[float | None, float | None]:
        """(highest passing rate below every failing one, lowest failing rate); None if none."""
        pooled = self.pooled()
        failing = [rate for rate, pct in pooled.items() if pct < self.attainment]
        high = min(failing, default=None)
        passing = [r for r, pct in pooled.items() if pct >= self.attainment]
        low = max((r for r in passing if high is None or r < high), default=None)
        return low, high

    def _count(self, rate: float) -> int:
        return sum(float(run["request_rate"]) == rate for run in self.runs)

    def next_rate(self) -> float | None:
        """The rate to measure next; None when the search is over (or out of runs)."""
        return None if len(self.runs) >= self.max_runs else self._wanted()

    def _wanted(self) -> float | None:
        if not self.runs:
            return round(self.start, 4)
        low, high = self.bracket()
        if high is None:
            return round(low * self.step, 4) if low is not None else None
        if low is None:
            lower = round(high / self.step, 4)
            return lower if lower >= self.floor else None
        if high / low > 1.0 + self.tolerance:
            return round(math.sqrt(low * high), 4)
        for rate in (low, high):
            if self._count(rate) < 1 + self.confirm:
                return rate
        return None

    def record(self, summary: Mapping[str, Any]) -> None:
        """Add one run's steady-state summary (`request_rate`, `measured`, `met_slo`)."""
        self.runs.append(summary)

    def result(self) -> dict[str, Any]:
        """The capacity (None if nothing passed), its bracket, whether it converged, every run."""
        low, high = self.bracket()
        return {
            "capacity_rps": low,
            "lowest_failing_rps": high,
            # bracketed, tight and confirmed (not: out of runs, or failing down to the floor)
            "converged": self._wanted() is None and None not in (low, high),
            "pooled_attainment_pct": {f"{r:g}": round(p, 2) for r, p in self.pooled().items()},
            "runs": [dict(run) for run in self.runs],
        }
