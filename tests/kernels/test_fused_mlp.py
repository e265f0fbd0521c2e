"""Fused gate/up + SiLU-mul kernel against the pure-torch reference, alone and feeding down."""

from __future__ import annotations

import math

import pytest
import torch

from elasticserve.kernels import reference
from elasticserve.kernels.fused_mlp import fused_gate_up_silu
from elasticserve.kernels.sliced_matmul import sliced_matmul_in


def test_matches_reference(layout, dtype, device, as_i32, assert_close):
    torch.manual_seed(0)
    widths = layout.widths(layout.n)
    x = torch.randn(layout.rows, layout.k, device=device).to(dtype)
    w_gate = (torch.randn(layout.n, layout.k, device=device) / layout.k**0.5).to(dtype)
    w_up = torch.randn(layout.n, layout.k, device=device).to(dtype)
    w_gate[max(widths) :] = math.nan  # rows past every segment's width must never be read
    w_up[max(widths) :] = math.nan
    offsets, seg_n = layout.offsets(device), as_i32(widths)

    h = fused_gate_up_silu(x, w_gate, w_up, offsets, seg_n, layout.n)

    expected = reference.fused_gate_up_silu(x, w_gate, w_up, offsets, seg_n, layout.n)
    assert_close(h, expected, dtype)
    for (lo, hi), n in zip(layout.segments(), widths, strict=True):
        assert torch.all(h[lo:hi, n:] == 0), "columns past a segment's width must be exact zeros"


def test_elastic_mlp(device, as_i32, assert_close):
    """down(silu(gate) * up) with per-segment widths equals the dense MLP of each pruned shape."""
    torch.manual_seed(0)
    hidden, inter = 40, 100
    x = torch.randn(13, hidden, device=device)
    w_gate = torch.randn(inter, hidden, device=device) / hidden**0.5
    w_up = torch.randn(inter, hidden, device=device) / hidden**0.5
    down_t = torch.randn(inter, hidden, device=device) / inter**0.5  # down stored transposed
    offsets, widths = as_i32([0, 2, 7, 13]), [100, 76, 50]
    seg_n = as_i32(widths)

    h = fused_gate_up_silu(x, w_gate, w_up, offsets, seg_n, inter)
    y = sliced_matmul_in(h, down_t, offsets, seg_n, inter)

    for (lo, hi), n in zip([(0, 2), (2, 7), (7, 13)], widths, strict=True):
        xs = x[lo:hi]
        dense = (torch.nn.functional.silu(xs @ w_gate[:n].T) * (xs @ w_up[:n].T)) @ down_t[:n]
        assert_close(y[lo:hi], dense, torch.float32)


def test_rejects_bad_arguments(device, as_i32):
    x = torch.randn(10, 40, device=device)
    w = torch.randn(72, 40, device=device)
    offsets, seg_n = as_i32([0, 4, 10]), as_i32([72, 36])
    with pytest.raises(ValueError, match="w_gate, w_up"):
        fused_gate_up_silu(x, w, w[:64], offsets, seg_n, 72)
    with pytest.raises(ValueError, match="w_up must have x's dtype"):
        fused_gate_up_silu(x, w, w.half(), offsets, seg_n, 72)
    with pytest.raises(ValueError, match=r"seg_n\[0\]=72 is outside \[0, 64\]"):
        fused_gate_up_silu(x, w, w, offsets, seg_n, 64)


def test_kernel_compiles_for_gpu(compiles_for_sm90):
    """Both accumulators fit and the kernel compiles for an H100 in every dtype."""
    jobs = []
    for dtype, precision, tile in [
        ("fp16", "tf32", (16, 64, 128)),
        ("bf16", "tf32", (64, 64, 32)),
        ("fp32", "ieee", (16, 32, 64)),
    ]:
        constexprs: dict[str, object] = {"S_BLOCK": 4, "DOT_PRECISION": precision}
        constexprs |= dict(zip(["BLOCK_M", "BLOCK_N", "BLOCK_K"], tile, strict=True))
        jobs.append(("fused_mlp", "_gate_up_silu_kernel", dtype, constexprs))
    compiles_for_sm90(jobs)
