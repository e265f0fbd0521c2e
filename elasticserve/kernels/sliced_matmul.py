"""Segmented sliced matmul, both prefix flavours, one launch per mixed-shape batch.

Rows of `x` form contiguous segments, each with its own width (`n` output columns for q/gate/up,
`k` input columns for o/down). Segment bounds and widths live in int32 device tensors, so one CUDA
graph serves every mix of shapes. The grid is (row tiles, column tiles) over the whole batch, not
per segment: a row tile reads its weight tile once for all its rows, masks each row to its own
width, and a tile past every row's width does no loads. A mixed step therefore reads about what its
widest rows need (DESIGN.md, "What a mixed step costs"), never the sum over segments.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import utils
from .utils import INTERPRET_CONFIG, MATMUL_CONFIGS, max_combine, row_widths


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
    utils.check_input(x)
    utils.check_weight("w", w, x, 2)
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"need x [T, K] and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    rows, k_dim = x.shape
    n_dim = w.shape[0]
    if not 0 <= max_n <= n_dim:
        raise ValueError(f"max_n={max_n} must lie in [0, N={n_dim}]")
    if bias is not None:
        utils.check_float("bias", bias)
        if bias.shape != (n_dim,) or not bias.is_contiguous() or bias.device != x.device:
            raise ValueError(f"bias must be a contiguous [{n_dim}] tensor on {x.device}")
    segments = utils.check_segment_metadata(
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
        "S_BLOCK": utils.segment_block(segments),
        "DOT_PRECISION": utils.dot_precision(x.dtype),
    }

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(max_n, meta["BLOCK_N"])

    key = ("M_BUCKET", "K", "max_n", "S_BLOCK", "HAS_BIAS")
    utils.launch(
        _sliced_out_kernel, MATMUL_CONFIGS, key, grid, args, rows, x.device, INTERPRET_CONFIG
    )
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
    utils.check_input(x)
    utils.check_weight("wt", wt, x, 2)
    rows = x.shape[0]
    k_dim, n_dim = wt.shape
    if not 0 <= max_k <= min(k_dim, x.shape[1]):
        raise ValueError(f"max_k={max_k} must lie in [0, min(K={k_dim}, x.shape[1]={x.shape[1]})]")
    segments = utils.check_segment_metadata(
        rows, x.device, seg_offsets, {"seg_k": (seg_k, 0, max_k)}, check
    )
    if seg_bias is not None:
        utils.check_float("seg_bias", seg_bias)
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
        "S_BLOCK": utils.segment_block(segments),
        "DOT_PRECISION": utils.dot_precision(x.dtype),
    }

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n_dim, meta["BLOCK_N"])

    key = ("M_BUCKET", "N", "max_k", "S_BLOCK", "HAS_BIAS")
    utils.launch(
        _sliced_in_kernel, MATMUL_CONFIGS, key, grid, args, rows, x.device, INTERPRET_CONFIG
    )
    return y
