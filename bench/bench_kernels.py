"""Segmented sliced matmul kernels vs torch on the same prefix views, with cold weights (GPU only).

For the elastic linears of SmolLM2-135M and a Llama-3.2-1B-sized layer, at M rows and width r:
the Triton kernel, `F.linear(x, w[:n])` (output prefix) or `x[:, :k] @ wt[:k]` (input prefix),
and the HBM floor (bytes / copy bandwidth measured here). Then a mixed batch of 4 shapes in one
launch vs 4 separate launches vs the widest shape alone. Decode reads weights cold from HBM, so
each op is captured in a CUDA graph that cycles over enough weight copies (> 2x L2) and timed by
graph replays with CUDA events; no L2 flush between calls is needed or used.

    python bench/bench_kernels.py [--quick] [--dtype bfloat16] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kernels.json"
WIDTHS = (1.0, 0.75, 0.5)
MIXED_WIDTHS = (1.0, 0.75, 0.5, 0.5)  # DESIGN.md's mix: full, w0.75, w0.5, half-depth w0.5
MAX_COPY_BYTES = 4 << 30  # rotating weight copies never take more than this


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int


MODELS = {
    "smollm2-135m": Model("smollm2-135m", 576, 1536, 9, 3, 64),
    "llama-3.2-1b": Model("llama-3.2-1b", 2048, 8192, 32, 8, 64),
}


@dataclass(frozen=True)
class Matrix:
    """One elastic linear: `prefix` is the sliced dim, `other` the never-pruned one (hidden)."""

    name: str
    flavour: str  # "out": w [prefix, other], y = x @ w[:n].T ; "in": wt [prefix, other]
    prefix: int
    other: int
    unit: int  # widths are multiples of this (64 channels, or G heads for q/o)

    def width(self, ratio: float) -> int:
        """Prefix kept at `ratio`, rounded to whole units (at least one)."""
        return max(self.unit, round(ratio * self.prefix / self.unit) * self.unit)


def matrices(model: Model) -> list[Matrix]:
    """q and o keep whole GQA groups, gate and down keep 64-channel blocks (up is like gate)."""
    q_dim, group = model.heads * model.head_dim, model.kv_heads * model.head_dim
    return [
        Matrix("q", "out", q_dim, model.hidden, group),
        Matrix("gate", "out", model.intermediate, model.hidden, 64),
        Matrix("o", "in", q_dim, model.hidden, group),
        Matrix("down", "in", model.intermediate, model.hidden, 64),
    ]


def measure_bandwidth(gib: float = 1.0, reps: int = 10) -> float:
    """Device copy bandwidth in bytes/s (read + write of a large buffer)."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    return 2 * src.numel() * src.element_size() / seconds


def copies_for(weight_bytes: int, l2_bytes: int) -> int:
    """Number of weight copies whose total exceeds twice the L2, so every call reads HBM."""
    wanted = math.ceil(2 * l2_bytes / weight_bytes) + 1
    return max(2, min(wanted, MAX_COPY_BYTES // weight_bytes))


def time_cold(op: Callable[[int], object], copies: int, reps: int) -> float:
    """Median µs of one op call, each call of a graph replay on the next weight copy."""
    op(0)  # compile / autotune outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            op(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    del graph
    return statistics.median(times)


def i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def split_rows(rows: int, parts: int) -> list[int]:
    """seg_offsets of `parts` near-equal segments."""
    return [rows * i // parts for i in range(parts + 1)]


@dataclass
class Row:
    model: str
    matrix: str
    flavour: str
    rows: int
    ratio: float
    width: int
    triton_us: float
    torch_us: float
    hbm_us: float


@dataclass
class MixedRow:
    model: str
    matrix: str
    rows: int
    widths: list[int]
    mixed_us: float  # one launch, 4 segments
    separate_us: float  # 4 Triton launches, one per segment
    torch_separate_us: float  # 4 torch ops on prefix views, one per segment
    widest_us: float  # one launch, every row at the widest width
    hbm_us: float  # widest weight prefix + activations, read once


def bench_matrix(
    model: Model, mat: Matrix, rows_list: list[int], dtype: torch.dtype, ctx: dict
) -> tuple[list[Row], list[MixedRow]]:
    """Uniform widths and the 4-shape mix of one matrix at every M."""
    from elasticserve.kernels.sliced_matmul import sliced_matmul_in, sliced_matmul_out

    elem = torch.finfo(dtype).bits // 8
    weight_bytes = mat.prefix * mat.other * elem
    copies = copies_for(weight_bytes, ctx["l2_bytes"])
    weights = torch.randn(copies, mat.prefix, mat.other, device="cuda", dtype=dtype) * 0.02
    bw, reps = ctx["bandwidth"], ctx["reps"]
    rows_out: list[Row] = []
    mixed_out: list[MixedRow] = []

    def hbm_us(width: int, rows: int) -> float:
        # out: read w[:n] [n, other] and x [M, other], write y [M, n]
        # in:  read wt[:k] [k, other] and x[:, :k] [M, k], write y [M, other]
        if mat.flavour == "out":
            moved = width * mat.other + rows * mat.other + rows * width
        else:
            moved = width * mat.other + rows * width + rows * mat.other
        return moved * elem / bw * 1e6

    def triton_op(x: torch.Tensor, offs: list[int], widths: list[int]) -> Callable[[int], object]:
        seg_offsets, seg_w, widest = i32(offs), i32(widths), max(widths)
        if mat.flavour == "out":
            return lambda i: sliced_matmul_out(
                x, weights[i], seg_offsets, seg_w, widest, check=False
            )
        return lambda i: sliced_matmul_in(x, weights[i], seg_offsets, seg_w, widest, check=False)

    def torch_op(x: torch.Tensor, width: int) -> Callable[[int], torch.Tensor]:
        if mat.flavour == "out":
            return lambda i: F.linear(x, weights[i, :width])
        return lambda i: x[:, :width] @ weights[i, :width]

    def chain(ops: Sequence[Callable[[int], object]]) -> Callable[[int], object]:
        return lambda i: [op(i) for op in ops]

    for rows in rows_list:
        # out: x [M, other] ; in: x [M, prefix] (only x[:, :k] is read)
        x = torch.randn(rows, mat.other if mat.flavour == "out" else mat.prefix, device="cuda")
        x = x.to(dtype)
        for ratio in WIDTHS:
            width = mat.width(ratio)
            # Validate once against torch (check=True syncs), then time the unchecked hot path.
            sliced = sliced_matmul_out if mat.flavour == "out" else sliced_matmul_in
            got = sliced(x, weights[0], i32([0, rows]), i32([width]), width).float()
            want = torch_op(x, width)(0).float()
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * scale)
            rows_out.append(
                Row(
                    model.name,
                    mat.name,
                    mat.flavour,
                    rows,
                    ratio,
                    width,
                    time_cold(triton_op(x, [0, rows], [width]), copies, reps),
                    time_cold(torch_op(x, width), copies, reps),
                    hbm_us(width, rows),
                )
            )
        if rows < len(MIXED_WIDTHS):
            continue
        widths = [mat.width(r) for r in MIXED_WIDTHS]
        offs = split_rows(rows, len(widths))
        segments = list(itertools.pairwise(offs))
        separate = [
            triton_op(x[lo:hi], [0, hi - lo], [w])
            for (lo, hi), w in zip(segments, widths, strict=True)
        ]
        torch_sep = [torch_op(x[lo:hi], w) for (lo, hi), w in zip(segments, widths, strict=True)]
        mixed_out.append(
            MixedRow(
                model.name,
                mat.name,
                rows,
                widths,
                time_cold(triton_op(x, offs, widths), copies, reps),
                time_cold(chain(separate), copies, reps),
                time_cold(chain(torch_sep), copies, reps),
                time_cold(triton_op(x, [0, rows], [max(widths)]), copies, reps),
                hbm_us(max(widths), rows),
            )
        )
    return rows_out, mixed_out


def print_tables(rows: list[Row], mixed: list[MixedRow]) -> None:
    """Times in µs and the ratios that matter: Triton/torch, slice/full vs r, mixed/widest."""
    full = {(r.model, r.matrix, r.rows): r.triton_us for r in rows if r.ratio == 1.0}
    print(
        f"{'model':<13} {'mat':<5} {'M':>4} {'r':>5} {'width':>6} {'triton':>8} {'torch':>8} "
        f"{'hbm':>7} {'tri/torch':>9} {'hbm/tri':>8} {'slice/full':>10}"
    )
    for r in rows:
        slice_full = r.triton_us / full[(r.model, r.matrix, r.rows)]
        print(
            f"{r.model:<13} {r.matrix:<5} {r.rows:>4} {r.ratio:>5.2f} {r.width:>6} "
            f"{r.triton_us:>8.2f} {r.torch_us:>8.2f} {r.hbm_us:>7.2f} "
            f"{r.triton_us / r.torch_us:>9.2f} {r.hbm_us / r.triton_us:>8.2f} {slice_full:>10.2f}"
        )
    if not mixed:
        return
    print(
        f"\n{'model':<13} {'mat':<5} {'M':>4} {'mixed':>8} {'4 launch':>8} {'4 torch':>8} "
        f"{'widest':>8} {'hbm':>7} {'mix/wide':>8} {'4L/wide':>8}"
    )
    for m in mixed:
        print(
            f"{m.model:<13} {m.matrix:<5} {m.rows:>4} {m.mixed_us:>8.2f} {m.separate_us:>8.2f} "
            f"{m.torch_separate_us:>8.2f} {m.widest_us:>8.2f} {m.hbm_us:>7.2f} "
            f"{m.mixed_us / m.widest_us:>8.2f} {m.separate_us / m.widest_us:>8.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, M in {1, 64}, 5 reps")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "bench_kernels.py needs a CUDA GPU (Triton kernels, CUDA graphs); none found.",
            file=sys.stderr,
        )
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_kernels.py times compiled kernels: unset TRITON_INTERPRET.", file=sys.stderr)
        return 2
    from tqdm import tqdm

    dtype = getattr(torch, args.dtype)
    models = [MODELS["smollm2-135m"]] if args.quick else list(MODELS.values())
    rows_list = [1, 64] if args.quick else [1, 8, 64, 256]
    props = torch.cuda.get_device_properties(0)
    ctx = {
        "bandwidth": measure_bandwidth(),
        "l2_bytes": getattr(props, "L2_cache_size", 0) or 64 << 20,
        "reps": 5 if args.quick else 20,
    }
    print(f"{props.name}: copy bandwidth {ctx['bandwidth'] / 1e12:.2f} TB/s, L2 {ctx['l2_bytes']}")
    rows: list[Row] = []
    mixed: list[MixedRow] = []
    jobs = [(model, mat) for model in models for mat in matrices(model)]
    for model, mat in tqdm(jobs, desc="matrices"):
        uniform, mix = bench_matrix(model, mat, rows_list, dtype, ctx)
        rows += uniform
        mixed += mix
        torch.cuda.empty_cache()  # drop this matrix's weight copies before the next one
    print_tables(rows, mixed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": props.name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "copy_bandwidth_bytes_per_s": ctx["bandwidth"],
        "l2_bytes": ctx["l2_bytes"],
        "timing": "median over graph replays of us per call, weights rotated over > 2x L2",
        "uniform": [asdict(r) for r in rows],
        "mixed": [asdict(m) for m in mixed],
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
