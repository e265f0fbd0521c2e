"""What structured output costs: batch-8 decode tok/s under each kind of grammar vs unconstrained.

The offline LLM on the default model decodes the same 8 prompts greedily for `--new-tokens`
tokens (EOS ignored, so every row produces them all: a grammar that has ended allows only EOS
and its row keeps decoding under that one-token mask) with no grammar, a json_object, a
json_schema, a regex and a choice. Decode time is (time of 1 + N tokens) - (time of 1 token), so
the prefill and the grammar's compilation drop out. Rounds interleave the configurations (each
round runs every one once) and the best of the rounds is kept, because a shared machine only
ever adds time; the median of the per-round ratios is printed beside it. A last instrumented
pass splits each guided step's cost into the matcher (xgrammar advancing and writing the
bitmask) and applying the mask in the sampler (medians over the steps).

    python bench/bench_guided.py [--rounds 3] [--new-tokens 64] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from elasticserve.engine import guided, sampling
from elasticserve.engine.guided import GuidedDecodingParams
from elasticserve.engine.llm import LLM
from elasticserve.engine.sampling import SamplingParams
from elasticserve.model.device import cpu_model, kernel_flags

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "austen"
ASK = "\n\nThe passage above, as a JSON record:\n"
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "characters": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            },
            "minItems": 3,
        },
        "mood": {"enum": ["happy", "sad", "neutral"]},
    },
    "required": ["title", "characters", "mood"],
}
CONFIGS: dict[str, GuidedDecodingParams | None] = {
    "none": None,
    "json_object": GuidedDecodingParams(json_object=True),
    "json_schema": GuidedDecodingParams(json=SCHEMA),
    "regex": GuidedDecodingParams(regex=r"\d{4}-\d{2}-\d{2}(, \d{4}-\d{2}-\d{2}){15}"),
    "choice": GuidedDecodingParams(choice=("yes", "no", "not stated in the passage")),
}


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """`batch` different corpus passages of `length` tokens, each followed by the same request."""
    text = (CORPUS / "emma.txt").read_text()[20000:80000] if CORPUS.exists() else "word " * 20000
    ids = tokenizer(text)["input_ids"]
    ask = tokenizer(ASK)["input_ids"]
    return [ids[i * length : (i + 1) * length] + ask for i in range(batch)]


def runner(llm: LLM, batch: list[list[int]], params: GuidedDecodingParams | None) -> Callable:
    def run(n: int) -> list:
        p = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, guided_decoding=params)
        return llm.generate(batch, p)

    return run


def decode_seconds(runs: dict[str, Callable], new: int, rounds: int) -> dict[str, list[float]]:
    """Per configuration, each interleaved round's time(1 + new tokens) - time(1 token)."""

    def timed(run: Callable, n: int) -> float:
        t = time.perf_counter()
        run(n)
        return time.perf_counter() - t

    for run in runs.values():
        run(2)  # warm-up: compiles each grammar once into xgrammar's cache
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            samples[name].append(timed(run, 1 + new) - timed(run, 1))
        print(
            f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in samples.items())
        )
    return samples


def guided_tokens(llm: LLM, outputs: list) -> float:
    """Mean tokens a row produced before its grammar ended (the rest are EOS under the mask)."""
    eos = llm.engine.runner.eos_token_ids
    counts = []
    for out in outputs:
        ids = out.outputs[0].token_ids
        counts.append(next((i for i, t in enumerate(ids) if t in eos), len(ids)))
    return sum(counts) / len(counts)


def split_cost(run: Callable, new: int) -> dict[str, float]:
    """Median ms per decode step in the matcher (Guide.fill_mask) and in the rest of the masking."""
    matcher: list[float] = []  # per step: the matcher's time over every guided row
    rest: list[float] = []  # per step: the sampler's masking around it
    fill, apply = guided.Guide.fill_mask, sampling._apply_guides

    def timed_fill(self, *args):
        t = time.perf_counter()
        fill(self, *args)
        matcher[-1] += time.perf_counter() - t

    def timed_apply(*args):
        matcher.append(0.0)
        t = time.perf_counter()
        out = apply(*args)
        rest.append(time.perf_counter() - t - matcher[-1])
        return out

    guided.Guide.fill_mask, sampling._apply_guides = timed_fill, timed_apply  # type: ignore
    try:
        run(new)
    finally:
        guided.Guide.fill_mask, sampling._apply_guides = fill, apply  # type: ignore
    return {
        "matcher_ms_per_step": round(statistics.median(matcher) * 1e3, 3),
        "sampler_mask_ms_per_step": round(statistics.median(rest) * 1e3, 3),
        "steps": len(rest),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--pack", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="bench/results/bench_guided.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, args.pack)
    batch = prompts(llm.tokenizer, args.batch, args.prompt_len)
    runs = {name: runner(llm, batch, params) for name, params in CONFIGS.items()}
    samples = decode_seconds(runs, args.new_tokens, args.rounds)
    seconds = {name: min(times) for name, times in samples.items()}  # interference only adds
    base = args.batch * args.new_tokens / seconds["none"]
    results = []
    for name, run in runs.items():
        outputs = run(args.new_tokens)
        tps = args.batch * args.new_tokens / seconds[name]
        row = {
            "config": name,
            "tok_s": round(tps, 2),
            "vs_none": round(tps / base, 3),
            "cost": round(1 - tps / base, 3),
            # the same round's unconstrained time over this one's, median over the rounds: a
            # second view, robust to a slow spell that missed one configuration's best round
            "median_round_ratio": round(
                statistics.median(
                    n / t for n, t in zip(samples["none"], samples[name], strict=True)
                ),
                3,
            ),
            "round_seconds": [round(t, 3) for t in samples[name]],
            "guided_tokens": round(guided_tokens(llm, outputs), 1),
            "sample": outputs[0].outputs[0].text[:80],
        }
        if CONFIGS[name] is not None:
            row.update(split_cost(run, args.new_tokens))
            masking = row["matcher_ms_per_step"] + row["sampler_mask_ms_per_step"]
            row["masking_share_of_step"] = round(
                masking / (seconds["none"] / args.new_tokens) / 1e3, 4
            )
        results.append(row)
        split = (
            f"  matcher {row['matcher_ms_per_step']:.2f} ms/step, "
            f"sampler mask {row['sampler_mask_ms_per_step']:.2f} ms/step "
            f"({row['masking_share_of_step']:.1%} of an unconstrained step)"
            if "steps" in row
            else ""
        )
        print(
            f"{name:<12} {tps:7.1f} tok/s  x{row['vs_none']:.3f} vs none  cost {row['cost']:+.1%}"
            f"  (median round x{row['median_round_ratio']:.3f})"
            f"  grammar active {row['guided_tokens']:.0f}/{args.new_tokens} tokens{split}"
        )
    meta = {
        "machine": cpu_model(),
        "cpu_flags": kernel_flags(),
        "threads": args.threads,
        "model": llm.bundle.name,
        "dtype": str(llm.bundle.model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "step_ms_unconstrained": round(seconds["none"] / args.new_tokens * 1e3, 2),
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
