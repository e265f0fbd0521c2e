"""Fuzz the server with generated request bodies: never a 5xx, and healthy afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from elasticserve.model.bundle import load_bundle

from .test_app import NAME, Live, all_blocks_free, make_engine, poll, serving

EXAMPLES = 200  # per endpoint

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-1, 0, 10**6, 2**64, -0.5, 1e308, "1", "", [], {}]),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=60_000), max_size=4),
    st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)
text = st.text(min_size=1, max_size=30)
token_ids = st.lists(st.integers(min_value=0, max_value=49_151), min_size=1, max_size=6)
fraction = st.floats(min_value=0.01, max_value=1.0)

# Valid values: each generated body then has up to two fields replaced by junk, so the mix holds
# well-formed requests (that generate, a few tokens each) as well as every kind of bad one.
SAMPLING = {
    "model": st.sampled_from([NAME, f"{NAME}@full", f"{NAME}@auto", f"{NAME}@d3-w0.5"]),
    "max_tokens": st.integers(min_value=1, max_value=3),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_p": fraction,
    "top_k": st.integers(min_value=-1, max_value=100),
    "min_p": st.floats(min_value=0, max_value=1),
    "seed": st.integers(min_value=0, max_value=2**32),
    "stop": st.one_of(text, st.lists(text, max_size=2)),
    "stop_token_ids": st.lists(st.integers(min_value=0, max_value=49_151), max_size=3),
    "presence_penalty": st.floats(min_value=-2, max_value=2),
    "frequency_penalty": st.floats(min_value=-2, max_value=2),
    "repetition_penalty": st.floats(min_value=0.5, max_value=2),
    "min_tokens": st.integers(min_value=0, max_value=1),
    "ignore_eos": st.booleans(),
    "n": st.just(1),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    ),
    "priority": st.integers(min_value=-5, max_value=5),
    "slo": st.fixed_dictionaries(
        {}, optional={"ttft_ms": st.floats(1, 1e4), "tpot_ms": st.floats(1, 1e4)}
    ),
    "user": text,
    "logit_bias": st.dictionaries(
        st.integers(min_value=0, max_value=49_151).map(str), st.floats(-100, 100), max_size=3
    ),
    "prompt_logprobs": st.integers(min_value=0, max_value=3),
}
COMPLETION = {
    **SAMPLING,
    "prompt": st.one_of(text, token_ids, st.lists(text, min_size=1, max_size=1)),
    "logprobs": st.integers(min_value=0, max_value=5),
    "echo": st.booleans(),
}
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.one_of(
            text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))
        ),
    }
)
CHAT = {
    **SAMPLING,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_completion_tokens": st.integers(min_value=1, max_value=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(min_value=0, max_value=5),
    "response_format": st.just({"type": "text"}),
    "echo": st.booleans(),
}


@st.composite
def bodies(draw: st.DrawFn, fields: dict[str, st.SearchStrategy], required: str) -> Any:
    """A request body: valid values for a random subset of fields, up to two made junk."""
    optional = {k: v for k, v in fields.items() if k not in (required, "max_tokens")}
    body = draw(
        st.fixed_dictionaries(
            {required: fields[required], "max_tokens": fields["max_tokens"]}, optional=optional
        )
    )
    for key in draw(st.lists(st.sampled_from([*fields, "junk_field"]), max_size=2)):
        body[key] = draw(junk)
    return body


def _mostly(body: st.SearchStrategy, *other: st.SearchStrategy) -> st.SearchStrategy:
    """Three bodies in four, else anything (one_of alone would weigh every junk kind as a body)."""
    rest = st.one_of(*other)
    return st.integers(min_value=0, max_value=3).flatmap(lambda i: body if i else rest)


@pytest.fixture(scope="module")
def live(tiny_llama_dir: Path) -> Iterator[Live]:
    engine = make_engine(load_bundle(tiny_llama_dir, dtype="float32"), max_num_seqs=8)
    with serving(engine) as server:
        yield server
    engine.shutdown()


def _send(live: Live, path: str, body: Any, raw: bool) -> None:
    content = json.dumps(body).encode() if not raw else body
    response = live.http.post(path, content=content, headers={"content-type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics shows the mix
    if response.status_code >= 400:
        event(response.json()["error"]["message"][:30])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text
    else:
        assert response.json()["choices"], response.text


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # no .hypothesis folder in the tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(body=_mostly(bodies(COMPLETION, "prompt"), junk, st.binary(max_size=30)))
def test_fuzz_completions(live: Live, body: Any):
    _send(live, "/v1/completions", body, raw=isinstance(body, bytes))


@FUZZ
@given(body=_mostly(bodies(CHAT, "messages"), junk))
def test_fuzz_chat_completions(live: Live, body: Any):
    _send(live, "/v1/chat/completions", body, raw=False)


def test_server_is_healthy_after_the_fuzzing(live: Live):
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    poll(lambda: all_blocks_free(live), 10, "every KV block to be free")
    ok = live.client.completions.create(model=NAME, prompt="Hello", max_tokens=2)
    assert ok.usage is not None and ok.usage.completion_tokens == 2
