"""The elastic grid's Pareto front: every picked shape's bytes, decode tok/s and perplexity.

Shapes: depths x widths x precisions (the model's dtype and each quantized precision) of the
loaded pack. For each, the weight bytes one decode step reads, decode throughput at batch 1 and
8 (best of interleaved rounds: every shape is measured once per round, so a slow spell of the
shared machine hits them all), and held-out perplexity (the pack's recorded quality, or measured
here with --data). The front: shapes no other shape beats on both bytes (or tok/s) and quality.

    python bench/bench_precision.py --precisions q4 --out bench/results/bench_precision.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from elasticserve.engine.llm import LLM
from elasticserve.engine.sampling import SamplingParams
from elasticserve.model.device import cpu_model, kernel_flags


def front(rows: list[dict], cost: str, lower_is_better: bool = True) -> set[str]:
    """Shapes no other row beats on both `cost` and perplexity."""
    names = set()
    for r in rows:
        better = [
            o
            for o in rows
            if o is not r
            and o["ppl"] <= r["ppl"]
            and (o[cost] <= r[cost] if lower_is_better else o[cost] >= r[cost])
            and (o["ppl"] < r["ppl"] or o[cost] != r[cost])
        ]
        if not better:
            names.add(r["shape"])
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--pack", default=None)
    parser.add_argument("--precisions", default="q4")
    parser.add_argument("--depths", default="30,24,18,15")
    parser.add_argument("--widths", default="1.0,0.75,0.5")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--data", default=None, help="held-out text: measure perplexity here")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens (--data)")
    parser.add_argument("--out", default="bench/results/bench_precision.json")
    parser.add_argument("--plot", default="bench/results/bench_precision.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, args.pack, precisions=args.precisions)
    bundle = llm.bundle
    depths = [int(d) for d in args.depths.split(",")]
    widths = [float(w) for w in args.widths.split(",")]
    specs = [s for s in bundle.specs if s.shape.depth in depths and s.shape.width in widths]
    ppl = {s.name: s.ppl for s in specs}
    if args.data:
        from elasticserve.training.data import load_token_ids
        from elasticserve.training.evaluate import perplexity

        ids = load_token_ids(bundle.tokenizer, [args.data], max_tokens=args.tokens)
        ppl = {s.name: perplexity(bundle, s, ids) for s in specs}
    prompt = llm.tokenizer("It is a truth universally acknowledged, that a single man")["input_ids"]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    batches = [int(b) for b in args.batches.split(",")]
    best = {(s.name, b): float("inf") for s in specs for b in batches}
    for b in batches:  # warm-up: every shape once
        for s in specs:
            llm.generate([prompt] * b, SamplingParams(max_tokens=2), shape=s.name)
    for _ in range(args.rounds):
        for b in batches:
            for s in specs:
                start = time.perf_counter()
                llm.generate([prompt] * b, params, shape=s.name)
                best[(s.name, b)] = min(best[(s.name, b)], time.perf_counter() - start)
    rows = []
    full = {b: best[(specs[0].name, b)] for b in batches}
    for s in specs:
        row = {
            "shape": s.name,
            "precision": s.shape.precision or str(bundle.model.dtype).removeprefix("torch."),
            "weight_fraction": round(s.weight_fraction, 4),
            "step_bytes_mb": round(bundle.weight_bytes(s) / 1e6, 1),
            "ppl": None if ppl[s.name] is None else round(float(ppl[s.name]), 3),
        }
        for b in batches:
            row[f"tok_s_b{b}"] = round(b * args.new_tokens / best[(s.name, b)], 1)
            row[f"speedup_b{b}"] = round(full[b] / best[(s.name, b)], 3)
        rows.append(row)
    rated = [r for r in rows if r["ppl"] is not None]
    by_bytes = front(rated, "step_bytes_mb")
    by_speed = front(rated, f"tok_s_b{batches[0]}", lower_is_better=False)
    for r in rows:
        r["front_bytes"], r["front_speed"] = r["shape"] in by_bytes, r["shape"] in by_speed
    header = f"{'shape':<16} {'bytes MB':>8} {'ppl':>8} " + " ".join(
        f"{'B=' + str(b) + ' tok/s':>12} {'x full':>6}" for b in batches
    )
    print(header)
    for r in rows:
        cells = " ".join(f"{r[f'tok_s_b{b}']:>12.1f} {r[f'speedup_b{b}']:>6.2f}" for b in batches)
        mark = ("*" if r["front_bytes"] else " ") + ("+" if r["front_speed"] else " ")
        ppl_text = f"{r['ppl']:.2f}" if r["ppl"] is not None else "-"
        print(f"{r['shape']:<16} {r['step_bytes_mb']:>8.1f} {ppl_text:>8} {cells} {mark}")
    print("* on the bytes/perplexity front, + on the batch-1 speed/perplexity front")
    meta = {
        "machine": cpu_model(),
        "cpu_flags": kernel_flags(),
        "threads": args.threads,
        "dtype": str(bundle.model.dtype),
        "torch": torch.__version__,
        "args": vars(args),
        "ppl_source": "measured (--data)" if args.data else "the pack's recorded quality",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    if args.plot and rated:
        plot(rated, batches[0], args.plot, meta)
    print(f"wrote {args.out}")


def plot(rows: list[dict], batch: int, path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, x, label, key in (
        (axes[0], "step_bytes_mb", "weight bytes per decode step (MB)", "front_bytes"),
        (axes[1], f"tok_s_b{batch}", f"decode tok/s at batch {batch}", "front_speed"),
    ):
        for precision in sorted({r["precision"] for r in rows}):
            pts = [r for r in rows if r["precision"] == precision]
            ax.scatter([r[x] for r in pts], [r["ppl"] for r in pts], label=precision, s=30)
        on = sorted((r for r in rows if r[key]), key=lambda r: r[x])
        ax.plot([r[x] for r in on], [r["ppl"] for r in on], "k--", lw=1, label="front")
        for r in on:
            ax.annotate(
                r["shape"], (r[x], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity (persuasion.txt)")
        ax.set_yscale("log")
        ax.legend(loc="upper right")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"Shapes of the grid: quality against bytes and speed ({meta['machine']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
