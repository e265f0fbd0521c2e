"""Decode throughput per shape vs HF generate, and against the weight-streaming limit.

For each dtype and batch size: decode tokens/s of elasticserve at a few shapes and of HF
`generate` on the same weights, threads and prompts, in the same run. Decode time excludes the
prefill: (time for 1 + N new tokens) - (time for 1 new token), the same way for both. Batch-1
decode reads every kept weight once per token, so `bytes per token / measured bandwidth` is its
floor; the table gives each shape's fraction of that limit and its speed-up against what its
bytes predict.

    python bench/bench_decode.py [--dtypes float32,bfloat16] [--kernels native,torch]
                                 [--batches 1,8] [--quick]

`--kernels native-avx2` is the native step with its AMX bf16 tiles turned off (the AVX2 kernels),
so an AMX CPU measures both in the same rounds; `native-nodnn` keeps a prefill's dense linears on
the native kernels instead of oneDNN (the prefill column shows what oneDNN gains).

Each dtype runs on both CPU paths (the native kernels and torch ops) in the same rounds; a batch
at least as large as the picked shapes also runs mixed (one shape per row, round robin), reported
as its time against the widest shape's batch. The read bandwidth is the best of probes taken
before and after every batch size, torch's reduction and the native one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from elasticserve import LLM, SamplingParams
from elasticserve.engine.llm_engine import EngineConfig
from elasticserve.model.bundle import ModelBundle
from elasticserve.model.device import cpu_model, kernel_flags
from elasticserve.model.shapes import ShapeSpec

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "austen"


def measure_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Read bandwidth (bytes/s): the best of a torch reduction and the native read probe (the
    kernels' own loads, where they build), over a buffer far larger than the caches."""
    from elasticserve.kernels.cpu import load

    ext = load()
    x = torch.ones(mib * 2**18)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
        if ext is not None:
            t = time.perf_counter()
            ext.read(x, torch.get_num_threads())
            best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def bytes_per_token(bundle: ModelBundle, spec: ShapeSpec) -> int:
    """Weight bytes one decode step reads: kept layers' linears + norms + the LM head."""
    norms = (2 * len(spec.layers) + 1) * bundle.config.hidden_size
    # the native path keeps its norms in fp32
    elem = 4 if bundle.native is not None else bundle.model.dtype.itemsize
    return bundle.weight_bytes(spec) + norms * elem


def prompts(tokenizer, batch: int, length: int) -> list[list[int]]:
    """`batch` different prompts of exactly `length` tokens from the corpus (or filler text)."""
    text = (CORPUS / "emma.txt").read_text()[20000:80000] if CORPUS.exists() else "word " * 20000
    ids = tokenizer(text)["input_ids"]
    return [ids[i * length : (i + 1) * length] for i in range(batch)]


def decode_seconds(
    runs: dict[str, Callable[[int], object]], new: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Per run, the best of `repeats` (time of 1 + new tokens) - (time of 1 token), decode
    alone, and the best time of 1 token (the prompt's prefill and one step).

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
    first = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            one = timed(run, 1)
            best[name] = min(best[name], timed(run, 1 + new) - one)
            first[name] = min(first[name], one)
    return best, first


def ours(
    llm: LLM, batch: list[list[int]], shape: str | list[str], amx: bool = True, dnn: bool = True
) -> Callable[[int], object]:
    from elasticserve.kernels.cpu import load

    ext = load()

    def run(n: int) -> object:
        before = ext.use_amx(amx) if ext is not None else None
        before_dnn = ext.use_onednn(dnn) if ext is not None else None
        try:
            return llm.generate(
                batch, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), shape=shape
            )
        finally:
            if ext is not None:
                ext.use_amx(before)
                ext.use_onednn(before_dnn)

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
    parser.add_argument("--kernels", default="native,torch", help="CPU paths to compare")
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
    results = []
    bandwidths = [measure_bandwidth()]
    for dtype in args.dtypes.split(","):
        llms = {
            k: LLM(
                args.model,
                args.pack,
                dtype=dtype,
                cpu_kernels=k.split("-")[0],
                # every repeat prefills the whole prompt (a cache hit would time its last block)
                engine_config=EngineConfig(enable_prefix_caching=False),
            )
            for k in args.kernels.split(",")
        }
        first = next(iter(llms.values()))
        hf = AutoModelForCausalLM.from_pretrained(first.model_dir, dtype=first.bundle.model.dtype)
        shapes = pick_shapes(first)
        mixed = [
            shapes[i % len(shapes)].name for i in range(max(map(int, args.batches.split(","))))
        ]
        for b in map(int, args.batches.split(",")):
            batch = prompts(first.tokenizer, b, args.prompt_len)
            runs = {"HF": hf_generate(hf, batch)}
            for kernels, llm in llms.items():
                amx, dnn = not kernels.endswith("-avx2"), not kernels.endswith("-nodnn")
                runs.update(
                    {
                        f"{kernels} {spec.name}": ours(llm, batch, spec.name, amx, dnn)
                        for spec in shapes
                    }
                )
                if b >= len(shapes):  # a mixed batch: one of each picked shape, round robin
                    runs[f"{kernels} mixed"] = ours(llm, batch, mixed[:b], amx, dnn)
            seconds, prefill = decode_seconds(runs, args.new_tokens, args.repeats)
            bandwidths.append(measure_bandwidth())
            bandwidth = max(bandwidths)
            hf_tps = b * args.new_tokens / seconds["HF"]
            for kernels, llm in llms.items():
                full = shapes[0].name
                full_tps = b * args.new_tokens / seconds[f"{kernels} {full}"]
                full_bytes = bytes_per_token(llm.bundle, shapes[0])
                names = [s.name for s in shapes] + (["mixed"] if b >= len(shapes) else [])
                for name in names:
                    tps = b * args.new_tokens / seconds[f"{kernels} {name}"]
                    spec = llm.bundle.spec(name) if name != "mixed" else shapes[0]
                    nbytes = bytes_per_token(llm.bundle, spec)
                    row = {
                        "dtype": dtype,
                        "kernels": kernels,
                        "batch": b,
                        "shape": name,
                        "weight_fraction": round(spec.weight_fraction, 4),
                        "bytes_per_token": nbytes,
                        "tok_s": round(tps, 2),
                        "hf_tok_s": round(hf_tps, 2),
                        "vs_hf": round(tps / hf_tps, 3),
                        "limit_fraction": (
                            round(tps / b * nbytes / bandwidth, 3) if b == 1 else None
                        ),
                        "speedup": round(tps / full_tps, 3),
                        "prefill_ms": round(prefill[f"{kernels} {name}"] * 1e3, 1),
                        "hf_prefill_ms": round(prefill["HF"] * 1e3, 1),
                        "bytes_speedup": round(full_bytes / nbytes, 3),
                    }
                    row["speedup_vs_bytes"] = round(row["speedup"] / row["bytes_speedup"], 3)
                    results.append(row)
                    what = (
                        "mixed vs widest"
                        if name == "mixed"
                        else f"speed-up {row['speedup']:.2f} (bytes predict "
                        f"{row['bytes_speedup']:.2f}, {row['speedup_vs_bytes']:.0%})"
                    )
                    print(
                        f"{dtype:>9} {kernels:>11} B={b} {name:<11} {row['weight_fraction']:>6.1%} "
                        f"{tps:7.1f} tok/s  HF {hf_tps:6.1f}  x{row['vs_hf']:.2f} vs HF  "
                        + (
                            f"{1 / row['speedup']:.2f}x the widest's time"
                            if name == "mixed"
                            else what
                        )
                        + (f"  {row['limit_fraction']:.0%} of the byte limit" if b == 1 else "")
                        + f"  prefill+1 {row['prefill_ms']:.0f} ms (HF {row['hf_prefill_ms']:.0f})"
                    )
        del llms, first, hf
    meta = {
        "machine": cpu_model(),
        "cpu_flags": kernel_flags(),
        "threads": args.threads,
        "bandwidth_gb_s": round(max(bandwidths) / 1e9, 2),
        "bandwidth_samples_gb_s": [round(b / 1e9, 2) for b in bandwidths],
        "torch": torch.__version__,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    best = max(bandwidths) / 1e9
    print(f"read bandwidth {best:.1f} GB/s (best of {len(bandwidths)} probes); wrote {args.out}")


if __name__ == "__main__":
    main()
