"""Segmented sliced matmul kernels against the pure-torch reference."""

from __future__ import annotations

import math

import pytest
import torch

from elasticserve.kernels import reference
from elasticserve.kernels.sliced_matmul import sliced_matmul_in, sliced_matmul_out


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_out_matches_reference(layout, dtype, with_bias, device, as_i32, assert_close):
    torch.manual_seed(0)
    widths = layout.widths(layout.n)
    widest = max(widths)
    x = torch.randn(layout.rows, layout.k, device=device).to(dtype)
    w = torch.randn(layout.n, layout.k, device=device).to(dtype)
    w[widest:] = math.nan  # rows past every segment's width must never be read
    bias = None
    if with_bias:
        bias = torch.randn(layout.n, device=device).to(dtype)
        bias[widest:] = math.nan
    offsets, seg_n = layout.offsets(device), as_i32(widths)

    y = sliced_matmul_out(x, w, offsets, seg_n, layout.n, bias)

    assert_close(y, reference.sliced_matmul_out(x, w, offsets, seg_n, layout.n, bias), dtype)
    for (lo, hi), n in zip(layout.segments(), widths, strict=True):
        assert torch.all(y[lo:hi, n:] == 0), "columns past a segment's width must be exact zeros"


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "seg_bias"])
def test_in_matches_reference(layout, dtype, with_bias, device, as_i32, assert_close):
    torch.manual_seed(0)
    widths = layout.widths(layout.k)
    widest = max(widths)
    # x is wider than any k_s (row stride > max_k) and stale past each row's own k_s.
    x = torch.randn(layout.rows, layout.k + 8, device=device).to(dtype)
    for (lo, hi), k in zip(layout.segments(), widths, strict=True):
        x[lo:hi, k:] = math.nan
    wt = torch.randn(layout.k, layout.n, device=device).to(dtype)
    wt[widest:] = math.nan
    seg_bias = None
    if with_bias:
        seg_bias = torch.randn(len(widths), layout.n, device=device).to(dtype)
    offsets, seg_k = layout.offsets(device), as_i32(widths)

    y = sliced_matmul_in(x, wt, offsets, seg_k, widest, seg_bias)

    assert_close(y, reference.sliced_matmul_in(x, wt, offsets, seg_k, widest, seg_bias), dtype)


def test_out_max_n_below_n(device, as_i32, assert_close):
    """A layer whose widest shape keeps 64 of 100 rows allocates only [T, 64]."""
    x = torch.randn(12, 40, device=device)
    w = torch.randn(100, 40, device=device)
    offsets, seg_n = as_i32([0, 5, 12]), as_i32([64, 33])

    y = sliced_matmul_out(x, w, offsets, seg_n, 64)

    assert y.shape == (12, 64)
    assert_close(y, reference.sliced_matmul_out(x, w, offsets, seg_n, 64), torch.float32)


def test_check_false_gives_same_result(device, as_i32):
    """The hot path (check=False, no host sync) computes exactly what the checked path does."""
    x = torch.randn(10, 40, device=device)
    w = torch.randn(72, 40, device=device)
    wt = torch.randn(40, 72, device=device)
    offsets, seg_n, seg_k = as_i32([0, 4, 10]), as_i32([72, 36]), as_i32([40, 20])

    out = sliced_matmul_out(x, w, offsets, seg_n, 72, check=False)
    inp = sliced_matmul_in(x, wt, offsets, seg_k, 40, check=False)

    assert torch.equal(out, sliced_matmul_out(x, w, offsets, seg_n, 72))
    assert torch.equal(inp, sliced_matmul_in(x, wt, offsets, seg_k, 40))


def _out_args(device):
    x = torch.randn(10, 40, device=device)
    w = torch.randn(72, 40, device=device)
    offsets = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    seg_n = torch.tensor([72, 36], dtype=torch.int32, device=device)
    return {"x": x, "w": w, "seg_offsets": offsets, "seg_n": seg_n, "max_n": 72}


BAD_OUT = {
    "int64_offsets": (
        lambda a: {"seg_offsets": a["seg_offsets"].long()},
        "seg_offsets must be int32",
    ),
    "offsets_not_from_0": (lambda a: {"seg_offsets": a["seg_offsets"] + 1}, "from 0 to T=10"),
    "last_offset_not_T": (lambda a: {"seg_offsets": a["seg_offsets"].clamp(max=9)}, "0 to T=10"),
    "width_over_max_n": (lambda a: {"max_n": 64}, r"seg_n\[0\]=72 is outside \[0, 64\]"),
    "max_n_over_n": (lambda a: {"max_n": 80}, "max_n=80"),
    "negative_width": (lambda a: {"seg_n": a["seg_n"] - 40}, r"seg_n\[1\]=-4"),
    "wrong_seg_n_length": (lambda a: {"seg_n": a["seg_n"][:1]}, "seg_n has 1 entries"),
    "dtype_mismatch": (lambda a: {"w": a["w"].half()}, "x's dtype"),
    "int_weights": (lambda a: {"x": a["x"].long(), "w": a["w"].long()}, "fp16, bf16 or fp32"),
    "k_mismatch": (lambda a: {"w": a["w"][:, :32].contiguous()}, "need x"),
    "weight_not_contiguous": (lambda a: {"w": a["w"].T.contiguous().T}, "w must be contiguous"),
    "bias_shape": (lambda a: {"bias": torch.zeros(36, device=a["x"].device)}, "bias must be"),
}


@pytest.mark.parametrize("case", BAD_OUT.values(), ids=BAD_OUT.keys())
def test_out_rejects_bad_arguments(case, device):
    change, message = case
    args = _out_args(device)
    args.update(change(args))
    with pytest.raises(ValueError, match=message):
        sliced_matmul_out(**args)


def test_in_rejects_bad_arguments(device, as_i32):
    x = torch.randn(10, 40, device=device)
    wt = torch.randn(40, 72, device=device)
    offsets = as_i32([0, 4, 10])
    with pytest.raises(ValueError, match=r"seg_k\[1\]=41 is outside \[0, 40\]"):
        sliced_matmul_in(x, wt, offsets, as_i32([40, 41]), 40)
    with pytest.raises(ValueError, match="max_k=48"):
        sliced_matmul_in(x, wt, offsets, as_i32([40, 20]), 48)
    with pytest.raises(ValueError, match=r"seg_bias must be \[S=2, N=72\]"):
        sliced_matmul_in(x, wt, offsets, as_i32([40, 20]), 40, torch.zeros(3, 72, device=device))
    with pytest.raises(ValueError, match="non-decreasing"):
        sliced_matmul_in(x, wt, as_i32([0, 7, 4, 10]), as_i32([40, 20, 10]), 40)


def test_kernels_compile_for_gpu(compiles_for_sm90):
    """Both flavours compile for an H100 in every dtype (bf16, exact fp32), decode/prefill tiles."""
    jobs = []
    for dtype, precision, tile in [
        ("fp16", "tf32", (16, 64, 128)),
        ("bf16", "tf32", (64, 64, 32)),
        ("fp32", "ieee", (16, 32, 64)),
    ]:
        constexprs = {"HAS_BIAS": True, "S_BLOCK": 4, "DOT_PRECISION": precision}
        constexprs |= dict(zip(["BLOCK_M", "BLOCK_N", "BLOCK_K"], tile, strict=True))
        for name in ["_sliced_out_kernel", "_sliced_in_kernel"]:
            jobs.append(("sliced_matmul", name, dtype, constexprs))
    compiles_for_sm90(jobs)


def test_unchecked_widths_are_clamped(device, as_i32):
    """check=False skips validation, but a width past max_n still never reads past the weight."""
    x = torch.randn(10, 40, device=device)
    w = torch.randn(72, 40, device=device)
    wt = torch.randn(40, 72, device=device)
    offsets = as_i32([0, 4, 10])

    out = sliced_matmul_out(x, w, offsets, as_i32([500, 36]), 72, check=False)
    inp = sliced_matmul_in(x, wt, offsets, as_i32([500, 20]), 40, check=False)

    assert torch.equal(out, sliced_matmul_out(x, w, offsets, as_i32([72, 36]), 72))
    assert torch.equal(inp, sliced_matmul_in(x, wt, offsets, as_i32([40, 20]), 40))


def test_too_many_segments_rejected(device):
    x = torch.randn(70, 40, device=device)
    w = torch.randn(72, 40, device=device)
    offsets = torch.arange(71, dtype=torch.int32, device=device)
    seg_n = torch.full((70,), 72, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="70 segments: at most 64"):
        sliced_matmul_out(x, w, offsets, seg_n, 72)


def test_unchecked_overlapping_segments_stay_in_bounds(device, as_i32):
    """Overlapping offsets (check=False) sum two widths per row; the kernel still clamps."""
    x = torch.randn(10, 40, device=device)
    wt = torch.randn(40, 72, device=device)
    seg_bias = torch.randn(3, 72, device=device)

    y = sliced_matmul_in(x, wt, as_i32([0, 8, 4, 10]), as_i32([30, 5, 30]), 40, seg_bias, False)

    assert y.shape == (10, 72) and torch.isfinite(y).all()
