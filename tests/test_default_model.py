"""End to end on the embedded SmolLM2-135M: same tokens as transformers, every shape runs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticserve import LLM, SamplingParams
from elasticserve.model.bundle import default_pack_path, load_bundle
from elasticserve.training.chat import conversation_ids, read_chat
from elasticserve.training.evaluate import chat_report

from .conftest import requires_default_model
from .helpers import prefill_logits

pytestmark = requires_default_model


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32")


@pytest.fixture(scope="module")
def hf(llm):
    return AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32)


def test_full_shape_logits_equal_transformers(llm, hf):
    ids = llm.tokenizer("Anne Elliot had been a very pretty girl")["input_ids"]
    ours = prefill_logits(llm.bundle, [ids], [llm.bundle.full])[0]
    ref = hf(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-3


def test_greedy_continuation_equals_transformers(llm, hf):
    messages = [{"role": "user", "content": "Name three novels by Jane Austen."}]
    prompt = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenizer(prompt)["input_ids"]
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref[0, len(ids) :].tolist()
    assert out.shape == "d30-w1.0"


def test_every_shape_generates(llm):
    shapes = [s.name for s in llm.shapes]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(["It was a dark and stormy night"] * len(shapes), params, shape=shapes)
    assert [o.shape for o in outs] == shapes
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


def test_served_model_name_keeps_the_default_pack(llm):
    """`--served-model-name` renames the model; it must not swap its pack for the identity one."""
    alias = load_bundle(dtype="float32", name="my-alias", lora=False)
    assert alias.name == "my-alias"
    grid = [(s.name, s.layers, s.heads, s.mlp) for s in llm.bundle.specs]
    assert [(s.name, s.layers, s.heads, s.mlp) for s in alias.specs] == grid
    assert alias.pack.fingerprint == llm.bundle.pack.fingerprint


# -- the default pack's distilled adapters -------------------------------------------------------


CHAT_SHAPES = ["d30-w0.75", "d24-w1.0", "d24-w0.75-q4"]


def _held_out_chat(bundle, count: int = 4):
    pack = default_pack_path(bundle.name)
    assert pack is not None
    path = pack / "chat.jsonl"
    records = read_chat(path, "heldout")[:count]
    return [conversation_ids(bundle.tokenizer, r) for r in records]


def test_the_default_pack_ships_adapters_that_lower_held_out_chat_kl(llm):
    bundle = llm.bundle
    assert bundle.model.lora is not None, "the default pack has adapters"
    plain = load_bundle(dtype="float32", lora=False)
    assert plain.model.lora is None
    lora = bundle.model.lora
    assert bundle.full.id not in lora.routes, "the full shape has none: it stays the base model"
    convs = _held_out_chat(bundle)
    specs = [bundle.spec(n) for n in CHAT_SHAPES]
    assert all(s.id in lora.routes for s in specs)
    with_lora = chat_report(bundle, specs, convs)
    without = chat_report(plain, [plain.spec(n) for n in CHAT_SHAPES], convs)
    for a, b in zip(with_lora, without, strict=True):
        assert a["chat_kl"] < b["chat_kl"], (a, b)


def test_adapted_shapes_apply_by_shape_id_in_a_mixed_batch(llm):
    shapes = ["d30-w1.0", *CHAT_SHAPES]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = "Tell me about the village and its people."
    together = llm.generate([prompt] * len(shapes), params, shape=shapes)
    for shape, out in zip(shapes, together, strict=True):
        alone = llm.generate(prompt, params, shape=shape)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, shape
