"""The native band linear against a torch reference: both flavours, fp32/bf16, odd sizes."""

from __future__ import annotations

import pytest
import torch

from elasticserve.kernels.cpu import load

ext = load()
pytestmark = pytest.mark.skipif(ext is None, reason="the native CPU kernels do not build here")

OUT, IN = 0, 1
# errors relative to the largest output: fp32 math on exact weights, except that the AMX tiles
# carry x as two bf16 halves (x = hi + lo, 16 bits of mantissa: 2^-18 of each element)
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
AMX_TOL = 3e-5
ISAS = ["amx", "avx2"]


@pytest.fixture(params=ISAS)
def isa(request):
    """The AMX bf16 kernels where the CPU has them, and the AVX2 ones everywhere."""
    if request.param == "amx" and not ext.amx_supported():
        pytest.skip("this CPU has no AMX-BF16")
    before = ext.use_amx(request.param == "amx")
    yield request.param
    ext.use_amx(before)


def tolerance(dtype, isa):
    return AMX_TOL if isa == "amx" and dtype == torch.bfloat16 else TOL[dtype]


def reference(w, x, bands, flavour, y, accumulate):
    """Each band's rows against its prefix of w, in float64 (y's other entries unchanged)."""
    y, w, x = y.clone().double(), w.double(), x.double()
    start = 0
    for end, width in bands:
        if flavour == OUT:
            part, target = x[start:end] @ w[:width].T, y[start:end, :width]
        else:
            part, target = x[start:end, :width] @ w[:, :width].T, y[start:end, : w.shape[0]]
        target.copy_(target + part if accumulate else part)
        start = end
    return y.float()


def kept(shape, bands, flavour, n):
    mask = torch.zeros(shape, dtype=torch.bool)
    start = 0
    for end, width in bands:
        mask[start:end, : width if flavour == OUT else n] = True
        start = end
    return mask


BANDS = {
    "one": [(1, 1.0)],
    "batch": [(7, 1.0)],
    "three": [(3, 1.0), (4, 0.7), (9, 0.3)],
    "empty and one-row": [(2, 1.0), (2, 0.75), (3, 0.5), (5, 0.0)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flavour", [OUT, IN])
@pytest.mark.parametrize("nk", [(37, 53), (576, 1536), (5, 8), (64, 576), (48, 100)])
@pytest.mark.parametrize("bands", BANDS.keys())
@pytest.mark.parametrize("accumulate", [False, True])
def test_bands_match_reference(dtype, flavour, nk, bands, accumulate, isa):
    if isa == "amx" and dtype != torch.bfloat16:
        pytest.skip("AMX runs the bf16 weights only")
    n, k = nk
    limit = n if flavour == OUT else k
    runs = [(end, int(limit * f)) for end, f in BANDS[bands]]
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(runs[-1][0], k + 3, generator=g)[:, :k]  # strided rows
    y = torch.randn(runs[-1][0], n + 2, generator=g)
    want = reference(w, x, runs, flavour, y, accumulate)
    got = y.clone()
    ext.linear(w, x, torch.tensor(runs, dtype=torch.int32), flavour, got, accumulate)
    mask = kept(y.shape, runs, flavour, n)
    scale = want.abs().max().item()
    assert (got - want).abs()[mask].max().item() <= tolerance(dtype, isa) * scale
    assert torch.equal(got[~mask], y[~mask])  # what no band keeps is left alone


@pytest.mark.parametrize("rows", [1, 6, 40])
def test_thread_counts_agree(rows, isa):
    """Every output is one thread's sum: any thread count gives the same bits."""
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(300, 200, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 200, generator=g)
    bands = torch.tensor([(max(1, rows // 3), 300), (rows, 131)], dtype=torch.int32)
    ref = torch.zeros(rows, 300)
    ext.linear(w, x, bands, OUT, ref, simd=False)
    outs = []
    for threads in (1, 2, 3):
        got = torch.zeros(rows, 300)
        ext.linear(w, x, bands, OUT, got, threads=threads)
        outs.append(got)
    scale = ref.abs().max().item()
    assert (outs[0] - ref).abs().max().item() <= tolerance(torch.bfloat16, isa) * scale
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(
    ("bands", "message"),
    [
        ([(2, 10), (4, 10)], "strictly decrease"),
        ([(4, 10), (2, 5)], "must not decrease"),
        ([(2, 99)], "outside 0..16"),
    ],
)
def test_bad_bands_are_refused(bands, message):
    w, x, y = torch.zeros(16, 8), torch.zeros(4, 8), torch.zeros(4, 16)
    with pytest.raises(ValueError, match=message):
        ext.linear(w, x, torch.tensor(bands, dtype=torch.int32), OUT, y)


def test_wrong_dtype_is_refused():
    w, x, y = torch.zeros(16, 8, dtype=torch.int8), torch.zeros(4, 8), torch.zeros(4, 16)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        ext.linear(w, x, torch.tensor([(4, 16)], dtype=torch.int32), OUT, y)
