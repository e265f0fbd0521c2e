"""Weights in the serving layout, converted once from HF-named dense weights through a pack.

Serving layout (DESIGN.md "Width"): q rows hold heads rank-major across KV groups; o and down are
stored transposed; gate/up/down channels and q/o heads are permuted into the pack's importance order
once at load, so every width of every layer is a contiguous row prefix, taken as a view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .pack import Pack
from .quant import QGROUP, QuantWeight, cat_rows, quantize, take_groups, take_rows


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    # [2*kv*hd + n_heads*hd, H]: v rows, k rows, then q rows with heads rank-major. A q width is
    # a row prefix, one GEMM computes all three, and keys and queries, adjacent, take one rotary
    # pass; the cache stores the (v, k) rows as they come out.
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None  # [2*kv*hd + n_heads*hd]
    kv_rows: int  # rows of v (= rows of k): kv heads * head_dim, never pruned
    o_t: torch.Tensor  # [n_heads*hd, H] o transposed, same head order as q (see _transposed)
    mlp_norm: torch.Tensor  # [H]
    gate: torch.Tensor  # [I, H] channels in importance order
    up: torch.Tensor  # [I, H]
    down_t: torch.Tensor  # [I, H] down transposed (see _transposed)

    @property
    def q(self) -> torch.Tensor:
        return self.qkv[2 * self.kv_rows :]

    @property
    def k(self) -> torch.Tensor:
        return self.qkv[self.kv_rows : 2 * self.kv_rows]

    @property
    def v(self) -> torch.Tensor:
        return self.qkv[: self.kv_rows]

    def bias(self, part: str) -> torch.Tensor | None:
        """The "q", "k", "v" or "vk" slice of the fused bias (None without one)."""
        if self.qkv_bias is None:
            return None
        kv = self.kv_rows
        start, stop = {"v": (0, kv), "k": (kv, 2 * kv), "vk": (0, 2 * kv), "q": (2 * kv, None)}[
            part
        ]
        return self.qkv_bias[start:stop]


@dataclass
class Weights:
    embed: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [H]
    lm_head: torch.Tensor  # [V, H] (the embedding itself when tied)


def _permute_heads(w: torch.Tensor, order: torch.Tensor, head_dim: int) -> torch.Tensor:
    # w [n_heads*hd, ...] -> rows regrouped head by head in `order`
    return w.view(-1, head_dim, *w.shape[1:])[order].reshape(w.shape).contiguous()


def _transposed(w_t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`w_t` ([K, N], the transpose of a [N, K] weight) in the memory order its matmul reads best.

    Prefixes over K are row slices either way. CUDA kernels want [K, N] contiguous. On the CPU
    the tensor is a transposed view of a contiguous [N, K] one: the native kernels read weights
    as [N, K] rows (model/native.py), torch's bf16/fp16 GEMV streams [N, K] rows 1.4x faster
    (bench/bench_cpu_ops.py), and `x[:, :k] @ w_t[:k]` runs as F.linear on the strided view.
    """
    if device.type == "cpu":
        return w_t.t().contiguous().t()
    return w_t.contiguous()


def serving_weights(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    pack: Pack,
    dtype: torch.dtype,
    device: torch.device,
) -> Weights:
    """Convert HF-named dense weights to the serving layout of `pack` (one permutation copy)."""

    def get(name: str) -> torch.Tensor:
        return state[name].to(device=device, dtype=dtype)

    hd = config.head_dim
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        heads, chans = pack.head_order[i].to(device), pack.mlp_order[i].to(device)
        v, k, q = (get(p + f"self_attn.{x}_proj.weight") for x in "vkq")
        bias = None
        if config.qkv_bias:
            vb, kb, qb = (get(p + f"self_attn.{x}_proj.bias") for x in "vkq")
            bias = torch.cat([vb, kb, _permute_heads(qb, heads, hd)])
        layers.append(
            LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                qkv=torch.cat([v, k, _permute_heads(q, heads, hd)]),
                qkv_bias=bias,
                kv_rows=config.kv_size,
                o_t=_transposed(
                    _permute_heads(get(p + "self_attn.o_proj.weight").t(), heads, hd), device
                ),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                gate=get(p + "mlp.gate_proj.weight")[chans].contiguous(),
                up=get(p + "mlp.up_proj.weight")[chans].contiguous(),
                down_t=_transposed(get(p + "mlp.down_proj.weight").t()[chans], device),
            )
        )
        for name in [k for k in state if k.startswith(p)]:
            del state[name]  # free dense copies as we go: peak memory ~ one model, not two
    embed = get("model.embed_tokens.weight")
    head = state.get("lm_head.weight")
    lm_head = embed if config.tie_word_embeddings or head is None else get("lm_head.weight")
    return Weights(embed=embed, layers=layers, norm=get("model.norm.weight"), lm_head=lm_head)


# -- the quantized copy (q8 / q4 shapes) --------------------------------------------------------


@dataclass
class QuantLayer:
    """One layer's linears in the serving layout as nested q8/q4 planes (model/quant.py)."""

    qkv: QuantWeight  # rows as LayerWeights.qkv
    o: QuantWeight  # [H, heads*hd], input columns in the serving head order
    gate: QuantWeight
    up: QuantWeight
    down: QuantWeight  # [H, I], input channels in the serving order
    down_requantized: bool  # a source's blocks did not survive the channel order: made anew

    def linears(self) -> tuple[QuantWeight, ...]:
        return (self.qkv, self.o, self.gate, self.up, self.down)


@dataclass
class QuantWeights:
    layers: list[QuantLayer]
    head: QuantWeight  # the LM head, read at q8 by every quantized shape
    source: str  # "gguf" (the file's own blocks where they survive) or the quantize method

    def bits_per_weight(self, precision: str, down_q8: bool = True) -> float:
        """Mean bits a decoder weight costs at `precision`: codes, scales and minimums, with
        `down` read at q8 where `down_q8` (and it has a residual plane)."""
        numel = sum(w.rows * w.cols for lw in self.layers for w in lw.linears())
        return 8 * self._decoder_bytes(precision, down_q8) / numel

    def _decoder_bytes(self, precision: str, down_q8: bool) -> int:
        total = 0
        for lw in self.layers:
            down = "q8" if down_q8 and lw.down.lo is not None else precision
            total += sum(w.nbytes(precision) for w in lw.linears()[:-1]) + lw.down.nbytes(down)
        return total


def _group_order(channels: torch.Tensor) -> torch.Tensor | None:
    """The order of whole 32-column groups that `channels` is, or None if it splits a group."""
    if channels.numel() % QGROUP:
        return None
    runs = channels.view(-1, QGROUP)
    starts = runs[:, 0]
    within = torch.arange(QGROUP).expand_as(runs)
    if (starts % QGROUP).any() or not torch.equal(runs - starts[:, None], within):
        return None
    return starts // QGROUP


def quantized_weights(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    pack: Pack,
    source: dict[str, QuantWeight] | None = None,
    method: str = "minmax",
) -> QuantWeights:
    """The serving layout of `pack` as q8/q4 planes, from HF-named fp32 weights (call before
    `serving_weights`, which frees them). `source`: a GGUF's own quantized blocks by HF name
    (quant.gguf_linears); a weight found there is taken as it is, permuted by rows or whole
    groups, and only a weight whose blocks a channel permutation splits is quantized anew."""
    source = source or {}
    hd = config.head_dim

    def own(name: str, rows: torch.Tensor | None = None) -> QuantWeight:
        if name in source:
            q = source[name]
            return take_rows(q, rows) if rows is not None else q
        w = state[name].float()
        return quantize(w[rows] if rows is not None else w, method)

    def own_columns(name: str, cols: torch.Tensor) -> tuple[QuantWeight, bool]:
        """The weight with its input columns in order `cols`: the source's blocks moved as whole
        groups where `cols` keeps them, else quantized anew (True: a source's blocks split)."""
        groups = _group_order(cols)
        if name in source and groups is not None:
            return take_groups(source[name], groups), False
        return quantize(state[name].float()[:, cols], method), name in source

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        heads, chans = pack.head_order[i], pack.mlp_order[i]
        head_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        qkv = cat_rows(
            [
                own(p + "self_attn.v_proj.weight"),
                own(p + "self_attn.k_proj.weight"),
                own(p + "self_attn.q_proj.weight", head_rows),
            ]
        )
        o, _ = own_columns(p + "self_attn.o_proj.weight", head_rows)
        down, requantized = own_columns(p + "mlp.down_proj.weight", chans)
        layers.append(
            QuantLayer(
                qkv=qkv,
                o=o,
                gate=own(p + "mlp.gate_proj.weight", chans),
                up=own(p + "mlp.up_proj.weight", chans),
                down=down,
                down_requantized=requantized,
            )
        )
    head_name = "lm_head.weight"
    if config.tie_word_embeddings or head_name not in state:
        head_name = "model.embed_tokens.weight"
    return QuantWeights(layers, own(head_name), "gguf" if source else method)
