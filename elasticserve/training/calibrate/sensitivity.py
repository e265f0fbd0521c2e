"""Per-layer widths chosen by measured damage: each layer's KL cost at each width, then a knapsack.

A global importance ranking (widths.py) compares channels of different layers by normalised scores,
and keeps the uniform split between heads and MLP channels. Here instead every layer is pruned
alone, to each candidate number of heads and of MLP channels (in its importance order, with bias
compensation), and the KL of the model's next-token distribution from the full model's is measured
on a calibration batch. Summing those costs over layers and minimising the sum under each width's
byte budget is a multiple-choice knapsack, solved exactly by dynamic programming over bytes; the
widths of a smaller ratio are bounded by the next larger ratio's so the bands stay nested.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from ...model.config import ModelConfig
from ...model.pack import channel_multiple, uniform_widths
from .depth import LayerRunner
from .importance import LayerStats, cut_head_columns, mean_contribution
from .widths import LayerWidths, check_widths

MLP_LEVELS = (0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # kept fractions measured per layer


@dataclass
class LayerCosts:
    """KL of pruning one layer alone: heads[l][k] at head_counts[k], mlp[l][k] at mlp_counts[k]."""

    head_counts: list[int]  # ascending, the last is all heads (cost 0)
    mlp_counts: list[int]  # ascending, the last is all channels (cost 0)
    heads: torch.Tensor  # [L, len(head_counts)]
    mlp: torch.Tensor  # [L, len(mlp_counts)]


@contextmanager
def _pruned_input(linear: torch.nn.Linear, cut: torch.Tensor, mean: torch.Tensor) -> Iterator[None]:
    """While open, `linear` sees its input channels `cut` removed and their mean added back."""
    mask = torch.ones(linear.in_features, dtype=linear.weight.dtype)
    mask[cut] = 0
    bias = mean_contribution(linear.weight, cut, mean).to(linear.weight.dtype)
    pre = linear.register_forward_pre_hook(lambda _m, args: (args[0] * mask,))
    post = linear.register_forward_hook(lambda _m, _args, out: out + bias)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def layer_costs(
    hf: PreTrainedModel,
    runner: LayerRunner,
    stats: list[LayerStats],
    head_orders: list[torch.Tensor],
    mlp_orders: list[torch.Tensor],
    config: ModelConfig,
    mlp_levels: Sequence[float] = MLP_LEVELS,
    progress: bool = True,
) -> LayerCosts:
    """Every layer's KL cost at each head count (multiples of the KV groups) and MLP level."""
    groups, mult = config.num_groups, channel_multiple(config)
    head_counts = list(range(groups, config.num_heads + 1, groups))
    mlp_counts = sorted(
        {max(mult, round(config.intermediate_size * f / mult) * mult) for f in mlp_levels}
        | {config.intermediate_size}
    )
    num = config.num_layers
    heads = torch.zeros(num, len(head_counts))
    mlp = torch.zeros(num, len(mlp_counts))
    total = num * (len(head_counts) + len(mlp_counts) - 2)
    bar = tqdm(total=total, desc="width sensitivity", disable=not progress)
    everything = list(range(num))
    for layer, (block, s) in enumerate(zip(hf.model.layers, stats, strict=True)):
        for k, count in enumerate(head_counts[:-1]):
            cut = cut_head_columns(head_orders[layer], count, config.head_dim)
            with _pruned_input(block.self_attn.o_proj, cut, s.attn.mean):
                heads[layer, k] = runner.score(everything, layer)
            bar.update()
        for k, count in enumerate(mlp_counts[:-1]):
            with _pruned_input(block.mlp.down_proj, mlp_orders[layer][count:], s.mlp.mean):
                mlp[layer, k] = runner.score(everything, layer)
            bar.update()
    bar.close()
    return LayerCosts(head_counts, mlp_counts, heads, mlp)


def _interpolated(counts: list[int], costs: torch.Tensor, grid: list[int]) -> torch.Tensor:
    """Costs [L, len(counts)] at each count of `grid`, piecewise linear between measured counts."""
    x = torch.tensor(counts, dtype=torch.float64)
    out = torch.empty(costs.shape[0], len(grid))
    for j, g in enumerate(grid):
        hi = int(torch.searchsorted(x, torch.tensor(float(g))).clamp(1, len(counts) - 1))
        t = (g - counts[hi - 1]) / (counts[hi] - counts[hi - 1])
        out[:, j] = costs[:, hi - 1] + t * (costs[:, hi] - costs[:, hi - 1])
    return out.clamp_min(0)


def knapsack_widths(costs: LayerCosts, config: ModelConfig, widths: Sequence[float]) -> LayerWidths:
    """Per-layer (heads, channels) per ratio minimising the summed KL within uniform's bytes."""
    mult = channel_multiple(config)
    mlp_grid = list(range(costs.mlp_counts[0], config.intermediate_size + 1, mult))
    mlp_cost = _interpolated(costs.mlp_counts, costs.mlp, mlp_grid)  # [L, M]
    head_cost = costs.heads  # [L, Hc]
    # option (h, m) of a layer: its cost, and its bytes in units above the layer's smallest option
    base = config.layer_params(costs.head_counts[0], mlp_grid[0])
    sizes = [
        [config.layer_params(h, m) - base for m in mlp_grid] for h in costs.head_counts
    ]  # [Hc][M]
    unit = max(1, math.gcd(*(s for row in sizes for s in row)))
    units = torch.tensor(sizes) // unit  # [Hc, M]
    option_cost = head_cost[:, :, None] + mlp_cost[:, None, :]  # [L, Hc, M]
    out: LayerWidths = {}
    cap_h = [len(costs.head_counts) - 1] * config.num_layers
    cap_m = [len(mlp_grid) - 1] * config.num_layers
    for width in sorted(widths, reverse=True):
        u_heads, u_mlp = uniform_widths(config, width)
        budget = sum(config.layer_params(h, m) for h, m in zip(u_heads, u_mlp, strict=True))
        budget_units = (budget - base * config.num_layers) // unit
        if width == 1.0:
            chosen = list(zip(cap_h, cap_m, strict=True))
        else:
            chosen = _solve(option_cost, units, int(budget_units), cap_h, cap_m)
        cap_h = [h for h, _ in chosen]
        cap_m = [m for _, m in chosen]
        out[width] = (
            tuple(costs.head_counts[h] for h in cap_h),
            tuple(mlp_grid[m] for m in cap_m),
        )
    check_widths(out, config)
    return out


def _solve(
    option_cost: torch.Tensor,
    units: torch.Tensor,
    budget: int,
    cap_h: list[int],
    cap_m: list[int],
) -> list[tuple[int, int]]:
    """Exact multiple-choice knapsack: one (h, m) per layer within caps, at most `budget` units."""
    num, _, n_m = option_cost.shape
    if budget < 0:
        raise ValueError("the width's byte budget is below every layer's narrowest measured option")
    inf = float("inf")
    best = torch.full((budget + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []  # per layer: [budget + 1] flat option index that reached each total
    for layer in range(num):
        new = torch.full_like(best, inf)
        pick = torch.full((budget + 1,), -1, dtype=torch.long)
        for h in range(cap_h[layer] + 1):
            for m in range(cap_m[layer] + 1):
                size = int(units[h, m])
                if size > budget:
                    continue
                cand = best[: budget + 1 - size] + float(option_cost[layer, h, m])
                better = cand < new[size:]
                new[size:] = torch.where(better, cand, new[size:])
                pick[size:] = torch.where(better, torch.tensor(h * n_m + m), pick[size:])
        best = new
        picks.append(pick)
    total = int(best.argmin())
    if best[total] == inf:
        raise ValueError(f"no per-layer widths fit a budget of {budget} units")
    chosen = []
    for layer in reversed(range(num)):
        flat = int(picks[layer][total])
        h, m = divmod(flat, n_m)
        chosen.append((h, m))
        total -= int(units[h, m])
    return chosen[::-1]
