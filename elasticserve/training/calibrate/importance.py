"""WIFV importance (FLAP's fluctuation metric) of heads and MLP channels, and bias compensation.

A channel's score is the variance of its input activation to `o`/`down` over the calibration tokens
times the squared norm of its weight column there: what pruning it would move the residual stream
by, beyond its mean, which bias compensation adds back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from ...model.config import ModelConfig
from ...model.step_plan import BiasTable

LayerWidths = dict[float, tuple[tuple[int, ...], tuple[int, ...]]]


@dataclass
class ChannelStats:
    """Running first and second moments of one linear's input channels (fp64)."""

    total: torch.Tensor  # [D]
    squares: torch.Tensor  # [D]
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()  # [tokens, D]
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def var(self) -> torch.Tensor:
        return (self.squares / self.count - self.mean**2).clamp_min(0)


@dataclass
class LayerStats:
    attn: ChannelStats  # inputs of o_proj: [n_heads*hd], original head order
    mlp: ChannelStats  # inputs of down_proj: [I], original channel order


def load_dense(model_dir: str | os.PathLike[str]) -> PreTrainedModel:
    """The base model as a plain fp32 transformers model (the reference for calibration)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def _zeros(n: int) -> ChannelStats:
    return ChannelStats(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64))


@torch.inference_mode()
def activation_stats(hf: PreTrainedModel, ids: torch.Tensor, batch: int = 4) -> list[LayerStats]:
    """Input moments of every layer's o and down projections over calibration windows [N, T]."""
    stats = []
    handles = []
    for block in hf.model.layers:
        s = LayerStats(
            _zeros(block.self_attn.o_proj.in_features), _zeros(block.mlp.down_proj.in_features)
        )
        stats.append(s)
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(_hook(s.attn)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(_hook(s.mlp)))
    try:
        for start in tqdm(range(0, ids.shape[0], batch), desc="activation statistics"):
            hf.model(ids[start : start + batch])  # the LM head is not needed
    finally:
        for h in handles:
            h.remove()
    return stats


def _hook(stats: ChannelStats):
    def hook(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        stats.add(args[0])

    return hook


def wifv_scores(
    hf: PreTrainedModel, stats: list[LayerStats], config: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of heads [L, n_heads] and MLP channels [L, I] in original order."""
    heads, mlp = [], []
    for block, s in zip(hf.model.layers, stats, strict=True):
        o = block.self_attn.o_proj.weight.double()  # [H, n_heads*hd]
        down = block.mlp.down_proj.weight.double()  # [H, I]
        attn = s.attn.var * o.pow(2).sum(0)  # [n_heads*hd]
        heads.append(attn.view(config.num_heads, config.head_dim).sum(1))
        mlp.append(s.mlp.var * down.pow(2).sum(0))
    return torch.stack(heads).float(), torch.stack(mlp).float()


def head_order(scores: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Rank-major serving order of one layer's heads: slot i is rank i // G of group i % G."""
    # scores [n_heads] original order; heads of group g are g*per_group ... (g+1)*per_group - 1
    groups, per_group = config.num_groups, config.num_heads // config.num_groups
    ranked = scores.view(groups, per_group).argsort(dim=1, descending=True, stable=True)
    ranked = ranked + torch.arange(groups)[:, None] * per_group  # [G, per_group] original heads
    return ranked.t().reshape(-1)  # slot r*G + g = rank r of group g


def orders(
    head_scores: torch.Tensor, mlp_scores: torch.Tensor, config: ModelConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer head and MLP channel orders, most important first."""
    heads = [head_order(s, config) for s in head_scores]
    mlp = [s.argsort(descending=True, stable=True) for s in mlp_scores]
    return heads, mlp


def cut_head_columns(order: torch.Tensor, keep: int, head_dim: int) -> torch.Tensor:
    """o's input columns of the heads past the first `keep` of a layer's serving `order`."""
    cut = order[keep:]
    return (cut[:, None] * head_dim + torch.arange(head_dim)).flatten()


def mean_contribution(weight: torch.Tensor, cut: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """What input channels `cut` add to a linear's output on average: `W[:, cut] @ mean[cut]`."""
    return weight.double()[:, cut] @ mean[cut]  # [out], fp64


def bias_compensation(
    hf: PreTrainedModel,
    stats: list[LayerStats],
    head_orders: list[torch.Tensor],
    mlp_orders: list[torch.Tensor],
    layer_widths: LayerWidths,
    config: ModelConfig,
) -> BiasTable:
    """Per (width, layer): the mean contribution of the pruned o/down inputs, `Wt[k:].T @ mean`."""
    table: BiasTable = {}
    for layer, (block, s) in enumerate(zip(hf.model.layers, stats, strict=True)):
        o = block.self_attn.o_proj.weight.double()  # [H, n_heads*hd]
        down = block.mlp.down_proj.weight.double()  # [H, I]
        for width, (heads, mlp) in layer_widths.items():
            if heads[layer] == config.num_heads and mlp[layer] == config.intermediate_size:
                continue
            cols = cut_head_columns(head_orders[layer], heads[layer], config.head_dim)
            o_bias = mean_contribution(o, cols, s.attn.mean)  # [H]
            down_bias = mean_contribution(down, mlp_orders[layer][mlp[layer] :], s.mlp.mean)
            table[(width, layer)] = (o_bias.float(), down_bias.float())
    return table
