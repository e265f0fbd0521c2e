"""The native prefill step with its tiled attention at 16 lanes (AVX-512) against the AVX2 tile.

The default model at the full shape: one sequence prefills `--new` tokens after `--cached`
tokens already in the paged cache (a chat turn over its history), through the native decoder
step (`bundle.native.forward`), with `use_avx512_attention` on and off, interleaved, best of
`--rounds` per configuration. The attention's share of the step is what the two differ in.

    python bench/bench_prefill_attention.py [--cached 0,512,1536] [--new 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from elasticserve.engine import kv_cache
from elasticserve.kernels.cpu import build
from elasticserve.model.bundle import load_bundle
from elasticserve.model.device import cpu_model, kernel_flags
from elasticserve.model.step_plan import BlockPool, SeqChunk

BLOCK = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cached", default="0,512,1536", help="tokens already in the cache")
    parser.add_argument("--new", type=int, default=128, help="tokens prefilled in the step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/prefill_attention.json")
    args = parser.parse_args()
    ext = build.load()
    if ext is None or not ext.avx512_attention_active():
        raise SystemExit("needs the native kernels on a CPU with AVX-512 (avx512f/dq/vl)")
    bundle = load_bundle()
    cfg, spec = bundle.config, bundle.full
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {bundle.model.dtype}; flags "
          f"{' '.join(kernel_flags())}")  # fmt: skip
    print(f"{'cached':>7} {'new':>5} {'AVX2 ms':>9} {'AVX-512 ms':>11} {'speed-up':>9}")
    for cached in (int(c) for c in args.cached.split(",")):
        total = cached + args.new
        ids = torch.randint(0, cfg.vocab_size, (total,), generator=g).tolist()
        pool = BlockPool(BLOCK)
        table = pool.table(spec, total)
        cache = kv_cache.allocate(cfg, pool.blocks, BLOCK, torch.float32, torch.device("cpu"))
        for start in range(0, cached, 512):  # the history, in the engine's 512-token steps
            piece = ids[start : min(cached, start + 512)]
            bundle.native.forward([SeqChunk(spec, piece, start, table, "last")], cache, BLOCK)
        step = [SeqChunk(spec, ids[cached:], cached, table, "last")]
        best = {True: float("inf"), False: float("inf")}
        for r in range(args.rounds):
            for wide in (r % 2 == 0, r % 2 == 1):  # the order alternates
                before = ext.use_avx512_attention(wide)
                try:
                    t0 = time.perf_counter()
                    bundle.native.forward(step, cache, BLOCK)
                    best[wide] = min(best[wide], time.perf_counter() - t0)
                finally:
                    ext.use_avx512_attention(before)
        row = {"cached": cached, "new": args.new, "avx2_ms": 1e3 * best[False],
               "avx512_ms": 1e3 * best[True], "speedup": best[False] / best[True]}  # fmt: skip
        rows.append(row)
        print(f"{cached:>7} {args.new:>5} {row['avx2_ms']:>9.1f} {row['avx512_ms']:>11.1f} "
              f"{row['speedup']:>8.2f}x")  # fmt: skip
    meta = {"cpu": cpu_model(), "flags": kernel_flags(), "threads": torch.get_num_threads(),
            "dtype": str(bundle.model.dtype), "rounds": args.rounds}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
