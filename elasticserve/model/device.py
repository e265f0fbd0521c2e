"""Device and dtype choice by what the hardware can do."""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@cache
def _cpuinfo(key: str) -> str | None:
    """The first `key` line of /proc/cpuinfo (None where there is no such line or file)."""
    path = Path("/proc/cpuinfo")
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it does not exist)."""
    return frozenset((_cpuinfo("flags") or "").split())


KERNEL_FLAGS = frozenset(
    {"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}
)


def kernel_flags() -> list[str]:
    """The CPU flags the kernels dispatch on, sorted: what a benchmark records beside its CPU."""
    return sorted(cpu_flags() & KERNEL_FLAGS)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's word for it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_has_native_bf16() -> bool:
    """True when bf16 matmuls run in hardware (AVX512-BF16 or AMX), not emulated through fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` is CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(
    dtype: str | torch.dtype, device: torch.device, native: bool = False
) -> torch.dtype:
    """`auto`: bf16 on CUDA, under the native CPU kernels (bf16 in memory, fp32 math) and on
    CPUs with native bf16; fp32 on CPUs where torch would emulate it.

    Emulated bf16 halves the bytes a batch-1 decode reads, but torch's math loses from batch ~4
    up (BENCHMARKS.md, bench/bench_decode.py), and a server runs batches.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or native or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]
