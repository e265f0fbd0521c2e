"""Step load (light -> 3x capacity -> light): p99 TPOT and served shape over time, per policy.

Starts `elasticserve serve` once per policy on 127.0.0.1, measures the full shape's capacity with
a closed loop (requests/s it completes with `--probe-concurrency` streams), then sends a
piecewise-Poisson load at `--phases` multiples of that capacity and records every request.
Writes bench/results/step_load.json and step_load.png: p99 TPOT per time bin and the served
shapes' weight fraction per time bin, `slo` against `fixed` (full).

    python bench/step_load.py [--policies fixed,slo] [--slo-tpot-ms 150] [--phase-s 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from elasticserve.benchmark.datasets import prompt_bodies, with_unique_prefixes
from elasticserve.benchmark.local import free_port, probe_capacity, running_server
from elasticserve.benchmark.serve import BenchConfig, RequestResult, send_request

OUT = Path("bench/results")


def serve_cmd(policy: str, port: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "elasticserve.cli", "serve", "--port", str(port)]
    cmd += ["--policy", policy, "--slo-tpot-ms", str(args.slo_tpot_ms)]
    cmd += ["--slo-ttft-ms", str(args.slo_ttft_ms), "--max-num-seqs", str(args.max_num_seqs)]
    return cmd


def schedule(rates: list[float], phase_s: float, seed: int) -> list[float]:
    """Poisson send times for consecutive phases of constant rate."""
    rng = np.random.default_rng(seed)
    times, start = [], 0.0
    for rate in rates:
        t = start + rng.exponential(1 / rate)
        while t < start + phase_s:
            times.append(t)
            t += rng.exponential(1 / rate)
        start += phase_s
    return times


async def drive(cfg: BenchConfig, prompts: list[str], times: list[float]) -> list[RequestResult]:
    async with httpx.AsyncClient(timeout=cfg.timeout, trust_env=False) as client:
        t0 = time.perf_counter()

        async def one(i: int, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            return await send_request(client, cfg, prompts[i], i, t0)

        return list(await asyncio.gather(*(one(i, at) for i, at in enumerate(times))))


def shape_fraction(shapes: dict[str, int], fractions: dict[str, float]) -> float | None:
    total = sum(shapes.values())
    if not total:
        return None
    return sum(fractions.get(s, math.nan) * n for s, n in shapes.items()) / total


def binned(results: list[dict], seconds: float, bin_s: float) -> list[dict]:
    rows = []
    for start in np.arange(0.0, seconds, bin_s):
        inside = [r for r in results if r["ok"] and start <= r["sent"] < start + bin_s]
        tpots = [r["tpot_ms"] for r in inside if r["tpot_ms"] is not None]
        fracs = [r["weight_fraction"] for r in inside if r["weight_fraction"] is not None]
        rows.append(
            {
                "t": float(start),
                "requests": len(inside),
                "p99_tpot_ms": float(np.percentile(tpots, 99)) if tpots else None,
                "weight_fraction": float(np.mean(fracs)) if fracs else None,
            }
        )
    return rows


def plot(runs: dict[str, dict], slo_tpot_ms: float, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6))
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    for policy, run in runs.items():
        t = [b["t"] for b in run["bins"]]
        ax1.plot(t, [b["p99_tpot_ms"] for b in run["bins"]], marker="o", label=policy)
        ax2.plot(t, [b["weight_fraction"] for b in run["bins"]], marker="o", label=policy)
    ax1.axhline(slo_tpot_ms, color="grey", linestyle="--", label="TPOT SLO")
    ax1.set_ylabel("p99 TPOT (ms), by send time")
    ax1.set_yscale("log")
    ax2.set_ylabel("served weight fraction")
    ax2.set_xlabel("seconds (phases: light, 3x capacity, light)")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policies", default="fixed,slo")
    parser.add_argument("--slo-tpot-ms", type=float, default=150.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    parser.add_argument("--phases", default="0.3,3,0.3", help="multiples of full-shape capacity")
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--probe-concurrency", type=int, default=4)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--bin-s", type=float, default=5.0)
    parser.add_argument("--data", default="../shared/corpus/austen")
    args = parser.parse_args()
    mults = [float(m) for m in args.phases.split(",")]
    runs: dict[str, dict] = {}
    capacity = None
    for policy in args.policies.split(","):
        port = free_port()
        with running_server(serve_cmd(policy, port, args), port) as base:
            shapes = httpx.get(base + "/v1/shapes").json()
            shapes = shapes.get("data", shapes) if isinstance(shapes, dict) else shapes
            fractions = {s["shape"]: s["weight_fraction"] for s in shapes}
            cfg = BenchConfig(
                base,
                "smollm2-135m",
                data=args.data,
                input_len=args.input_len,
                output_len=args.output_len,
                timeout=120.0,
            )
            bodies = prompt_bodies("austen", args.data, 4000, args.input_len, seed=1)
            prompts = with_unique_prefixes(bodies)
            if capacity is None:  # the full shape's capacity, measured once (fixed serves full)
                full = BenchConfig(**{**cfg.__dict__, "model": "smollm2-135m@full"})
                capacity = asyncio.run(probe_capacity(full, prompts, args.probe_concurrency, 15.0))
                print(f"full-shape capacity: {capacity:.2f} requests/s")
            times = schedule([m * capacity for m in mults], args.phase_s, seed=0)
            results = asyncio.run(drive(cfg, prompts, times))
        records = [
            {
                "sent": r.sent,
                "ok": r.ok,
                "tpot_ms": None if r.tpot is None else r.tpot * 1e3,
                "ttft_ms": None if r.ttft is None else r.ttft * 1e3,
                "weight_fraction": shape_fraction(r.shapes, fractions),
                "shapes": r.shapes,
                "error": r.error,
            }
            for r in results
        ]
        ok = [r for r in records if r["ok"] and r["tpot_ms"] is not None]
        within = [
            r for r in ok if r["tpot_ms"] <= args.slo_tpot_ms and r["ttft_ms"] <= args.slo_ttft_ms
        ]
        runs[policy] = {
            "requests": len(records),
            "failed_or_refused": len(records) - len([r for r in records if r["ok"]]),
            "slo_attainment": len(within) / max(1, len(records)),
            "p99_tpot_ms": float(np.percentile([r["tpot_ms"] for r in ok], 99)) if ok else None,
            "bins": binned(records, args.phase_s * len(mults), args.bin_s),
            "records": records,
        }
        print(
            f"{policy:>6}: {len(records)} requests, SLO attainment "
            f"{runs[policy]['slo_attainment']:.0%}, p99 TPOT {runs[policy]['p99_tpot_ms']:.0f} ms, "
            f"{runs[policy]['failed_or_refused']} failed/refused"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "capacity_rps": capacity}
    (OUT / "step_load.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    plot(runs, args.slo_tpot_ms, OUT / "step_load.png")
    print(f"wrote {OUT / 'step_load.json'} and {OUT / 'step_load.png'}")


if __name__ == "__main__":
    main()
