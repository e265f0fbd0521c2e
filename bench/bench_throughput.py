"""Offline throughput: continuous batching vs HF generate, and what a mixed-shape batch costs.

64 requests (128-token prompts cut from the corpus, 128 new tokens each, EOS ignored):
- elasticserve at the full shape (all requests submitted at once) vs HF `generate` in batches of 8,
  same weights, dtype and threads, in the same run: output tokens/s and their ratio. HF runs
  twice, with its default attention (SDPA) and with its eager attention (CPU bf16 SDPA is slow,
  bench/bench_cpu_ops.py), and both ratios are reported;
- the same requests split evenly over 4 shapes vs all of them at the widest of those 4 shapes:
  time ratio (a mixed step should cost what its widest rows cost, DESIGN.md).

Every timing is the best of `--repeats` rounds, the rounds interleaving all runs (a shared
machine's slow spells only ever add time, and hit every run alike).

    python bench/bench_throughput.py [--requests 64] [--dtype auto] [--repeats 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from elasticserve import LLM, EngineConfig, SamplingParams

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "austen"
MIXED = ["full", "d30-w0.75", "d30-w0.5", "d15-w0.5"]


def corpus_prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n distinct prompts of `length` tokens from the Austen novels (filler text if absent)."""
    files = sorted(CORPUS.glob("*.txt")) if CORPUS.exists() else []
    text = " ".join(f.read_text()[5000:60000] for f in files) or "lorem ipsum " * 50000
    ids = tokenizer(text)["input_ids"]
    stride = max(length, (len(ids) - length) // n)
    return [ids[i * stride : i * stride + length] for i in range(n)]


def run_ours(llm: LLM, prompts: list[list[int]], shapes: list[str], new: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, shape=shapes)
    elapsed = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == new for o in outs)
    return elapsed


def run_hf(
    model_dir: Path,
    dtype: torch.dtype,
    prompts: list[list[int]],
    new: int,
    batch: int,
    attention: str,
) -> float:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attention)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch])
            hf.generate(  # type: ignore[operator]
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--pack", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many rounds")
    parser.add_argument("--quick", action="store_true", help="16 requests, 32 new tokens")
    parser.add_argument("--out", default="bench/results/bench_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.new_tokens = 16, 32
    llm = LLM(args.model, args.pack, dtype=args.dtype, engine_config=EngineConfig(max_num_seqs=64))
    prompts = corpus_prompts(llm.tokenizer, args.requests, args.prompt_len)
    tokens = args.requests * args.new_tokens
    run_ours(llm, prompts[:4], ["full"] * 4, 4)  # warm-up

    mixed_shapes = [MIXED[i % len(MIXED)] for i in range(args.requests)]
    widest = max((llm.bundle.spec(s) for s in MIXED), key=lambda s: s.weight_fraction).name
    runs: dict[str, Callable[[], float]] = {
        "full": partial(run_ours, llm, prompts, ["full"] * args.requests, args.new_tokens),
        "mixed": partial(run_ours, llm, prompts, mixed_shapes, args.new_tokens),
    }
    if widest != llm.bundle.full.name:
        runs["widest"] = partial(run_ours, llm, prompts, [widest] * args.requests, args.new_tokens)
    hf_args = (llm.model_dir, llm.bundle.model.dtype, prompts, args.new_tokens, args.hf_batch)
    runs["hf"] = partial(run_hf, *hf_args, attention="sdpa")
    runs["hf_eager"] = partial(run_hf, *hf_args, attention="eager")
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):
        for name, run in runs.items():
            best[name] = min(best[name], run())
    t_full, t_mixed, t_hf, t_hf_eager = best["full"], best["mixed"], best["hf"], best["hf_eager"]
    t_widest = best.get("widest", t_full)

    result = {
        "dtype": str(llm.bundle.model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "ours_full_tok_s": round(tokens / t_full, 2),
        "hf_tok_s": round(tokens / t_hf, 2),
        "ours_vs_hf": round(t_hf / t_full, 3),
        "hf_eager_tok_s": round(tokens / t_hf_eager, 2),
        "ours_vs_hf_eager": round(t_hf_eager / t_full, 3),
        "mixed_shapes": MIXED,
        "widest": widest,
        "mixed_tok_s": round(tokens / t_mixed, 2),
        "mixed_vs_widest_time": round(t_mixed / t_widest, 3),
    }
    print(
        f"{args.requests} requests x {args.new_tokens} tokens, {result['dtype']}, "
        f"{result['threads']} threads\n"
        f"  elasticserve full shape  {result['ours_full_tok_s']:8.1f} tok/s\n"
        f"  HF generate, batch {args.hf_batch:<3}  {result['hf_tok_s']:8.1f} tok/s\n"
        f"  ratio                    {result['ours_vs_hf']:8.2f}x\n"
        f"  HF, eager attention      {result['hf_eager_tok_s']:8.1f} tok/s\n"
        f"  ratio                    {result['ours_vs_hf_eager']:8.2f}x\n"
        f"  mixed {'/'.join(MIXED)}  {result['mixed_tok_s']:8.1f} tok/s, "
        f"time {result['mixed_vs_widest_time']:.2f}x the same batch at {widest}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
