"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from elasticserve.engine.llm_engine import EngineConfig, LLMEngine
from elasticserve.engine.outputs import CompletionOutput, RequestOutput
from elasticserve.engine.sampling import SamplingParams
from elasticserve.model.adapters import LoraConfig
from elasticserve.model.bundle import ModelBundle, load_bundle
from elasticserve.server.app import build_app
from elasticserve.server.args import add_serve_arguments, parse_bytes
from elasticserve.server.async_engine import AsyncLLMEngine
from elasticserve.server.completions import SHAPE_HEADER
from elasticserve.server.formats import CompletionFormat
from elasticserve.server.protocol import CompletionRequest
from elasticserve.server.serve import GracefulServer, run_serve
from elasticserve.training.finetune import FinetuneConfig, finetune

NAME = "tiny"
PINNED = "d3-w0.5"
PROMPT = "It is a truth universally acknowledged"
CHAT = [{"role": "user", "content": "Who is Emma Woodhouse?"}]
GREEDY = {"temperature": 0, "max_tokens": 6}
LONG = {"max_tokens": 400, "extra_body": {"ignore_eos": True}}


@dataclass
class Live:
    """A server running in this process, with clients pointed at it."""

    url: str
    engine: AsyncLLMEngine
    bundle: ModelBundle
    client: openai.OpenAI
    http: httpx.Client


@contextlib.contextmanager
def serving(engine: AsyncLLMEngine, api_key: str | None = None, **app_options) -> Iterator[Live]:
    """Run a uvicorn server for `engine` on a free port in a thread; stop it afterwards."""
    app = build_app(engine, NAME, api_key=api_key, **app_options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before the thread starts: no port race
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    http = httpx.Client(base_url=url, timeout=30)
    poll(lambda: _healthy(http), timeout=30, what="the server to answer /health")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0)
    try:
        yield Live(url, engine, engine.bundle, client, http)
    finally:
        client.close()
        http.close()
        server.should_exit = True
        thread.join(10)
        sock.close()


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def poll(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def make_engine(bundle: ModelBundle, max_waiting: int = 256, **config) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(bundle, EngineConfig(**config)), max_waiting=max_waiting)


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir: Path) -> ModelBundle:
    return load_bundle(tiny_llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def live(bundle: ModelBundle) -> Iterator[Live]:
    engine = make_engine(bundle, max_num_seqs=8)
    with serving(engine) as server:
        yield server
    engine.shutdown()


@pytest.fixture(scope="module")
def guarded(bundle: ModelBundle) -> Iterator[Live]:
    """A second server: an API key, one running request at a time, one waiting at most."""
    engine = make_engine(bundle, max_waiting=1, max_num_seqs=1)
    with serving(engine, api_key="sesame") as server:
        yield server
    engine.shutdown()


def _offline(bundle: ModelBundle, prompt: str | list[int], shape: str, max_tokens: int) -> str:
    """What the engine alone generates greedily at `shape`."""
    engine = LLMEngine(bundle)
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), shape)
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
    return text


def _chat_ids(bundle: ModelBundle, messages: list[dict[str, str]]) -> list[int]:
    text = bundle.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return bundle.tokenizer(text, add_special_tokens=False)["input_ids"]


def _metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if there are none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- discovery -----------------------------------------------------------------------------------


def test_models_list_the_base_and_every_shape(live: Live):
    ids = [m.id for m in live.client.models.list()]
    assert ids == [NAME] + [f"{NAME}@{s.name}" for s in live.bundle.specs]
    assert live.client.models.retrieve(f"{NAME}@{PINNED}").id == f"{NAME}@{PINNED}"
    with pytest.raises(openai.NotFoundError):
        live.client.models.retrieve("gpt-4")


def test_shapes_endpoint_lists_the_grid(live: Live):
    data = live.http.get("/v1/shapes").json()["data"]
    assert [d["id"] for d in data] == [f"{NAME}@{s.name}" for s in live.bundle.specs]
    full, pinned = data[0], next(d for d in data if d["shape"] == PINNED)
    assert (full["depth"], full["width"], full["weight_fraction"]) == (6, 1.0, 1.0)
    assert (pinned["depth"], pinned["width"]) == (3, 0.5)
    assert 0 < pinned["weight_fraction"] < 0.5
    assert {"ppl", "latency"} <= pinned.keys()


def test_health_reports_the_load(live: Live):
    body = live.http.get("/health").json()
    assert body["status"] == "ok" and body["num_blocks"] > 0


# -- generation ----------------------------------------------------------------------------------


def test_completion_usage_counts_and_default_shape(live: Live):
    raw = live.client.completions.with_raw_response.create(
        model=NAME, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True}, logprobs=0
    )
    resp = raw.parse()
    full = f"{NAME}@{live.bundle.full.name}"
    assert resp.model == full and raw.headers[SHAPE_HEADER] == full
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None and len(choice.logprobs.tokens or []) == 5
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(live.bundle.tokenizer(PROMPT)["input_ids"])
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5
    assert resp.usage.model_extra == {"shape_tokens": {live.bundle.full.name: 5}}


def test_chat_uses_the_chat_template(live: Live):
    resp = live.client.chat.completions.create(model=NAME, messages=CHAT, **GREEDY)  # type: ignore[arg-type]
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(_chat_ids(live.bundle, CHAT))
    expected = _offline(live.bundle, _chat_ids(live.bundle, CHAT), "full", 6)
    assert resp.choices[0].message.content == expected


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_non_stream_for_greedy(live: Live, endpoint: str):
    if endpoint == "chat":
        create: Callable = live.client.chat.completions.create
        args: dict = {"messages": CHAT, "logprobs": True, "top_logprobs": 2}
    else:
        create, args = live.client.completions.create, {"prompt": PROMPT, "logprobs": 2}
    greedy = {**GREEDY, "max_tokens": 24}  # long enough for the engine to run ahead of the stream
    whole = create(model=NAME, **args, **greedy)
    chunks = list(
        create(model=NAME, stream=True, stream_options={"include_usage": True}, **args, **greedy)
    )
    *deltas, last = chunks
    choices = [c.choices[0] for c in deltas]
    if endpoint == "chat":
        text = whole.choices[0].message.content
        streamed = "".join(c.delta.content or "" for c in choices)
        tokens = [t.token for t in whole.choices[0].logprobs.content]
        streamed_tokens = [t.token for c in choices if c.logprobs for t in c.logprobs.content]
    else:
        text, streamed = whole.choices[0].text, "".join(c.text for c in choices)
        tokens = whole.choices[0].logprobs.tokens
        streamed_tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
    assert streamed == text and text
    assert streamed_tokens == tokens and len(tokens) == whole.usage.completion_tokens
    assert choices[-1].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage == whole.usage
    assert {c.model for c in chunks} == {f"{NAME}@{live.bundle.full.name}"}


def test_streamed_logprobs_follow_the_tokens_not_the_engines_growing_list(bundle: ModelBundle):
    # The engine hands out its own token and logprob lists and appends to them on its thread: by
    # the time the event loop formats an output, the lists may be ahead of that output.
    tokens = [5, 7, 9]
    logprobs = [{5: -0.5, 6: -1.0}, {7: -0.1, 5: -2.0}, {9: -0.2}]

    def output(text: str, delta: str, n: int, finished: bool) -> RequestOutput:
        completion = CompletionOutput(
            0, text, tokens, logprobs=logprobs, text_delta=delta, num_tokens=n
        )
        return RequestOutput("r", None, [1], [completion], finished, "d6-w1.0", "d6-w1.0")

    outputs = [output("ab", "ab", 1, False), output("abc", "c", 2, True)]
    server = SimpleNamespace(name=NAME, tokenizer=bundle.tokenizer)
    body = CompletionRequest(prompt="x", logprobs=1)
    fmt = CompletionFormat(server, "cmpl-1", body)  # type: ignore[arg-type]
    chunks = [chunk for out in outputs for chunk in fmt.chunks(out)]
    lps = [chunk.choices[0].logprobs for chunk in chunks]
    assert [lp.token_logprobs for lp in lps] == [[-0.5], [-0.1]]
    assert [chunk.choices[0].text for chunk in chunks] == ["ab", "c"]
    assert [len(lp.top_logprobs[0]) for lp in lps] == [2, 2]


@pytest.mark.parametrize("alias", [PINNED, "D3-W0.50"])
def test_pinned_shape_is_served_and_reported(live: Live, alias: str):
    model = f"{NAME}@{PINNED}"
    raw = live.client.completions.with_raw_response.create(
        model=f"{NAME}@{alias}", prompt=PROMPT, **GREEDY
    )
    resp = raw.parse()
    assert resp.model == model and raw.headers[SHAPE_HEADER] == model
    assert resp.choices[0].text == _offline(live.bundle, PROMPT, PINNED, 6)
    assert resp.choices[0].text != _offline(live.bundle, PROMPT, "full", 6)
    with live.client.chat.completions.with_streaming_response.create(
        model=model, messages=CHAT, stream=True, **GREEDY
    ) as stream:
        assert stream.headers[SHAPE_HEADER] == model
        assert {chunk.model for chunk in stream.parse()} == {model}


def test_full_alias_and_auto_serve_the_full_shape(live: Live):
    for model in (f"{NAME}@full", f"{NAME}@auto", NAME):
        resp = live.client.completions.create(model=model, prompt=PROMPT, max_tokens=1)
        assert resp.model == f"{NAME}@{live.bundle.full.name}"


def test_vllm_sampling_extras_are_honoured(live: Live):
    extras = {"top_k": 5, "min_tokens": 4, "repetition_penalty": 1.2, "min_p": 0.01}
    args = dict(model=NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, extra_body=extras)
    first = live.client.completions.create(**args)  # type: ignore[call-overload]
    again = live.client.completions.create(**args)  # type: ignore[call-overload]
    assert first.choices[0].text == again.choices[0].text  # seeded
    greedy = live.client.completions.create(model=NAME, prompt=PROMPT, **GREEDY, logprobs=1)
    stop_id = live.bundle.tokenizer(greedy.choices[0].logprobs.tokens[2])["input_ids"][0]
    stopped = live.client.completions.create(
        model=NAME, prompt=PROMPT, **GREEDY, extra_body={"stop_token_ids": [stop_id]}
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens <= 3


def test_explicit_nulls_mean_the_defaults(live: Live):
    fields = ["n", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user"]
    fields += ["top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "priority"]
    fields += ["presence_penalty", "frequency_penalty", "stop_token_ids", "slo", "logprobs"]
    nulls = dict.fromkeys(fields)
    body = {**nulls, "model": NAME, "prompt": PROMPT, "max_tokens": 2, "echo": None}
    assert live.http.post("/v1/completions", json=body).status_code == 200
    body = {**nulls, "model": NAME, "messages": CHAT, "max_tokens": 2, "top_logprobs": None}
    assert live.http.post("/v1/chat/completions", json=body).status_code == 200


def test_chat_logprobs_in_openai_format(live: Live):
    resp = live.client.chat.completions.create(
        model=NAME, messages=CHAT, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = resp.choices[0].logprobs.content
    assert content is not None and len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best
        assert bytes(entry.bytes or []).decode() == entry.token


# -- errors --------------------------------------------------------------------------------------

ERRORS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 600}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "x " * 600}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": f"{NAME}@d2-w0.5", "prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": f"{NAME}@huge", "prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "cat"}]}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": CHAT, "max_completion_tokens": 1000},
        400,
        "max_tokens",
    ),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": "nope", "messages": CHAT}, 404, "model"),
]


def _assert_openai_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param


@pytest.mark.parametrize(("path", "body", "status", "param"), ERRORS)
def test_errors_have_their_status_and_openai_body(live: Live, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = live.http.post(path, content=content, headers={"content-type": "application/json"})
    _assert_openai_error(response, status, param)
    if status == 404:
        assert response.json()["error"]["code"] == "model_not_found"


def test_errors_reach_the_openai_client_as_its_exceptions(live: Live):
    with pytest.raises(openai.NotFoundError):
        live.client.completions.create(model="gpt-4", prompt=PROMPT)
    with pytest.raises(openai.BadRequestError, match="context length"):
        live.client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="not in the grid"):
        live.client.completions.create(model=f"{NAME}@d1-w0.5", prompt=PROMPT, stream=True)


def test_api_key_guards_v1_but_not_health_or_metrics(guarded: Live):
    url = guarded.url
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{url}/v1/models", headers=headers)
        _assert_openai_error(response, 401, None)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert guarded.client.models.list().data[0].id == NAME


def test_queue_over_its_limit_answers_429_with_retry_after(guarded: Live):
    slow_step = guarded.engine.engine.step

    def step():  # ~10 ms a step: the running request outlives this test's three requests
        time.sleep(0.01)
        return slow_step()

    guarded.engine.engine.step = step  # type: ignore[method-assign]
    client = guarded.client
    try:
        running = client.completions.create(model=NAME, prompt=PROMPT, stream=True, **LONG)
        next(iter(running))
        waiting = client.completions.create(model=NAME, prompt=PROMPT, stream=True, **LONG)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1)
        assert int(info.value.response.headers["retry-after"]) >= 1
        _assert_openai_error(info.value.response, 429, None)
        running.close()
        waiting.close()
    finally:
        del guarded.engine.engine.step
    poll(lambda: guarded.engine.stats().num_waiting == 0, 10, "the queue to drain")
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1).choices


def all_blocks_free(live: Live) -> bool:
    stats = live.engine.stats()
    return stats.num_free_blocks == stats.num_blocks and stats.num_running == 0


def test_client_disconnect_mid_stream_frees_its_kv_blocks(live: Live):
    aborted = _metric(live.http.get("/metrics").text, "elasticserve:request_success_total")
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "stream": True}
    with live.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert live.engine.stats().num_free_blocks < live.engine.stats().num_blocks
    poll(lambda: all_blocks_free(live), 10, "the KV blocks to be freed")
    metrics = live.http.get("/metrics").text
    total = _metric(metrics, "elasticserve:request_success_total")
    assert total == aborted + 1
    assert _metric(metrics, "elasticserve:request_success_total", finished_reason="abort") >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_error_fails_its_requests_and_the_server_keeps_serving(live: Live, stream: bool):
    step = live.engine.engine.step

    def broken():
        del live.engine.engine.step  # fail once, then the real step again
        raise RuntimeError("injected fault")

    live.engine.engine.step = broken  # type: ignore[method-assign]
    body = {"model": NAME, "prompt": PROMPT, "stream": stream}
    try:
        response = live.http.post("/v1/completions", json=body)
        if stream:  # the status went out with the headers: the error comes as an event
            events = [line for line in response.text.splitlines() if line]
            assert response.status_code == 200 and events[-1] == "data: [DONE]"
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert "injected fault" in error["message"]
        else:
            _assert_openai_error(response, 500, None)
            assert "injected fault" in response.json()["error"]["message"]
    finally:
        live.engine.engine.__dict__.pop("step", None)
    assert live.engine.engine.step == step
    assert live.client.completions.create(model=NAME, prompt=PROMPT, max_tokens=2).choices
    poll(lambda: all_blocks_free(live), 10, "the KV blocks to be freed")


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_use_vllm_names_with_shape_labels(live: Live):
    live.client.completions.create(model=f"{NAME}@{PINNED}", prompt=PROMPT, max_tokens=3)
    text = live.http.get("/metrics").text
    labels = {"model_name": NAME, "shape": PINNED}
    for name in (
        "elasticserve:time_to_first_token_seconds_count",
        "elasticserve:inter_token_latency_seconds_count",
        "elasticserve:e2e_request_latency_seconds_count",
        "elasticserve:request_queue_time_seconds_count",
        "elasticserve:prompt_tokens_total",
        "elasticserve:generation_tokens_total",
        "elasticserve:request_success_total",
    ):
        assert _metric(text, name, **labels) >= 1, name
    assert _metric(text, "elasticserve:generation_tokens_total", **labels) >= 3
    for name in ("num_requests_running", "num_requests_waiting"):
        assert f'elasticserve:{name}{{model_name="{NAME}",shape="{PINNED}"}}' in text
    assert "elasticserve:kv_cache_usage_perc{" in text
    assert "# TYPE elasticserve:shape_switches_total counter" in text


# -- the serve command ---------------------------------------------------------------------------


def test_serve_command_builds_the_server_its_arguments_describe(tiny_llama_dir: Path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    argv = ["--model", str(tiny_llama_dir), "--dtype", "float32", "--served-model-name", "mini"]
    argv += ["--api-key", "k", "--kv-cache-memory", "8MiB", "--port", "1234", "--policy", "load"]
    seen: dict = {}
    monkeypatch.setattr(GracefulServer, "run", lambda server: seen.update(config=server.config))
    run_serve(parser.parse_args(argv))
    config = seen["config"]
    assert (config.host, config.port) == ("127.0.0.1", 1234)
    client = TestClient(config.app)
    assert client.get("/v1/models").status_code == 401
    shapes = client.get("/v1/shapes", headers={"Authorization": "Bearer k"}).json()["data"]
    assert shapes[0]["id"] == "mini@d6-w1.0" and shapes[0]["latency"] is None  # no profile
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-memory", "lots"])


def test_serve_no_lora_serves_the_pack_without_its_adapters(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch
):
    base = load_bundle(tiny_llama_dir, dtype="float32")
    config = FinetuneConfig(steps=1, lora=LoraConfig(rank=2, experts=2), seq_len=16, batch=1)
    ids = base.tokenizer(" ".join(["the quiet house and the noisy ball"] * 20))["input_ids"]
    finetune(base, ids, [], tmp_path / "adapted", config, progress=False)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    argv = ["--model", str(tiny_llama_dir), "--pack", str(tmp_path / "adapted")]
    argv += ["--dtype", "float32", "--served-model-name", "mini", "--kv-cache-memory", "8MiB"]
    adapters = {}
    for flags in ([], ["--no-lora"]):
        seen: dict = {}
        monkeypatch.setattr(
            GracefulServer, "run", lambda server, seen=seen: seen.update(c=server.config)
        )
        run_serve(parser.parse_args(argv + flags))
        shapes = TestClient(seen["c"].app).get("/v1/shapes").json()["data"]
        adapters[tuple(flags)] = {s["shape"]: s["adapter"] for s in shapes}
    with_lora, without = adapters[()], adapters[("--no-lora",)]
    assert with_lora["d6-w1.0"] is False, "the full shape has no adapter"
    assert all(a for shape, a in with_lora.items() if shape != "d6-w1.0")
    assert not any(without.values())


def test_sizes():
    assert parse_bytes("512MiB") == parse_bytes("512m") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
