"""Prompt log-probs and logit_bias in the engine: transformers' numbers, across chunked prefill,
past the prefix cache, beside other requests."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from elasticserve import EngineConfig, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.outputs import RequestOutput
from elasticserve.model.bundle import load_bundle

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
K = 3


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir):
    return load_bundle(tiny_llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tokenizer) -> tuple[list[int], torch.Tensor]:
    """The prompt and transformers' log-softmax at each of its positions [P, V]."""
    prompt = tokenizer(TEXT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0]
    return prompt, logits.log_softmax(-1)


def _finish(engine: LLMEngine) -> dict[str, RequestOutput]:
    done = {}
    while engine.has_unfinished_requests():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return done


def _prompt_logprobs(engine: LLMEngine, prompt: list[int], **params) -> RequestOutput:
    params = {"temperature": 0, "max_tokens": 3, "ignore_eos": True, **params}
    request_id = engine.add_request(prompt, SamplingParams(prompt_logprobs=K, **params))
    return _finish(engine)[request_id]


def _check(out: RequestOutput, prompt: list[int], ref: torch.Tensor) -> None:
    """Each prompt token's entry: its log-prob and rank, then the K best, as transformers says."""
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    for j in range(1, len(prompt)):
        entry, row = entries[j], ref[j - 1]
        assert entry is not None
        assert next(iter(entry)) == prompt[j]  # the prompt's own token first
        mine = entry[prompt[j]]
        assert mine.logprob == pytest.approx(float(row[prompt[j]]), abs=1e-4)
        assert mine.rank == int((row > row[prompt[j]]).sum()) + 1
        best = row.topk(K)
        pairs = zip(best.indices.tolist(), best.values.tolist(), strict=True)
        for rank, (token, value) in enumerate(pairs, 1):
            assert entry[token].logprob == pytest.approx(value, abs=1e-4)
            assert token == prompt[j] or entry[token].rank == rank
        assert len(entry) == K + (prompt[j] not in best.indices.tolist())


@pytest.mark.parametrize("cpu_kernels", ["native", "torch"])
@pytest.mark.parametrize("budget", [512, 7])
def test_prompt_logprobs_match_transformers_in_one_chunk_or_many(
    tiny_llama_dir, reference, budget, cpu_kernels
):
    prompt, ref = reference
    assert len(prompt) > 2 * budget or budget == 512  # 7: the prompt runs in several chunks
    try:
        bundle = load_bundle(tiny_llama_dir, dtype="float32", cpu_kernels=cpu_kernels)
    except RuntimeError as exc:  # no compiler here: the torch path is still tested
        pytest.skip(f"the native kernels do not build here: {exc}")
    assert (bundle.native is not None) == (cpu_kernels == "native")
    engine = LLMEngine(bundle, EngineConfig(max_num_batched_tokens=budget, block_size=4))
    _check(_prompt_logprobs(engine, prompt), prompt, ref)


def test_prompt_logprobs_never_read_the_prefix_cache(bundle, reference):
    prompt, ref = reference
    engine = LLMEngine(bundle, EngineConfig(block_size=4))
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request(prompt, plain)
    _finish(engine)
    out = _prompt_logprobs(engine, prompt)
    assert out.num_cached_tokens == 0
    _check(out, prompt, ref)
    again = engine.add_request(prompt, plain)  # its blocks were cached for those that read them
    assert _finish(engine)[again].num_cached_tokens > 0


def test_prompt_logprobs_beside_other_requests_change_nothing_of_theirs(bundle, reference):
    prompt, ref = reference
    engine = LLMEngine(bundle, EngineConfig(max_num_batched_tokens=16, block_size=4))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone_id = engine.add_request(prompt[:9], params)
    alone = _finish(engine)[alone_id].outputs[0].token_ids
    other = engine.add_request(prompt[:9], params)
    wanted = engine.add_request(prompt, SamplingParams(prompt_logprobs=K, n=2, temperature=1.0))
    done = _finish(engine)
    assert done[other].outputs[0].token_ids == alone
    assert done[other].prompt_logprobs is None
    assert len(done[wanted].outputs) == 2
    _check(done[wanted], prompt, ref)


def test_preempted_requests_gather_each_prompt_entry_once(bundle, tokenizer):
    prompts = [tokenizer(" ".join([TEXT + f" ({i})"] * (3 + i)))["input_ids"] for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)

    def run(config: EngineConfig) -> tuple[list[RequestOutput], int]:
        engine = LLMEngine(bundle, config)
        ids = [engine.add_request(p, params) for p in prompts]
        seqs = [engine.requests[i].seq for i in ids]
        done = _finish(engine)
        return [done[i] for i in ids], sum(s.num_preemptions for s in seqs)

    tight, preemptions = run(EngineConfig(max_num_batched_tokens=64, kv_cache_memory=450_000))
    roomy, none = run(EngineConfig(max_num_batched_tokens=64))
    assert preemptions > 0 and none == 0
    for out, ref, prompt in zip(tight, roomy, prompts, strict=True):
        assert out.prompt_logprobs is not None and ref.prompt_logprobs is not None
        assert len(out.prompt_logprobs) == len(prompt) == len(ref.prompt_logprobs)
        for entry, expected in zip(out.prompt_logprobs[1:], ref.prompt_logprobs[1:], strict=True):
            assert entry is not None and expected is not None and entry.keys() == expected.keys()
            for token, lp in entry.items():
                assert lp.logprob == pytest.approx(expected[token].logprob, abs=1e-4)


def test_logit_bias_steers_greedy_decoding_and_checks_the_vocabulary(bundle, tokenizer):
    prompt = tokenizer(TEXT)["input_ids"]
    engine = LLMEngine(bundle)
    forced = 1234
    biased = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={forced: 100})
    request_id = engine.add_request(prompt, biased)
    assert _finish(engine)[request_id].outputs[0].token_ids == [forced] * 5
    vocab = bundle.config.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias has token id {vocab}, outside"):
        engine.add_request(prompt, SamplingParams(logit_bias={vocab: 1.0}))
    assert not engine.has_unfinished_requests()
