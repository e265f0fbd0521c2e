"""What reusing a prefix's K/V across shapes would cost: KL of the next-token distributions.

The prefix cache reuses a block only for the shape that computed it (exact). This measures the
approximation the other rule would make: shape B continues a text over the prefix K/V that shape
A computed (for every layer B keeps; a pair where B keeps a layer A skipped cannot reuse at all),
against B prefilling the same text itself. Per pair, over held-out windows (persuasion.txt) of a
`--prefix`-token prefix (whole cache blocks, as a cache hit is) and a `--continuation`:
  KL(B exact || B on A's prefix), mean over the continuation's positions, in nats;
  top-1 agreement of the two;
and for scale, KL(B exact || A exact): what answering with A instead of B costs outright.
Runs the native step, the path that serves (quantized shapes only run there). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F

from elasticserve.model.bundle import load_bundle
from elasticserve.model.device import cpu_model, kernel_flags
from elasticserve.model.step_plan import BlockPool, SeqChunk

CORPUS = Path(__file__).resolve().parents[2] / "shared/corpus/austen/persuasion.txt"
BLOCK = 16
SHAPES = "full,full-q4,d30-w0.875,d30-w0.75,d30-w0.5,d27-w1.0,d24-w1.0,d24-w0.75-q4"


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Per row KL(p || q) in nats."""
    p = F.log_softmax(p_logits.double(), -1)
    q = F.log_softmax(q_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


@torch.inference_mode()
def measure_window(bundle, specs, ids: list[int], prefix: int) -> dict:
    """One window: every shape's exact logits over the continuation, then every pair's reuse."""
    native, cfg = bundle.native, bundle.config
    pool = BlockPool(BLOCK)
    exact_chunks = [
        SeqChunk(s, ids, block_table=pool.table(s, len(ids)), logits="all") for s in specs
    ]
    cont = len(ids) - prefix
    pairs = [
        (a, b)
        for a, b in product(range(len(specs)), repeat=2)
        if set(specs[b].layers) <= set(specs[a].layers)
    ]
    reuse_chunks = []
    for a, b in pairs:
        tables_a = dict(zip(specs[a].layers, exact_chunks[a].block_table, strict=True))
        fresh = pool.table(specs[b], cont)  # the continuation's own blocks
        table = [tables_a[layer][: prefix // BLOCK] for layer in specs[b].layers]
        table = [t + own for t, own in zip(table, fresh, strict=True)]
        reuse_chunks.append(
            SeqChunk(specs[b], ids[prefix:], num_computed=prefix, block_table=table, logits="all")
        )
    cache = torch.zeros(pool.blocks * BLOCK, 2, cfg.num_kv_heads, cfg.head_dim)
    logits, slices = native.forward(exact_chunks, cache, BLOCK)
    exact = [logits[s][prefix:] for s in slices]  # [cont, V] positions prefix .. end-1
    logits, slices = native.forward(reuse_chunks, cache, BLOCK)
    out: dict = {}
    for (a, b), rows in zip(pairs, slices, strict=True):
        approx = logits[rows]
        out[(a, b)] = {
            "kl_reuse": kl(exact[b], approx).mean().item(),
            "top1_reuse": (exact[b].argmax(-1) == approx.argmax(-1)).double().mean().item(),
            "kl_shape": kl(exact[b], exact[a]).mean().item(),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--precisions", default="q4")
    parser.add_argument("--prefix", type=int, default=256, help="tokens; a multiple of 16")
    parser.add_argument("--continuation", type=int, default=64)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default="bench/results/prefix_cross_shape.json")
    args = parser.parse_args()
    if args.prefix % BLOCK:
        parser.error(f"--prefix must be a multiple of {BLOCK} (a cache hit is whole blocks)")
    bundle = load_bundle(precisions=args.precisions)
    if bundle.native is None:
        raise SystemExit("the native CPU step is not available here; it is what serves")
    specs = [bundle.spec(name) for name in args.shapes.split(",")]
    text = bundle.tokenizer(CORPUS.read_text())["input_ids"]
    size = args.prefix + args.continuation
    windows = [text[i * size : (i + 1) * size] for i in range(args.windows)]
    sums: dict = {}
    for n, ids in enumerate(windows):
        for pair, row in measure_window(bundle, specs, ids, args.prefix).items():
            acc = sums.setdefault(pair, {k: 0.0 for k in row})
            for k, v in row.items():
                acc[k] += v / len(windows)
        print(f"window {n + 1}/{len(windows)}", flush=True)
    names = [s.name for s in specs]
    print(f"CPU: {cpu_model()}, flags: {' '.join(kernel_flags())}")
    print(f"{len(windows)} windows of persuasion.txt, {args.prefix} prefix + {args.continuation}")
    print(f"{'A cached':24} {'B reuses':16} {'KL reuse':>9} {'top-1':>6} {'KL B||A':>8}")
    rows = []
    for (a, b), r in sorted(sums.items()):
        rows.append({"cached_by": names[a], "reused_by": names[b], **r})
        print(
            f"{names[a]:24} {names[b]:16} {r['kl_reuse']:9.4f} {r['top1_reuse']:6.3f} "
            f"{r['kl_shape']:8.4f}"
        )
    unusable = [
        (names[a], names[b]) for a, b in product(range(len(specs)), repeat=2) if (a, b) not in sums
    ]
    print(f"pairs that cannot reuse (B keeps a layer A skipped): {len(unusable)}")
    result = {
        "args": vars(args),
        "cpu": cpu_model(),
        "cpu_flags": kernel_flags(),
        "pairs": rows,
        "unusable": unusable,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
