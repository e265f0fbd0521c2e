"""`elasticserve bench serve` and `elasticserve bench plot`."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..benchmark.serve import BenchConfig

COLUMNS = (  # header, width, summary key (or a function of the summary)
    ("rate", 6, "request_rate"),
    ("ok/sent", 9, None),
    ("req/s", 7, "request_throughput"),
    ("tok/s", 8, "output_throughput"),
    ("TTFT p50", 9, "ttft_median_ms"),
    ("TTFT p99", 9, "ttft_p99_ms"),
    ("TPOT p50", 9, "tpot_median_ms"),
    ("TPOT p99", 9, "tpot_p99_ms"),
    ("goodput", 8, "goodput"),
    ("SLO%", 6, "slo_attainment_pct"),
    ("ppl", 7, "ppl_served"),
)


def parse_rates(text: str) -> list[float]:
    """`1,2,4,inf` -> [1.0, 2.0, 4.0, inf]; every rate must be > 0."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: write rates like 0.5,1,2,inf") from None
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"--sweep {text!r}: needs one or more rates > 0")
    return rates


def _cell(summary: dict[str, Any], key: str | None, width: int) -> str:
    if key is None:
        return f"{summary['completed']}/{summary['num_requests']}".rjust(width)
    value = summary[key]
    if value is None:
        return "-".rjust(width)
    if isinstance(value, float | int):
        return f"{float(value):>{width}.2f}" if key != "request_rate" else f"{value:>{width}g}"
    return str(value).rjust(width)


def table_header() -> str:
    """The header line of the printed results table."""
    return " ".join(h.rjust(w) for h, w, _ in COLUMNS) + "  shapes"


def table_row(summary: dict[str, Any]) -> str:
    """One run as a line of the printed table; the shapes column lists the top three."""
    mix = ", ".join(f"{s} {f:.0%}" for s, f in list(summary["shape_mix"].items())[:3])
    return " ".join(_cell(summary, k, w) for _, w, k in COLUMNS) + "  " + mix


def _config(args: argparse.Namespace) -> BenchConfig:
    from ..benchmark.serve import BenchConfig  # httpx and numpy: only when benchmarking

    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency {args.max_concurrency}: must be >= 1")
    if args.output_len < 1 or args.timeout <= 0:
        raise ValueError(f"--output-len ({args.output_len}) >= 1 and --timeout > 0 required")
    return BenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        dataset=args.dataset,
        data=args.data,
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        seed=args.seed,
        timeout=args.timeout,
        ignore_eos=not args.no_ignore_eos,
        api_key=args.api_key,
    )


def _serve(args: argparse.Namespace) -> None:
    from ..benchmark.datasets import prompt_bodies, with_unique_prefixes
    from ..benchmark.serve import run_benchmark, save_run, summarize, write_csv

    base = _config(args)
    rates = parse_rates(args.sweep) if args.sweep else [args.request_rate]
    out = Path(args.out)
    bodies = prompt_bodies(base.dataset, base.data, base.num_prompts, base.input_len, base.seed)
    for i, rate in enumerate(rates):
        cfg = replace(base, request_rate=rate)
        prompts = with_unique_prefixes(bodies)  # fresh per rate: no cache hits from the last one
        results, duration, shape_ppl = asyncio.run(run_benchmark(cfg, prompts))
        summary = summarize(cfg, results, duration, shape_ppl)
        save_run(out, cfg, summary, results)
        write_csv(out)  # after every rate, so an interrupted sweep keeps what it measured
        print((table_header() + "\n" if i == 0 else "") + table_row(summary), flush=True)
        errors = sorted({r.error for r in results if r.error})
        if errors:
            print(f"  {summary['failed']} failed, e.g. {errors[0]}")
    print(f"results: {out}/rate-*.json, {out}/summary.csv")


def _plot(args: argparse.Namespace) -> None:
    from ..benchmark.plot import plot_runs  # matplotlib only when plotting

    dirs = [Path(d) for d in args.dirs]
    for path in plot_runs(dirs, Path(args.out) if args.out else dirs[0]):
        print(path)


def _rate(text: str) -> float:
    rate = float(text)
    if not rate > 0 or math.isnan(rate):
        raise argparse.ArgumentTypeError(f"{text!r}: a request rate must be > 0 (or inf)")
    return rate


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="benchmark an OpenAI-compatible server")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name sent with every request")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument(
        "--dataset",
        choices=["random", "austen", "sharegpt"],
        default="random",
        help="random common words (default); austen: passages of --data (text file or dir); "
        "sharegpt: the prompts of --data (ShareGPT-like .json or .jsonl)",
    )
    p.add_argument("--data", default=None, help="the file or directory --dataset reads")
    p.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="sent as a Bearer token (default: $OPENAI_API_KEY)",
    )
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (approximate)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--num-prompts", type=int, default=100)
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--request-rate", type=_rate, default=math.inf, help="req/s (default inf)")
    rate.add_argument("--sweep", default=None, help="rates run in order, e.g. 0.5,1,2,inf")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--out", default="bench-results", help="directory for JSON and CSV")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument(
        "--no-ignore-eos", action="store_true", help="omit ignore_eos (servers rejecting it)"
    )
    p.set_defaults(func=_serve)


def _add_plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="PNG plots of one or more result directories")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    p.add_argument("--out", default=None, help="where the PNGs go (default: the first DIR)")
    p.set_defaults(func=_plot)


def register(subparsers: Any) -> None:
    """Add `bench serve` and `bench plot` to the `elasticserve` command."""
    bench = subparsers.add_parser("bench", help="serving benchmark of any OpenAI-compatible server")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    _add_serve(sub)
    _add_plot(sub)
