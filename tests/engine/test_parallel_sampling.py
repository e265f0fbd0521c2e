"""Parallel sampling (n, best_of): members share the prompt's blocks, each draws its own tokens."""

from __future__ import annotations

import pytest

from elasticserve import EngineConfig, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.model.bundle import load_bundle

from ..helpers import random_pack

PROMPT = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition"


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    return load_bundle(tiny_llama_dir, pack=random_pack(base.pack, seed=5), dtype="float32")


def _final(engine: LLMEngine, request_id: str, on_step=None):
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                last = out
        if on_step is not None:
            on_step()
    return last


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("shape", [None, "d5-w0.75"])
def test_each_choice_equals_a_single_request_with_its_seed(bundle, caching, shape):
    config = EngineConfig(block_size=4, enable_prefix_caching=caching)
    params = dict(temperature=1.0, max_tokens=10, ignore_eos=True, logprobs=0)
    engine = LLMEngine(bundle, config)
    out = _final(engine, engine.add_request(PROMPT, SamplingParams(n=3, seed=7, **params), shape))
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    for choice in out.outputs:
        alone = LLMEngine(bundle, config)
        one = SamplingParams(seed=7 + choice.index, **params)
        single = _final(alone, alone.add_request(PROMPT, one, shape)).outputs[0]
        assert choice.token_ids == single.token_ids
        assert choice.cumulative_logprob == pytest.approx(single.cumulative_logprob, abs=1e-4)
        assert choice.text == single.text
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.stats().kv_usage == 0.0


def test_choices_share_the_prompt_blocks(bundle, tokenizer):
    engine = LLMEngine(bundle, EngineConfig(block_size=4))
    prompt_len = len(tokenizer(PROMPT)["input_ids"])
    layers = bundle.config.num_layers
    params = SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True)
    request_id = engine.add_request(PROMPT, params)
    bm = engine.block_manager
    used: list[int] = []
    _final(engine, request_id, lambda: used.append(bm.num_blocks - bm.num_free_blocks))
    per_choice = -(-(prompt_len + 5) // 4)  # blocks of the 5 tokens' K/V the last step holds
    # the blocks before the prompt's last token once; from that block on, each choice its own
    shared = (prompt_len - 1) // 4
    assert max(used) == layers * (shared + 3 * (per_choice - shared)) < 3 * layers * per_choice
    assert engine.stats().kv_usage == 0.0


def test_best_of_returns_the_n_most_likely_and_abort_frees_every_member(bundle):
    engine = LLMEngine(bundle, EngineConfig(block_size=4))
    base = dict(temperature=1.0, max_tokens=8, ignore_eos=True, seed=3)
    all_four = _final(engine, engine.add_request(PROMPT, SamplingParams(n=4, **base)))
    ranked = sorted(all_four.outputs, key=lambda c: -c.cumulative_logprob)
    best = _final(engine, engine.add_request(PROMPT, SamplingParams(n=2, best_of=4, **base)))
    assert [c.index for c in best.outputs] == [0, 1]
    assert [c.token_ids for c in best.outputs] == [c.token_ids for c in ranked[:2]]
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    request_id = engine.add_request(PROMPT, SamplingParams(n=3, **base))
    for _ in range(3):
        engine.step()
    assert len(engine.groups[request_id].members) == 3
    engine.abort(request_id)
    assert not engine.has_unfinished_requests() and engine.stats().kv_usage == 0.0
