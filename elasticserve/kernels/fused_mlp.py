"""Fused gate/up output-prefix matmul + SiLU-mul: the first half of an elastic MLP in one launch.

h[s, :n_s] = silu(x[s] @ w_gate[:n_s].T) * (x[s] @ w_up[:n_s].T), zeros past n_s, so `h` feeds
`sliced_matmul_in(h, down_t, seg_offsets, seg_n, max_n)` directly. Against two sliced matmuls and
an elementwise op it saves two launches and the [T, n] gate/up round trips through memory; each x
tile is loaded once for both weights. Tiling and segment handling are those of sliced_matmul_out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import utils
from .utils import INTERPRET_CONFIG, MATMUL_CONFIGS, max_combine, row_widths


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,
    wg_ptr,
    wu_ptr,
    h_ptr,
    off_ptr,
    seg_n_ptr,
    T,
    K,
    max_n,
    S,
    M_BUCKET,
    stride_xm,
    stride_wn,
    stride_hm,
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
    row_n, _ = row_widths(off_ptr, seg_n_ptr, rows, S, max_n, S_BLOCK)
    tile_n = tl.reduce(row_n, 0, max_combine)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :]
    h_mask = row_ok[:, None] & (cols[None, :] < max_n)
    if pid_n * BLOCK_N >= tile_n:
        tl.store(h_ptrs, tl.full((BLOCK_M, BLOCK_N), 0, h_ptr.dtype.element_ty), mask=h_mask)
        return
    col_ok = cols < tile_n
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :]  # [BM, BK]
    w_offs = cols[None, :] * stride_wn + ks[:, None]  # [BK, BN]: rows `cols` of w, transposed
    gate = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    up = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = tl.load(wg_ptr + w_offs, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptr + w_offs, mask=w_mask, other=0.0)
        gate = tl.dot(a, wg, gate, input_precision=DOT_PRECISION)
        up = tl.dot(a, wu, up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_offs += BLOCK_K
    # silu(g) = g * sigmoid(g), written with tl.exp (a builtin) for the interpreter's sake.
    h = gate / (1.0 + tl.exp(-gate)) * up
    h = tl.where(cols[None, :] < row_n[:, None], h, 0.0)
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=h_mask)


def fused_gate_up_silu(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    seg_offsets: Tensor,
    seg_n: Tensor,
    max_n: int,
    check: bool = True,
) -> Tensor:
    """h[s, :n_s] = silu(x[s] @ w_gate[:n_s].T) * (x[s] @ w_up[:n_s].T); h[s, n_s:] = 0."""
    # x [T, H] ; w_gate, w_up [I, H] ; seg_offsets [S+1] ; seg_n [S] ; h [T, max_n]
    utils.check_input(x)
    utils.check_weight("w_gate", w_gate, x, 2)
    utils.check_weight("w_up", w_up, x, 2)
    if w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[1]:
        raise ValueError(
            f"need x [T, H] and w_gate, w_up [I, H], got {tuple(x.shape)}, "
            f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}"
        )
    rows, k_dim = x.shape
    if not 0 <= max_n <= w_gate.shape[0]:
        raise ValueError(f"max_n={max_n} must lie in [0, I={w_gate.shape[0]}]")
    segments = utils.check_segment_metadata(
        rows, x.device, seg_offsets, {"seg_n": (seg_n, 0, max_n)}, check
    )
    h = torch.empty(rows, max_n, dtype=x.dtype, device=x.device)
    if rows == 0 or max_n == 0:
        return h
    args = {
        "x_ptr": x,
        "wg_ptr": w_gate,
        "wu_ptr": w_up,
        "h_ptr": h,
        "off_ptr": seg_offsets,
        "seg_n_ptr": seg_n,
        "T": rows,
        "K": k_dim,
        "max_n": max_n,
        "S": segments,
        "stride_xm": x.stride(0),
        "stride_wn": w_gate.stride(0),
        "stride_hm": h.stride(0),
        "S_BLOCK": utils.segment_block(segments),
        "DOT_PRECISION": utils.dot_precision(x.dtype),
    }

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(max_n, meta["BLOCK_N"])

    key = ("M_BUCKET", "K", "max_n", "S_BLOCK")
    utils.launch(
        _gate_up_silu_kernel, MATMUL_CONFIGS, key, grid, args, rows, x.device, INTERPRET_CONFIG
    )
    return h
