"""The engine: mixed-shape continuous batching gives each request what it would get alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticserve import LLM, EngineConfig, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.model.bundle import load_bundle

from ..helpers import random_pack

SHAPES = ["full", "d6-w0.625", "d5-w0.75", "d3-w0.5"]
TEXTS = [
    "It is a truth universally acknowledged",
    "Emma Woodhouse, handsome, clever, and rich",
    "Sir Walter Elliot, of Kellynch Hall",
    "No one who had ever seen Catherine Morland",
]


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    return load_bundle(tiny_llama_dir, pack=random_pack(base.pack, seed=5), dtype="float32")


def _run(engine: LLMEngine, prompts, params, shapes) -> dict[str, list[int]]:
    ids = [engine.add_request(p, params, s) for p, s in zip(prompts, shapes, strict=True)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return {i: done[i] for i in ids}


def _requests(tokenizer, long: bool):
    prompts, shapes = [], []
    for i in range(16):
        text = TEXTS[i % 4] + f" ({i})"
        if long:
            text = " ".join([text] * (8 + i))  # 100-300 tokens: several prefill chunks
        prompts.append(tokenizer(text)["input_ids"])
        shapes.append(SHAPES[i % 4])
    return prompts, shapes


@pytest.mark.parametrize(
    "long, config",
    [
        (False, EngineConfig()),
        (True, EngineConfig(max_num_batched_tokens=64)),  # chunked prefill
        (True, EngineConfig(max_num_batched_tokens=64, kv_cache_memory=450_000)),  # preemption
    ],
    ids=["short", "chunked", "preempting"],
)
def test_mixed_batch_equals_each_alone(bundle, tokenizer, long, config):
    prompts, shapes = _requests(tokenizer, long)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine = LLMEngine(bundle, config)
    together = list(_run(engine, prompts, params, shapes).values())
    alone_engine = LLMEngine(bundle)
    for prompt, shape, tokens in zip(prompts, shapes, together, strict=True):
        alone = next(iter(_run(alone_engine, [prompt], params, [shape]).values()))
        assert tokens == alone
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_preemption_happens_under_memory_pressure(bundle, tokenizer):
    prompts, shapes = _requests(tokenizer, long=True)
    engine = LLMEngine(bundle, EngineConfig(max_num_batched_tokens=64, kv_cache_memory=450_000))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    seqs = []
    for prompt, shape in zip(prompts, shapes, strict=True):
        seqs.append(engine.requests[engine.add_request(prompt, params, shape)].seq)
    while engine.has_unfinished_requests():
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert all(s.num_output_tokens == 12 for s in seqs)
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_no_block_leaks_after_finish_abort_and_errors(bundle, tokenizer):
    engine = LLMEngine(bundle, EngineConfig(max_num_batched_tokens=64))
    params = SamplingParams(temperature=0.8, max_tokens=20, seed=1)
    ids = [engine.add_request(t, params, s) for t, s in zip(TEXTS, SHAPES, strict=True)]
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("hello", SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="not in the grid"):
        engine.add_request("hello", params, "d2-w0.75")
    with pytest.raises(ValueError, match="invalid shape"):
        engine.add_request("hello", params, "d0-wx")
    engine.step()
    engine.step()
    engine.abort(ids[0])  # running
    late = engine.add_request("A late request", params, "d3-w0.5")
    engine.abort(late)  # waiting
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
    assert not engine.has_unfinished_requests()


def test_stop_conditions(bundle, tokenizer):
    engine = LLMEngine(bundle)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = next(iter(_run(engine, [TEXTS[0]], greedy, [None]).values()))
    stop_id = ref[5]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id])
    rid = engine.add_request(TEXTS[0], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    last = outs[-1].outputs[0]
    assert last.finish_reason == "stop" and last.stop_reason == stop_id
    assert last.token_ids == ref[: ref.index(stop_id) + 1]


def test_text_deltas_add_up_to_the_text_and_outputs_share_the_lists(bundle):
    def outputs(**stop) -> list:
        engine = LLMEngine(bundle)
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0, **stop)
        engine.add_request(TEXTS[1], params)
        outs = []
        while engine.has_unfinished_requests():
            outs += [o.outputs[0] for o in engine.step()]
        return outs

    whole = outputs()[-1].text
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]  # a stop string cut from the middle
    outs = outputs(stop=[stop])
    last = outs[-1]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert "".join(o.text_delta for o in outs) == last.text == whole[: whole.index(stop)]
    assert [o.num_tokens for o in outs] == list(range(1, len(outs) + 1))
    assert all(o.token_ids is last.token_ids and o.logprobs is last.logprobs for o in outs)


def test_llm_generate_reports_shapes_and_keeps_order(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32")
    outs = llm.generate(TEXTS, SamplingParams(temperature=0, max_tokens=5), shape=SHAPES)
    assert [o.prompt for o in outs] == TEXTS
    assert [o.shape for o in outs] == [llm.bundle.spec(s).name for s in SHAPES]
    assert all(len(o.outputs[0].token_ids) <= 5 for o in outs)
    assert llm.shapes[0].name == "d6-w1.0" and llm.shapes[0].weight_fraction == 1.0
    with pytest.raises(ValueError, match="3 values for 4 prompts"):
        llm.generate(TEXTS, shape=SHAPES[:3])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_over_paged_cache_matches_transformers(tiny_llama_dir, tokenizer, dtype):
    """Rows of different lengths decode together over scattered 8-token blocks; every chosen
    token's log-prob equals transformers' on the same tokens (the cache is fp32 on CPU)."""
    torch_dtype = getattr(torch, dtype)
    bundle = load_bundle(tiny_llama_dir, dtype=dtype)
    engine = LLMEngine(bundle, EngineConfig(block_size=8))
    assert engine.runner.cache.dtype == torch.float32
    prompts = [tokenizer(" ".join([t] * (1 + i)))["input_ids"] for i, t in enumerate(TEXTS[:3])]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o.outputs[0] for o in engine.step() if o.finished}
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch_dtype)
    tolerance = 1e-3 if dtype == "float32" else 5e-2
    for request_id, prompt in zip(ids, prompts, strict=True):
        out = done[request_id]
        tokens = torch.tensor([prompt + list(out.token_ids)])
        with torch.inference_mode():
            ref = hf(tokens).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        chosen = ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
        pairs = zip(out.logprobs, out.token_ids, strict=True)
        ours = torch.tensor([entry[t] for entry, t in pairs])
        assert (ours - chosen).abs().max().item() <= tolerance
