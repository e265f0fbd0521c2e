"""The decoder step in the native CPU kernels (kernels/cpu): one call runs every layer of a step.

Same inputs as `build_step` + `ElasticModel.forward` (one `SeqChunk` per sequence, the paged
cache) and the same result, without the ~25 torch calls per layer: the rows are sorted widest
first, and the C++ side gathers each layer's rows, runs the elastic linears on prefix bands
(each weight byte read once for any mix of shapes), writes the new V/K and attends. Weights stay
in the model's dtype in memory (bf16 halves the bytes) and the math is fp32. Shape-aware LoRA
runs here too: each adapted row adds its shape's two experts (fp32, per linear) mixed by the
gate's weights, so a step with adapted shapes stays one native call.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch

from .decoder import ElasticModel
from .lora import LINEARS, LoraWeights
from .quant import QuantWeight
from .shapes import PRECISION_ORDER, ShapeSpec
from .step_plan import BiasTable, SeqChunk, step_order
from .weights import QuantWeights


def _planes(q: QuantWeight, q4_reads_lo: bool = False) -> tuple[object, ...]:
    return (q.hi, q.lo, q.scale, q.minimum, q4_reads_lo)


class NativeDecoder:
    """An `ElasticModel`'s weights bound to the native decoder, with the grid's shape tables."""

    def __init__(
        self,
        ext: ModuleType,
        model: ElasticModel,
        specs: Sequence[ShapeSpec],
        biases: BiasTable,
        rope: tuple[torch.Tensor, torch.Tensor],
        quant: QuantWeights | None = None,
        down_q8: bool = True,
    ) -> None:
        """`quant`: the q8/q4 planes the grid's quantized shapes read; `down_q8`: a q4 row reads
        `down` at q8 (where it has a residual plane: not a GGUF's own 4-bit blocks)."""
        cfg, w = model.config, model.weights
        self.config = cfg
        self.vnni = bool(ext.vnni_supported())  # the q8/q4 linears run AVX-512 VNNI kernels
        self.amx = bool(ext.amx_supported())  # the bf16 linears run AMX tiles
        self.amx_int8 = bool(ext.amx_int8_supported())  # q8/q4 steps of several rows: int8 tiles
        self.amx_int8_min_rows = int(ext.qamx_min_rows)
        self.model = model
        num_layers = cfg.num_layers
        bias_rows: dict[tuple[float, int], int] = {}
        bias_o: list[torch.Tensor] = []
        bias_down: list[torch.Tensor] = []
        for key, (o, down) in biases.items():
            bias_rows[key] = len(bias_o)
            bias_o.append(o.float())
            bias_down.append(down.float())
        kept, heads, mlp, bias = [], [], [], []
        for spec in specs:
            kept += [int(k) for k in spec.kept]
            heads += list(spec.heads)
            mlp += list(spec.mlp)
            bias += [bias_rows.get((spec.shape.width, i), -1) for i in range(num_layers)]
        precision = [PRECISION_ORDER.index(spec.shape.precision) for spec in specs]
        if any(precision) and quant is None:
            raise ValueError("the grid has q8/q4 shapes but no quantized weights were given")
        tables = [torch.tensor(t, dtype=torch.int32) for t in (kept, heads, mlp, bias, precision)]
        quant_layers = [
            [
                _planes(q.qkv),
                _planes(q.o),
                _planes(q.gate),
                _planes(q.up),
                _planes(q.down, down_q8),
            ]
            for q in (quant.layers if quant is not None else [])
        ]

        def f32(t: torch.Tensor | None) -> torch.Tensor:
            return torch.empty(0) if t is None else t.float().contiguous()

        layers = [
            [
                f32(lw.attn_norm),
                lw.qkv,
                f32(lw.qkv_bias),
                lw.o_t.t(),  # [H, heads*hd]: the serving layout stores it as [N, K] rows on CPU
                f32(lw.mlp_norm),
                lw.gate,
                lw.up,
                lw.down_t.t(),
            ]
            for lw in w.layers
        ]
        cos, sin = (t.float().contiguous() for t in rope)
        stack = torch.stack if bias_o else (lambda _: torch.empty(0))
        self.native = ext.NativeModel(
            [
                cfg.hidden_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.head_dim,
                cfg.intermediate_size,
                cfg.vocab_size,
                num_layers,
            ],
            cfg.rms_norm_eps,
            layers,
            f32(w.norm),
            w.embed,
            w.lm_head,
            cos,
            sin,
            tables,
            stack(bias_o),
            stack(bias_down),
            quant_layers,
            _planes(quant.head) if quant is not None else None,
        )

        self._lora: LoraWeights | None = None  # the adapters bound to the native step
        self._num_shapes = len(specs)

    def _bind_lora(self) -> None:
        """Bind the model's adapters (when they changed since the last step): the experts and
        each shape's two experts and gains."""
        lora = self.model.lora
        if lora is self._lora:
            return
        route = torch.full((self._num_shapes, 2), -1, dtype=torch.int32)
        gain = torch.zeros(self._num_shapes, 2)
        a: list[list[torch.Tensor]] = []
        b: list[list[torch.Tensor]] = []
        if lora is not None and lora.experts:
            for shape_id, (experts, weights) in lora.routes.items():
                route[shape_id] = torch.tensor(experts, dtype=torch.int32)
                gain[shape_id] = torch.tensor(weights) * lora.scale
            a = [[layer[name][0] for name in LINEARS] for layer in lora.experts]
            b = [[layer[name][1] for name in LINEARS] for layer in lora.experts]
        self.native.set_lora(a, b, route, gain)
        self._lora = lora

    def supports(self, chunks: Sequence[SeqChunk]) -> bool:
        """True when the native step can run these chunks: every one has its block table, and
        the adapters of any row's shape are ones the native step can mix (it has the experts)."""
        if any(c.block_table is None for c in chunks):
            return False
        lora = self.model.lora
        if lora is None or lora.experts:
            return True
        return not any(slots[c.spec.id] >= 0 for slots in lora.slots for c in chunks)

    def forward(
        self, chunks: Sequence[SeqChunk], cache: torch.Tensor, block_size: int
    ) -> tuple[torch.Tensor, list[slice]]:
        """(logits [N, V] fp32, each chunk's rows of them in input order); writes new K/V."""
        self._bind_lora()
        order = step_order(chunks)  # the torch step's order: widths fall down the rows
        tokens: list[int] = []
        positions: list[int] = []
        row_shape: list[int] = []
        row_seq: list[int] = []
        logit_rows: list[int] = []
        logit_slices = [slice(0, 0)] * len(chunks)
        num_layers = self.config.num_layers
        width = max(len(t) for c in chunks for t in c.block_table or [[]])
        pad = [-1] * max(width, 1)
        blocks = [[pad] * len(chunks) for _ in range(num_layers)]  # [layer][seq][block]
        for seq, i in enumerate(order):
            c = chunks[i]
            assert c.block_table is not None
            n, start = len(c.token_ids), len(tokens)
            tokens += c.token_ids
            positions += range(c.num_computed, c.num_computed + n)
            row_shape += [c.spec.id] * n
            row_seq += [seq] * n
            first = len(logit_rows)
            if c.logits == "all":
                logit_rows += range(start, start + n)
            elif c.logits == "last":
                logit_rows.append(start + n - 1)
            logit_slices[i] = slice(first, len(logit_rows))
            for layer, table in zip(c.spec.layers, c.block_table, strict=True):
                blocks[layer][seq] = table + pad[len(table) :]
        logits = self.native.forward(
            torch.tensor(tokens, dtype=torch.long),
            torch.tensor(positions, dtype=torch.long),
            torch.tensor(row_shape, dtype=torch.int32),
            torch.tensor(row_seq, dtype=torch.int32),
            torch.tensor(blocks, dtype=torch.int32),
            torch.tensor(logit_rows, dtype=torch.long),
            cache,
            block_size,
            torch.get_num_threads(),  # the native threads follow torch's setting
        )
        return logits, logit_slices
