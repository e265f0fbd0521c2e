"""n > 1, best_of and prefix caching through the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from elasticserve.model.bundle import ModelBundle, load_bundle

from .test_app import NAME, Live, _metric, make_engine, serving

HISTORY = " ".join(["It is a truth universally acknowledged, that a single man"] * 6)
SAMPLED = {"temperature": 1.0, "max_tokens": 8, "seed": 11, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def live(tiny_llama_dir) -> Iterator[Live]:
    bundle: ModelBundle = load_bundle(tiny_llama_dir, dtype="float32")
    engine = make_engine(bundle, max_num_seqs=8, block_size=4)
    with serving(engine) as server:
        yield server
    engine.shutdown()


def test_n_choices_are_indexed_and_stream_equals_non_stream(live: Live):
    whole = live.client.completions.create(model=NAME, prompt=HISTORY, n=3, **SAMPLED)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert len({c.text for c in whole.choices}) > 1  # each choice draws its own tokens
    assert whole.usage is not None and whole.usage.completion_tokens == 3 * 8
    stream = live.client.completions.create(model=NAME, prompt=HISTORY, n=3, stream=True, **SAMPLED)
    texts, finishes = ["", "", ""], [None, None, None]
    for chunk in stream:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [c.text for c in whole.choices]
    assert finishes == ["length"] * 3


def test_chat_stream_with_n_opens_and_fills_every_choice(live: Live):
    messages = [{"role": "user", "content": HISTORY}]
    whole = live.client.chat.completions.create(model=NAME, messages=messages, n=2, **SAMPLED)
    assert [c.index for c in whole.choices] == [0, 1]
    chunks = list(
        live.client.chat.completions.create(
            model=NAME, messages=messages, n=2, stream=True, **SAMPLED
        )
    )
    roles = [c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    texts = ["", ""]
    for chunk in chunks:
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert texts == [c.message.content for c in whole.choices]


def test_best_of_returns_n_choices_and_is_refused_in_a_stream(live: Live):
    one = live.client.completions.create(model=NAME, prompt=HISTORY, best_of=3, **SAMPLED)
    assert [c.index for c in one.choices] == [0]
    with pytest.raises(openai.BadRequestError) as info:
        live.client.completions.create(
            model=NAME, prompt=HISTORY, best_of=3, stream=True, **SAMPLED
        )
    assert info.value.body["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as info:
        live.client.completions.create(model=NAME, prompt=HISTORY, n=3, best_of=2, **SAMPLED)
    assert info.value.body["param"] == "best_of"


def test_a_repeated_prefix_is_served_from_the_cache(live: Live):
    greedy = {"temperature": 0, "max_tokens": 6}
    prompt = HISTORY + " in possession of a good fortune"
    metrics = live.http.get("/metrics").text
    hits_before = _metric(metrics, "elasticserve:prefix_cache_hits_total")
    first = live.client.completions.create(model=NAME, prompt=prompt, **greedy)
    again = live.client.completions.create(model=NAME, prompt=prompt, **greedy)
    assert again.choices[0].text == first.choices[0].text
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (again.usage.prompt_tokens - 1) // 4 * 4 > 0
    metrics = live.http.get("/metrics").text
    assert _metric(metrics, "elasticserve:prefix_cache_hits_total") - hits_before >= cached
    assert _metric(metrics, "elasticserve:prefix_cache_queries_total") > 0
    health = httpx.get(f"{live.url}/health").json()
    assert health is not None
