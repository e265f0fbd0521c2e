"""The q8/q4 band linears: SIMD against the scalar reference, and against dequantized weights."""

from __future__ import annotations

import pytest
import torch

from elasticserve.kernels.cpu import build
from elasticserve.model.quant import dequantize, quantize

pytestmark = pytest.mark.skipif(
    build.load() is None, reason="the native CPU kernels do not build here"
)
OUT, IN = 0, 1


def run(q, x, bands, flavour, precision, simd=True, q4_reads_lo=False, lo=True):
    ext = build.load()
    n = bands[0][1] if flavour == OUT else q.rows
    y = torch.zeros(x.shape[0], q.rows if flavour == IN else n)
    b = torch.tensor(bands, dtype=torch.int32)
    ext.qlinear(
        q.hi,
        q.lo if lo else None,
        q.scale,
        q.minimum,
        x,
        b,
        flavour,
        y,
        precision == "q8",
        simd=simd,
        q4_reads_lo=q4_reads_lo,
    )
    return y


CASES = [  # (N, K, bands, flavour)
    (8, 64, [[1, 8]], OUT),
    (37, 160, [[5, 37]], OUT),  # odd weight rows, an odd number of groups (5)
    (64, 576, [[2, 64], [4, 40], [7, 8]], OUT),  # three widths in one pass
    (10, 96, [[3, 96]], IN),
    (24, 320, [[1, 320], [4, 128], [6, 32]], IN),  # prefixes of 10, 4 and 1 groups
]


ISAS = ["vnni", "avx2"]


@pytest.fixture(params=ISAS)
def isa(request):
    """The AVX-512 VNNI kernels where the CPU has them, and the AVX2 ones everywhere."""
    ext = build.load()
    if request.param == "vnni" and not ext.vnni_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    before = ext.use_vnni(request.param == "vnni")
    yield request.param
    ext.use_vnni(before)


@pytest.mark.parametrize("precision", ["q8", "q4"])
@pytest.mark.parametrize("case", CASES)
def test_simd_equals_scalar_reference(case, precision, isa):
    n, k, bands, flavour = case
    g = torch.Generator().manual_seed(n * k)
    q = quantize(torch.randn(n, k, generator=g))
    x = torch.randn(bands[-1][0], k, generator=g)
    got, want = run(q, x, bands, flavour, precision), run(q, x, bands, flavour, precision, False)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["q8", "q4"])
def test_matches_the_dequantized_weights(precision, isa):
    """Only the int8 activations differ from a float product with the dequantized weights."""
    g = torch.Generator().manual_seed(3)
    q = quantize(torch.randn(96, 256, generator=g))
    x = torch.randn(4, 256, generator=g)
    want = x @ dequantize(q, precision).t()
    for flavour, bands in ((OUT, [[4, 96]]), (IN, [[4, 256]])):
        got = run(q, x, bands, flavour, precision)
        assert ((got - want).norm() / want.norm()).item() < 0.02


def test_q4_reads_both_planes_when_told_and_q8_without_a_residual_is_q4(isa):
    g = torch.Generator().manual_seed(4)
    q = quantize(torch.randn(16, 128, generator=g))
    x = torch.randn(2, 128, generator=g)
    bands = [[2, 16]]
    q8 = run(q, x, bands, OUT, "q8")
    assert torch.equal(run(q, x, bands, OUT, "q4", q4_reads_lo=True), q8)
    assert torch.equal(run(q, x, bands, OUT, "q8", lo=False), run(q, x, bands, OUT, "q4"))
    assert not torch.equal(q8, run(q, x, bands, OUT, "q4"))


def test_bad_bands_are_refused():
    q = quantize(torch.randn(8, 128))
    x = torch.randn(2, 128)
    with pytest.raises(ValueError, match="whole groups of 32"):
        run(q, x, [[2, 48]], IN, "q4")
    with pytest.raises(ValueError, match="widths must strictly decrease"):
        run(q, x, [[1, 4], [2, 8]], OUT, "q4")
    ext = build.load()
    y = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="hi must be a contiguous uint8"):
        ext.qlinear(
            q.hi[:, :32].contiguous(),
            None,
            q.scale,
            q.minimum,
            x,
            torch.tensor([[2, 8]], dtype=torch.int32),
            OUT,
            y,
            False,
        )
