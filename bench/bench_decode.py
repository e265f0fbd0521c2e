"""Decode throughput per shape vs HF generate, and against the weight-streaming limit.

For each dtype and batch size: decode tokens/s of elasticserve at a few shapes and of HF
`generate` on the same weights, threads and prompts, in the same run. Decode time excludes the
prefill: (time for 1 + N new tokens) - (time for 1 new token), the same way for both. Batch-1
decode reads every kept weight once per token, so `bytes per token / measured bandwidth` is its
floor; the table gives each shape's fraction of that limit and its speed-up against what its
bytes predict.

    python bench/bench_decode.py [--dtypes float32,bfloat16] [--batches 1,8] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from elasticserve import LLM, SamplingParams
from elasticserve.model.bundle import ModelBundle
from elasticserve.model.device import cpu_flags
from elasticserve.model.shapes import ShapeSpec

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "austen"


def measure_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Read bandwidth (bytes/s) of a large fp32 reduction: what streaming weights can reach."""
    x = torch.ones(mib * 2**18)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bytes_per_token(bundle: ModelBundle, spec: ShapeSpec) -> int:
    """Weight bytes one decode step reads: kept layers' linears + norms + the LM head."""
    cfg = bundle.config
    elem = torch.finfo(bundle.model.dtype).bits // 8
    layers = sum(cfg.layer_params(spec.heads[i], spec.mlp[i]) for i in spec.layers)
    norms = (2 * len(spec.layers) + 1) * cfg.hidden_size
    return (layers + norms + cfg.vocab_size * cfg.hidden_size) * elem


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """`batch` different prompts of exactly `length` tokens from the corpus (or filler text)."""
    text = (CORPUS / "emma.txt").read_text()[20000:80000] if CORPUS.exists() else "word " * 20000
    ids = tokenizer(text)["input_ids"]
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


def decode_seconds(runs: dict[str, Callable[[int], object]], new: int, repeats: int) -> dict:
    """Per run, the best of `repeats` (time of 1 + new tokens) - (time of 1 token): decode alone.

    The rounds interleave the runs, so a slow spell of a shared machine hits them all alike, and
    the minimum is kept, because interference only ever adds time.
    """

    def timed(run: Callable[[int], object], n: int) -> float:
        t = time.perf_counter()
        run(n)
        return time.perf_counter() - t

    for run in runs.values():
        run(2)  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            best[name] = min(best[name], timed(run, 1 + new) - timed(run, 1))
    return best


def ours(llm: LLM, batch: list[list[int]], shape: str) -> Callable[[int], object]:
    def run(n: int) -> object:
        return llm.generate(
            batch, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), shape=shape
        )

    return run


def hf_generate(hf: torch.nn.Module, batch: list[list[int]]) -> Callable[[int], object]:
    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)

    def run(n: int) -> object:
        with torch.inference_mode():
            return hf.generate(  # type: ignore[operator]
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )

    return run


def pick_shapes(llm: LLM) -> list[ShapeSpec]:
    """The full shape and those nearest 75% and 50% of the decoder bytes (depth- and width-wise)."""
    specs = llm.shapes
    full = specs[0]
    chosen = [full]
    for target in (0.75, 0.5):
        by_depth = [s for s in specs if s.shape.width == 1.0]
        by_width = [s for s in specs if s.shape.depth == full.shape.depth]
        for group in (by_depth, by_width):
            best = min(group, key=lambda s: abs(s.weight_fraction - target))
            if best not in chosen:
                chosen.append(best)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--pack", default=None)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="best of this many measurements")
    parser.add_argument("--quick", action="store_true", help="16 new tokens, batch 1, fp32")
    parser.add_argument("--out", default="bench/results/bench_decode.json")
    args = parser.parse_args()
    if args.quick:
        args.dtypes, args.batches, args.new_tokens = "float32", "1", 16
    torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth()
    print(f"threads {args.threads}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    results = []
    for dtype in args.dtypes.split(","):
        llm = LLM(args.model, args.pack, dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=llm.bundle.model.dtype)
        shapes = pick_shapes(llm)
        full_bytes = bytes_per_token(llm.bundle, shapes[0])
        for b in map(int, args.batches.split(",")):
            batch = prompts(llm.tokenizer, b, args.prompt_len)
            runs = {"HF": hf_generate(hf, batch)}
            runs.update({spec.name: ours(llm, batch, spec.name) for spec in shapes})
            seconds = decode_seconds(runs, args.new_tokens, args.repeats)
            hf_tps = b * args.new_tokens / seconds["HF"]
            full_tps = b * args.new_tokens / seconds[shapes[0].name]
            for spec in shapes:
                tps = b * args.new_tokens / seconds[spec.name]
                nbytes = bytes_per_token(llm.bundle, spec)
                row = {
                    "dtype": dtype,
                    "batch": b,
                    "shape": spec.name,
                    "weight_fraction": round(spec.weight_fraction, 4),
                    "bytes_per_token": nbytes,
                    "tok_s": round(tps, 2),
                    "hf_tok_s": round(hf_tps, 2),
                    "vs_hf": round(tps / hf_tps, 3),
                    "limit_fraction": round(tps / b * nbytes / bandwidth, 3) if b == 1 else None,
                    "speedup": round(tps / full_tps, 3),
                    "bytes_speedup": round(full_bytes / nbytes, 3),
                }
                row["speedup_vs_bytes"] = round(row["speedup"] / row["bytes_speedup"], 3)
                results.append(row)
                print(
                    f"{dtype:>9} B={b} {spec.name:<11} {row['weight_fraction']:>6.1%} "
                    f"{tps:7.1f} tok/s  HF {hf_tps:6.1f}  x{row['vs_hf']:.2f} vs HF  "
                    f"speed-up {row['speedup']:.2f} (bytes predict {row['bytes_speedup']:.2f}, "
                    f"{row['speedup_vs_bytes']:.0%})"
                    + (f"  {row['limit_fraction']:.0%} of the byte limit" if b == 1 else "")
                )
        del llm, hf
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpu_flags_bf16": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16", "avx2", "avx512f"}),
        "threads": args.threads,
        "bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "torch": torch.__version__,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
