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
    # AMX: two x tiles (20 rows), 16-row weight blocks and a tail, mixed prefixes
    (53, 1536, [[20, 53]], OUT),
    (40, 1536, [[3, 1536], [9, 768], [18, 64]], IN),
    (32, 576, [[4, 32], [17, 16]], OUT),  # the narrow band is one whole tile of weight rows
    (64, 256, [[4, 64]], OUT),  # the fewest rows the tiles take; each block fetches the next
]


ISAS = ["amx", "vnni", "avx2"]


@pytest.fixture(params=ISAS)
def isa(request):
    """The AMX int8 tiles and the AVX-512 VNNI kernels where the CPU has them, the AVX2 ones
    everywhere (AMX takes steps of QAMX_MIN_ROWS rows and more)."""
    ext = build.load()
    if request.param == "amx" and not ext.amx_int8_supported():
        pytest.skip("this CPU has no AMX int8 tiles")
    if request.param in ("amx", "vnni") and not ext.vnni_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    vnni = ext.use_vnni(request.param != "avx2")
    amx = ext.use_amx(request.param == "amx")
    yield request.param
    ext.use_vnni(vnni)
    ext.use_amx(amx)


@pytest.mark.parametrize("precision", ["q8", "q4"])
@pytest.mark.parametrize("case", CASES)
def test_simd_equals_scalar_reference(case, precision, isa):
    n, k, bands, flavour = case
    g = torch.Generator().manual_seed(n * k)
    q = quantize(torch.randn(n, k, generator=g))
    x = torch.randn(bands[-1][0], k, generator=g)
    got, want = run(q, x, bands, flavour, precision), run(q, x, bands, flavour, precision, False)
    # fp32 sums of up to 48 scaled group dots against the reference's double ones
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


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


@pytest.mark.parametrize("rows", [2, 6])
def test_q4_reads_both_planes_when_told_and_q8_without_a_residual_is_q4(isa, rows):
    g = torch.Generator().manual_seed(4)
    q = quantize(torch.randn(16, 128, generator=g))
    x = torch.randn(rows, 128, generator=g)
    bands = [[rows, 16]]
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
