"""The elastic decoder: one forward pass for any mix of shapes over serving-layout weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import attention, attention_dtype, rotate
from .config import ModelConfig
from .lora import LayerLora, LoraWeights, bind_step
from .ops import linear_in, linear_out
from .step_plan import LayerPlan, StepInput
from .weights import LayerWeights, Weights


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
        loras: list[LayerLora | None] = [None] * len(w.layers)
        if self.lora is not None:  # kernels when the step carries their device metadata
            kernels = any(p is not None and p.attn_bands.offsets is not None for p in step.layers)
            segments = [None if p is None else p.segments for p in step.layers]
            loras = bind_step(self.lora, segments, kernels)
        for layer, plan, lora in zip(w.layers, step.layers, loras, strict=True):
            if plan is None:
                continue  # no row of this step keeps this layer
            # a slice gives views (updated in place); an index tensor gathers copies
            xl, cos, sin = x[plan.rows], cos_all[plan.rows], sin_all[plan.rows]
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
        kq.copy_(rotate(kq, cos, sin))
        vk = vkq[:, : 2 * kv_rows].view(n, 2, cfg.num_kv_heads, hd)  # the cache's layout
        if plan.write_slots is not None and cache is not None:
            cache.index_copy_(0, plan.write_slots, vk.to(cache.dtype))
        q = vkq[:, 2 * kv_rows :].view(n, -1, hd)  # [T_l, m, hd]
        attn = attention(q, vk, plan, cache, cfg.num_groups)
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
