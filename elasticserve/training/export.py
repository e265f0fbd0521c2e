"""Export one shape as a standalone HF model directory, physically pruned, plus its peft LoRA.

HF configs hold one head count and one intermediate size for all layers, but a pack's widths vary
per layer. Each kept layer is therefore zero-padded to the shape's widest layer: a zero MLP channel
gives silu(0)·0 = 0, and a zero-padded head's output meets zero columns of o_proj, so logits are
unchanged. The export is always a Llama config: its `attention_bias`/`mlp_bias` switches express
Qwen2's q/k/v biases and bias compensation on o/down alike (zero where the source has none).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import LlamaConfig

from ..model.bundle import ModelBundle
from ..model.config import ModelConfig
from ..model.loader import load_config
from ..model.lora import Pair
from ..model.shapes import ShapeSpec
from ..model.weights import LayerWeights

ADAPTER_DIR = "adapter"
_HF_NAMES = {
    "q": "self_attn.q_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _head_rows(heads: int, padded: int, groups: int, hd: int) -> tuple[Tensor, Tensor]:
    """(serving rows, exported rows) of the kept heads: rank-major slots to group-major heads."""
    # slot r*G + g (rank r of KV group g) -> HF head g*(padded/G) + r ; padded heads stay zero
    per, per_padded = heads // groups, padded // groups
    src = [r * groups + g for g in range(groups) for r in range(per)]
    dst = [g * per_padded + r for g in range(groups) for r in range(per)]
    offsets = torch.arange(hd)

    def rows(h: list[int]) -> Tensor:
        return (torch.tensor(h)[:, None] * hd + offsets).flatten()

    return rows(src), rows(dst)


def _scatter(src: Tensor, rows: tuple[Tensor, Tensor], size: int) -> Tensor:
    """A [size, ...] zero tensor with src[rows[0]] placed at rows[1]."""
    out = src.new_zeros(size, *src.shape[1:])
    out[rows[1]] = src[rows[0]]
    return out


def _layer_tensors(
    lw: LayerWeights,
    bundle: ModelBundle,
    spec: ShapeSpec,
    layer: int,
    padded: tuple[int, int],
    adapter: dict[str, Pair] | None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(HF weights, peft LoRA weights) of one kept layer, names relative to the layer."""
    cfg = bundle.config
    hd = cfg.head_dim
    heads_p, mlp_p = padded
    rows = _head_rows(spec.heads[layer], heads_p, cfg.num_groups, hd)
    chans = (torch.arange(spec.mlp[layer]), torch.arange(spec.mlp[layer]))
    w = {
        "input_layernorm.weight": lw.attn_norm,
        "post_attention_layernorm.weight": lw.mlp_norm,
        "self_attn.q_proj.weight": _scatter(lw.q, rows, heads_p * hd),
        "self_attn.k_proj.weight": lw.k,
        "self_attn.v_proj.weight": lw.v,
        "self_attn.o_proj.weight": _scatter(lw.o_t, rows, heads_p * hd).T,
        "mlp.gate_proj.weight": _scatter(lw.gate, chans, mlp_p),
        "mlp.up_proj.weight": _scatter(lw.up, chans, mlp_p),
        "mlp.down_proj.weight": _scatter(lw.down_t, chans, mlp_p).T,
    }
    if lw.qkv_bias is not None:
        kv = lw.kv_rows
        v_bias, k_bias, q_bias = lw.qkv_bias.split([kv, kv, lw.qkv_bias.shape[0] - 2 * kv])
        w["self_attn.q_proj.bias"] = _scatter(q_bias, rows, heads_p * hd)
        w["self_attn.k_proj.bias"], w["self_attn.v_proj.bias"] = k_bias, v_bias
    if (bias := bundle.biases.get((spec.shape.width, layer))) is not None:
        w["self_attn.o_proj.bias"], w["mlp.down_proj.bias"] = bias
    lora: dict[str, Tensor] = {}
    for name, (a, b) in (adapter or {}).items():
        # serving a [in, R], b [R, out] -> peft lora_A [R, in], lora_B [out, R], padded alike
        idx, size = (rows, heads_p * hd) if name in ("q", "o") else (chans, mlp_p)
        if name in ("q", "gate", "up"):
            b = _scatter(b.T, idx, size).T
        else:
            a = _scatter(a, idx, size)
        lora[f"{_HF_NAMES[name]}.lora_A.weight"] = a.T
        lora[f"{_HF_NAMES[name]}.lora_B.weight"] = b.T
    return w, lora


def _padded_heads(cfg: ModelConfig, heads: int) -> int:
    """The fewest heads >= `heads` that keep GQA groups whole and divide the hidden size.

    LlamaConfig refuses a hidden size that is not a multiple of the head count, even with an
    explicit head_dim; extra zero heads cost compute but change no logit.
    """
    for m in range(heads, cfg.num_heads, cfg.num_groups):
        if cfg.hidden_size % m == 0:
            return m
    return cfg.num_heads


def _config(bundle: ModelBundle, spec: ShapeSpec, padded: tuple[int, int]) -> LlamaConfig:
    cfg = bundle.config
    _, hf = load_config(bundle.model_dir)
    biased = any((spec.shape.width, i) in bundle.biases for i in spec.layers)
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=padded[1],
        num_hidden_layers=len(spec.layers),
        num_attention_heads=padded[0],
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=getattr(hf, "rope_parameters", None),
        attention_bias=cfg.qkv_bias or biased,
        mlp_bias=biased,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=list(cfg.eos_token_ids) or None,
        pad_token_id=getattr(hf, "pad_token_id", None),
        dtype=str(bundle.model.dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )


def _fill_zero_biases(state: dict[str, Tensor], config: LlamaConfig, prefix: str) -> None:
    """Llama's bias switches cover several linears: the ones the source lacks get zeros."""
    names = ["q_proj", "k_proj", "v_proj", "o_proj"] if config.attention_bias else []
    names = [f"self_attn.{n}" for n in names]
    names += [f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")] if config.mlp_bias else []
    for n in names:
        weight = state[f"{prefix}{n}.weight"]
        state.setdefault(f"{prefix}{n}.bias", weight.new_zeros(weight.shape[0]))


def export_shape(
    bundle: ModelBundle, spec: ShapeSpec, out: str | os.PathLike[str], lora: bool = True
) -> Path:
    """Write `spec` as an HF model dir at `out` (its adapter in `out`/adapter); returns `out`."""
    out = Path(out)
    w, cfg = bundle.model.weights, bundle.config
    padded = (
        _padded_heads(cfg, max(spec.heads[i] for i in spec.layers)),
        max(spec.mlp[i] for i in spec.layers),
    )
    config = _config(bundle, spec, padded)
    state = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = w.lm_head
    adapter: dict[str, Tensor] = {}
    lora_weights = bundle.model.lora if lora else None
    for j, layer in enumerate(spec.layers):
        pair = None if lora_weights is None else lora_weights.adapter(layer, spec.id)
        lw, la = _layer_tensors(w.layers[layer], bundle, spec, layer, padded, pair)
        state.update({f"model.layers.{j}.{k}": v for k, v in lw.items()})
        _fill_zero_biases(state, config, f"model.layers.{j}.")
        adapter.update({f"base_model.model.model.layers.{j}.{k}": v for k, v in la.items()})
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    bundle.tokenizer.save_pretrained(out)
    if (gen := bundle.model_dir / "generation_config.json").is_file():
        shutil.copy(gen, out)  # sampling defaults and stop tokens of the base model
    if adapter:
        _save_peft(adapter, out)
    return out


def _save_peft(adapter: dict[str, Tensor], out: Path) -> None:
    """adapter_model.safetensors + adapter_config.json in peft's format (rank 2r, scale 1)."""
    rank = next(iter(adapter.values())).shape[0]
    path = out / ADAPTER_DIR
    path.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(out.resolve()),
        "r": rank,
        "lora_alpha": rank,  # gate weights and alpha/r are folded into lora_B: scale 1
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": [n.split(".")[-1] for n in _HF_NAMES.values()],
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1) + "\n")
