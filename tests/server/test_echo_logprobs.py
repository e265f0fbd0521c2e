"""echo, prompt_logprobs and logit_bias through the official `openai` client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from elasticserve.model.bundle import ModelBundle, load_bundle

from .test_app import NAME, PROMPT, Live, make_engine, serving

GREEDY = {"temperature": 0, "max_tokens": 5, "extra_body": {"ignore_eos": True}}
HISTORY = " ".join(["It is a truth universally acknowledged, that a single man"] * 3)


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir) -> ModelBundle:
    return load_bundle(tiny_llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def live(bundle: ModelBundle) -> Iterator[Live]:
    engine = make_engine(bundle, max_num_seqs=8, block_size=4, max_num_batched_tokens=16)
    with serving(engine) as server:
        yield server
    engine.shutdown()


def _prompt_tokens(live: Live, prompt: str) -> list[str]:
    ids = live.bundle.tokenizer(prompt)["input_ids"]
    return [live.bundle.tokenizer.decode([t]) for t in ids]


def _extra(choice_or_response: Any, name: str) -> Any:
    return (choice_or_response.model_extra or {}).get(name)


# -- echo ----------------------------------------------------------------------------------------


def test_echo_prepends_the_prompt_and_its_logprobs(live: Live):
    plain = live.client.completions.create(model=NAME, prompt=PROMPT, logprobs=2, **GREEDY)
    echoed = live.client.completions.create(
        model=NAME, prompt=PROMPT, logprobs=2, echo=True, **GREEDY
    )
    scored = live.client.completions.create(
        model=NAME, prompt=PROMPT, **GREEDY | {"extra_body": {"prompt_logprobs": 2}}
    )
    choice, generated = echoed.choices[0], plain.choices[0]
    assert choice.text == PROMPT + generated.text
    lp, gen = choice.logprobs, generated.logprobs
    assert lp is not None and gen is not None
    prompt_tokens = _prompt_tokens(live, PROMPT)
    p = len(prompt_tokens)
    assert lp.tokens == prompt_tokens + gen.tokens
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[p:] == pytest.approx(gen.token_logprobs, abs=1e-5)
    assert lp.top_logprobs[p:] == gen.top_logprobs
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # the prompt tokens' log-probs are the ones prompt_logprobs reports
    entries = _extra(scored.choices[0], "prompt_logprobs")
    ids = live.bundle.tokenizer(PROMPT)["input_ids"]
    for j in range(1, p):
        assert lp.token_logprobs[j] == pytest.approx(entries[j][str(ids[j])]["logprob"], abs=1e-5)
        top = lp.top_logprobs[j]
        assert top is not None and 2 <= len(top) <= 3 and lp.tokens[j] in top
    assert echoed.usage is not None and echoed.usage.completion_tokens == 5


def test_echo_streams_the_prompt_in_the_first_chunk(live: Live):
    args = dict(model=NAME, prompt=PROMPT, logprobs=1, echo=True, **GREEDY)
    whole = live.client.completions.create(**args)  # type: ignore[call-overload]
    chunks = list(live.client.completions.create(stream=True, **args))  # type: ignore[call-overload]
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == whole.choices[0].logprobs.tokens
    first = chunks[0].choices[0].logprobs
    assert first is not None and first.token_logprobs is not None
    assert first.token_logprobs[0] is None


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_returns_the_prompt_alone(live: Live, stream: bool):
    args: dict[str, Any] = dict(model=NAME, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    if stream:
        chunks = list(
            live.client.completions.create(
                stream=True, stream_options={"include_usage": True}, **args
            )
        )
        *deltas, last = chunks
        text = "".join(c.choices[0].text for c in deltas)
        tokens = [t for c in deltas if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        finish, usage = deltas[-1].choices[0].finish_reason, last.usage
    else:
        resp = live.client.completions.create(**args)
        text, finish, usage = resp.choices[0].text, resp.choices[0].finish_reason, resp.usage
        assert resp.choices[0].logprobs is not None
        tokens = resp.choices[0].logprobs.tokens
    assert text == PROMPT
    assert tokens == _prompt_tokens(live, PROMPT)
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 0
    assert usage.total_tokens == usage.prompt_tokens == len(tokens)


def test_max_tokens_0_needs_echo(live: Live):
    with pytest.raises(openai.BadRequestError) as info:
        live.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=0)
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "max_tokens"


def test_chat_echo_prepends_the_last_assistant_message(live: Live):
    start = "Emma Woodhouse, handsome, clever, and rich,"
    turn = [{"role": "user", "content": "Begin a novel."}, {"role": "assistant", "content": start}]
    args: dict[str, Any] = dict(model=NAME, messages=turn, **GREEDY)
    plain = live.client.chat.completions.create(**args)
    args["extra_body"] = {**GREEDY["extra_body"], "echo": True}
    echoed = live.client.chat.completions.create(**args)
    assert echoed.choices[0].message.content == start + (plain.choices[0].message.content or "")
    chunks = list(live.client.chat.completions.create(stream=True, **args))
    assert [c.choices[0].delta.content for c in chunks[:2]] == ["", start]
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == echoed.choices[0].message.content
    # a conversation that ends with the user's message has nothing to echo
    args["messages"] = turn[:1]
    user_last = live.client.chat.completions.create(**args)
    args["extra_body"] = GREEDY["extra_body"]
    assert user_last.choices[0].message.content == (
        live.client.chat.completions.create(**args).choices[0].message.content
    )


# -- prompt_logprobs -----------------------------------------------------------------------------


def _check_prompt_logprobs(live: Live, entries: Any, prompt_ids: list[int], k: int) -> None:
    """vLLM's shape: None, then per token {id: {logprob, rank, decoded_token}}, its own first."""
    assert entries is not None and len(entries) == len(prompt_ids) and entries[0] is None
    for token, entry in zip(prompt_ids[1:], entries[1:], strict=True):
        assert next(iter(entry)) == str(token)
        assert k <= len(entry) <= k + 1
        for key, value in entry.items():
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["logprob"] <= 0 and value["rank"] >= 1
            assert value["decoded_token"] == live.bundle.tokenizer.decode([int(key)])
        ranked = sorted((v["rank"], v["logprob"]) for key, v in entry.items() if key != str(token))
        assert [lp for _, lp in ranked] == sorted((lp for _, lp in ranked), reverse=True)


def test_completion_prompt_logprobs_on_every_choice(live: Live):
    resp = live.client.completions.create(
        model=NAME, prompt=PROMPT, n=2, **GREEDY | {"extra_body": {"prompt_logprobs": 3}}
    )
    ids = live.bundle.tokenizer(PROMPT)["input_ids"]
    entries = [_extra(c, "prompt_logprobs") for c in resp.choices]
    _check_prompt_logprobs(live, entries[0], ids, 3)
    assert entries[1] == entries[0]
    plain = live.client.completions.create(model=NAME, prompt=PROMPT, **GREEDY)
    assert _extra(plain.choices[0], "prompt_logprobs") is None


def test_chat_prompt_logprobs_skip_the_prefix_cache(live: Live):
    messages = [{"role": "user", "content": HISTORY}]
    first = live.client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    extra = {"extra_body": {**GREEDY["extra_body"], "prompt_logprobs": 0}}
    scored = live.client.chat.completions.create(model=NAME, messages=messages, **GREEDY | extra)
    again = live.client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    assert scored.usage is not None and again.usage is not None
    assert scored.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details is not None
    assert scored.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the cache did hold them
    assert scored.choices[0].message.content == first.choices[0].message.content
    entries = _extra(scored, "prompt_logprobs")
    assert len(entries) == scored.usage.prompt_tokens
    _check_prompt_logprobs(live, entries, _chat_prompt_ids(live, messages), 0)


def _chat_prompt_ids(live: Live, messages: list[dict[str, str]]) -> list[int]:
    text = live.bundle.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return live.bundle.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- logit_bias ----------------------------------------------------------------------------------


def test_logit_bias_forces_a_token_and_leaves_other_requests_alone(live: Live):
    forced = live.bundle.tokenizer(" Emma")["input_ids"][0]
    long = {"temperature": 0, "max_tokens": 40, "extra_body": {"ignore_eos": True}}
    alone = live.client.completions.create(model=NAME, prompt=HISTORY, **long).choices[0].text
    results: dict[str, str] = {}

    def biased() -> None:
        resp = live.client.completions.create(
            model=NAME, prompt=PROMPT, logit_bias={str(forced): 100}, **long
        )
        results["biased"] = resp.choices[0].text

    def unbiased() -> None:
        resp = live.client.completions.create(model=NAME, prompt=HISTORY, **long)
        results["unbiased"] = resp.choices[0].text

    threads = [threading.Thread(target=f) for f in (biased, unbiased)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["biased"] == " Emma" * 40
    assert results["unbiased"] == alone
    chat = live.client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": PROMPT}],
        logit_bias={str(forced): 100},
        **GREEDY,
    )
    assert chat.choices[0].message.content == " Emma" * 5


def test_a_negative_bias_bans_the_greedy_choice(live: Live):
    plain = live.client.completions.create(model=NAME, prompt=PROMPT, logprobs=0, **GREEDY)
    first = live.bundle.tokenizer(plain.choices[0].text)["input_ids"][0]
    banned = live.client.completions.create(
        model=NAME, prompt=PROMPT, logit_bias={str(first): -100}, **GREEDY
    )
    assert live.bundle.tokenizer(banned.choices[0].text)["input_ids"][0] != first


@pytest.mark.parametrize(
    "body, param",
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": -100.5}}, "logit_bias"),
        ({"logit_bias": {"5": "x"}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),  # past the vocabulary
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
        ({"echo": True, "max_tokens": 0, "min_tokens": 1}, "min_tokens"),
    ],
)
def test_bad_values_get_a_400_naming_the_field(live: Live, body: dict[str, Any], param: str):
    response = live.http.post(
        "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2, **body}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]
    if "echo" not in body:
        messages = [{"role": "user", "content": PROMPT}]
        chat = live.http.post(
            "/v1/chat/completions",
            json={"model": NAME, "messages": messages, "max_tokens": 2, **body},
        )
        assert chat.status_code == 400 and chat.json()["error"]["param"] == param
