"""The native q8/q4 band linear against the bf16 one on the same matrix, streamed from DRAM.

A decode step reads every weight once, from memory: so does this benchmark, cycling through
`--copies` different copies of one decoder-sized matrix (more bytes than the last-level cache:
the Xeon VM reports 300 MB of L3, which the old default of 60 copies, 40-106 MB, fitted in)
at `--batches` rows (batch 1 by default). Configurations are interleaved in every round; best
of the rounds.

    python bench/bench_qlinear.py --out bench/results/bench_qlinear.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from elasticserve.kernels.cpu import load
from elasticserve.model.device import cpu_model, kernel_flags
from elasticserve.model.quant import quantize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1536, help="N (gate/up: 1536)")
    parser.add_argument("--cols", type=int, default=576, help="K (hidden: 576)")
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batches", default="1", help="x rows, e.g. 1,8")
    parser.add_argument("--out", default="bench/results/bench_qlinear.json")
    args = parser.parse_args()
    ext = load()
    if ext is None:
        raise SystemExit("the native CPU kernels do not build here")
    n, k = args.rows, args.cols
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(n, k, generator=g) for _ in range(4)]
    quant = [quantize(base[i % 4]) for i in range(args.copies)]
    dense = [base[i % 4].bfloat16().clone() for i in range(args.copies)]

    def run_quant(q8: bool, threads: int, batch: int, amx: bool = True) -> Callable[[], None]:
        x, y = torch.randn(batch, k, generator=g), torch.zeros(batch, n)
        bands = torch.tensor([[batch, n]], dtype=torch.int32)

        def f() -> None:
            ext.use_amx(amx)  # the AMX int8 tiles (steps of 4+ rows) or the VNNI code
            for q in quant:
                ext.qlinear(q.hi, q.lo, q.scale, q.minimum, x, bands, 0, y, q8, threads=threads)

        return f

    def run_dense(threads: int, batch: int) -> Callable[[], None]:
        x, y = torch.randn(batch, k, generator=g), torch.zeros(batch, n)
        bands = torch.tensor([[batch, n]], dtype=torch.int32)

        def f() -> None:
            ext.use_amx(True)  # bf16 on AMX tiles where the CPU has them
            for w in dense:
                ext.linear(w, x, bands, 0, y, threads=threads)

        return f

    configs: dict[tuple[str, int, int], tuple[Callable[[], None], int]] = {}
    for batch in map(int, args.batches.split(",")):
        for threads in map(int, args.threads.split(",")):
            configs[("bf16", threads, batch)] = (run_dense(threads, batch), n * k * 2)
            q8, q4 = run_quant(True, threads, batch), run_quant(False, threads, batch)
            configs[("q8", threads, batch)] = (q8, quant[0].nbytes("q8"))
            configs[("q4", threads, batch)] = (q4, quant[0].nbytes("q4"))
            if ext.amx_int8_supported():  # the same kernels without the int8 tiles
                q8, q4 = (run_quant(p == "q8", threads, batch, amx=False) for p in ("q8", "q4"))
                configs[("q8-vnni", threads, batch)] = (q8, quant[0].nbytes("q8"))
                configs[("q4-vnni", threads, batch)] = (q4, quant[0].nbytes("q4"))
    best = {key: float("inf") for key in configs}
    for _ in range(args.rounds):
        for key, (f, _) in configs.items():
            start = time.perf_counter()
            f()
            best[key] = min(best[key], (time.perf_counter() - start) / args.copies)
    rows = []
    for (kind, threads, batch), (_, nbytes) in configs.items():
        seconds = best[(kind, threads, batch)]
        row = {
            "kind": kind,
            "threads": threads,
            "batch": batch,
            "us_per_matrix": round(seconds * 1e6, 1),
            "gb_s": round(nbytes / seconds / 1e9, 2),
            "speedup_vs_bf16": round(best[("bf16", threads, batch)] / seconds, 3),
        }
        rows.append(row)
        print(
            f"{kind:>7} threads={threads} batch={batch:>2} {row['us_per_matrix']:7.1f} us/matrix "
            f"{row['gb_s']:6.2f} GB/s  x{row['speedup_vs_bf16']:.2f} vs bf16"
        )
    meta = {
        "machine": cpu_model(),
        "cpu_flags": kernel_flags(),
        "vnni_kernels": bool(ext.vnni_supported()),
        "amx_kernels": bool(ext.amx_supported()),
        "torch": torch.__version__,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
