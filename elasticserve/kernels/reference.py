"""Pure-torch references of the segmented kernels: one obvious loop over segments, fp32 math.

Every Triton kernel in this package is tested against the function of the same name here.
Metadata is read with `.tolist()` (a host sync): these are for tests and CPU fallbacks, not the
hot path.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def _segments(seg_offsets: Tensor) -> list[tuple[int, int]]:
    """(start, end) row ranges of every segment."""
    return list(itertools.pairwise(int(v) for v in seg_offsets.tolist()))


def sliced_matmul_out(
    x: Tensor,
    w: Tensor,
    seg_offsets: Tensor,
    seg_n: Tensor,
    max_n: int,
    bias: Tensor | None = None,
) -> Tensor:
    """Reference output-prefix matmul: y[s, :n_s] = x[s] @ w[:n_s].T (+ bias[:n_s]), rest zero."""
    # x [T, K] ; w [N, K] ; y [T, max_n]
    y = torch.zeros(x.shape[0], max_n, dtype=torch.float32, device=x.device)
    for (lo, hi), n in zip(_segments(seg_offsets), seg_n.tolist(), strict=True):
        y[lo:hi, :n] = x[lo:hi].float() @ w[:n].float().T
        if bias is not None:
            y[lo:hi, :n] += bias[:n].float()
    return y.to(x.dtype)


def sliced_matmul_in(
    x: Tensor,
    wt: Tensor,
    seg_offsets: Tensor,
    seg_k: Tensor,
    max_k: int,
    seg_bias: Tensor | None = None,
) -> Tensor:
    """Reference input-prefix matmul: y[s] = x[s, :k_s] @ wt[:k_s] (+ seg_bias[s])."""
    # x [T, >= max_k] ; wt [K, N] ; seg_bias [S, N] ; y [T, N]
    y = torch.zeros(x.shape[0], wt.shape[1], dtype=torch.float32, device=x.device)
    for s, ((lo, hi), k) in enumerate(zip(_segments(seg_offsets), seg_k.tolist(), strict=True)):
        y[lo:hi] = x[lo:hi, :k].float() @ wt[:k].float()
        if seg_bias is not None:
            y[lo:hi] += seg_bias[s].float()
    return y.to(x.dtype)


def fused_gate_up_silu(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    seg_offsets: Tensor,
    seg_n: Tensor,
    max_n: int,
) -> Tensor:
    """Reference gate/up + SiLU-mul: h[s, :n_s] = silu(x[s] @ wg[:n_s].T) * (x[s] @ wu[:n_s].T)."""
    # x [T, H] ; w_gate, w_up [I, H] ; h [T, max_n]
    h = torch.zeros(x.shape[0], max_n, dtype=torch.float32, device=x.device)
    for (lo, hi), n in zip(_segments(seg_offsets), seg_n.tolist(), strict=True):
        xs = x[lo:hi].float()
        h[lo:hi, :n] = F.silu(xs @ w_gate[:n].float().T) * (xs @ w_up[:n].float().T)
    return h.to(x.dtype)


def lora_shrink(
    x: Tensor, a: Tensor, seg_offsets: Tensor, seg_k: Tensor, seg_adapter: Tensor
) -> Tensor:
    """Reference LoRA shrink: t[s] = x[s, :k_s] @ a[id_s, :k_s]; rows of adapter -1 are zero."""
    # x [T, >= k] ; a [A, K, R] ; t [T, R] fp32
    t = torch.zeros(x.shape[0], a.shape[2], dtype=torch.float32, device=x.device)
    metas = zip(_segments(seg_offsets), seg_k.tolist(), seg_adapter.tolist(), strict=True)
    for (lo, hi), k, ident in metas:
        if ident >= 0:
            t[lo:hi] = x[lo:hi, :k].float() @ a[ident, :k].float()
    return t


def lora_expand(
    y: Tensor,
    t: Tensor,
    b: Tensor,
    seg_offsets: Tensor,
    seg_n: Tensor,
    seg_adapter: Tensor,
    scale: float = 1.0,
) -> Tensor:
    """Reference LoRA expand, in place: y[s, :n_s] += scale * t[s] @ b[id_s, :, :n_s]."""
    # y [T, >= n] ; t [T, R] ; b [A, R, N]
    metas = zip(_segments(seg_offsets), seg_n.tolist(), seg_adapter.tolist(), strict=True)
    for (lo, hi), n, ident in metas:
        if ident >= 0:
            delta = scale * (t[lo:hi].float() @ b[ident, :, :n].float())
            y[lo:hi, :n] = (y[lo:hi, :n].float() + delta).to(y.dtype)
    return y
