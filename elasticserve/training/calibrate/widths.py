"""Per-layer widths from one global WIFV ranking across layers (a baseline), and width checks.

The pack's widths come from measured KL costs (sensitivity.py); this ranking is the training-free
baseline bench/bench_quality.py compares them with. Scores are divided by their layer's median
first: a layer's scale (and SmolLM2's massive activation, one channel holding most of a layer's
score) must not decide how much of it survives, and a mean would starve exactly the layers with
such outliers. The ranking is over *units* (64 channels, or one head per KV group), taken in each
layer's importance order, so every width is already rounded and a smaller ratio keeps a subset of
a larger one's units: widths are non-increasing per layer.
"""

from __future__ import annotations

import itertools

import torch

from ...model.config import ModelConfig
from ...model.pack import channel_multiple, uniform_widths

LayerWidths = dict[float, tuple[tuple[int, ...], tuple[int, ...]]]


def mlp_units(scores: torch.Tensor, multiple: int) -> torch.Tensor:
    """Score of each block of `multiple` channels in importance order: [L, I / multiple]."""
    ranked = scores.sort(dim=1, descending=True).values  # [L, I]
    return ranked.view(scores.shape[0], -1, multiple).sum(-1)


def head_units(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Score of each rank across KV groups (rank r: the r-th best head of each group): [L, n/G]."""
    per_group = scores.shape[1] // groups
    ranked = scores.view(scores.shape[0], groups, per_group).sort(dim=2, descending=True).values
    return ranked.sum(1)  # [L, per_group]


def allocate(units: torch.Tensor, keep: int) -> list[int]:
    """Units kept per layer when the `keep` best of all layers' units [L, U] survive (>= 1 each)."""
    num_layers, per_layer = units.shape
    if not num_layers <= keep <= units.numel():
        raise ValueError(f"cannot keep {keep} of {units.numel()} units with one per layer")
    forced = units.clone()
    forced[:, 0] = float("inf")  # the floor survives whatever its score
    # stable: ties go to the earlier unit, so a layer's kept units are always a prefix, and a
    # smaller `keep` takes a prefix of the same ranking: a subset of a larger one's units
    order = forced.flatten().argsort(descending=True, stable=True)[:keep]
    return torch.bincount(order // per_layer, minlength=num_layers).tolist()


def median_normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores [L, n] divided by each layer's median score."""
    return scores / scores.median(dim=1, keepdim=True).values.clamp_min(1e-30)


def global_widths(
    head_scores: torch.Tensor,
    mlp_scores: torch.Tensor,
    config: ModelConfig,
    widths: list[float],
) -> LayerWidths:
    """Per-layer (heads, MLP channels) per ratio: as many of each as uniform widths keep."""
    groups, mult = config.num_groups, channel_multiple(config)
    if config.intermediate_size % mult:
        raise ValueError(
            f"intermediate size {config.intermediate_size} is not a multiple of {mult}"
        )
    heads_u = head_units(median_normalised(head_scores), groups)  # [L, n_heads / G]
    mlp_u = mlp_units(median_normalised(mlp_scores), mult)  # [L, I / mult]
    out: LayerWidths = {}
    for width in sorted(widths, reverse=True):
        u_heads, u_mlp = uniform_widths(config, width)  # the uniform baseline's bytes
        heads = allocate(heads_u, sum(u_heads) // groups)
        mlp = allocate(mlp_u, sum(u_mlp) // mult)
        out[width] = (tuple(h * groups for h in heads), tuple(m * mult for m in mlp))
    check_widths(out, config)
    return out


def check_widths(layer_widths: LayerWidths, config: ModelConfig) -> None:
    """Reject widths off the grid or growing as the ratio shrinks (nested bands rely on it)."""
    groups, mult = config.num_groups, channel_multiple(config)
    for width, (heads, mlp) in layer_widths.items():
        if len(heads) != config.num_layers or len(mlp) != config.num_layers:
            raise ValueError(f"width {width}: need one entry per layer ({config.num_layers})")
        for layer, (h, m) in enumerate(zip(heads, mlp, strict=True)):
            if h % groups or not groups <= h <= config.num_heads:
                raise ValueError(
                    f"width {width} layer {layer}: {h} heads is not a multiple of {groups}"
                )
            if m % mult or not mult <= m <= config.intermediate_size:
                raise ValueError(
                    f"width {width} layer {layer}: {m} channels is not a multiple of {mult}"
                )
    for wide, narrow in itertools.pairwise(sorted(layer_widths, reverse=True)):
        for layer in range(config.num_layers):
            (hw, mw), (hn, mn) = (
                (layer_widths[w][0][layer], layer_widths[w][1][layer]) for w in (wide, narrow)
            )
            if hn > hw or mn > mw:
                raise ValueError(
                    f"layer {layer} is wider at width {narrow} ({hn} heads, {mn} channels) than at "
                    f"{wide} ({hw} heads, {mw} channels): widths must not grow as the ratio shrinks"
                )
