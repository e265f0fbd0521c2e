"""Shared test helpers: random packs and physically pruned HF reference models."""

from __future__ import annotations

import copy
import itertools

import torch
from transformers import AutoModelForCausalLM

from elasticserve.model.bundle import ModelBundle
from elasticserve.model.pack import Pack, channel_multiple, rank_major_heads
from elasticserve.model.shapes import ShapeSpec
from elasticserve.model.step_plan import SeqChunk, build_step


def random_pack(pack: Pack, seed: int = 0, bias: bool = True) -> Pack:
    """A pack with random orderings, non-uniform monotone per-layer widths and random biases."""
    g = torch.Generator().manual_seed(seed)
    cfg = pack.config
    groups, per_group = cfg.num_groups, cfg.num_heads // cfg.num_groups
    head_order, mlp_order = [], []
    for _ in range(cfg.num_layers):
        ranks = torch.stack([torch.randperm(per_group, generator=g) for _ in range(groups)])
        # slot i = rank r of group g: original head g * per_group + ranks[g, r]
        slots = rank_major_heads(cfg)
        head_order.append(
            torch.tensor(
                [
                    (h // per_group) * per_group + ranks[h // per_group, h % per_group]
                    for h in slots.tolist()
                ]
            )
        )
        mlp_order.append(torch.randperm(cfg.intermediate_size, generator=g))
    mult = channel_multiple(cfg)
    widths = {}
    for w in pack.widths:
        heads, mlp = [], []
        for layer in range(cfg.num_layers):
            jitter = (layer % 3 - 1) * mult if w < 1 else 0  # non-uniform across layers
            base = round(cfg.intermediate_size * w / mult) * mult
            mlp.append(min(cfg.intermediate_size, max(mult, base + jitter)))
            hbase = max(groups, round(cfg.num_heads * w / groups) * groups)
            heads.append(min(cfg.num_heads, hbase + (groups if layer % 2 and w < 1 else 0)))
        widths[w] = (tuple(heads), tuple(mlp))
    # keep widths monotone in the ratio per layer, as calibration guarantees
    ordered = sorted(widths, reverse=True)
    for a, b in itertools.pairwise(ordered):
        ha, ma = widths[a]
        hb, mb = widths[b]
        widths[b] = (tuple(map(min, ha, hb)), tuple(map(min, ma, mb)))
    biases = {}
    if bias:
        for w in pack.widths:
            if w < 1:
                for layer in range(cfg.num_layers):
                    biases[(w, layer)] = (
                        0.05 * torch.randn(cfg.hidden_size, generator=g),
                        0.05 * torch.randn(cfg.hidden_size, generator=g),
                    )
    return Pack(
        pack.fingerprint, cfg, head_order, mlp_order, widths, dict(pack.layer_tables), biases
    )


def pruned_hf_model(model_dir, pack: Pack, spec: ShapeSpec) -> torch.nn.Module:
    """A dense HF model physically cut down to `spec`'s layers, heads and channels."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = pack.config
    hd = cfg.head_dim
    kept_layers = []
    for layer in spec.layers:
        block = hf.model.layers[layer]
        attn, mlp = block.self_attn, block.mlp
        heads = sorted(pack.head_order[layer][: spec.heads[layer]].tolist())  # group-major again
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        chans = pack.mlp_order[layer][: spec.mlp[layer]].sort().values
        attn.q_proj = _rows(attn.q_proj, rows)
        attn.o_proj = _cols(attn.o_proj, rows)
        attn.num_key_value_groups = len(heads) // cfg.num_kv_heads
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, chans), _rows(mlp.up_proj, chans)
        mlp.down_proj = _cols(mlp.down_proj, chans)
        if (bias := pack.bias.get((spec.shape.width, layer))) is not None:
            attn.o_proj.bias = torch.nn.Parameter(bias[0].clone())
            mlp.down_proj.bias = torch.nn.Parameter(bias[1].clone())
        kept_layers.append(block)
    hf.model.layers = torch.nn.ModuleList(kept_layers)
    return hf


def _rows(linear: torch.nn.Linear, rows: torch.Tensor) -> torch.nn.Linear:
    new = copy.deepcopy(linear)
    new.weight = torch.nn.Parameter(linear.weight[rows].clone())
    if linear.bias is not None:
        new.bias = torch.nn.Parameter(linear.bias[rows].clone())
    new.out_features = len(rows)
    return new


def _cols(linear: torch.nn.Linear, cols: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(len(cols), linear.out_features, bias=False)
    new.weight = torch.nn.Parameter(linear.weight[:, cols].clone())
    return new


def prefill_logits(
    bundle: ModelBundle, prompts: list[list[int]], specs: list[ShapeSpec], kernels: bool = False
) -> list[torch.Tensor]:
    """All-position logits of several sequences run together in one cache-less step."""
    chunks = [SeqChunk(s, p, logits="all") for p, s in zip(prompts, specs, strict=True)]
    cfg = bundle.config
    step = build_step(
        chunks, cfg.num_layers, cfg.head_dim, 2 * cfg.kv_size, 16, bundle.biases, kernels=kernels
    )
    logits = bundle.model.forward(step)
    return [logits[sl] for sl in step.logit_slices]
