"""Prefix caching in the engine: same tokens as without it, exact reuse only, no leaked blocks."""

from __future__ import annotations

import pytest

from elasticserve import EngineConfig, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.model.bundle import load_bundle

from ..conftest import requires_default_model
from ..helpers import random_pack

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
HISTORY = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune"
)


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    return load_bundle(tiny_llama_dir, pack=random_pack(base.pack, seed=5), dtype="float32")


def _generate(engine: LLMEngine, prompt: list[int], shape: str | None = None):
    request_id = engine.add_request(prompt, GREEDY, shape)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == request_id:
                last = out
    return last


def _chat(engine: LLMEngine, tokenizer, shape: str | None, turns: int = 4):
    """A conversation: each turn's prompt is the last prompt, its answer and a new question."""
    prompt = tokenizer(HISTORY)["input_ids"]
    results = []
    for turn in range(turns):
        out = _generate(engine, prompt, shape)
        results.append((out.outputs[0].token_ids, out.num_cached_tokens))
        prompt = prompt + out.outputs[0].token_ids + tokenizer(f" and then {turn}?")["input_ids"]
    return results


@pytest.mark.parametrize("shape", [None, "d5-w0.75"])
def test_multi_turn_greedy_tokens_equal_without_caching(bundle, tokenizer, shape):
    cached = LLMEngine(bundle, EngineConfig(block_size=4))
    plain = LLMEngine(bundle, EngineConfig(block_size=4, enable_prefix_caching=False))
    with_cache, without = _chat(cached, tokenizer, shape), _chat(plain, tokenizer, shape)
    assert [t for t, _ in with_cache] == [t for t, _ in without]
    assert [c for _, c in without] == [0, 0, 0, 0]
    assert with_cache[0][1] == 0 and all(c >= 16 for _, c in with_cache[1:])
    stats = cached.stats()
    assert stats.prefix_cache_hits == sum(c for _, c in with_cache) > 0
    assert stats.kv_usage == 0.0 and plain.stats().kv_usage == 0.0


def test_a_prefix_is_reused_only_by_the_shape_that_computed_it(bundle, tokenizer):
    engine = LLMEngine(bundle, EngineConfig(block_size=4))
    prompt = tokenizer(HISTORY)["input_ids"]
    full = _generate(engine, prompt, "full")
    narrow = _generate(engine, prompt, "d5-w0.75")
    assert narrow.num_cached_tokens == 0  # other K/V below every layer: not exact, not reused
    again = _generate(engine, prompt, "d5-w0.75")
    assert again.num_cached_tokens == (len(prompt) - 1) // 4 * 4
    assert again.outputs[0].token_ids == narrow.outputs[0].token_ids
    assert _generate(engine, prompt, "full").outputs[0].token_ids == full.outputs[0].token_ids
    assert engine.stats().kv_usage == 0.0


def test_aborted_and_preempted_requests_leave_reusable_blocks_and_no_leak(bundle, tokenizer):
    long = " ".join([HISTORY] * 6)
    config = EngineConfig(block_size=4, max_num_batched_tokens=64, kv_cache_memory=450_000)
    engine = LLMEngine(bundle, config)
    prompt = tokenizer(long)["input_ids"]
    request_id = engine.add_request(prompt, GREEDY)
    engine.step()  # one 64-token chunk computed: 16 full blocks registered
    engine.abort(request_id)
    assert engine.stats().kv_usage == 0.0
    assert _generate(engine, prompt).num_cached_tokens == 64
    seqs = []
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for i in range(12):  # more than the pool holds at once: preemption recomputes from the cache
        ids = tokenizer(long + " ".join([f" ({i})"] * (4 + 2 * i)))["input_ids"]
        seqs.append(engine.requests[engine.add_request(ids, params)].seq)
    while engine.has_unfinished_requests():
        engine.step()
    assert sum(s.num_preemptions for s in seqs) > 0
    assert all(s.num_output_tokens == 24 for s in seqs)
    assert all(s.num_cached_tokens >= 64 for s in seqs)
    stats = engine.stats()
    assert stats.kv_usage == 0.0 and stats.num_free_blocks == stats.num_blocks


@requires_default_model
@pytest.mark.parametrize("shape", ["full", "d24-w0.75-q4"])
def test_default_model_chat_equal_with_and_without_caching(shape):
    """The real model through its chat template: a 4-turn conversation whose later turns hit the
    cache gives the greedy tokens of the same conversation prefilled from scratch."""
    default = load_bundle()
    tok = default.tokenizer
    engines = {
        on: LLMEngine(default, EngineConfig(enable_prefix_caching=on)) for on in (True, False)
    }
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    questions = ["Who is Anne Elliot?", "Why?", "Say it in French.", "And shorter?"]
    answers: dict[bool, list[list[int]]] = {True: [], False: []}
    cached: list[int] = []
    for on, engine in engines.items():
        history: list[dict[str, str]] = []
        for question in questions:
            history.append({"role": "user", "content": question})
            text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            prompt = tok(text, add_special_tokens=False)["input_ids"]
            request_id = engine.add_request(prompt, params, shape)
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id == request_id:
                        last = out
            answers[on].append(last.outputs[0].token_ids)
            if on:
                cached.append(last.num_cached_tokens)
            history.append({"role": "assistant", "content": last.outputs[0].text})
        assert engine.stats().kv_usage == 0.0
    assert answers[True] == answers[False]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])
