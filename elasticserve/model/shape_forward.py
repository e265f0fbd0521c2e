"""A differentiable forward of one shape over [B, S] windows, for fine-tuning and its evaluation.

The serving forward runs ragged mixed-shape rows over a paged cache under inference_mode; training
needs autograd through the LoRA experts and gate. This forward reads the same serving-layout weights
with the same prefix slicing (output prefix `x @ w[:n].T`, input prefix `x[..., :k] @ wt[:k]`,
heads rank-major), plus an optional rank-2r adapter per kept layer (`LoraExperts.mixture`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import rotate
from .config import ModelConfig
from .decoder import ElasticModel
from .lora import Pair
from .shapes import ShapeSpec
from .step_plan import BiasTable
from .weights import LayerWeights

Adapters = list[dict[str, Pair] | None]  # [num_layers] linear -> (a [in, R], b [R, out])


def shape_logits(
    model: ElasticModel,
    spec: ShapeSpec,
    ids: Tensor,
    biases: BiasTable,
    adapters: Adapters | None = None,
) -> Tensor:
    """Causal logits [B, S, V] (fp32) of shape `spec` on windows `ids` [B, S] starting at 0."""
    cfg, w = model.config, model.weights
    seq = ids.shape[1]
    x = w.embed[ids]  # [B, S, H]
    cos, sin = model.cos[:seq, None], model.sin[:seq, None]  # [S, 1, hd]
    for layer in spec.layers:
        x = _layer(
            x,
            w.layers[layer],
            cfg,
            (spec.heads[layer], spec.mlp[layer]),
            biases.get((spec.shape.width, layer)),
            adapters[layer] if adapters else None,
            (cos, sin),
        )
    h = F.rms_norm(x, (cfg.hidden_size,), w.norm, cfg.rms_norm_eps)
    return F.linear(h, w.lm_head).float()


def _out(x: Tensor, w: Tensor, n: int, bias: Tensor | None, lora: Pair | None) -> Tensor:
    # x [B, S, K] ; w [N, K] ; y [B, S, n]
    y = F.linear(x, w[:n], None if bias is None else bias[:n])
    if lora is not None:
        a, b = (t.to(x.dtype) for t in lora)  # fp32 trainable experts over 16-bit weights
        y = y + (x @ a) @ b[:, :n]
    return y


def _in(x: Tensor, wt: Tensor, k: int, lora: Pair | None) -> Tensor:
    # x [B, S, >= k] ; wt [K, N] ; y [B, S, N]
    y = x[..., :k] @ wt[:k]
    if lora is not None:
        a, b = (t.to(x.dtype) for t in lora)
        y = y + (x[..., :k] @ a[:k]) @ b
    return y


def _layer(
    x: Tensor,
    lw: LayerWeights,
    cfg: ModelConfig,
    widths: tuple[int, int],
    bias: tuple[Tensor, Tensor] | None,
    lora: dict[str, Pair] | None,
    rope: tuple[Tensor, Tensor],
) -> Tensor:
    # x [B, S, H] -> [B, S, H]
    lo = lora or {}
    b, s, _ = x.shape
    hd, groups, eps = cfg.head_dim, cfg.num_groups, cfg.rms_norm_eps
    heads, mlp = widths
    h = F.rms_norm(x, (cfg.hidden_size,), lw.attn_norm, eps)
    q = _out(h, lw.q, heads * hd, lw.bias("q"), lo.get("q")).view(b, s, heads, hd)
    vk = F.linear(h, lw.qkv[: 2 * lw.kv_rows], lw.bias("vk")).view(b, s, 2, cfg.num_kv_heads, hd)
    q, k = rotate(q, *rope), rotate(vk[:, :, 1], *rope)
    # rank-major slot r*G + g -> group-major head g*(m/G) + r, the order enable_gqa expects
    qg = q.view(b, s, heads // groups, groups, hd).permute(0, 3, 2, 1, 4).reshape(b, heads, s, hd)
    kt, vt = k.transpose(1, 2), vk[:, :, 0].transpose(1, 2)  # [B, kv, S, hd]
    o = F.scaled_dot_product_attention(qg, kt, vt, is_causal=True, enable_gqa=True)
    o = o.view(b, groups, heads // groups, s, hd).permute(0, 3, 2, 1, 4).reshape(b, s, heads * hd)
    x = x + _in(o, lw.o_t, heads * hd, lo.get("o"))
    if bias is not None:
        x = x + bias[0]
    h = F.rms_norm(x, (cfg.hidden_size,), lw.mlp_norm, eps)
    act = F.silu(_out(h, lw.gate, mlp, None, lo.get("gate"))) * _out(
        h, lw.up, mlp, None, lo.get("up")
    )
    x = x + _in(act, lw.down_t, mlp, lo.get("down"))
    if bias is not None:
        x = x + bias[1]
    return x


def window_nll(
    model: ElasticModel,
    spec: ShapeSpec,
    ids: Tensor,
    biases: BiasTable,
    adapters: Adapters | None = None,
) -> tuple[float, int]:
    """(summed next-token NLL, token count) of `spec` on windows `ids` [B, S], without grad."""
    with torch.no_grad():
        logits = shape_logits(model, spec, ids, biases, adapters)  # [B, S, V]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return nll.item(), ids[:, 1:].numel()
