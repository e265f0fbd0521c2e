"""Sustained capacity: the window arithmetic, the search, and the run against a fake server."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from elasticserve.benchmark.capacity import (
    CapacitySearch,
    Window,
    schedule,
    slo_latency_s,
    steady_state,
    sustained_run,
    window_for,
)
from elasticserve.benchmark.serve import BenchConfig, RequestResult, arrival_offsets

from .test_serve import Fake, serving

# --- a simulated server with a known service time: an M/D/1 queue on a fake clock -------------

SERVICE_S = 1.0  # every request holds the one slot this long
FIRST_S = 0.1  # of which the first token comes this long after it starts
ALLOWED_WAIT_S = 3.0  # the TTFT SLO lets a request queue this long


def md1_wait_cdf(x: float, rate: float) -> float:
    """P(queueing wait <= x) of an M/D/1 queue, service SERVICE_S (Erlang's formula)."""
    rho = rate * SERVICE_S
    terms = (
        (rate * (k * SERVICE_S - x)) ** k
        / math.factorial(k)
        * math.exp(-rate * (k * SERVICE_S - x))
        for k in range(int(x // SERVICE_S) + 1)
    )
    return (1.0 - rho) * sum(terms)


def md1_capacity() -> float:
    """The rate at which exactly 95 % wait no longer than ALLOWED_WAIT_S (bisection)."""
    lo, hi = 0.01, 0.999 / SERVICE_S
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if md1_wait_cdf(ALLOWED_WAIT_S, mid) >= 0.95 else (lo, mid)
    return lo


def simulate(rate: float, window: Window, seed: int) -> list[RequestResult]:
    """What the M/D/1 server does with Poisson arrivals over the window's span."""
    offsets = arrival_offsets(math.ceil(rate * window.span_s * 1.5) + 20, rate, 1.0, seed)
    free, results = 0.0, []
    for i, at in enumerate(offsets[offsets < window.span_s]):
        begin = max(float(at), free)
        free = begin + SERVICE_S
        ttft = begin - at + FIRST_S
        done = RequestResult(i, sent=float(at), ok=True, ttft=ttft, e2e=free - at)
        done.output_tokens = 10
        results.append(done)
    return results


CFG = BenchConfig("sim", "m", output_len=10, slo_ttft_ms=1000 * (ALLOWED_WAIT_S + FIRST_S))


def test_the_search_finds_a_known_service_capacity_within_ten_percent() -> None:
    truth = md1_capacity()  # ~0.72 req/s: 95 % queue under 3 s
    latency = ALLOWED_WAIT_S + SERVICE_S
    search = CapacitySearch(start=0.2, step=1.5, tolerance=0.1, confirm=1)
    seed = 0
    while (rate := search.next_rate()) is not None:
        window = window_for(latency, rate, windows=4, min_requests=4000)  # long: small noise
        seed += 1
        search.record(steady_state(CFG, simulate(rate, window, seed), window, rate))
    found = search.result()
    assert found["converged"]
    assert found["capacity_rps"] == pytest.approx(truth, rel=0.1)
    assert found["lowest_failing_rps"] / found["capacity_rps"] <= 1.1
    rates = [run["request_rate"] for run in found["runs"]]
    assert rates.count(found["capacity_rps"]) == 2  # confirmed by a rerun
    assert rates.count(found["lowest_failing_rps"]) == 2


def test_steady_state_measures_the_window_of_arrivals_not_the_drain() -> None:
    window = Window(warmup_s=10.0, window_s=20.0, tail_s=10.0)

    def done(sent: float, ttft: float) -> RequestResult:
        shapes = {"d30-w1.0": 10} if ttft < 1.0 else {"d15-w0.5": 10}
        return RequestResult(
            0, sent=sent, ok=True, ttft=ttft, e2e=ttft + 0.9, output_tokens=10, shapes=shapes
        )

    results = [
        done(1.0, 9.0),  # warm-up: not measured, however slow
        *(done(10.0 + k, 0.1) for k in range(15)),  # measured, within the SLO
        *(done(25.0 + k, 5.0) for k in range(4)),  # measured, TTFT too slow
        RequestResult(0, sent=29.5, error="HTTP 500"),  # measured, failed
        done(30.0, 0.1),  # the tail: keeps the load up, not measured
    ]
    cfg = BenchConfig("x", "m", output_len=10, slo_ttft_ms=1000, slo_tpot_ms=1000)
    s = steady_state(cfg, results, window, rate=1.0)
    assert (s["measured"], s["met_slo"], s["failed"]) == (20, 15, 1)
    assert s["slo_attainment_pct"] == 75.0
    assert s["goodput"] == 15 / 20.0 and s["arrival_rate"] == 1.0  # per window second
    assert (s["out_min"], s["out_max"], s["short_outputs"]) == (10, 10, 0)
    assert s["ttft_p95_ms"] == pytest.approx(5000.0)
    # the measured requests' tokens only: 15 fast ones on the full shape, 4 slow on the small
    assert s["shape_mix"] == {"d30-w1.0": 0.789474, "d15-w0.5": 0.210526}


def test_window_is_several_slo_bound_latencies_with_a_floor_of_requests() -> None:
    latency = slo_latency_s(slo_ttft_ms=500, slo_tpot_ms=100, output_len=11)
    assert latency == pytest.approx(1.5)
    assert window_for(latency, rate=10.0, windows=4, min_requests=40) == Window(1.5, 6.0, 1.5)
    assert window_for(latency, rate=1.0, windows=4, min_requests=40).window_s == 40.0
    with pytest.raises(ValueError, match="must be > 0"):
        window_for(latency, rate=0.0, windows=4, min_requests=40)


def _run(rate: float, ok: bool) -> dict[str, float]:
    return {"request_rate": rate, "measured": 100, "met_slo": 100 if ok else 50}


def test_search_climbs_bisects_and_confirms_both_ends() -> None:
    search = CapacitySearch(start=2.0, step=2.0, tolerance=0.1, confirm=1)
    tried = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        search.record(_run(rate, rate <= 5.0))
    assert tried[:3] == [2.0, 4.0, 8.0]  # up the ladder to the first failure
    low, high = search.bracket()
    assert low is not None and high is not None
    assert low <= 5.0 < high and high / low <= 1.1
    assert sorted(tried[-2:]) == [low, high] and tried.count(low) == tried.count(high) == 2
    assert search.result()["converged"]


def test_a_confirmation_that_flips_moves_the_bracket_and_the_search_goes_on() -> None:
    # The true limit is 5 req/s, but a rerun above 4.7 fails: its pooled verdict (75 %) fails.
    search = CapacitySearch(start=2.0, step=2.0, tolerance=0.1, confirm=1)
    seen: set[float] = set()
    first_low = None
    while (rate := search.next_rate()) is not None:
        if rate in seen and first_low is None:
            first_low = search.bracket()[0]  # the bracket when confirmation began
        search.record(_run(rate, rate <= 5.0 and not (rate in seen and rate > 4.7)))
        seen.add(rate)
    found = search.result()
    assert first_low is not None and first_low > 4.7
    assert found["converged"] and found["capacity_rps"] < first_low  # moved down
    assert found["lowest_failing_rps"] == first_low  # the flipped rate now bounds it
    runs = [r for r in found["runs"] if r["request_rate"] == found["capacity_rps"]]
    assert len(runs) == 2 and all(r["met_slo"] == 100 for r in runs)


def test_a_server_failing_everywhere_is_given_up_at_the_floor() -> None:
    search = CapacitySearch(start=1.0, step=2.0, floor=0.2)
    while (rate := search.next_rate()) is not None:
        search.record({"request_rate": rate, "measured": 10, "met_slo": 0})
    assert [r["request_rate"] for r in search.runs] == [1.0, 0.5, 0.25]
    assert search.result()["capacity_rps"] is None and not search.result()["converged"]


# --- a sustained run against the fake HTTP server ----------------------------------------------


def test_schedule_stretches_the_window_to_the_minimum_of_requests() -> None:
    window = Window(warmup_s=1.0, window_s=2.0, tail_s=1.0)
    offsets, stretched = schedule(rate=2.0, window=window, seed=5, min_requests=30)
    assert stretched.window_s > window.window_s  # 2 s at 2 req/s holds ~4, not 30
    assert sum(stretched.measures(float(at)) for at in offsets) == 30
    assert offsets.max() < stretched.span_s and stretched.tail_s == 1.0
    same, kept = schedule(rate=2.0, window=window, seed=5)
    assert kept == window and np.array_equal(same, offsets[offsets < window.span_s])


def test_sustained_run_measures_the_window_and_cancels_the_tail() -> None:
    offsets, window = schedule(40.0, Window(warmup_s=0.25, window_s=0.5, tail_s=0.5), seed=3)
    tail = {i for i, at in enumerate(offsets) if at >= window.warmup_s + window.window_s}
    assert tail  # the seed gives the window a tail
    # Tail requests hang for a minute: if they were awaited, the run would end in timeouts.
    fake = Fake(hang=lambda prompt: int(prompt.split("-")[1].split("]")[0]) in tail)
    with serving(fake) as url:
        cfg = BenchConfig(url, "m", output_len=4, timeout=120.0)
        results = asyncio.run(sustained_run(cfg, offsets, window, ["a", "b"]))
    measured = [r for r in results if window.measures(r.sent)]
    expected = sum(window.measures(float(at)) for at in offsets)
    assert len(measured) == expected and all(r.ok for r in measured)
    assert not {r.index for r in results} & tail  # cancelled, not awaited
    assert all(r.sent == float(offsets[r.index]) for r in results)
