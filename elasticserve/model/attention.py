"""Rotary embedding and causal attention of a step's rows over the paged KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .step_plan import DecodePlan, LayerPlan


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
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


def attention(
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
