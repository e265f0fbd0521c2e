"""Segmented prefix linears: rows grouped into runs of one width, each width a weight prefix.

A *band* list `((row_end, width), ...)` describes the rows of a step sorted by width, widest first:
rows `[prev_row_end, row_end)` keep `width` output (or input) features. Each weight row is read once
("nested bands": the narrowest prefix for all rows, then each wider slice for the rows that keep
it),
so a mixed-width step costs what its widest rows cost, not the sum of its segments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Bands = tuple[tuple[int, int], ...]


def make_bands(rows_and_widths: list[tuple[int, int]]) -> Bands:
    """Merge consecutive (row_end, width) runs of equal width; widths must not increase."""
    bands: list[tuple[int, int]] = []
    for row_end, width in rows_and_widths:
        if bands and bands[-1][1] == width:
            bands[-1] = (row_end, width)
            continue
        if bands and bands[-1][1] < width:
            raise ValueError(f"band widths must not increase: {bands[-1][1]} then {width}")
        bands.append((row_end, width))
    return tuple(bands)


def linear_out(x: torch.Tensor, w: torch.Tensor, bands: Bands, bias: torch.Tensor | None = None):
    """Output-prefix flavour (q, gate, up): y[r, :n_r] = x[r] @ w[:n_r].T (+ bias[:n_r]).

    Columns past a row's width are left undefined: no later op reads them.
    """
    # x [T, K] ; w [N, K] ; y [T, n_widest]
    if len(bands) == 1:
        n = bands[0][1]
        return F.linear(x, w[:n], None if bias is None else bias[:n])
    y = x.new_empty(x.shape[0], bands[0][1])
    lo = 0
    for rows, n in reversed(bands):  # narrowest band spans every row
        if n > lo:
            b = None if bias is None else bias[lo:n]
            y[:rows, lo:n] = F.linear(x[:rows], w[lo:n], b)
            lo = n
    return y


def linear_in(x: torch.Tensor, wt: torch.Tensor, bands: Bands) -> torch.Tensor:
    """Input-prefix flavour (o, down): y[r] = x[r, :k_r] @ wt[:k_r], wt stored transposed."""
    # x [T, >= k_widest] ; wt [K, N] ; y [T, N]
    _rows_all, k_min = bands[-1]
    y = x[:, :k_min] @ wt[:k_min]
    lo = k_min
    for rows, k in reversed(bands[:-1]):
        y[:rows].addmm_(x[:rows, lo:k], wt[lo:k])
        lo = k
    return y
