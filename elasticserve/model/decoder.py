"""The elastic decoder: weights in the serving layout and one forward pass for any mix of shapes.

Serving layout (DESIGN.md "Width"): q rows hold heads rank-major across KV groups; o and down are
stored transposed; gate/up/down channels and q/o heads are permuted into the pack's importance order
once at load, so every width of every layer is a contiguous row prefix, taken as a view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .lora import LayerLora, LoraWeights, bind_layer
from .ops import linear_in, linear_out
from .pack import Pack
from .step_plan import DecodePlan, LayerPlan, StepInput


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

    Prefixes over K are row slices either way. CUDA kernels and fp32 CPU GEMV want [K, N]
    contiguous; the CPU's bf16/fp16 GEMV streams [N, K] rows 1.4x faster (22 vs 16 GB/s for a
    576x1536 down at batch 1, bench/bench_cpu_ops.py), so there the [K, N] tensor is a transposed
    view of a contiguous [N, K] one and `x[:, :k] @ w_t[:k]` runs as F.linear on a strided view.
    """
    if device.type == "cpu" and w_t.dtype in (torch.bfloat16, torch.float16):
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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, hd] ; cos/sin [T, 1, hd] (HF's rotate_half convention)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _gather_kv(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cached V/K at `slots` [L] as one [2, kv, L, hd] tensor of `dtype`."""
    ctx = cache.index_select(0, slots)  # [L, 2, kv, hd]
    return _kv_layout(ctx.permute(1, 2, 0, 3), dtype)


def _gather_blocks(cache: torch.Tensor, dec: DecodePlan, dtype: torch.dtype) -> torch.Tensor:
    """The first `dec.length` cached V/K of each decoding row as one [2, B, kv, L, hd] tensor.

    Whole blocks are gathered (a copy of block_size slots at a time, not slot by slot), then
    viewed down to the context length.
    """
    b, nb = dec.blocks.shape
    per_slot = cache.shape[1:]
    ctx = cache.view(-1, dec.block_size, *per_slot).index_select(0, dec.blocks.flatten())
    ctx = ctx.view(b, nb * dec.block_size, *per_slot)[:, : dec.length]  # [B, L, 2, kv, hd]
    return _kv_layout(ctx.permute(2, 0, 3, 1, 4), dtype)


def _kv_layout(vk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gathered V/K, permuted to [2, ..., kv, L, hd], as SDPA takes them.

    On CPU, where the cache is kept in the attention dtype, the permuted view itself: the fp32
    SDPA reads strided key rows well, and with the block gather decode attention runs 1.1-1.7x
    faster than over a converted contiguous copy of a bf16 cache (bench/bench_cpu_ops.py).
    Elsewhere one contiguous copy in `dtype`.
    """
    if vk.device.type == "cpu" and vk.dtype == dtype:
        return vk
    return _dense(vk, dtype)


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous `dtype` copy of a strided view, in one pass (`.to().contiguous()` makes two)."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def attention_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype attention and the KV cache use: fp32 on CPU, whose bf16/fp16 SDPA is 1.9-5x
    slower than its fp32 one (bench/bench_cpu_ops.py); else the model's."""
    return torch.float32 if device.type == "cpu" else dtype


def _attention(
    q: torch.Tensor, vk: torch.Tensor, plan: LayerPlan, cache: torch.Tensor | None, groups: int
) -> torch.Tensor:
    """Causal attention of every row over its own sequence's cached and new keys."""
    # q [T, m, hd] rank-major heads ; vk [T, 2, kv, hd] new values/keys ; out [T, m*hd]
    n_rows, m, hd = q.shape
    out = q.new_empty(n_rows, m * hd)
    dtype = attention_dtype(q.dtype, q.device)
    if (dec := plan.decode) is not None:
        assert cache is not None
        b = dec.rows.shape[0]
        qd = q.index_select(0, dec.rows).view(b, m // groups, groups, hd)
        qd = qd.transpose(1, 2).reshape(b, m, 1, hd).to(dtype)  # group-major heads for enable_gqa
        v, k = _gather_blocks(cache, dec, dtype)  # [B, kv, L, hd] each
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=dec.mask, enable_gqa=True)
        o = o.view(b, groups, m // groups, hd).transpose(1, 2).reshape(b, m * hd)
        out.index_copy_(0, dec.rows, o.to(out.dtype))
    for pre in plan.prefills:
        n, mh = pre.num_tokens, pre.heads
        rows = slice(pre.start, pre.start + n)
        qs = q[rows, :mh].view(n, mh // groups, groups, hd).permute(2, 1, 0, 3)
        qs = qs.reshape(1, mh, n, hd).to(dtype)
        if pre.slots is None:  # nothing cached before this chunk: attend to the fresh keys
            fresh = vk[rows].permute(1, 2, 0, 3)
            v, k = _dense(fresh, dtype)
            mask, causal = None, True
        else:
            assert cache is not None
            v, k = _gather_kv(cache, pre.slots, dtype)
            mask, causal = pre.mask, False
        o = F.scaled_dot_product_attention(
            qs, k[None], v[None], attn_mask=mask, is_causal=causal, enable_gqa=True
        )
        o = o.view(groups, mh // groups, n, hd).permute(2, 1, 0, 3).reshape(n, mh * hd)
        out[rows, : mh * hd] = o.to(out.dtype)
    return out


class ElasticModel:
    """A base model in the serving layout; `forward` runs any mix of shapes in one step."""

    def __init__(
        self, config: ModelConfig, weights: Weights, rope: tuple[torch.Tensor, torch.Tensor]
    ):
        self.config = config
        self.weights = weights
        # The one switch between the Triton kernels and torch ops on prefix views.
        self.use_kernels = weights.embed.is_cuda
        self.cos, self.sin = rope  # [max_pos, hd] each
        self.lora: LoraWeights | None = None  # per-shape adapters, set by the loader

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype: the one attention runs in, so no step converts what it reads."""
        return attention_dtype(self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, step: StepInput, cache: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(step.logit_rows), V] (fp32) for one step; writes new K/V into `cache`."""
        cfg, w = self.config, self.weights
        x = w.embed[step.input_ids]  # [T, H]
        cos_all = self.cos[step.positions].unsqueeze(1)  # [T, 1, hd]
        sin_all = self.sin[step.positions].unsqueeze(1)
        for i, (layer, plan) in enumerate(zip(w.layers, step.layers, strict=True)):
            if plan is None:
                continue  # no row of this step keeps this layer
            # a slice gives views (updated in place); an index tensor gathers copies
            xl, cos, sin = x[plan.rows], cos_all[plan.rows], sin_all[plan.rows]
            lora = None
            if self.lora is not None:  # kernels when the step carries their device metadata
                kernels = plan.attn_bands.offsets is not None
                lora = bind_layer(self.lora, i, plan.segments, kernels)
            self._layer(xl, layer, plan, cache, cos, sin, lora)
            if isinstance(plan.rows, torch.Tensor):
                x.index_copy_(0, plan.rows, xl)
        h = F.rms_norm(x[step.logit_rows], (cfg.hidden_size,), w.norm, cfg.rms_norm_eps)
        return F.linear(h, w.lm_head).float()

    def _layer(
        self,
        x: torch.Tensor,
        lw: LayerWeights,
        plan: LayerPlan,
        cache: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        lora: LayerLora | None,
    ) -> None:
        # x [T_l, H], updated in place (a view of the step's hidden states, or a gathered copy)
        cfg = self.config
        hd, eps, n = cfg.head_dim, cfg.rms_norm_eps, x.shape[0]
        h = F.rms_norm(x, (cfg.hidden_size,), lw.attn_norm, eps)
        vkq = linear_out(h, lw.qkv, plan.qkv_bands, lw.qkv_bias)  # [T_l, 2*kv*hd + m*hd]
        kv_rows = lw.kv_rows
        if lora is not None:
            lora.add("q", vkq[:, 2 * kv_rows :], h)
        kq = vkq[:, kv_rows:].view(n, -1, hd)  # keys then queries: one rotary pass
        kq.copy_(_rotate(kq, cos, sin))
        vk = vkq[:, : 2 * kv_rows].view(n, 2, cfg.num_kv_heads, hd)  # the cache's layout
        if plan.write_slots is not None and cache is not None:
            cache.index_copy_(0, plan.write_slots, vk.to(cache.dtype))
        q = vkq[:, 2 * kv_rows :].view(n, -1, hd)  # [T_l, m, hd]
        attn = _attention(q, vk, plan, cache, cfg.num_groups)
        o = linear_in(attn, lw.o_t, plan.attn_bands)
        if lora is not None:
            lora.add("o", o, attn)
        x += o
        for rows, o_bias, _ in plan.biases:
            x[rows] += o_bias
        h = F.rms_norm(x, (cfg.hidden_size,), lw.mlp_norm, eps)
        gate = linear_out(h, lw.gate, plan.mlp_bands)
        up = linear_out(h, lw.up, plan.mlp_bands)
        if lora is not None:
            lora.add("gate", gate, h)
            lora.add("up", up, h)
        act = F.silu(gate) * up
        down = linear_in(act, lw.down_t, plan.mlp_bands)
        if lora is not None:
            lora.add("down", down, act)
        x += down
        for rows, _, down_bias in plan.biases:
            x[rows] += down_bias


def rope_tables(hf_config: object, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_len, hd] (fp32) from transformers' own rotary embedding (all scaling types)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    cls = (
        Qwen2RotaryEmbedding
        if getattr(hf_config, "model_type", "") == "qwen2"
        else LlamaRotaryEmbedding
    )
    rotary = cls(hf_config)  # type: ignore[arg-type]
    positions = torch.arange(max_len, dtype=torch.float32)[None]
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0].float(), sin[0].float()
