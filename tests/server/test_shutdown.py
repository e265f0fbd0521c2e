"""SIGTERM on `elasticserve serve`: in-flight requests finish or get an error, then it exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from .test_app import PROMPT, poll

DRAIN_S = 1.0
LONG = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(model: Path, port: int) -> subprocess.Popen:
    argv = [sys.executable, "-m", "elasticserve.cli", "serve", "--model", str(model)]
    argv += ["--dtype", "float32", "--port", str(port), "--shutdown-timeout", str(DRAIN_S)]
    argv += ["--served-model-name", "tiny", "--log-level", "warning"]
    return subprocess.Popen(argv, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.TransportError:
        return False


def _request(url: str, stream: bool, results: list) -> None:
    body = {"model": "tiny", **LONG, "stream": stream}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        results.append((stream, response.status_code, response.read().decode()))


def _ended_cleanly(stream: bool, status: int, text: str) -> str:
    """'done' or 'error' for a response that ended either way; AssertionError otherwise."""
    if not stream:
        body = json.loads(text)
        if status == 200:
            assert body["choices"][0]["finish_reason"] == "length", text
            return "done"
        assert status == 503 and set(body["error"]) == {"message", "type", "param", "code"}, text
        return "error"
    events = [line.removeprefix("data: ") for line in text.splitlines() if line]
    assert status == 200 and events[-1] == "[DONE]", text[-300:]
    last = json.loads(events[-2])
    if "error" in last:
        assert "shutting down" in last["error"]["message"], last
        return "error"
    assert last["choices"][0]["finish_reason"] == "length", last
    return "done"


def test_sigterm_drains_then_fails_the_rest_exits_and_a_restart_serves(tiny_llama_dir: Path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start(tiny_llama_dir, port)
    try:
        poll(lambda: _up(url), 180, "the server to start")
        results: list = []
        threads = [
            threading.Thread(target=_request, args=(url, i % 2 == 0, results)) for i in range(8)
        ]
        for thread in threads:
            thread.start()

        def admitted() -> bool:  # every request is in the engine, or already answered
            load = httpx.get(f"{url}/health").json()
            return load["num_running"] + load["num_waiting"] + len(results) == 8

        poll(admitted, 60, "8 requests in flight")
        server.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        # uvicorn re-raises the signal once it has shut down: "ended by SIGTERM", as it should.
        assert server.wait(DRAIN_S + 30) in (0, -signal.SIGTERM)
        outcomes = [_ended_cleanly(*result) for result in results]
        assert len(outcomes) == 8, results
    finally:
        server.kill()
        server.wait()
    again = _start(tiny_llama_dir, port)
    try:
        poll(lambda: _up(url), 180, "the restarted server")
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2}
        usage = httpx.post(f"{url}/v1/completions", json=body).json()["usage"]
        assert usage["completion_tokens"] == 2
    finally:
        again.terminate()
        assert again.wait(DRAIN_S + 30) in (0, -signal.SIGTERM)


def test_a_request_cut_short_keeps_every_choice():
    """An n > 1 request aborted or failed mid-way ends every choice, keeping what each had."""
    from elasticserve.engine.outputs import CompletionOutput, RequestOutput
    from elasticserve.server.async_engine import _final_output

    last = RequestOutput(
        request_id="r",
        prompt="p",
        prompt_token_ids=[1],
        outputs=[
            CompletionOutput(0, "ab", [5, 6], finish_reason="stop", text_delta="b"),
            CompletionOutput(1, "a", [5], text_delta="a"),
        ],
        finished=False,
        shape="full",
        narrowest_shape="full",
    )
    out = _final_output("r", last, None, "abort", "shutting down")
    assert out.finished and out.error == "shutting down"
    assert [(c.index, c.text, c.finish_reason, c.text_delta) for c in out.outputs] == [
        (0, "ab", "stop", ""),
        (1, "a", "abort", ""),
    ]
