"""One forward step's inputs: rows sorted into shape segments, and a plan per layer, built once.

The engine hands over one `SeqChunk` per scheduled sequence; `build_step` sorts them widest first
(so every elastic linear runs as nested bands), and precomputes for every layer which rows run it,
where their new K/V go in the paged cache and which cached slots each row attends to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .ops import Bands, make_bands
from .shapes import PRECISION_ORDER, ShapeSpec

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
    blocks: torch.Tensor  # [B, ceil(L / block_size)] cache blocks of each row's context (padded)
    block_size: int
    length: int  # L: the longest context; a row's first L slots of its blocks are read
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
    qkv_bands: Bands  # the same rows, (local row end, v + k + q rows of the fused projection)
    mlp_bands: Bands  # (local row end, MLP channels)
    biases: list[tuple[slice, torch.Tensor, torch.Tensor]]  # bias compensation (rows, o, down)
    # per chunk, in row order: (local row end, shape id, q/o features, MLP channels); plain tuples
    # keep planning cheap, per-shape LoRA (lora.bind_step) reads them only when adapters exist
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


def step_order(chunks: Sequence[SeqChunk]) -> list[int]:
    """The chunks' order in a step: by precision (the model's dtype, q8, q4: each reads its own
    copy of the weights), then widest shape first (every elastic linear then runs on nested
    bands, widths non-increasing down the rows), a shape's chunks together."""

    def key(i: int) -> tuple[int, float, int, bool]:
        shape = chunks[i].spec.shape
        rank = PRECISION_ORDER.index(shape.precision)
        return (rank, -shape.width, chunks[i].spec.id, chunks[i].num_computed == 0)

    return sorted(range(len(chunks)), key=key)


class BlockPool:
    """Block tables handed out from consecutive blocks of one scratch cache, one table per kept
    layer, as the block manager would: for steps run outside the engine (evaluation, tests)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks = 0  # handed out so far

    def table(self, spec: ShapeSpec, tokens: int) -> list[list[int]]:
        need = -(-tokens // self.block_size)
        start, self.blocks = self.blocks, self.blocks + need * len(spec.layers)
        return [
            list(range(start + i * need, start + (i + 1) * need)) for i in range(len(spec.layers))
        ]


def _slots(table: list[int], start: int, stop: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


def build_step(
    chunks: list[SeqChunk],
    num_layers: int,
    head_dim: int,
    kv_width: int,
    block_size: int,
    biases: BiasTable | None = None,
    device: torch.device | str = "cpu",
    kernels: bool = False,
) -> StepInput:
    """Sort chunks into width segments and plan every layer of one forward step.

    `kv_width` is the rows of v and k ahead of q in the fused projection (2 * kv heads * head_dim);
    `kernels` puts each layer's segment metadata on `device` for the Triton kernels.
    """
    biases = biases or {}
    order = step_order(chunks)
    sorted_chunks = [chunks[i] for i in order]
    starts: list[int] = []
    ids: list[int] = []
    positions: list[int] = []
    for c in sorted_chunks:
        starts.append(len(ids))
        ids += c.token_ids
        positions += range(c.num_computed, c.num_computed + len(c.token_ids))

    decoding = _DecodeSlots.build(sorted_chunks, num_layers, block_size, device)
    plans: list[LayerPlan | None] = []
    for layer in range(num_layers):
        active = [j for j, c in enumerate(sorted_chunks) if c.spec.kept[layer]]
        plans.append(
            _plan_layer(
                layer,
                active,
                sorted_chunks,
                starts,
                head_dim,
                kv_width,
                block_size,
                biases,
                decoding,
                device,
                kernels,
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


def _is_decode(c: SeqChunk) -> bool:
    return len(c.token_ids) == 1 and c.num_computed > 0 and c.block_table is not None


@dataclass
class _DecodeSlots:
    """Cache blocks of every decoding chunk in every layer, computed in one go for the step.

    Per layer, a plan then takes views of these (the same rows, the same padded length and
    mask in every layer a chunk keeps) instead of rebuilding its tensors from lists.
    """

    index: dict[int, int]  # sorted chunk -> its row in the tensors below
    blocks: torch.Tensor  # [D, num_layers, W] context blocks, padded (0 where a layer is not kept)
    block_size: int
    written: torch.Tensor  # [D, num_layers] the slot of each chunk's new token
    lens: list[int]  # [D] context lengths
    mask: torch.Tensor | None  # [D, 1, 1, L] True where the slot is in context; None: all equal
    rows: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # made once a step

    @classmethod
    def build(
        cls, chunks: list[SeqChunk], num_layers: int, block_size: int, device: torch.device | str
    ) -> _DecodeSlots | None:
        decoding = [j for j, c in enumerate(chunks) if _is_decode(c)]
        if not decoding:
            return None
        lens = [chunks[j].num_computed + 1 for j in decoding]
        longest = max(lens)
        width = -(-longest // block_size)
        blocks = []
        for j in decoding:
            c = chunks[j]
            assert c.block_table is not None
            tables = dict(zip(c.spec.layers, c.block_table, strict=True))
            blocks.append([(tables.get(i, []) + [0] * width)[:width] for i in range(num_layers)])
        table = torch.tensor(blocks, device=device)  # [D, num_layers, width]
        last = torch.tensor(lens, device=device) - 1
        block = table.gather(2, (last // block_size)[:, None, None].expand(-1, num_layers, 1))
        written = block[..., 0] * block_size + (last % block_size)[:, None]
        mask = None
        if min(lens) < longest:  # SDPA is faster without a mask: pad only when lengths differ
            valid = torch.arange(longest, device=device)[None, :] <= last[:, None]
            mask = valid[:, None, None, :]
        index = {j: d for d, j in enumerate(decoding)}
        return cls(index, table, block_size, written, lens, mask)

    def plan(
        self, layer: int, rows: list[int], ds: list[int], device: torch.device | str
    ) -> DecodePlan:
        """The decode plan of the chunks `ds` (in order) at local `rows` of `layer`."""
        if ds == list(range(ds[0], ds[-1] + 1)):  # a run of chunks: views
            pick: slice | torch.Tensor = slice(ds[0], ds[-1] + 1)
        else:
            pick = torch.tensor(ds, device=device)
        lens = [self.lens[d] for d in ds]
        longest = max(lens)
        blocks = self.blocks[pick, layer, : -(-longest // self.block_size)]
        mask = None
        if min(lens) < longest:  # these chunks' lengths differ, so the step's did: a mask exists
            assert self.mask is not None
            mask = self.mask[pick][..., :longest]
        key = tuple(rows)
        if key not in self.rows:  # most layers decode the same rows
            self.rows[key] = torch.tensor(rows, device=device)
        return DecodePlan(self.rows[key], blocks, self.block_size, longest, mask)


def _plan_layer(
    layer: int,
    active: list[int],
    chunks: list[SeqChunk],
    starts: list[int],
    head_dim: int,
    kv_width: int,
    block_size: int,
    biases: BiasTable,
    decoding: _DecodeSlots | None,
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

    attn, mlp, plan_biases = [], [], []
    # new K/V slots in row order: lists of ints (prefill) and runs of decoding chunks (d0, d1)
    write: list[list[int] | tuple[int, int]] = []
    segments: list[tuple[int, int, int, int]] = []
    dec_rows, dec_ds = [], []
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
        elif decoding is not None and j in decoding.index:
            d = decoding.index[j]
            dec_rows.append(local)
            dec_ds.append(d)
            if write and isinstance(run := write[-1], tuple) and run[1] == d:
                write[-1] = (run[0], d + 1)
            else:
                write.append((d, d + 1))
        else:
            table = c.block_table[spec.layers.index(layer)]
            write.append(_slots(table, c.num_computed, ctx, block_size))
            if c.num_computed == 0:
                prefills.append(PrefillPlan(local, n, spec.heads[layer], None, None))
            else:
                slots = torch.tensor(_slots(table, 0, ctx, block_size), device=device)
                key = torch.arange(ctx, device=device)
                mask = key[None, :] <= (c.num_computed + torch.arange(n, device=device))[:, None]
                prefills.append(PrefillPlan(local, n, spec.heads[layer], slots, mask))
        local += n

    decode = None
    if dec_rows:
        assert decoding is not None
        decode = decoding.plan(layer, dec_rows, dec_ds, device)
    pieces = [
        decoding.written[piece[0] : piece[1], layer]
        if isinstance(piece, tuple) and decoding is not None
        else torch.tensor(piece, device=device)
        for piece in write
    ]
    return LayerPlan(
        rows=rows,
        attn_bands=make_bands(attn, device if kernels else None),
        qkv_bands=make_bands([(r, kv_width + w) for r, w in attn], device if kernels else None),
        mlp_bands=make_bands(mlp, device if kernels else None),
        biases=plan_biases,
        segments=segments,
        write_slots=(pieces[0] if len(pieces) == 1 else torch.cat(pieces)) if pieces else None,
        decode=decode,
        prefills=prefills,
    )
