"""Per-shape LoRA at serving time: each shape's adapter tables, bound to a step's segments.

The shape id is the adapter index: a segment's rows add their shape's rank-2r adapter to each
elastic linear (q, o, gate, up, down), sliced to the same prefix as the base weight; the full shape
has none. The tables come from the mixture of experts in adapters.py.
"""

from __future__ import annotations

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
    # shape id -> ((e1, e2), (g1, g2)): the gate's choice, for inspection
    routes: dict[int, tuple[tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)

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


def bind_layer(
    lora: LoraWeights, layer: int, segments: list[tuple[int, int, int, int]], kernels: bool
) -> LayerLora | None:
    """The adapters of `layer` for a step's segments; None when no segment has one."""
    # segments: per chunk (row end, shape id, attn, mlp); chunks of one shape are adjacent
    merged: list[list[int]] = []  # [start, end, shape id, attn, mlp]
    start = 0
    for end, shape_id, attn, mlp in segments:
        if merged and merged[-1][2] == shape_id:
            merged[-1][1] = end
        else:
            merged.append([start, end, shape_id, attn, mlp])
        start = end
    slots = lora.slots[layer]
    runs = [(s, e, slots[i], a, m) for s, e, i, a, m in merged]
    adapted = [r for r in runs if r[2] >= 0]
    if not adapted:
        return None
    tables = lora.tables[layer]
    if not kernels:
        return LayerLora(tables, adapted)
    a_q = tables["q"][0]
    hidden = a_q.shape[1]  # what output-prefix linears read and input-prefix ones write
    # One host-to-device copy per layer; the kernels skip segments of slot -1 (the full shape).
    rows = [[0] + [r[1] for r in runs], [r[2] for r in runs], [r[3] for r in runs]]
    rows += [[r[4] for r in runs], [hidden] * len(runs)]
    flat = torch.tensor([v for row in rows for v in row], dtype=torch.int32, device=a_q.device)
    s = len(runs)
    names = ("slots", "attn", "mlp", "hidden")
    meta = {"offsets": flat[: s + 1]}
    meta.update({n: flat[s + 1 + i * s : s + 1 + (i + 1) * s] for i, n in enumerate(names)})
    return LayerLora(tables, adapted, meta)
