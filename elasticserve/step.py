"""One forward step's inputs: rows sorted into shape segments, and a plan per layer, built once.

The engine hands over one `SeqChunk` per scheduled sequence; `build_step` sorts them widest first
(so every elastic linear runs as nested bands), and precomputes for every layer which rows run it,
where their new K/V go in the paged cache and which cached slots each row attends to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ops import Bands, make_bands
from .shapes import ShapeSpec

BiasTable = dict[
    tuple[float, int], tuple[torch.Tensor, torch.Tensor]
]  # (width, layer) -> (o, down)


@dataclass
class SeqChunk:
    """The tokens one sequence runs in this step."""

    spec: ShapeSpec
    token_ids: list[int]
    num_computed: int = 0  # tokens of this sequence already in the cache
    block_table: list[list[int]] | None = None  # [kept layer][logical block]; None: no cache
    logits: str = "last"  # which rows' logits to return: "last", "all" or "none"


@dataclass
class DecodePlan:
    rows: torch.Tensor  # [B] layer-local rows that decode one token
    slots: torch.Tensor  # [B, L] cache slots of each row's context (padded)
    mask: torch.Tensor | None  # [B, 1, 1, L] True where the slot is in the row's context


@dataclass
class PrefillPlan:
    start: int  # first layer-local row
    num_tokens: int
    heads: int  # query heads this sequence keeps in this layer
    slots: torch.Tensor | None  # [c] cached + new slots; None: attend to the fresh keys only
    mask: torch.Tensor | None  # [n, c] causal mask offset by the cached length


@dataclass
class LayerPlan:
    rows: slice | torch.Tensor  # rows of the step that run this layer
    attn_bands: Bands  # (local row end, q/o features) widest first
    mlp_bands: Bands  # (local row end, MLP channels)
    biases: list[tuple[slice, torch.Tensor, torch.Tensor]]  # bias compensation (rows, o, down)
    # per chunk, in row order: (local row end, shape id, q/o features, MLP channels); plain tuples
    # keep planning cheap, per-shape LoRA (lora.bind_layer) reads them only when adapters exist
    segments: list[tuple[int, int, int, int]]
    write_slots: torch.Tensor | None  # [T_l] cache slot of each row's new K/V
    decode: DecodePlan | None = None
    prefills: list[PrefillPlan] = field(default_factory=list)


@dataclass
class StepInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    layers: list[LayerPlan | None]  # None: no row keeps that layer
    logit_rows: torch.Tensor  # [N] rows whose logits are returned
    logit_slices: list[slice]  # per input chunk (input order): its rows of the returned logits


def _slots(table: list[int], start: int, stop: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


def build_step(
    chunks: list[SeqChunk],
    num_layers: int,
    head_dim: int,
    block_size: int,
    biases: BiasTable | None = None,
    device: torch.device | str = "cpu",
    kernels: bool = False,
) -> StepInput:
    """Sort chunks into width segments and plan every layer of one forward step.

    `kernels` puts each layer's segment metadata on `device` for the Triton kernels.
    """
    biases = biases or {}
    order = sorted(
        range(len(chunks)),
        key=lambda i: (-chunks[i].spec.shape.width, chunks[i].spec.id, chunks[i].num_computed == 0),
    )
    sorted_chunks = [chunks[i] for i in order]
    starts: list[int] = []
    ids: list[int] = []
    positions: list[int] = []
    for c in sorted_chunks:
        starts.append(len(ids))
        ids += c.token_ids
        positions += range(c.num_computed, c.num_computed + len(c.token_ids))

    plans: list[LayerPlan | None] = []
    for layer in range(num_layers):
        active = [j for j, c in enumerate(sorted_chunks) if c.spec.kept[layer]]
        plans.append(
            _plan_layer(
                layer, active, sorted_chunks, starts, head_dim, block_size, biases, device, kernels
            )
            if active
            else None
        )

    logit_rows: list[int] = []
    logit_slices: list[slice] = [slice(0, 0)] * len(chunks)
    for j, c in enumerate(sorted_chunks):
        n, first = len(c.token_ids), len(logit_rows)
        if c.logits == "all":
            logit_rows += range(starts[j], starts[j] + n)
        elif c.logits == "last":
            logit_rows.append(starts[j] + n - 1)
        logit_slices[order[j]] = slice(first, len(logit_rows))

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return StepInput(tensor(ids), tensor(positions), plans, tensor(logit_rows), logit_slices)


def _plan_layer(
    layer: int,
    active: list[int],
    chunks: list[SeqChunk],
    starts: list[int],
    head_dim: int,
    block_size: int,
    biases: BiasTable,
    device: torch.device | str,
    kernels: bool,
) -> LayerPlan:
    """Plan one layer for the chunks (indices into `chunks`) whose shape keeps it."""
    spans = [(starts[j], starts[j] + len(chunks[j].token_ids)) for j in active]
    contiguous = all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    rows: slice | torch.Tensor
    if contiguous:
        rows = slice(spans[0][0], spans[-1][1])
    else:
        rows = torch.tensor([r for a, b in spans for r in range(a, b)], device=device)

    attn, mlp, plan_biases, write = [], [], [], []
    segments: list[tuple[int, int, int, int]] = []
    dec_rows, dec_tables, dec_lens = [], [], []
    prefills: list[PrefillPlan] = []
    local = 0
    for j in active:
        c = chunks[j]
        n, spec = len(c.token_ids), c.spec
        attn.append((local + n, spec.heads[layer] * head_dim))
        mlp.append((local + n, spec.mlp[layer]))
        segments.append((local + n, spec.id, attn[-1][1], spec.mlp[layer]))
        if (bias := biases.get((spec.shape.width, layer))) is not None:
            plan_biases.append((slice(local, local + n), *bias))
        ctx = c.num_computed + n
        if c.block_table is None:
            if c.num_computed:
                raise ValueError("a chunk with cached tokens needs a block table")
            prefills.append(PrefillPlan(local, n, spec.heads[layer], None, None))
        else:
            table = c.block_table[spec.layers.index(layer)]
            write += _slots(table, c.num_computed, ctx, block_size)
            if n == 1 and c.num_computed:
                dec_rows.append(local)
                dec_tables.append(table[: -(-ctx // block_size)])
                dec_lens.append(ctx)
            elif c.num_computed == 0:
                prefills.append(PrefillPlan(local, n, spec.heads[layer], None, None))
            else:
                slots = torch.tensor(_slots(table, 0, ctx, block_size), device=device)
                key = torch.arange(ctx, device=device)
                mask = key[None, :] <= (c.num_computed + torch.arange(n, device=device))[:, None]
                prefills.append(PrefillPlan(local, n, spec.heads[layer], slots, mask))
        local += n

    decode = _decode_plan(dec_rows, dec_tables, dec_lens, block_size, device) if dec_rows else None
    return LayerPlan(
        rows=rows,
        attn_bands=make_bands(attn, device if kernels else None),
        mlp_bands=make_bands(mlp, device if kernels else None),
        biases=plan_biases,
        segments=segments,
        write_slots=torch.tensor(write, device=device) if write else None,
        decode=decode,
        prefills=prefills,
    )


def _decode_plan(
    rows: list[int],
    tables: list[list[int]],
    lens: list[int],
    block_size: int,
    device: torch.device | str,
) -> DecodePlan:
    """Slots of every decoding row's context, padded to the longest, with a mask if they differ."""
    width = max(len(t) for t in tables)
    blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device)
    longest = max(lens)
    offsets = torch.arange(block_size, device=device)
    slots = (blocks[:, :, None] * block_size + offsets).flatten(1)[:, :longest]  # [B, L]
    mask = None
    if min(lens) < longest:  # SDPA is faster without a mask: pad only when lengths differ
        valid = (
            torch.arange(longest, device=device)[None, :]
            < torch.tensor(lens, device=device)[:, None]
        )
        mask = valid[:, None, None, :]  # [B, 1, 1, L]
    return DecodePlan(torch.tensor(rows, device=device), slots, mask)
