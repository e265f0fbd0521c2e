"""Segmented prefix linears: rows grouped into runs of one width, each width a weight prefix.

`Bands` describes the rows of a step sorted by width, widest first: rows `[prev_end, row_end)`
keep `width` output (or input) features. On CPU each weight row is read once ("nested bands":
the narrowest prefix for all rows, then each wider slice for the rows that keep it), so a
mixed-width step costs what its widest rows cost, not the sum of its segments. When the bands
carry device metadata (CUDA), the Triton kernels run the whole mixed batch in one launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Bands:
    runs: tuple[tuple[int, int], ...]  # (row_end, width), widths strictly decreasing
    offsets: torch.Tensor | None = None  # [S+1] int32 row offsets on the device: use the kernels
    widths: torch.Tensor | None = None  # [S] int32

    @property
    def widest(self) -> int:
        return self.runs[0][1]


def make_bands(
    rows_and_widths: list[tuple[int, int]], kernel_device: torch.device | str | None = None
) -> Bands:
    """Merge consecutive (row_end, width) runs of equal width; widths must not increase.

    With `kernel_device`, the segment metadata is also put there for the Triton kernels.
    """
    runs: list[tuple[int, int]] = []
    for row_end, width in rows_and_widths:
        if runs and runs[-1][1] == width:
            runs[-1] = (row_end, width)
            continue
        if runs and runs[-1][1] < width:
            raise ValueError(f"band widths must not increase: {runs[-1][1]} then {width}")
        runs.append((row_end, width))
    if kernel_device is None:
        return Bands(tuple(runs))
    offsets = torch.tensor([0] + [r for r, _ in runs], dtype=torch.int32, device=kernel_device)
    widths = torch.tensor([w for _, w in runs], dtype=torch.int32, device=kernel_device)
    return Bands(tuple(runs), offsets, widths)


def linear_out(
    x: torch.Tensor, w: torch.Tensor, bands: Bands, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Output-prefix flavour (q, gate, up): y[r, :n_r] = x[r] @ w[:n_r].T (+ bias[:n_r]).

    Columns past a row's width are undefined on CPU (zero from the kernel): no later op reads them.
    """
    # x [T, K] ; w [N, K] ; y [T, n_widest]
    if bands.offsets is not None and bands.widths is not None:
        from ..kernels.sliced_matmul import sliced_matmul_out

        return sliced_matmul_out(x, w, bands.offsets, bands.widths, bands.widest, bias, check=False)
    if len(bands.runs) == 1:
        n = bands.widest
        return F.linear(x, w[:n], None if bias is None else bias[:n])
    y = x.new_empty(x.shape[0], bands.widest)
    lo = 0
    for rows, n in reversed(bands.runs):  # narrowest band spans every row
        b = None if bias is None else bias[lo:n]
        y[:rows, lo:n] = F.linear(x[:rows], w[lo:n], b)
        lo = n
    return y


def linear_in(x: torch.Tensor, wt: torch.Tensor, bands: Bands) -> torch.Tensor:
    """Input-prefix flavour (o, down): y[r] = x[r, :k_r] @ wt[:k_r], wt stored transposed."""
    # x [T, >= k_widest] ; wt [K, N] ; y [T, N]
    if bands.offsets is not None and bands.widths is not None:
        from ..kernels.sliced_matmul import sliced_matmul_in

        # the kernels read [K, N] rows; a CPU model keeps [N, K] (weights._transposed), so the
        # kernels on CPU (the Triton interpreter, in tests) take a copy
        wt = wt if wt.is_contiguous() else wt.contiguous()
        return sliced_matmul_in(x, wt, bands.offsets, bands.widths, bands.widest, check=False)
    _, k_min = bands.runs[-1]
    y = x[:, :k_min] @ wt[:k_min]
    lo = k_min
    for rows, k in reversed(bands.runs[:-1]):
        y[:rows].addmm_(x[:rows, lo:k], wt[lo:k])
        lo = k
    return y
