"""Per-shape LoRA at serving time: each shape's adapter tables, bound to a step's segments.

The shape id is the adapter index: a segment's rows add their shape's rank-2r adapter to each
elastic linear (q, o, gate, up, down), sliced to the same prefix as the base weight; the full shape
has none. The tables come from the mixture of experts in adapters.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

LINEARS = ("q", "o", "gate", "up", "down")
OUTPUT_PREFIX = frozenset({"q", "gate", "up"})  # these slice their output; o and down their input


Pair = tuple[Tensor, Tensor]  # (a [in, R], b [R, out]) of one linear


@dataclass
class LoraWeights:
    """Every shape's effective adapter, precomputed at load: what serving applies."""

    # [num_layers][num_shapes] a shape's row in that layer's tables; -1: no adapter
    slots: list[list[int]]
    tables: list[dict[str, Pair]]  # [num_layers] linear -> (a [N_l, in, 2r], b [N_l, 2r, out])
    # shape id -> ((e1, e2), (g1, g2)): the gate's choice (what the native step applies)
    routes: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)
    # [num_layers] linear -> (a [E, in, r], b [E, r, out]) fp32 on CPU: the experts themselves,
    # which the native CPU step mixes per row by `routes` (empty: it cannot, torch runs them)
    experts: list[dict[str, Pair]] = field(default_factory=list)
    scale: float = 1.0  # alpha / r, applied with the gate weights

    def adapter(self, layer: int, shape_id: int) -> dict[str, Pair] | None:
        """One shape's (a [in, 2r], b [2r, out]) per linear at `layer`, or None."""
        slot = self.slots[layer][shape_id]
        if slot < 0:
            return None
        return {name: (a[slot], b[slot]) for name, (a, b) in self.tables[layer].items()}


@dataclass
class LayerLora:
    """One layer's adapter tables bound to one step's segments."""

    tables: dict[str, Pair]
    runs: list[tuple[int, int, int, int, int]]  # (start, end, slot, attn, mlp), adapted rows only
    meta: dict[str, Tensor] | None = None  # int32 device metadata for the Triton kernels

    def add(self, name: str, y: Tensor, x: Tensor) -> None:
        """y += x's LoRA term, per segment, sliced like the base weight (in place)."""
        # output prefix: y[s, :n] += (x[s] @ A) @ B[:, :n]
        # input prefix:  y[s] += (x[s, :k] @ A[:k]) @ B
        a, b = self.tables[name]
        if self.meta is not None:
            return self._add_kernels(name, y, x, a, b)
        for start, end, slot, attn, mlp in self.runs:
            width = attn if name in ("q", "o") else mlp
            if name in OUTPUT_PREFIX:
                y[start:end, :width].addmm_(x[start:end] @ a[slot], b[slot, :, :width])
            else:
                y[start:end].addmm_(x[start:end, :width] @ a[slot, :width], b[slot])

    def _add_kernels(self, name: str, y: Tensor, x: Tensor, a: Tensor, b: Tensor) -> None:
        from ..kernels.lora import lora_expand, lora_shrink

        assert self.meta is not None
        m = self.meta
        width = m["attn"] if name in ("q", "o") else m["mlp"]
        k, n = (m["hidden"], width) if name in OUTPUT_PREFIX else (width, m["hidden"])
        t = lora_shrink(x, a, m["offsets"], k, m["slots"], check=False)  # [T, 2r] fp32
        lora_expand(y, t, b, m["offsets"], n, m["slots"], check=False)


Segments = list[tuple[int, int, int, int]]  # per chunk (row end, shape id, attn, mlp)


def bind_step(
    lora: LoraWeights, segments: Sequence[Segments | None], kernels: bool
) -> list[LayerLora | None]:
    """Each layer's adapters for one step's segments; None where no segment has one.

    `segments[layer]` is None for a layer no row runs. Layers that run the same chunks (most of
    them) share their merged runs, and with `kernels` the metadata of every layer goes to the
    device in one host-to-device copy, each layer reading its own views of it.
    """
    merged_by_chunks: dict[tuple[tuple[int, int, int, int], ...], list[tuple[int, ...]]] = {}
    bound: list[LayerLora | None] = []
    rows: list[int] = []  # every layer's kernel metadata, concatenated
    starts: list[tuple[LayerLora, int, int]] = []  # (bound layer, offset in rows, segments)
    for layer, chunks in enumerate(segments):
        if chunks is None:
            bound.append(None)
            continue
        key = tuple(chunks)
        if key not in merged_by_chunks:
            merged_by_chunks[key] = _merge(chunks)
        slots = lora.slots[layer]
        runs = [(s, e, slots[i], a, m) for s, e, i, a, m in merged_by_chunks[key]]
        adapted = [r for r in runs if r[2] >= 0]
        if not adapted:
            bound.append(None)
            continue
        if not lora.tables:
            raise RuntimeError(
                "these adapters were loaded for the native CPU step only (no torch tables): "
                "load the model with cpu_kernels='torch' to run adapted shapes on torch ops"
            )
        tables = lora.tables[layer]
        layer_lora = LayerLora(tables, adapted)
        bound.append(layer_lora)
        if kernels:  # all runs: the kernels skip segments of slot -1 (the full shape)
            hidden = tables["q"][0].shape[1]  # what output-prefix linears read, input-prefix write
            starts.append((layer_lora, len(rows), len(runs)))
            rows += [0] + [r[1] for r in runs] + [r[2] for r in runs] + [r[3] for r in runs]
            rows += [r[4] for r in runs] + [hidden] * len(runs)
    if starts:
        device = starts[0][0].tables["q"][0].device
        flat = torch.tensor(rows, dtype=torch.int32, device=device)
        names = ("slots", "attn", "mlp", "hidden")
        for layer_lora, at, n in starts:
            meta = {"offsets": flat[at : at + n + 1]}
            first = at + n + 1
            meta.update({k: flat[first + i * n : first + (i + 1) * n] for i, k in enumerate(names)})
            layer_lora.meta = meta
    return bound


def _merge(chunks: Segments) -> list[tuple[int, ...]]:
    """(start, end, shape id, attn, mlp) runs: adjacent chunks of one shape become one."""
    merged: list[list[int]] = []
    start = 0
    for end, shape_id, attn, mlp in chunks:
        if merged and merged[-1][2] == shape_id:
            merged[-1][1] = end
        else:
            merged.append([start, end, shape_id, attn, mlp])
        start = end
    return [tuple(m) for m in merged]
