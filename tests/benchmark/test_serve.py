"""`elasticserve bench`: arrivals, metric arithmetic, prompts, and runs against a fake server."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from elasticserve.benchmark.datasets import prompt_bodies, text_files, with_unique_prefixes
from elasticserve.benchmark.local import (
    free_port,
    open_loop,
    probe_capacity,
    running_server,
    search_slo_capacity,
)
from elasticserve.benchmark.plot import (
    goodput_figure,
    latency_figure,
    shape_mix_figure,
    summaries_by_label,
)
from elasticserve.benchmark.serve import (
    BenchConfig,
    RequestResult,
    arrival_offsets,
    latency_stats,
    load_runs,
    meets_slo,
    run_benchmark,
    served_ppl,
    shape_mix,
    summarize,
)
from elasticserve.cli.bench import register, table_row

FULL, HALF = "d30-w1.0", "d15-w0.5"
SHAPE_PPL = {FULL: 10.0, HALF: 20.0}


# --- a fake OpenAI-compatible streaming server ------------------------------------------------


@dataclass
class Fake:
    """What the fake server does; it records every request body it receives."""

    first_delay: float = 0.05  # seconds before the first content chunk
    token_delay: float = 0.002
    shapes: tuple[str, ...] = (FULL, FULL, FULL, HALF)  # chunk i is served by shapes[i % 4]
    tokens_per_chunk: int = 1
    fail: Callable[[int], str | None] = lambda index: None  # "500", "drop" or None
    hang: Callable[[str], bool] = lambda prompt: False  # True: no first chunk for a minute
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)  # each request's Authorization header


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _events(fake: Fake, body: dict[str, Any], chat: bool, drop: bool) -> Any:
    n, k = body["max_tokens"], fake.tokens_per_chunk
    if chat:  # OpenAI opens a chat stream with an empty, role-only delta
        yield _sse({"model": "fake", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    await asyncio.sleep(60.0 if fake.hang(body.get("prompt", "")) else fake.first_delay)
    for chunk, i in enumerate(range(0, n, k)):
        if drop and chunk == 2:
            raise ConnectionResetError("the fake server drops the connection mid-stream")
        text = " tok" * min(k, n - i)
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        shape = fake.shapes[chunk % len(fake.shapes)]
        yield _sse({"model": f"fake@{shape}", "choices": [choice]})
        await asyncio.sleep(fake.token_delay)
    if body.get("stream_options", {}).get("include_usage"):
        usage = {"prompt_tokens": 16, "completion_tokens": n, "total_tokens": 16 + n}
        yield _sse({"model": "fake", "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


def fake_app(fake: Fake) -> FastAPI:
    """Completions and chat streaming with fixed delays and shapes, plus `/v1/shapes`."""
    app = FastAPI()

    @app.get("/v1/shapes")
    def shapes() -> dict[str, Any]:
        return {
            "data": [{"id": i, "shape": s, "ppl": p} for i, (s, p) in enumerate(SHAPE_PPL.items())]
        }

    async def stream(request: Request, chat: bool) -> Any:
        body = await request.json()
        fake.bodies.append(body)
        fake.auth.append(request.headers.get("authorization"))
        mode = fake.fail(len(fake.bodies) - 1)
        if mode == "500":
            return JSONResponse({"error": {"message": "fake overload"}}, status_code=500)
        events = _events(fake, body, chat, drop=mode == "drop")
        return StreamingResponse(events, media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await stream(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await stream(request, chat=True)

    return app


@contextmanager
def serving(fake: Fake) -> Iterator[str]:
    """Run the fake server on a free 127.0.0.1 port in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_app(fake), log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def bench(*argv: str) -> None:
    """Run `elasticserve bench ...` through the parser that `register` builds."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *argv])
    args.func(args)


def serve_args(url: str, out: Path, *extra: str) -> list[str]:
    """A small `bench serve` command line against `url`."""
    common = ["--base-url", url, "--model", "fake", "--dataset", "random", "--input-len", "16"]
    return ["serve", *common, "--output-len", "8", "--num-prompts", "6", "--out", str(out), *extra]


# --- arrivals ---------------------------------------------------------------------------------


def test_poisson_arrivals_keep_the_mean_rate_over_many_seeds() -> None:
    gaps = np.concatenate([np.diff(arrival_offsets(2000, 5.0, 1.0, seed)) for seed in range(20)])
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)  # exponential: CV 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_gap_variation(burstiness: float) -> None:
    gaps = np.diff(arrival_offsets(40_000, 8.0, burstiness, seed=1))
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_are_seeded_and_inf_sends_all_at_once() -> None:
    assert np.array_equal(arrival_offsets(50, 2.0, 1.0, 7), arrival_offsets(50, 2.0, 1.0, 7))
    assert arrival_offsets(50, 2.0, 1.0, 7)[0] == 0.0
    assert not arrival_offsets(5, math.inf, 1.0, 0).any()
    with pytest.raises(ValueError, match="must be > 0"):
        arrival_offsets(5, 0.0, 1.0, 0)


# --- metric arithmetic ------------------------------------------------------------------------


def test_slo_capacity_search_climbs_or_descends_the_ladder() -> None:
    def server(limit: float) -> Callable[[float], dict[str, float]]:
        def run(rate: float) -> dict[str, float]:
            tried.append(rate)
            return {"request_rate": rate, "slo_attainment_pct": 100.0 if rate <= limit else 40.0}

        return run

    tried: list[float] = []
    capacity, runs = search_slo_capacity(server(7.3), 3.0, step=1.25)
    assert tried == [3.0, 3.75, 4.688, 5.859, 7.324] and capacity == 5.859 and len(runs) == 5
    tried.clear()
    capacity, _ = search_slo_capacity(server(2.0), 3.0, step=1.25)
    assert tried == [3.0, 2.4, 1.92] and capacity == 1.92
    with pytest.raises(RuntimeError, match="no SLO capacity"):
        search_slo_capacity(server(math.inf), 1.0, tries=3)
    with pytest.raises(ValueError, match="step"):
        search_slo_capacity(server(1.0), 1.0, step=1.0)


def test_latency_stats_match_hand_computed_percentiles() -> None:
    stats = latency_stats([k / 1000 for k in range(1, 11)])  # 1..10 ms
    # numpy's linear rule: p90 sits at rank 0.9·9 = 8.1, between 9 and 10 ms.
    assert stats == pytest.approx({"mean": 5.5, "median": 5.5, "p90": 9.1, "p99": 9.91})
    assert latency_stats([]) == {"mean": None, "median": None, "p90": None, "p99": None}


def _done(index: int, ttft: float, tpot: float, tokens: int) -> RequestResult:
    e2e = ttft + tpot * (tokens - 1)
    return RequestResult(index, ok=True, ttft=ttft, e2e=e2e, output_tokens=tokens)


def test_goodput_counts_requests_meeting_both_slos() -> None:
    results = [
        _done(0, ttft=0.050, tpot=0.010, tokens=10),  # meets both
        _done(1, ttft=0.200, tpot=0.010, tokens=10),  # TTFT too slow
        _done(2, ttft=0.050, tpot=0.030, tokens=10),  # TPOT too slow
        _done(3, ttft=0.090, tpot=0.0, tokens=1),  # one token: no TPOT, meets TTFT
        RequestResult(4, error="HTTP 500: overload"),
    ]
    cfg = BenchConfig("http://x", "m", slo_ttft_ms=100, slo_tpot_ms=20)
    assert [meets_slo(r, 100, 20) for r in results] == [True, False, False, True, False]
    s = summarize(cfg, results, duration=2.0, shape_ppl={})
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (4, 1, 31)
    assert s["request_throughput"] == 2.0 and s["output_throughput"] == 15.5
    assert s["goodput"] == 1.0 and s["slo_attainment_pct"] == 40.0
    assert s["tpot_mean_ms"] == pytest.approx(50 / 3, abs=1e-3) and s[
        "tpot_median_ms"
    ] == pytest.approx(10)
    assert s["ttft_median_ms"] == pytest.approx(70.0)
    assert s["ppl_served"] is None and s["qa_goodput"] is None


def test_shape_mix_and_served_perplexity() -> None:
    a = RequestResult(0, ok=True, shapes={FULL: 3, HALF: 1})
    b = RequestResult(1, ok=True, shapes={HALF: 4})
    mix = shape_mix([a, b])
    assert mix == {HALF: 0.625, FULL: 0.375}
    # Token-weighted in log space: half the tokens at ppl 10, half at 40 -> 20.
    assert served_ppl({FULL: 0.5, HALF: 0.5}, {FULL: 10.0, HALF: 40.0}) == pytest.approx(20.0)
    assert served_ppl({FULL: 0.5, "d1-w0.1": 0.5}, SHAPE_PPL) is None


# --- prompts ----------------------------------------------------------------------------------


def test_every_prompt_has_a_unique_prefix_and_a_seeded_body() -> None:
    first = with_unique_prefixes(prompt_bodies("random", None, 50, 32, seed=3))
    second = with_unique_prefixes(prompt_bodies("random", None, 50, 32, seed=3))
    prefixes = {p.split()[0] for p in first + second}
    assert len(prefixes) == 100  # unique within a run and across runs
    assert [p.split(" ", 1)[1] for p in first] == [p.split(" ", 1)[1] for p in second]
    assert all(len(p.split()) == 33 for p in first)


def test_austen_prompts_cut_the_users_text(tmp_path: Path) -> None:
    (tmp_path / "novel.txt").write_text(" ".join(f"w{i}" for i in range(1000)))
    prompts = prompt_bodies("austen", tmp_path, 5, input_len=100, seed=0)
    assert all(len(p.split()) == 80 for p in prompts)  # ~0.8 words per token
    assert all(p in " ".join(f"w{i}" for i in range(1000)) for p in prompts)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text_files(tmp_path / "nowhere")


# --- runs against the fake server -------------------------------------------------------------


def test_sweep_against_fake_server_writes_results_and_plots(tmp_path: Path) -> None:
    fake = Fake()
    out = tmp_path / "fake"
    slo = ["--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000"]
    with serving(fake) as url:
        bench(*serve_args(url, out, "--sweep", "40,inf", *slo))
    runs = load_runs(out)
    assert [run["summary"]["request_rate"] for run in runs] == [40.0, "inf"]
    for run in runs:
        s = run["summary"]
        assert (s["completed"], s["failed"], s["total_output_tokens"]) == (6, 0, 48)
        assert all(r["ttft_ms"] >= 50.0 and len(r["itl_ms"]) == 7 for r in run["requests"])
        assert s["shape_mix"] == {FULL: 0.75, HALF: 0.25}
        assert s["ppl_served"] == pytest.approx(10 * 2**0.25, rel=1e-4)
        assert s["qa_goodput"] == pytest.approx(s["goodput"] / 2**0.25, rel=1e-3)
        assert s["slo_attainment_pct"] == 100.0
    sent = fake.bodies[0]
    assert sent["ignore_eos"] is True and sent["max_tokens"] == 8
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert len({b["prompt"] for b in fake.bodies}) == 12
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["request_rate"] for row in rows] == ["40.0", "inf"]
    assert rows[0][f"mix:{FULL}"] == "0.75"

    chat = tmp_path / "chat"
    with serving(Fake(tokens_per_chunk=2)) as url:
        bench(*serve_args(url, chat, "--endpoint", "chat", "--request-rate", "inf"))
    bench("plot", str(out), str(chat), "--out", str(tmp_path / "plots"))
    for name in ("latency_throughput", "goodput", "shape_mix"):
        png = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_api_key_is_sent_with_every_request_and_never_saved(tmp_path: Path) -> None:
    fake = Fake()
    with serving(fake) as url:
        bench(*serve_args(url, tmp_path, "--api-key", "sk-secret", "--request-rate", "inf"))
    assert fake.auth == ["Bearer sk-secret"] * 6
    assert "sk-secret" not in (tmp_path / "rate-inf.json").read_text()


def test_sharegpt_and_jsonl_files_give_their_prompts(tmp_path: Path) -> None:
    share = [
        {"conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}]},
        {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "Q2"}]},
        {"conversations": []},  # no human turn: skipped
    ]
    (tmp_path / "share.json").write_text(json.dumps(share))
    lines = [{"prompt": "P1"}, {"messages": [{"role": "user", "content": "P2"}]}, {"text": "P3"}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert sorted(prompt_bodies("sharegpt", tmp_path / "share.json", 2, 128, 0)) == ["Q1", "Q2"]
    assert sorted(prompt_bodies("sharegpt", tmp_path / "p.jsonl", 3, 128, 0)) == ["P1", "P2", "P3"]
    more = prompt_bodies("sharegpt", tmp_path / "p.jsonl", 7, 128, 0)  # past the file: reused
    assert len(more) == 7 and set(more) <= {"P1", "P2", "P3"}
    (tmp_path / "bad.jsonl").write_text('{"reply": "no prompt"}\n')
    with pytest.raises(ValueError, match="no record has a prompt"):
        prompt_bodies("sharegpt", tmp_path / "bad.jsonl", 1, 128, 0)
    with pytest.raises(FileNotFoundError, match="needs --data"):
        prompt_bodies("sharegpt", None, 1, 128, 0)

    fake = Fake()
    with serving(fake) as url:
        args = serve_args(url, tmp_path / "out", "--request-rate", "inf")
        args[args.index("random")] = "sharegpt"
        bench(*args, "--data", str(tmp_path / "share.json"))
    assert {b["prompt"].split(" ", 1)[1] for b in fake.bodies} == {"Q1", "Q2"}


def test_plots_have_titles_plain_log_ticks_the_slo_and_legends_inside(tmp_path: Path) -> None:
    out = tmp_path / "fake"
    with serving(Fake()) as url:
        bench(*serve_args(url, out, "--sweep", "40,inf", "--slo-tpot-ms", "50"))
    runs = summaries_by_label([out])
    fig = latency_figure(runs)
    fig.canvas.draw()  # lays the figure out: tick labels and legend positions are final
    ttft_ax, tpot_ax = fig.axes
    assert fig.get_suptitle() and ttft_ax.get_title().startswith("TTFT")
    labels = [t.get_text() for t in tpot_ax.get_yticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"[0-9.]+", text) for text in labels)  # 20, not 2×10¹
    assert any(line.get_label() == "SLO 50 ms" for line in tpot_ax.get_lines())
    assert not any(line.get_label().startswith("SLO") for line in ttft_ax.get_lines())  # unset
    for f in (fig, goodput_figure(runs), shape_mix_figure(runs)):
        f.canvas.draw()
        legends = [ax.get_legend() for ax in f.axes if ax.get_legend()] + f.legends
        assert legends
        for legend in legends:
            extent = legend.get_window_extent()
            box = f.bbox
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1  # not clipped at the edge
            assert box.y0 <= extent.y0 and extent.y1 <= box.y1


def test_token_counts_prefer_usage_over_chunks() -> None:
    fake = Fake(tokens_per_chunk=2)
    with serving(fake) as url:
        cfg = BenchConfig(url, "fake", endpoint="chat", output_len=8, ignore_eos=False)
        results, _, _ = asyncio.run(run_benchmark(cfg, ["a", "b"], progress=False))
    assert [(r.ok, r.output_tokens, sum(r.shapes.values())) for r in results] == [(True, 8, 4)] * 2
    assert "ignore_eos" not in fake.bodies[0]
    assert fake.bodies[0]["messages"] == [{"role": "user", "content": "a"}]


def test_failed_requests_are_counted_not_fatal(tmp_path: Path) -> None:
    fake = Fake(fail=lambda i: ("500", "drop", None)[i % 3])
    with serving(fake) as url:
        cfg = BenchConfig(url, "fake", output_len=8, num_prompts=6, max_concurrency=1)
        results, duration, ppl = asyncio.run(run_benchmark(cfg, list("abcdef"), progress=False))
    s = summarize(cfg, results, duration, ppl)
    assert (s["completed"], s["failed"]) == (2, 4)
    errors = [r.error or "" for r in results]
    assert sum(e.startswith("HTTP 500") for e in errors) == 2
    assert sum("RemoteProtocolError" in e for e in errors) == 2

    with serving(Fake(first_delay=2.0)) as url:
        cfg = BenchConfig(url, "fake", output_len=4, timeout=0.3)
        results, duration, ppl = asyncio.run(run_benchmark(cfg, ["a", "b"], progress=False))
    s = summarize(cfg, results, duration, ppl)
    assert s["failed"] == 2 and all("timeout" in (r.error or "") for r in results)
    assert s["ttft_p99_ms"] is None and "-" in table_row(s)

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    bench(*serve_args(url, tmp_path / "refused", "--request-rate", "inf"))
    closed.close()
    assert load_runs(tmp_path / "refused")[0]["summary"]["failed"] == 6


def test_running_server_waits_for_health_and_stops_the_process() -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with running_server(cmd, port, timeout_s=30, health_path="/") as url:
        assert httpx.get(url + "/", trust_env=False).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/", trust_env=False, timeout=2)


def test_running_server_reports_a_server_that_exits_before_it_is_up() -> None:
    port = free_port()
    server = running_server([sys.executable, "-c", "raise SystemExit(3)"], port, timeout_s=30)
    with pytest.raises(RuntimeError, match="exited with code 3"):
        server.__enter__()


def test_probe_capacity_counts_completed_requests_of_a_closed_loop() -> None:
    with serving(Fake()) as url:
        cfg = BenchConfig(url, "m", output_len=8)
        rate = asyncio.run(probe_capacity(cfg, ["a", "b", "c"], streams=2, seconds=1.0))
    # each of the 2 streams waits for the fake's first chunk and 7 more tokens per request
    per_request = Fake().first_delay + 7 * Fake().token_delay
    assert 0.3 * 2 / per_request < rate <= 2 / per_request * 1.05


def test_open_loop_sends_at_least_twenty_uniquely_prefixed_requests() -> None:
    fake = Fake()
    with serving(fake) as url:
        cfg, results, summary = open_loop(
            BenchConfig(url, "m", output_len=4), 40.0, 0.1, ["a"] * 30
        )
    assert cfg.request_rate == 40.0 and cfg.num_prompts == 20 and len(results) == 20
    assert summary["completed"] == 20 and all(r.ok for r in results)
    assert len({body["prompt"] for body in fake.bodies}) == 20  # the same body, 20 prefixes
