"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Must happen before anything decorates a kernel with triton.jit (it reads this then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import triton
import triton.language as tl

# Max error allowed, relative to the largest reference magnitude (fp32 math in both).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cuda when available, else cpu (interpreted kernels)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    module = sys.modules.get("elasticserve.kernels.utils")
    if module is not None and not module.INTERPRET:
        pytest.fail(
            "elasticserve.kernels was imported before TRITON_INTERPRET=1 was set: set it at the "
            "top of tests/conftest.py, or import the kernels only on CUDA"
        )
    return torch.device("cpu")


@triton.jit
def _bf16_dot_probe(a_ptr, b_ptr, c_ptr):
    i = tl.arange(0, 16)
    a = tl.load(a_ptr + i[:, None] * 16 + i[None, :])
    b = tl.load(b_ptr + i[:, None] * 16 + i[None, :])
    tl.store(c_ptr + i[:, None] * 16 + i[None, :], tl.dot(a, b))


@pytest.fixture(scope="session")
def bf16_dot_works(device: torch.device) -> bool:
    """Whether bf16 tl.dot is right here (Triton 3.9's interpreter multiplies raw bits)."""
    a = torch.randn(16, 16, device=device).to(torch.bfloat16)
    b = torch.randn(16, 16, device=device).to(torch.bfloat16)
    c = torch.empty(16, 16, device=device)
    _bf16_dot_probe[(1,)](a, b, c)
    return torch.allclose(c, a.float() @ b.float(), rtol=1e-2, atol=1e-2)


@pytest.fixture(params=DTYPES, ids=lambda dt: str(dt).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest, bf16_dot_works: bool) -> torch.dtype:
    """Each input dtype; bf16 is skipped, with the reason, where tl.dot cannot do bf16."""
    dt: torch.dtype = request.param
    if dt == torch.bfloat16 and not bf16_dot_works:
        pytest.skip(
            "bf16 tl.dot is wrong under TRITON_INTERPRET=1 (triton 3.9 stores bf16 as uint16 and "
            "np.matmul multiplies the raw bits); bf16 runs on GPU only"
        )
    return dt


@pytest.fixture
def assert_close() -> Callable[..., None]:
    """Compare with the inputs' dtype tolerance, scaled by the reference's largest magnitude."""

    def check(actual: torch.Tensor, expected: torch.Tensor, inputs: torch.dtype) -> None:
        assert actual.shape == expected.shape
        assert actual.dtype == expected.dtype
        tol = TOLERANCE[inputs]
        scale = max(1.0, expected.float().abs().max().item()) if expected.numel() else 1.0
        torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * scale)

    return check


@dataclass(frozen=True)
class Layout:
    """Rows per segment and each segment's width as a fraction of the prefixable dim."""

    name: str
    lens: tuple[int, ...]
    fracs: tuple[float, ...]
    k: int  # input features of the layer
    n: int  # output features of the layer

    @property
    def rows(self) -> int:
        return sum(self.lens)

    def offsets(self, device: torch.device) -> torch.Tensor:
        """seg_offsets [S+1] int32."""
        offs = [0]
        for length in self.lens:
            offs.append(offs[-1] + length)
        return torch.tensor(offs, dtype=torch.int32, device=device)

    def widths(self, dim: int) -> list[int]:
        """Per-segment widths on a dim of size `dim` (rounded, so mostly not multiples of 16)."""
        return [round(f * dim) for f in self.fracs]

    def segments(self) -> list[tuple[int, int]]:
        """(start, end) rows of each segment."""
        return list(itertools.pairwise(self.offsets(torch.device("cpu")).tolist()))


LAYOUTS = [
    Layout("one_segment", (7,), (1.0,), k=100, n=40),
    Layout("single_rows", (1, 1, 1), (1.0, 0.5, 0.75), k=40, n=72),
    Layout("empty_segments", (0, 9, 0, 12), (1.0, 0.5, 0.75, 0.4), k=72, n=100),
    Layout("four_widths", (3, 9, 1, 11), (0.75, 1.0, 0.5, 0.3), k=72, n=100),
    Layout("prefill_two_tiles", (23, 17), (0.5, 1.0), k=100, n=72),
    Layout("width_zero", (5, 6), (0.0, 0.5), k=40, n=40),  # a shape that skips the layer
]


@pytest.fixture(params=LAYOUTS, ids=lambda layout: layout.name)
def layout(request: pytest.FixtureRequest) -> Layout:
    """Each segment layout: empty segments, single rows, one segment, tiles straddling segments."""
    return request.param


def i32(values: list[int], device: torch.device) -> torch.Tensor:
    """int32 metadata tensor."""
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.fixture
def as_i32(device: torch.device) -> Callable[[list[int]], torch.Tensor]:
    """Build int32 metadata on the test device."""
    return lambda values: i32(values, device)


_COMPILE_SCRIPT = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from elasticserve.kernels import fused_mlp, lora, sliced_matmul

metadata = {"off_ptr", "seg_n_ptr", "seg_k_ptr", "seg_adapter_ptr"}
for module, name, dtype, constexprs in json.loads(sys.argv[1]):
    modules = {"fused_mlp": fused_mlp, "lora": lora, "sliced_matmul": sliced_matmul}
    fn = getattr(modules[module], name)
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            elem = "i32" if arg in metadata else "fp32" if arg == "t_ptr" else dtype
            signature[arg] = "*" + elem
        else:
            signature[arg] = "fp32" if arg == "scale" else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": 4, "num_stages": 3}
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
"""

# (module, kernel name, pointer dtype, constexprs) of one compilation.
CompileJob = tuple[str, str, str, dict[str, object]]


@pytest.fixture
def compiles_for_sm90() -> Callable[[list[CompileJob]], None]:
    """Compile kernels to H100 (sm_90) cubins without a GPU: catches what the interpreter won't."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernel tests compile and run the real kernels")

    def run(jobs: list[CompileJob]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(jobs)],
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"kernels do not compile for sm_90:\n{proc.stderr[-3000:]}"

    return run
