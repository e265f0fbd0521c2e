"""What every segmented kernel shares: metadata checks, tile configs, the launcher, row lookups.

Like vLLM's lora/ops/triton_ops/kernel_utils.py: a kernel file holds its kernel, launcher and
checks of its own arguments; what the row-tile kernels (sliced_matmul.py, fused_mlp.py) and the
segment kernels (lora.py) have in common lives here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

# The interpreter (CPU tests) runs every autotune candidate in numpy: use one small fixed config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SEGMENTS = 64  # segments are runs of one shape; a batch holds a handful of shapes


def m_bucket(rows: int) -> tuple[int, str]:
    """(bucket, regime) of a batch of `rows` rows: decode, mixed/chunked or prefill."""
    # The bucket is an autotune key, so a new batch size in a known regime does not re-tune.
    if rows <= 16:
        return 16, "decode"
    if rows <= 128:
        return 128, "mid"
    return 1024, "prefill"


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def gpu_table(tables: dict[str, dict[str, list[triton.Config]]], device: torch.device) -> str:
    """Key of `tables` for this GPU: first key contained in the device name, else "default"."""
    name = _gpu_name(device)
    return next((key for key in tables if key != "default" and key in name), "default")


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
    )


# Candidates per GPU kind and M regime, not measured choices: autotune times them on first use.
# Decode: one 16-row tile, split N finely so enough programs stream the weight, wide K steps.
# Prefill: square-ish 2-D tiles for tl.dot reuse. Fewer stages where shared memory is small.
MATMUL_CONFIGS: dict[str, dict[str, list[triton.Config]]] = {
    "default": {
        "decode": [_cfg(16, bn, bk, 4, 3) for bn in (32, 64) for bk in (64, 128)],
        "mid": [_cfg(bm, 64, 64, 4, 3) for bm in (32, 64)],
        "prefill": [_cfg(64, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 3), _cfg(128, 64, 32, 4, 3)],
    },
    "H100": {
        "decode": [
            _cfg(16, bn, bk, 4, s) for bn in (32, 64, 128) for bk in (64, 128) for s in (4, 5)
        ],
        "mid": [_cfg(bm, bn, 64, 4, 4) for bm in (32, 64) for bn in (64, 128)],
        "prefill": [
            _cfg(64, 128, 64, 4, 4),
            _cfg(128, 64, 64, 4, 4),
            _cfg(128, 128, 64, 8, 4),
            _cfg(128, 256, 64, 8, 3),
        ],
    },
    "A100": {
        "decode": [
            _cfg(16, bn, bk, 4, s) for bn in (32, 64, 128) for bk in (64, 128) for s in (3, 4)
        ],
        "mid": [_cfg(bm, bn, 64, 4, 3) for bm in (32, 64) for bn in (64, 128)],
        "prefill": [_cfg(64, 128, 32, 4, 4), _cfg(128, 64, 32, 4, 4), _cfg(128, 128, 32, 8, 3)],
    },
}
MATMUL_CONFIGS["H200"] = MATMUL_CONFIGS["H100"]
MATMUL_CONFIGS["H800"] = MATMUL_CONFIGS["H100"]
MATMUL_CONFIGS["A800"] = MATMUL_CONFIGS["A100"]
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def check_segment_metadata(
    rows: int,
    device: torch.device,
    seg_offsets: Tensor,
    per_segment: dict[str, tuple[Tensor, int, int]],
    check: bool = True,
) -> int:
    """Validate segment metadata and return the segment count S.

    Always checks dtype (int32), device, rank and lengths (no host sync). With `check`, also copies
    the values to the host once (a GPU sync; pass check=False inside CUDA graphs) and checks that
    seg_offsets runs 0..rows non-decreasing and each per-segment value lies in its [lo, hi].
    """
    tensors = {"seg_offsets": seg_offsets, **{k: v[0] for k, v in per_segment.items()}}
    for name, t in tensors.items():
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the activations on {device}")
        if t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D tensor, got shape {tuple(t.shape)}")
    segments = seg_offsets.numel() - 1
    if segments < 1:
        raise ValueError(f"seg_offsets needs at least 2 entries [0, ..., T], got {segments + 1}")
    for name, (t, _, _) in per_segment.items():
        if t.numel() != segments:
            raise ValueError(
                f"{name} has {t.numel()} entries, expected one per segment ({segments})"
            )
    if not check:
        return segments
    host = [int(v) for v in torch.cat(list(tensors.values())).tolist()]
    offs = host[: segments + 1]
    if offs[0] != 0 or offs[-1] != rows:
        raise ValueError(f"seg_offsets must run from 0 to T={rows}, got {offs[0]}..{offs[-1]}")
    for i in range(segments):
        if offs[i + 1] < offs[i]:
            raise ValueError(
                f"seg_offsets must be non-decreasing: seg_offsets[{i}]={offs[i]} > "
                f"seg_offsets[{i + 1}]={offs[i + 1]}"
            )
    pos = segments + 1
    for name, (_, lo, hi) in per_segment.items():
        for i, v in enumerate(host[pos : pos + segments]):
            if not lo <= v <= hi:
                raise ValueError(f"{name}[{i}]={v} is outside [{lo}, {hi}]")
        pos += segments
    return segments


def check_runnable(x: Tensor) -> None:
    """Triton needs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"Triton kernels need CUDA tensors (x is on {x.device}); on CPU use the torch ops "
            "on prefix views, or set TRITON_INTERPRET=1 for tests"
        )


def check_float(
    name: str, t: Tensor, dtype: torch.dtype | None = None, dtype_of: str = "x"
) -> None:
    """`t` is fp16/bf16/fp32 and, when given, exactly `dtype` (the dtype of `dtype_of`)."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must have {dtype_of}'s dtype {dtype}, got {t.dtype}")


def check_input(x: Tensor, name: str = "x") -> None:
    """x is a 2-D float activation, contiguous along features, on a device Triton can run on."""
    check_runnable(x)
    check_float(name, x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(
            f"{name} must be [T, features] and contiguous along features, got shape "
            f"{tuple(x.shape)} strides {x.stride()}"
        )


def check_weight(name: str, w: Tensor, x: Tensor, ndim: int, x_name: str = "x") -> None:
    """A weight has x's dtype and device, `ndim` dims and row-major contiguous storage."""
    check_float(name, w, x.dtype, x_name)
    if w.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {w.stride()}")
    if w.device != x.device:
        raise ValueError(f"{name} is on {w.device}, {x_name} is on {x.device}")


def segment_block(segments: int) -> int:
    """Segment-table width of the row-tile kernels, which hold a [BLOCK_M, S] mask in registers."""
    if segments > MAX_SEGMENTS:
        raise ValueError(
            f"{segments} segments: at most {MAX_SEGMENTS} (one per shape in a batch) are supported"
        )
    return triton.next_power_of_2(segments)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (no TF32) so fp32 results match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


# One autotuner per (kernel, GPU table, M regime), each timing only that regime's candidates.
_TUNERS: dict[tuple[int, str, str], Callable] = {}


def launch(
    kernel: Callable,
    tables: dict[str, dict[str, list[triton.Config]]],
    key: tuple[str, ...],
    grid: Callable[[dict], tuple[int, ...]],
    args: dict[str, object],
    rows: int,
    device: torch.device,
    interpret_config: dict[str, int],
    **autotune_kwargs: object,
) -> None:
    """Launch `kernel` with the tuned config of this GPU and M regime (fixed if interpreted)."""
    bucket, regime = m_bucket(rows)
    args = {**args, "M_BUCKET": bucket}
    if INTERPRET:
        kernel[grid(interpret_config)](**args, **interpret_config)  # type: ignore[index]
        return
    table = gpu_table(tables, device)
    tuner = _TUNERS.get((id(kernel), table, regime))
    if tuner is None:
        configs = tables[table][regime]
        tuner = triton.autotune(configs=configs, key=list(key), **autotune_kwargs)(kernel)
        _TUNERS[(id(kernel), table, regime)] = tuner
    tuner[grid](**args)  # type: ignore[index]


# tl.reduce with local combiners and tl.full, not tl.sum/tl.max/tl.zeros: those library helpers are
# jitted when triton.language is first imported, so they fail under TRITON_INTERPRET=1 whenever
# something (transformers does) imported triton before the variable was set. Same code on GPU.
@triton.jit
def add_combine(a, b):
    return a + b


@triton.jit
def max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def row_widths(off_ptr, seg_w_ptr, rows, S, max_w, S_BLOCK: tl.constexpr):
    """Width and segment index of each of `rows` (width 0 for a row in no segment)."""
    # One vector load of all segment bounds beats S dependent scalar loads per program.
    s = tl.arange(0, S_BLOCK)
    valid = s < S
    lo = tl.load(off_ptr + s, mask=valid, other=0)
    hi = tl.load(off_ptr + s + 1, mask=valid, other=0)
    width = tl.maximum(tl.load(seg_w_ptr + s, mask=valid, other=0), 0)
    inside = (rows[:, None] >= lo[None, :]) & (rows[:, None] < hi[None, :])  # [BM, S_BLOCK]
    row_w = tl.reduce(tl.where(inside, width[None, :], 0), 1, add_combine)
    row_seg = tl.reduce(tl.where(inside, s[None, :], 0), 1, add_combine)
    # Clamped: unchecked metadata (check=False, e.g. overlapping segments) may give wrong rows but
    # never reads out of bounds.
    return tl.minimum(row_w, max_w), tl.minimum(row_seg, S - 1)
