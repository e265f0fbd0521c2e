"""Segmented sliced matmul, both prefix flavours, one launch per mixed-shape batch.

Rows of `x` form contiguous segments, each with its own width (`n` output columns for q/gate/up,
`k` input columns for o/down). Segment bounds and widths live in int32 device tensors, so one CUDA
graph serves every mix of shapes. The grid is (row tiles, column tiles) over the whole batch, not
per segment: a row tile reads its weight tile once for all its rows, masks each row to its own
width, and a tile past every row's width does no loads. A mixed step therefore reads about what its
widest rows need (DESIGN.md, "What a mixed step costs"), never the sum over segments.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

# The interpreter (CPU tests) runs every autotune candidate in numpy: use one small fixed config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SEGMENTS = 64  # segments are runs of one shape; a batch holds a handful of shapes


def m_bucket(rows: int) -> tuple[int, str]:
    """(bucket, regime) of a batch of `rows` rows: decode, mixed/chunked or prefill."""
    # The bucket is an autotune key, so a new batch size in a known regime does not re-tune.
    if rows <= 16:
        return 16, "decode"
    if rows <= 128:
        return 128, "mid"
    return 1024, "prefill"


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def gpu_table(tables: dict[str, dict[str, list[triton.Config]]], device: torch.device) -> str:
    """Key of `tables` for this GPU: first key contained in the device name, else "default"."""
    name = _gpu_name(device)
    return next((key for key in tables if key != "default" and key in name), "default")


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
    )


# Candidates per GPU kind and M regime, not measured choices: autotune times them on first use.
# Decode: one 16-row tile, split N finely so enough programs stream the weight, wide K steps.
# Prefill: square-ish 2-D tiles for tl.dot reuse. Fewer stages where shared memory is small.
MATMUL_CONFIGS: dict[str, dict[str, list[triton.Config]]] = {
    "default": {
        "decode": [_cfg(16, bn, bk, 4, 3) for bn in (32, 64) for bk in (64, 128)],
        "mid": [_cfg(bm, 64, 64, 4, 3) for bm in (32, 64)],
        "prefill": [_cfg(64, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 3), _cfg(128, 64, 32, 4, 3)],
    },
    "H100": {
        "decode": [
            _cfg(16, bn, bk, 4, s) for bn in (32, 64, 128) for bk in (64, 128) for s in (4, 5)
        ],
        "mid": [_cfg(bm, bn, 64, 4, 4) for bm in (32, 64) for bn in (64, 128)],
        "prefill": [
            _cfg(64, 128, 64, 4, 4),
            _cfg(128, 64, 64, 4, 4),
            _cfg(128, 128, 64, 8, 4),
            _cfg(128, 256, 64, 8, 3),
        ],
    },
    "A100": {
        "decode": [
            _cfg(16, bn, bk, 4, s) for bn in (32, 64, 128) for bk in (64, 128) for s in (3, 4)
        ],
        "mid": [_cfg(bm, bn, 64, 4, 3) for bm in (32, 64) for bn in (64, 128)],
        "prefill": [_cfg(64, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4), _cfg(128, 128, 32, 8, 3)],
    },
}
MATMUL_CONFIGS["H200"] = MATMUL_CONFIGS["H100"]
MATMUL_CONFIGS["H800"] = MATMUL_CONFIGS["H100"]
MATMUL_CONFIGS["A800"] = MATMUL_CONFIGS["A100"]
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def check_segment_metadata(
    rows: int,
    device: torch.device,
    seg_offsets: Tensor,
    per_segment: dict[str, tuple[Tensor, int, int]],
    check: bool = True,
) -> int:
    """Validate segment metadata and return the segment count S.

    Always checks dtype (int32), device, rank and lengths (no host sync). With `check`, also copies
    the values to the host once (a GPU sync; pass check=False inside CUDA graphs) and checks that
    seg_offsets runs 0..rows non-decreasing and each per-segment value lies in its [lo, hi].
    """
    tensors = {"seg_offsets": seg_offsets, **{k: v[0] for k, v in per_segment.items()}}
    for name, t in tensors.items():
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    segments = seg_offsets.numel() - 1
    if segments < 1:
        raise ValueError(f"seg_offsets needs at least 2 entries [0, ..., T], got {segments + 1}")
    for name, (t, _, _) in per_segment.items():
        if t.numel() != segments:
            raise ValueError(
                f"{name} has {t.numel()} entries, expected one per segment ({segments})"
            )
    if not check:
        return segments
    host = [int(v) for v in torch.cat(list(tensors.values())).tolist()]
    offs = host[: segments + 1]
    if offs[0] != 0 or offs[-1] != rows:
        raise ValueError(f"seg_offsets must run from 0 to T={rows}, got {offs[0]}..{offs[-1]}")
    for i in range(segments):
        if offs[i + 1] < offs[i]:
            raise ValueError(
                f"seg_offsets must be non-decreasing: seg_offsets[{i}]={offs[i]} > "
                f"seg_offsets[{i + 1}]={offs[i + 1]}"
            )
    pos = segments + 1
    for name, (_, lo, hi) in per_segment.items():
        for i, v in enumerate(host[pos : pos + segments]):
            if not lo <= v <= hi:
                raise ValueError(f"{name}[{i}]={v} is outside [{lo}, {hi}]")
        pos += segments
    return segments


def check_runnable(x: Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"Triton kernels need CUDA tensors (x is on {x.device}); on CPU use the torch ops "
            "on prefix views, or set TRITON_INTERPRET=1 for tests"
        )


def check_float(
    name: str, t: Tensor, dtype: torch.dtype | None = None, dtype_of: str = "x"
) -> None:
    """`t` is fp16/bf16/fp32 and, when given, exactly `dtype` (the dtype of `dtype_of`)."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have {dtype_of}'s dtype {dtype}, got {t.dtype}")


def check_input(x: Tensor, name: str = "x") -> None:
    """x is a 2-D float activation, contiguous along features, on a device Triton can run on."""
    check_runnable(x)
    check_float(name, x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"{name} must be [T, features] and contiguous along features, got shape "
            f"{tuple(x.shape)} strides {x.stride()}"
        )


def check_weight(name: str, w: Tensor, x: Tensor, ndim: int, x_name: str = "x") -> None:
    """A weight has x's dtype and device, `ndim` dims and row-major contiguous storage."""
    check_float(name, w, x.dtype, x_name)
    if w.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {w.stride()}")
    if w.device != x.device:
        raise ValueError(f"{name} is on {w.device}, {x_name} is on {x.device}")


def segment_block(segments: int) -> int:
    """Segment-table width of the row-tile kernels, which hold a [BLOCK_M, S] mask in registers."""
    if segments > MAX_SEGMENTS:
        raise ValueError(
            f"{segments} segments: at most {MAX_SEGMENTS} (one per shape in a batch) are supported"
        )
    return triton.next_power_of_2(segments)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32) so fp32 results match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


# One autotuner per (kernel, GPU table, M regime), each timing only that regime's candidates.
_TUNERS: dict[tuple[int, str, str], Callable] = {}


def launch(
    kernel: Callable,
    tables: dict[str, dict[str, list[triton.Config]]],
    key: tuple[str, ...],
    grid: Callable[[dict], tuple[int, ...]],
    args: dict[str, object],
    rows: int,
    device: torch.device,
    interpret_config: dict[str, int],
    **autotune_kwargs: object,
) -> None:
    """Launch `kernel` with the tuned config of this GPU and M regime (fixed if interpreted)."""
    bucket, regime = m_bucket(rows)
    args = {**args, "M_BUCKET": bucket}
    if INTERPRET:
        kernel[grid(interpret_config)](**args, **interpret_config)  # type: ignore[index]
        return
    table = gpu_table(tables, device)
    tuner = _TUNERS.get((id(kernel), table, regime))
    if tuner is None:
        configs = tables[table][regime]
        tuner = triton.autotune(configs=configs, key=list(key), **autotune_kwargs)(kernel)
        _TUNERS[(id(kernel), table, regime)] = tuner
    tuner[grid](**args)  # type: ignore[index]


# tl.reduce with local combiners and tl.full, not tl.sum/tl.max/tl.zeros: those library helpers are
# jitted when triton.language is first imported, so they fail under TRITON_INTERPRET=1 whenever
# something (transformers does) imported triton before the variable was set. Same code on GPU.
@triton.jit
def add_combine(a, b):
    return a + b


@triton.jit
def max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def row_widths(off_ptr, seg_w_ptr, rows, S, max_w, S_BLOCK: tl.constexpr):
    """Width and segment index of each of `rows` (width 0 for a row in no segment)."""
    # One vector load of all segment bounds beats S dependent scalar loads per program.
    s = tl.arange(0, S_BLOCK)
    valid = s < S
    lo = tl.load(off_ptr + s, mask=valid, other=0)
    hi = tl.load(off_ptr + s + 1, mask=valid, other=0)
    width = tl.maximum(tl.load(seg_w_ptr + s, mask=valid, other=0), 0)
    inside = (rows[:, None] >= lo[None, :]) & (rows[:, None] < hi[None, :])  # [BM, S_BLOCK]
    row_w = tl.reduce(tl.where(inside, width[None, :], 0), 1, add_combine)
    row_seg = tl.reduce(tl.where(inside, s[None, :], 0), 1, add_combine)
    # Clamped: unchecked metadata (check=False, e.g. overlapping segments) may give wrong rows but
    # never reads out of bounds.
    return tl.minimum(row_w, max_w), tl.minimum(row_seg, S - 1)


@triton.jit
def _sliced_out_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    y_ptr,
    off_ptr,
    seg_n_ptr,
    T,
    K,
    max_n,
    S,
    M_BUCKET,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Row tiles vary fastest: programs that share a weight tile run together and hit L2.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    row_n, _ = row_widths(off_ptr, seg_n_ptr, rows, S, max_n, S_BLOCK)
    tile_n = tl.reduce(row_n, 0, max_combine)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    y_mask = row_ok[:, None] & (cols[None, :] < max_n)
    if pid_n * BLOCK_N >= tile_n:
        # No row of this tile keeps these columns: write the promised zeros, read no weights.
        tl.store(y_ptrs, tl.full((BLOCK_M, BLOCK_N), 0, y_ptr.dtype.element_ty), mask=y_mask)
        return
    col_ok = cols < tile_n
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]  # [BM, BK]
    w_ptrs = w_ptr + cols[None, :] * stride_wn + ks[:, None]  # [BK, BN] = w[cols].T
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # A row narrower than the tile's widest row gets exact zeros past its own width.
    acc = tl.where(cols[None, :] < row_n[:, None], acc, 0.0)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _sliced_in_kernel(
    x_ptr,
    wt_ptr,
    seg_bias_ptr,
    y_ptr,
    off_ptr,
    seg_k_ptr,
    T,
    N,
    max_k,
    S,
    M_BUCKET,
    stride_xm,
    stride_wk,
    stride_ym,
    stride_bs,
    HAS_BIAS: tl.constexpr,
    S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < T
    col_ok = cols < N
    row_k, row_seg = row_widths(off_ptr, seg_k_ptr, rows, S, max_k, S_BLOCK)
    # The K loop stops at the tile's widest row: weight rows no row of the tile keeps are not read.
    tile_k = tl.reduce(row_k, 0, max_combine)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]  # [BM, BK]
    w_ptrs = wt_ptr + ks[:, None] * stride_wk + cols[None, :]  # [BK, BN]
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, tile_k, BLOCK_K):
        # x past a row's own k_s is never read (it may be stale); masked to 0 it adds nothing.
        a = tl.load(x_ptrs, mask=(ks[None, :] < row_k[:, None] - k0) & row_ok[:, None], other=0.0)
        b = tl.load(w_ptrs, mask=(ks[:, None] < tile_k - k0) & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias_ptrs = seg_bias_ptr + row_seg[:, None] * stride_bs + cols[None, :]
        acc += tl.load(bias_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def sliced_matmul_out(
    x: Tensor,
    w: Tensor,
    seg_offsets: Tensor,
    seg_n: Tensor,
    max_n: int,
    bias: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Output-prefix matmul (q, gate, up): y[s, :n_s] = x[s] @ w[:n_s].T (+ bias[:n_s]), rest 0."""
    # x [T, K] ; w [N, K] ; bias [N] ; seg_offsets [S+1] ; seg_n [S] ; y [T, max_n]
    check_input(x)
    check_weight("w", w, x, 2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"need x [T, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    rows, k_dim = x.shape
    n_dim = w.shape[0]
    if not 0 <= max_n <= n_dim:
        raise ValueError(f"max_n={max_n} must lie in [0, N={n_dim}]")
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (n_dim,) or not bias.is_contiguous() or bias.device != x.device:
            raise ValueError(f"bias must be a contiguous [{n_dim}] tensor on {x.device}")
    segments = check_segment_metadata(
        rows, x.device, seg_offsets, {"seg_n": (seg_n, 0, max_n)}, check
    )
    y = torch.empty(rows, max_n, dtype=x.dtype, device=x.device)
    if rows == 0 or max_n == 0:
        return y
    args = {
        "x_ptr": x,
        "w_ptr": w,
        "bias_ptr": w if bias is None else bias,  # never read without HAS_BIAS
        "y_ptr": y,
        "off_ptr": seg_offsets,
        "seg_n_ptr": seg_n,
        "T": rows,
        "K": k_dim,
        "max_n": max_n,
        "S": segments,
        "stride_xm": x.stride(0),
        "stride_wn": w.stride(0),
        "stride_ym": y.stride(0),
        "HAS_BIAS": bias is not None,
        "S_BLOCK": segment_block(segments),
        "DOT_PRECISION": dot_precision(x.dtype),
    }

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(max_n, meta["BLOCK_N"])

    key = ("M_BUCKET", "K", "max_n", "S_BLOCK", "HAS_BIAS")
    launch(_sliced_out_kernel, MATMUL_CONFIGS, key, grid, args, rows, x.device, INTERPRET_CONFIG)
    return y


def sliced_matmul_in(
    x: Tensor,
    wt: Tensor,
    seg_offsets: Tensor,
    seg_k: Tensor,
    max_k: int,
    seg_bias: Tensor | None = None,
    check: bool = True,
) -> Tensor:
    """Input-prefix matmul (o, down): y[s] = x[s, :k_s] @ wt[:k_s] (+ seg_bias[s])."""
    # x [T, >= max_k] ; wt [K, N] ; seg_bias [S, N] ; seg_offsets [S+1] ; seg_k [S] ; y [T, N]
    check_input(x)
    check_weight("wt", wt, x, 2)
    rows = x.shape[0]
    k_dim, n_dim = wt.shape
    if not 0 <= max_k <= min(k_dim, x.shape[1]):
        raise ValueError(f"max_k={max_k} must lie in [0, min(K={k_dim}, x.shape[1]={x.shape[1]})]")
    segments = check_segment_metadata(
        rows, x.device, seg_offsets, {"seg_k": (seg_k, 0, max_k)}, check
    )
    if seg_bias is not None:
        check_float("seg_bias", seg_bias)
        if seg_bias.shape != (segments, n_dim) or seg_bias.stride(1) != 1:
            raise ValueError(
                f"seg_bias must be [S={segments}, N={n_dim}] contiguous along N, "
                f"got {tuple(seg_bias.shape)}"
            )
        if seg_bias.device != x.device:
            raise ValueError(f"seg_bias is on {seg_bias.device}, x is on {x.device}")
    y = torch.empty(rows, n_dim, dtype=x.dtype, device=x.device)
    if rows == 0 or n_dim == 0:
        return y
    args = {
        "x_ptr": x,
        "wt_ptr": wt,
        "seg_bias_ptr": wt if seg_bias is None else seg_bias,  # never read without HAS_BIAS
        "y_ptr": y,
        "off_ptr": seg_offsets,
        "seg_k_ptr": seg_k,
        "T": rows,
        "N": n_dim,
        "max_k": max_k,
        "S": segments,
        "stride_xm": x.stride(0),
        "stride_wk": wt.stride(0),
        "stride_ym": y.stride(0),
        "stride_bs": 0 if seg_bias is None else seg_bias.stride(0),
        "HAS_BIAS": seg_bias is not None,
        "S_BLOCK": segment_block(segments),
        "DOT_PRECISION": dot_precision(x.dtype),
    }

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n_dim, meta["BLOCK_N"])

    key = ("M_BUCKET", "N", "max_k", "S_BLOCK", "HAS_BIAS")
    launch(_sliced_in_kernel, MATMUL_CONFIGS, key, grid, args, rows, x.device, INTERPRET_CONFIG)
    return y
