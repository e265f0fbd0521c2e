"""The elastic forward pass against transformers: full model and physically pruned shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticserve.model.bundle import load_bundle
from elasticserve.model.pack import identity_pack

from ..helpers import prefill_logits, pruned_hf_model, random_pack

PROMPT = "It is a truth universally acknowledged, that a single man in possession"


def _ids(tokenizer, text: str = PROMPT) -> list[int]:
    return tokenizer(text)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_shape_matches_transformers(arch, tiny_llama_dir, tiny_qwen2_dir, tokenizer):
    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    bundle = load_bundle(model_dir, dtype="float32")
    ids = _ids(tokenizer)
    ours = prefill_logits(bundle, [ids], [bundle.full])[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_permutation_keeps_full_shape_logits(arch, tiny_llama_dir, tiny_qwen2_dir, tokenizer):
    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    plain = load_bundle(model_dir, dtype="float32")
    permuted = load_bundle(model_dir, pack=random_pack(plain.pack, seed=3), dtype="float32")
    ids = _ids(tokenizer)
    a = prefill_logits(plain, [ids], [plain.full])[0]
    b = prefill_logits(permuted, [ids], [permuted.full])[0]
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", ["d6-w0.75", "d5-w0.5", "d4-w0.875", "d3-w0.625", "d6-w1.0"])
def test_shape_matches_physically_pruned_model(
    arch, shape, tiny_llama_dir, tiny_qwen2_dir, tokenizer
):
    model_dir = tiny_llama_dir if arch == "llama" else tiny_qwen2_dir
    base = load_bundle(model_dir, dtype="float32")
    pack = random_pack(base.pack, seed=7)
    bundle = load_bundle(model_dir, pack=pack, dtype="float32")
    spec = bundle.spec(shape)
    ids = _ids(tokenizer)
    ours = prefill_logits(bundle, [ids], [spec])[0]
    ref = pruned_hf_model(model_dir, pack, spec)(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3
    if shape != "d6-w1.0":  # and the shape really is a different network
        full = prefill_logits(bundle, [ids], [bundle.full])[0]
        assert (ours - full).abs().max().item() > 1e-2


def test_widths_are_non_uniform_in_random_pack(tiny_llama_dir):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    heads, mlp = random_pack(base.pack).layer_widths[0.75]
    assert len(set(mlp)) > 1 and len(set(heads)) > 1


def test_mixed_shapes_in_one_step_equal_each_alone(tiny_llama_dir, tokenizer):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    bundle = load_bundle(tiny_llama_dir, pack=random_pack(base.pack, seed=11), dtype="float32")
    texts = [
        PROMPT,
        "Emma Woodhouse, handsome, clever",
        "In a hole in the ground",
        "Call me Ishmael.",
    ]
    prompts = [_ids(tokenizer, t) for t in texts]
    specs = [bundle.spec(s) for s in ["d3-w0.5", "full", "d5-w0.75", "d6-w0.625"]]
    together = prefill_logits(bundle, prompts, specs)
    for prompt, spec, logits in zip(prompts, specs, together, strict=True):
        alone = prefill_logits(bundle, [prompt], [spec])[0]
        assert (logits - alone).abs().max().item() <= 1e-4


def test_identity_pack_is_default_for_unknown_models(tiny_llama_dir):
    bundle = load_bundle(tiny_llama_dir, dtype="float32")
    expected = identity_pack(bundle.config, bundle.pack.fingerprint)
    assert bundle.pack.layer_tables == expected.layer_tables
    assert next(s.name for s in bundle.specs) == "d6-w1.0"
    assert len(bundle.specs) == len(expected.depths) * len(expected.widths)
