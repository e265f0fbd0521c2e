"""Benchmarks against servers started on this machine: start, wait for health, find capacity.

Used by the scripts under bench/ that compare policies or peer servers in one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import httpx

from .datasets import with_unique_prefixes
from .serve import (
    BenchConfig,
    RequestResult,
    client_for,
    run_benchmark,
    send_request,
    summarize,
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float, path: str) -> None:
    """Return once GET url+path answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was up")
        try:
            if httpx.get(url + path, timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url}{path} did not answer 200 within {timeout_s:.0f} s")


@contextlib.contextmanager
def running_server(
    cmd: Sequence[str],
    port: int,
    timeout_s: float = 300.0,
    health_path: str = "/health",
    env: dict[str, str] | None = None,
    log: str | None = None,
) -> Iterator[str]:
    """Run `cmd` (a server listening on 127.0.0.1:`port`) for the block; yields its base URL."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s, health_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


async def probe_capacity(
    cfg: BenchConfig, prompts: list[str], streams: int, seconds: float
) -> float:
    """Requests/s the server completes with `streams` back-to-back streams (a closed loop)."""
    done = 0
    t0 = time.perf_counter()
    async with client_for(cfg, streams) as client:

        async def loop(k: int) -> None:
            nonlocal done
            i = k
            while time.perf_counter() - t0 < seconds:
                r = await send_request(client, cfg, prompts[i % len(prompts)], i, t0)
                done += r.ok
                i += streams

        await asyncio.gather(*(loop(k) for k in range(streams)))
    return done / (time.perf_counter() - t0)


def open_loop(
    base: BenchConfig, rate: float, seconds: float, bodies: list[str]
) -> tuple[BenchConfig, list[RequestResult], dict[str, Any]]:
    """One run of Poisson arrivals at `rate` for about `seconds`: config, results, summary.

    At least 20 requests; each prompt gets a unique prefix (no prefix-cache hits).
    """
    num = max(20, math.ceil(rate * seconds))
    cfg = replace(base, request_rate=rate, num_prompts=num)
    prompts = with_unique_prefixes(bodies[:num])
    results, duration, shape_ppl = asyncio.run(run_benchmark(cfg, prompts, progress=False))
    return cfg, results, summarize(cfg, results, duration, shape_ppl)


def search_slo_capacity(
    run: Callable[[float], Mapping[str, Any]],
    start: float,
    step: float = 1.25,
    attainment: float = 95.0,
    tries: int = 12,
) -> tuple[float, list[Mapping[str, Any]]]:
    """The highest rate on `start`'s geometric ladder at which >= `attainment` % met the SLO.

    `run(rate)` measures one open-loop rate and returns its summary (`request_rate`,
    `slo_attainment_pct`). Rates rise by `step` while runs pass and fall by it while they fail,
    until a passing rate sits below every failing one. Returns the capacity and the summaries.
    """
    if step <= 1.0:
        raise ValueError(f"step must be > 1, got {step}")
    runs: list[Mapping[str, Any]] = []
    rate = start
    for _ in range(tries):
        runs.append(run(round(rate, 3)))
        passed = [float(r["request_rate"]) for r in runs if r["slo_attainment_pct"] >= attainment]
        failed = [float(r["request_rate"]) for r in runs if r["slo_attainment_pct"] < attainment]
        if passed and failed and min(failed) > max(passed):
            return max(passed), runs
        rate = rate * step if not failed else rate / step
    raise RuntimeError(f"no SLO capacity found in {tries} runs from {start:.2f} req/s")


def capacity_record(
    probed: float, capacity: float, runs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """What a capacity search found, for a results file: the probe, the capacity, each rate."""
    keys = ("request_rate", "slo_attainment_pct", "goodput")
    return {
        "probe_capacity_rps": probed,
        "slo_capacity_rps": capacity,
        "capacity_search": [{k: r[k] for k in keys} for r in runs],
    }
