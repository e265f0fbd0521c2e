"""`fixed` (full), `fixed` (smallest) and `slo` on the default model, swept from light load to ~3x.

Starts two `elasticserve serve` processes on 127.0.0.1 at once: one `fixed` server serves both
the full shape and, pinned by the model name, the smallest; one `slo` server. The full shape's
SLO capacity is searched first: from a closed-loop probe's rate, Poisson rates rise by
`--search-step` until fewer than 95 % of requests meet the SLO; the capacity is the highest rate
that kept 95 %. Then every configuration runs at `--mults` multiples of that capacity with
`elasticserve bench serve`'s machinery (unique prompt prefixes, streaming, SLO goodput, served
shape mix and served perplexity), **interleaved**: at each rate the three configurations take
turns, their order rotating, and the whole sweep is repeated `--repeats` times, so a slow spell
of the shared machine hits every configuration alike. Each run lasts about `--seconds`.

Writes bench/results/compare_policies/rep-<i>/<config>/rate-*.json + summary.csv, the plots of
`elasticserve bench plot`, and compare_policies.md (per configuration and rate: the mean and
the lowest share within the SLO over the repeats, mean goodput, the highest p99s, the served
perplexity and shape mix).

    python bench/compare_policies.py [--mults 0.5,1,1.5,2,3] [--repeats 2] [--slo-ttft-ms 2000]
        [--slo-tpot-ms 100] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from elasticserve.benchmark.datasets import prompt_bodies, with_unique_prefixes
from elasticserve.benchmark.local import (
    capacity_record,
    free_port,
    open_loop,
    probe_capacity,
    running_server,
    search_slo_capacity,
)
from elasticserve.benchmark.plot import plot_runs
from elasticserve.benchmark.serve import BenchConfig, save_run, write_csv

OUT = Path("bench/results/compare_policies")
NAME = "smollm2-135m"


def serve_cmd(policy: str, port: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "elasticserve.cli", "serve", "--port", str(port)]
    cmd += ["--served-model-name", NAME, "--policy", policy]
    cmd += ["--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms)]
    return [*cmd, "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]


def shapes(base: str) -> list[dict[str, Any]]:
    data = httpx.get(base + "/v1/shapes", trust_env=False).json()
    return data.get("data", data) if isinstance(data, dict) else data


def run_point(
    cfg: BenchConfig, rate: float, seconds: float, bodies: list[str], out: Path
) -> dict[str, Any]:
    """One open-loop run at `rate` (about `seconds` of arrivals), saved under `out`."""
    cfg, results, summary = open_loop(cfg, rate, seconds, bodies)
    save_run(out, cfg, summary, results)
    write_csv(out)
    print(
        f"  {out.parent.name}/{out.name:<15} rate {rate:5.2f}/s: "
        f"{summary['slo_attainment_pct']:5.1f}% within SLO, goodput {summary['goodput']:.2f}/s, "
        f"p99 TTFT {summary['ttft_p99_ms'] or 0:.0f} ms, p99 TPOT {summary['tpot_p99_ms'] or 0:.0f}"
        f" ms, ppl {summary['ppl_served']}",
        flush=True,
    )
    return summary


def pooled(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeats of one configuration at one rate: means, the worst attainment and p99s."""
    n = len(summaries)
    ppls = [s["ppl_served"] for s in summaries]
    mix: dict[str, float] = {}
    for s in summaries:
        for shape, share in s["shape_mix"].items():
            mix[shape] = mix.get(shape, 0.0) + share / n
    return {
        "request_rate": summaries[0]["request_rate"],
        "repeats": n,
        "slo_attainment_pct": sum(s["slo_attainment_pct"] for s in summaries) / n,
        "slo_attainment_min_pct": min(s["slo_attainment_pct"] for s in summaries),
        "goodput": sum(s["goodput"] for s in summaries) / n,
        "ttft_p99_ms": max(s["ttft_p99_ms"] or 0 for s in summaries),
        "tpot_p99_ms": max(s["tpot_p99_ms"] or 0 for s in summaries),
        "ppl_served": None if None in ppls else sum(ppls) / n,
        "shape_mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])),
        "runs": summaries,
    }


def table(results: dict[str, list[dict[str, Any]]], capacity: float) -> str:
    lines = [
        "| config | rate (req/s) | × capacity | within SLO (mean, lowest) | goodput (req/s) "
        "| p99 TTFT (ms) | p99 TPOT (ms) | served ppl | main shapes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config, summaries in results.items():
        for s in summaries:
            rate = float(s["request_rate"])
            mix = ", ".join(f"{k} {v:.0%}" for k, v in list(s["shape_mix"].items())[:2])
            ppl = "-" if s["ppl_served"] is None else f"{s['ppl_served']:.1f}"
            lines.append(
                f"| {config} | {rate:.2f} | {rate / capacity:.1f} "
                f"| {s['slo_attainment_pct']:.0f} %, {s['slo_attainment_min_pct']:.0f} %"
                f" | {s['goodput']:.2f} | {s['ttft_p99_ms'] or 0:.0f} | {s['tpot_p99_ms'] or 0:.0f}"
                f" | {ppl} | {mix} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mults", default="0.5,1,1.5,2,3", help="multiples of SLO capacity")
    parser.add_argument("--search-step", type=float, default=1.25, help="capacity search ratio")
    parser.add_argument("--seconds", type=float, default=20.0, help="arrivals per rate")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved sweeps")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--probe-concurrency", type=int, default=4)
    parser.add_argument("--data", default="../shared/corpus/austen")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    mults = [float(m) for m in args.mults.split(",")]
    bodies = prompt_bodies("austen", args.data, 2000, args.input_len, seed=1)
    slo = {"slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms}

    fixed_port, slo_port = free_port(), free_port()
    with (
        running_server(serve_cmd("fixed", fixed_port, args), fixed_port) as url,
        running_server(serve_cmd("slo", slo_port, args), slo_port) as slo_url,
    ):
        grid = shapes(url)
        smallest = min(grid, key=lambda s: s["weight_fraction"])["shape"]
        base = BenchConfig(
            url, NAME, data=args.data, input_len=args.input_len, output_len=args.output_len, **slo
        )
        full = replace(base, model=f"{NAME}@full")
        probe = with_unique_prefixes(bodies)
        probed = asyncio.run(probe_capacity(full, probe, args.probe_concurrency, 15.0))
        print(f"full shape, closed loop ({args.probe_concurrency} streams): {probed:.2f} req/s")
        searched = out / "capacity-search"
        for stale in [*searched.glob("rate-*.json"), *out.glob("rep-*/*/rate-*.json")]:
            stale.unlink()  # else they join this run's CSVs
        capacity, search = search_slo_capacity(
            lambda rate: run_point(full, rate, args.seconds, bodies, searched),
            probed,
            args.search_step,
        )
        print(f"full shape's SLO capacity (>= 95% within SLO): {capacity:.2f} req/s")
        rates = [round(m * capacity, 3) for m in mults]
        configs = {
            "fixed-full": full,
            "fixed-smallest": replace(base, model=f"{NAME}@{smallest}"),
            "slo": replace(base, base_url=slo_url),
        }
        names = list(configs)
        runs: dict[str, list[list[dict[str, Any]]]] = {c: [[] for _ in rates] for c in names}
        for rep in range(args.repeats):
            for i, rate in enumerate(rates):
                turn = (rep + i) % len(names)  # who goes first rotates
                for c in names[turn:] + names[:turn]:
                    got = run_point(configs[c], rate, args.seconds, bodies, out / f"rep-{rep}" / c)
                    runs[c][i].append(got)
        results = {c: [pooled(point) for point in runs[c]] for c in names}

    dirs = [out / f"rep-{rep}" / c for rep in range(args.repeats) for c in names]
    plots = plot_runs(dirs, out)
    text = table(results, capacity)
    meta = {"args": vars(args), **capacity_record(probed, capacity, search), "smallest": smallest}
    (out / "compare_policies.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1) + "\n"
    )
    (out / "compare_policies.md").write_text(text)
    print(text)
    print(f"rates are multiples of the full shape's SLO capacity, {capacity:.2f} req/s")
    print("plots: " + ", ".join(str(p) for p in plots))


if __name__ == "__main__":
    main()
