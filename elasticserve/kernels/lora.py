"""Segmented LoRA shrink/expand (Punica SGMV style); a segment's adapter id is its shape id.

Unlike the base matmul, rows of different segments use different weights, so tiles never straddle
segments: the grid is (row tiles of a segment, [column tiles,] segments), sized by T so one CUDA
graph fits every mix; a tile past its segment's rows or width, or of adapter -1, exits at once.
Both ops slice the adapter to the segment's prefix, like the base weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import utils

MAX_RANK = 256  # one rank tile in registers; ranks are 2r of a small per-shape mixture


def _shrink_cfg(bm: int, bk: int, split_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_K": bk, "SPLIT_K": split_k}, num_warps=warps, num_stages=stages
    )


def _expand_cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidates, not measurements (autotune times them). Shrink is a skinny [k, R] product: decode has
# one tile per segment, so split K across programs to get enough of them streaming `a`.
_SHRINK_CONFIGS: dict[str, dict[str, list[triton.Config]]] = {
    "default": {
        "decode": [_shrink_cfg(16, bk, sk, 4, 3) for bk in (64, 128) for sk in (4, 8, 16)],
        "mid": [_shrink_cfg(bm, 64, sk, 4, 3) for bm in (32, 64) for sk in (1, 4)],
        "prefill": [_shrink_cfg(bm, 64, sk, 4, 3) for bm in (64, 128) for sk in (1, 2)],
    },
}
_EXPAND_CONFIGS: dict[str, dict[str, list[triton.Config]]] = {
    "default": {
        "decode": [_expand_cfg(16, bn, 4, 2) for bn in (32, 64, 128)],
        "mid": [_expand_cfg(bm, bn, 4, 2) for bm in (32, 64) for bn in (64, 128)],
        "prefill": [_expand_cfg(bm, bn, 4, 2) for bm in (64, 128) for bn in (64, 128)],
    },
}
_SHRINK_INTERPRET = {"BLOCK_M": 16, "BLOCK_K": 32, "SPLIT_K": 2}
_EXPAND_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 32}


@triton.jit
def _segment(off_ptr, seg_w_ptr, seg_adapter_ptr, seg, pid_m, T, max_w, A, BLOCK_M: tl.constexpr):
    """Row range, width and adapter of one segment; `live` is False for a tile with no work."""
    # Clamped so unchecked metadata (check=False) can give wrong rows but never read out of bounds.
    lo = tl.maximum(tl.load(off_ptr + seg), 0)
    hi = tl.minimum(tl.load(off_ptr + seg + 1), T)
    width = tl.minimum(tl.load(seg_w_ptr + seg), max_w)
    ident = tl.load(seg_adapter_ptr + seg)
    m0 = lo + pid_m * BLOCK_M
    live = (ident >= 0) & (ident < A) & (m0 < hi) & (width > 0)
    return m0, hi, width, ident, live


@triton.jit
def _lora_shrink_kernel(
    x_ptr,
    a_ptr,
    t_ptr,
    off_ptr,
    seg_k_ptr,
    seg_adapter_ptr,
    T,
    K,
    A,
    R,
    M_BUCKET,
    stride_xm,
    stride_aa,
    stride_ak,
    stride_tm,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    pid_k = tl.program_id(2)
    m0, hi, k_s, ident, live = _segment(
        off_ptr, seg_k_ptr, seg_adapter_ptr, seg, pid_m, T, K, A, BLOCK_M
    )
    if not live:
        return  # t is zero-filled by the launcher
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    ks = tl.arange(0, BLOCK_K)
    a_base = a_ptr + ident.to(tl.int64) * stride_aa
    acc = tl.full((BLOCK_M, BLOCK_R), 0, tl.float32)
    # Split-K program pid_k takes K tiles pid_k, pid_k + SPLIT_K, ... of the segment's prefix.
    for k0 in range(pid_k * BLOCK_K, k_s, BLOCK_K * SPLIT_K):
        k_ok = ks < k_s - k0
        xa = tl.load(
            x_ptr + rows[:, None] * stride_xm + (k0 + ks)[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        aa = tl.load(
            a_base + (k0 + ks)[:, None] * stride_ak + rs[None, :],
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(xa, aa, acc, input_precision=DOT_PRECISION)
    t_ptrs = t_ptr + rows[:, None] * stride_tm + rs[None, :]
    t_mask = row_ok[:, None] & r_ok[None, :]
    if SPLIT_K == 1:
        tl.store(t_ptrs, acc, mask=t_mask)
    else:
        tl.atomic_add(t_ptrs, acc, mask=t_mask)


@triton.jit
def _lora_expand_kernel(
    y_ptr,
    t_ptr,
    b_ptr,
    off_ptr,
    seg_n_ptr,
    seg_adapter_ptr,
    T,
    N,
    A,
    R,
    scale,
    M_BUCKET,
    stride_ym,
    stride_tm,
    stride_ba,
    stride_br,
    DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    seg = tl.program_id(2)
    m0, hi, n_s, ident, live = _segment(
        off_ptr, seg_n_ptr, seg_adapter_ptr, seg, pid_m, T, N, A, BLOCK_M
    )
    if not live or pid_n * BLOCK_N >= n_s:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < hi
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_s
    rs = tl.arange(0, BLOCK_R)
    r_ok = rs < R
    b_ptrs = b_ptr + ident.to(tl.int64) * stride_ba + rs[:, None] * stride_br + cols[None, :]
    bb = tl.load(b_ptrs, mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BR, BN]
    # t is fp32 from the shrink; cast to b's dtype so 16-bit adapters use tensor cores.
    tt = tl.load(
        t_ptr + rows[:, None] * stride_tm + rs[None, :],
        mask=row_ok[:, None] & r_ok[None, :],
        other=0.0,
    ).to(bb.dtype)  # [BM, BR]
    delta = tl.dot(tt, bb, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    y_mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def _rank_block(rank: int) -> int:
    if not 0 < rank <= MAX_RANK:
        raise ValueError(f"LoRA rank R={rank} must lie in [1, {MAX_RANK}]")
    return max(16, triton.next_power_of_2(rank))  # tl.dot needs every block dim >= 16


def lora_shrink(
    x: Tensor,
    a: Tensor,
    seg_offsets: Tensor,
    seg_k: Tensor,
    seg_adapter: Tensor,
    check: bool = True,
) -> Tensor:
    """LoRA shrink: t[s] = x[s, :k_s] @ a[id_s, :k_s]; fp32 t, rows of adapter -1 are zero."""
    # x [T, >= k] ; a [A, K, R] ; seg_offsets [S+1] ; seg_k, seg_adapter [S] ; t [T, R] fp32
    utils.check_input(x)
    utils.check_weight("a", a, x, 3)
    rows = x.shape[0]
    adapters, k_dim, rank = a.shape
    block_r = _rank_block(rank)
    meta = {
        "seg_k": (seg_k, 0, min(k_dim, x.shape[1])),
        "seg_adapter": (seg_adapter, -1, adapters - 1),
    }
    segments = utils.check_segment_metadata(rows, x.device, seg_offsets, meta, check)
    # Zero-filled: split-K programs accumulate atomically, and skipped rows must read as zero.
    t = torch.zeros(rows, rank, dtype=torch.float32, device=x.device)
    if rows == 0:
        return t
    args = {
        "x_ptr": x,
        "a_ptr": a,
        "t_ptr": t,
        "off_ptr": seg_offsets,
        "seg_k_ptr": seg_k,
        "seg_adapter_ptr": seg_adapter,
        "T": rows,
        "K": min(k_dim, x.shape[1]),
        "A": adapters,
        "R": rank,
        "stride_xm": x.stride(0),
        "stride_aa": a.stride(0),
        "stride_ak": a.stride(1),
        "stride_tm": t.stride(0),
        "DOT_PRECISION": utils.dot_precision(x.dtype),
        "BLOCK_R": block_r,
    }

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), segments, meta["SPLIT_K"]

    utils.launch(
        _lora_shrink_kernel,
        _SHRINK_CONFIGS,
        ("M_BUCKET", "K", "R", "BLOCK_R"),
        grid,
        args,
        rows,
        x.device,
        _SHRINK_INTERPRET,
        reset_to_zero=["t_ptr"],  # autotune re-runs the kernel: each timing run starts from zeros
    )
    return t


def lora_expand(
    y: Tensor,
    t: Tensor,
    b: Tensor,
    seg_offsets: Tensor,
    seg_n: Tensor,
    seg_adapter: Tensor,
    scale: float = 1.0,
    check: bool = True,
) -> Tensor:
    """LoRA expand in place: y[s, :n_s] += scale * t[s] @ b[id_s, :, :n_s]; returns y."""
    # y [T, >= n] ; t [T, R] ; b [A, R, N] ; seg_offsets [S+1] ; seg_n, seg_adapter [S]
    utils.check_input(y, "y")
    utils.check_weight("b", b, y, 3, "y")
    utils.check_float("t", t)
    adapters, rank, n_dim = b.shape
    if t.shape != (y.shape[0], rank) or t.stride(1) != 1:
        raise ValueError(
            f"t must be [T={y.shape[0]}, R={rank}] contiguous along R, got {tuple(t.shape)}"
        )
    if t.device != y.device:
        raise ValueError(f"t is on {t.device}, y is on {y.device}")
    rows = y.shape[0]
    block_r = _rank_block(rank)
    width = min(n_dim, y.shape[1])
    meta = {"seg_n": (seg_n, 0, width), "seg_adapter": (seg_adapter, -1, adapters - 1)}
    segments = utils.check_segment_metadata(rows, y.device, seg_offsets, meta, check)
    if rows == 0 or width == 0:
        return y
    args = {
        "y_ptr": y,
        "t_ptr": t,
        "b_ptr": b,
        "off_ptr": seg_offsets,
        "seg_n_ptr": seg_n,
        "seg_adapter_ptr": seg_adapter,
        "T": rows,
        "N": width,
        "A": adapters,
        "R": rank,
        "scale": float(scale),
        "stride_ym": y.stride(0),
        "stride_tm": t.stride(0),
        "stride_ba": b.stride(0),
        "stride_br": b.stride(1),
        "DOT_PRECISION": utils.dot_precision(y.dtype),
        "BLOCK_R": block_r,
    }

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_N"]), segments

    utils.launch(
        _lora_expand_kernel,
        _EXPAND_CONFIGS,
        ("M_BUCKET", "N", "R", "BLOCK_R"),
        grid,
        args,
        rows,
        y.device,
        _EXPAND_INTERPRET,
        restore_value=["y_ptr"],  # in place: autotune's timing runs must not add twice
    )
    return y
