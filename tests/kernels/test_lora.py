"""Segmented LoRA shrink/expand kernels against the pure-torch reference."""

from __future__ import annotations

import math

import pytest
import torch

from elasticserve.kernels import lora, reference
from elasticserve.kernels.lora import lora_expand, lora_shrink
from elasticserve.kernels.sliced_matmul import sliced_matmul_out
from elasticserve.kernels.utils import INTERPRET

RANK, ADAPTERS = 12, 3  # rank not a power of two: the rank tile is masked
ADAPTER_IDS = [1, -1, 0, 2]  # per segment, cycled; -1 = this shape has no adapter


def _adapter_ids(layout) -> list[int]:
    return [ADAPTER_IDS[i % len(ADAPTER_IDS)] for i in range(len(layout.lens))]


@pytest.mark.parametrize("split_k", [1, 2])
def test_shrink_matches_reference(
    layout, dtype, split_k, device, as_i32, assert_close, monkeypatch
):
    if INTERPRET:  # on GPU autotune picks SPLIT_K; interpreted, exercise both store paths
        monkeypatch.setitem(lora._SHRINK_INTERPRET, "SPLIT_K", split_k)
    torch.manual_seed(0)
    widths, ids = layout.widths(layout.k), _adapter_ids(layout)
    x = torch.randn(layout.rows, layout.k + 8, device=device).to(dtype)
    for (lo, hi), k in zip(layout.segments(), widths, strict=True):
        x[lo:hi, k:] = math.nan  # stale activations past each row's width must not be read
    a = torch.randn(ADAPTERS, layout.k, RANK, device=device).to(dtype)
    a[:, max(widths) :] = math.nan
    offsets, seg_k, seg_adapter = layout.offsets(device), as_i32(widths), as_i32(ids)

    t = lora_shrink(x, a, offsets, seg_k, seg_adapter)

    assert_close(t, reference.lora_shrink(x, a, offsets, seg_k, seg_adapter), dtype)
    for (lo, hi), ident in zip(layout.segments(), ids, strict=True):
        if ident < 0:
            assert torch.all(t[lo:hi] == 0), "rows without an adapter must be exact zeros"


def test_expand_matches_reference(layout, dtype, device, as_i32, assert_close):
    torch.manual_seed(0)
    widths, ids = layout.widths(layout.n), _adapter_ids(layout)
    y = torch.randn(layout.rows, layout.n, device=device).to(dtype)
    t = torch.randn(layout.rows, RANK, device=device)
    b = torch.randn(ADAPTERS, RANK, layout.n, device=device).to(dtype)
    b[:, :, max(widths) :] = math.nan
    offsets, seg_n, seg_adapter = layout.offsets(device), as_i32(widths), as_i32(ids)
    before = y.clone()
    expected = reference.lora_expand(y.clone(), t, b, offsets, seg_n, seg_adapter, 0.5)

    out = lora_expand(y, t, b, offsets, seg_n, seg_adapter, scale=0.5)

    assert out is y, "expand works in place"
    assert_close(y, expected, dtype)
    for (lo, hi), n, ident in zip(layout.segments(), widths, ids, strict=True):
        untouched = slice(None) if ident < 0 else slice(n, None)
        assert torch.equal(y[lo:hi, untouched], before[lo:hi, untouched])


def test_lora_on_sliced_matmul(device, as_i32, assert_close):
    """q = x @ w[:n].T + scale * (x @ A) @ B[:, :n] per segment, zeros past n kept."""
    torch.manual_seed(0)
    k_dim, n_dim = 40, 72
    x = torch.randn(14, k_dim, device=device).half()
    w = torch.randn(n_dim, k_dim, device=device).half()
    a = torch.randn(ADAPTERS, k_dim, RANK, device=device).half()
    b = torch.randn(ADAPTERS, RANK, n_dim, device=device).half()
    offsets, seg_n = as_i32([0, 3, 9, 14]), as_i32([72, 54, 36])
    seg_k, seg_adapter = as_i32([k_dim] * 3), as_i32([2, -1, 0])

    y = sliced_matmul_out(x, w, offsets, seg_n, n_dim)
    lora_expand(y, lora_shrink(x, a, offsets, seg_k, seg_adapter), b, offsets, seg_n, seg_adapter)

    expected = reference.sliced_matmul_out(x, w, offsets, seg_n, n_dim)
    t_ref = reference.lora_shrink(x, a, offsets, seg_k, seg_adapter)
    reference.lora_expand(expected, t_ref, b, offsets, seg_n, seg_adapter)
    assert_close(y, expected, torch.float16)
    assert torch.all(y[3:9, 54:] == 0) and torch.all(y[9:, 36:] == 0)


def test_rejects_bad_arguments(device, as_i32):
    x = torch.randn(10, 40, device=device)
    a = torch.randn(ADAPTERS, 40, RANK, device=device)
    b = torch.randn(ADAPTERS, RANK, 72, device=device)
    y = torch.zeros(10, 72, device=device)
    t = torch.zeros(10, RANK, device=device)
    offsets, seg_k, seg_n = as_i32([0, 4, 10]), as_i32([40, 20]), as_i32([72, 36])
    with pytest.raises(ValueError, match=r"seg_adapter\[1\]=3 is outside \[-1, 2\]"):
        lora_shrink(x, a, offsets, seg_k, as_i32([0, 3]))
    with pytest.raises(ValueError, match=r"seg_k\[0\]=41"):
        lora_shrink(x, a, offsets, as_i32([41, 20]), as_i32([0, 1]))
    with pytest.raises(ValueError, match="rank R=300"):
        lora_shrink(x, torch.randn(1, 40, 300, device=device), offsets, seg_k, as_i32([0, 0]))
    with pytest.raises(ValueError, match="a must have x's dtype"):
        lora_shrink(x, a.half(), offsets, seg_k, as_i32([0, 1]))
    with pytest.raises(ValueError, match="seg_adapter must be int32"):
        lora_shrink(x, a, offsets, seg_k, torch.tensor([0, 1], device=device))
    with pytest.raises(ValueError, match=r"t must be \[T=10, R=12\]"):
        lora_expand(y, t[:, :8], b, offsets, seg_n, as_i32([0, 1]))
    with pytest.raises(ValueError, match=r"seg_n\[0\]=80 is outside \[0, 72\]"):
        lora_expand(y, t, b, offsets, as_i32([80, 36]), as_i32([0, 1]))
    with pytest.raises(ValueError, match="seg_adapter has 3 entries"):
        lora_expand(y, t, b, offsets, seg_n, as_i32([0, 1, 2]))


def test_kernels_compile_for_gpu(compiles_for_sm90):
    """Shrink (with and without split-K) and expand compile for an H100 in every dtype."""
    jobs = []
    for dtype, precision, split_k in [
        ("fp16", "tf32", 4),
        ("bf16", "tf32", 1),
        ("fp32", "ieee", 4),
    ]:
        blocks = {"DOT_PRECISION": precision, "BLOCK_R": 16, "BLOCK_M": 16}
        shrink = blocks | {"BLOCK_K": 64, "SPLIT_K": split_k}
        jobs.append(("lora", "_lora_shrink_kernel", dtype, shrink))
        jobs.append(("lora", "_lora_expand_kernel", dtype, blocks | {"BLOCK_N": 64}))
    compiles_for_sm90(jobs)


def test_unchecked_adapter_out_of_range_is_skipped(device, as_i32):
    """check=False: an adapter id past the table acts as no adapter instead of reading garbage."""
    x = torch.randn(10, 40, device=device)
    a = torch.randn(ADAPTERS, 40, RANK, device=device)
    offsets, seg_k = as_i32([0, 4, 10]), as_i32([40, 20])

    t = lora_shrink(x, a, offsets, seg_k, as_i32([7, 1]), check=False)

    assert torch.equal(t, lora_shrink(x, a, offsets, seg_k, as_i32([-1, 1])))
