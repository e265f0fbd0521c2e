"""Routing across replicas (pure rules) and the pieces of the Ray app that need no Ray."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from elasticserve.server.ray.args import use_ray
from elasticserve.server.ray.ingress import merge_metrics
from elasticserve.server.ray.replica import asgi_exchange
from elasticserve.server.ray.routing import (
    ReplicaLoad,
    has_token,
    predicted_wait_s,
    rank,
    retry_after,
)


def load(replica: str, running: int = 0, waiting: int = 0, **kw) -> ReplicaLoad:
    kw = {"step_base_s": 0.010, "step_row_s": 0.001, "max_num_seqs": 4, **kw}
    return ReplicaLoad(replica, running, waiting, **kw)


def test_stats_round_trip_and_unknown_fields() -> None:
    x = load("a", 2, 1, mean_output_tokens=40.0)
    assert ReplicaLoad.from_stats("a", {**x.to_stats(), "future_field": 1}) == x
    assert ReplicaLoad.from_stats("b", None) == ReplicaLoad("b")  # not reported yet: idle


def test_wait_grows_with_batch_and_with_the_queue_beyond_it() -> None:
    x = load("a", mean_output_tokens=8.0)
    idle, busy, full = (predicted_wait_s(x, q, 1.0) for q in (0, 3, 4))
    assert idle == pytest.approx(0.011)  # one step of a batch of one
    assert busy == pytest.approx(0.014)  # joins the batch: one step of four rows
    # no free slot: it waits for one, and a slot frees every 8 / 4 = 2 steps
    assert full == pytest.approx(3 * 0.014)
    assert predicted_wait_s(load("d", alive=False), 0, 1.0) == float("inf")


def test_reported_queue_used_when_serve_has_no_count() -> None:
    x = load("a", running=3)
    assert predicted_wait_s(x, None, 1.0) == predicted_wait_s(x, 3, 1.0)


def test_rank_prefers_least_wait_not_turn() -> None:
    rows = {"step_row_s": 0.010}  # each row costs as much as the empty batch: no ties here
    loads = [load("a", 3, **rows), load("b", 0, **rows), load("c", 1, **rows)]
    for turn in range(3):
        assert rank(loads, [3, 0, 1], turn=turn) == [1, 2, 0]


def test_rank_prefers_a_faster_step_over_a_shorter_queue() -> None:
    # b has more requests but runs a much smaller step shape: it answers sooner
    slow, fast = load("a", step_base_s=0.100), load("b", step_base_s=0.010)
    assert rank([slow, fast], [0, 2])[0] == 1


def test_rank_ties_go_round_robin() -> None:
    loads = [load("b"), load("a", step_base_s=0.0101), load("c")]  # within the noise
    firsts = [loads[rank(loads, [0, 0, 0], turn=t)[0]].replica for t in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_rank_puts_avoided_replicas_last_but_keeps_them() -> None:
    loads = [load("a"), load("b", running=2)]
    assert rank(loads, [0, 2], avoid={"a"}) == [1, 0]
    assert sorted(rank(loads, [0, 2], avoid={"a", "b"})) == [0, 1]


def test_unmeasured_replica_assumed_as_fast_as_the_median() -> None:
    fresh = load("new", step_base_s=None, step_row_s=0.0)
    old = load("old", step_base_s=0.5, running=2)
    assert rank([old, fresh], [2, 0])[0] == 1  # a restarted replica is not shunned or flooded


def test_retry_after_is_the_soonest() -> None:
    assert retry_after(["5", "2", None, "junk"]) == "2"
    assert retry_after([None]) == "1"


def _event(**choice) -> bytes:
    return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()


def test_has_token() -> None:
    assert not has_token(_event(delta={"role": "assistant", "content": ""}))
    assert not has_token(_event(text=""))
    assert has_token(_event(text=" Emma"))
    assert has_token(_event(delta={"content": "Hi"}))
    assert has_token(_event(text="", finish_reason="length"))
    assert has_token(b'data: {"error": {"message": "boom"}}\n\n')
    assert has_token(b"data: [DONE]\n\n")


REPLICA_TEXT = """# HELP elasticserve:generation_tokens_total Generated tokens.
# TYPE elasticserve:generation_tokens_total counter
elasticserve:generation_tokens_total{model_name="tiny",shape="full"} 7.0
# HELP elasticserve:kv_cache_usage_perc KV-cache usage.
# TYPE elasticserve:kv_cache_usage_perc gauge
elasticserve:kv_cache_usage_perc{model_name="tiny"} 0.25
"""


def test_merge_metrics_labels_each_replica_once_per_family() -> None:
    text = merge_metrics([("r1", REPLICA_TEXT), ("r2", REPLICA_TEXT.replace("7.0", "3.0"))])
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    tokens = families["elasticserve:generation_tokens"]
    assert {s.labels["replica"]: s.value for s in tokens.samples} == {"r1": 7.0, "r2": 3.0}
    assert text.decode().count("# TYPE elasticserve:generation_tokens_total") == 1


def test_use_ray_only_with_a_ray_option() -> None:
    from argparse import Namespace

    assert not use_ray(Namespace(replicas=None, ray_address=None, autoscale=None))
    assert use_ray(Namespace(replicas=2, ray_address=None, autoscale=None))


# -- the in-process HTTP bridge a replica runs requests through --------------------------------


def bridge_app(aborted: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"got": (await request.json())["x"], "q": request.url.query}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                aborted.append("stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def request(method: str, path: str, body: bytes = b"", query: str = "") -> dict:
    headers = [("content-type", "application/json")]
    return {"method": method, "path": path, "query": query, "headers": headers, "body": body}


def test_bridge_runs_a_request_through_the_app() -> None:
    async def go() -> list:
        app = bridge_app([])
        return [item async for item in asgi_exchange(app, request("POST", "/echo", b'{"x": 1}'))]

    head, *body = asyncio.run(go())
    assert head["status"] == 200 and ("content-type", "application/json") in head["headers"]
    assert json.loads(b"".join(body)) == {"got": 1, "q": ""}


def test_bridge_closed_early_ends_the_stream_in_the_app() -> None:
    aborted: list[str] = []

    async def go() -> list:
        items = []
        exchange = asgi_exchange(bridge_app(aborted), request("GET", "/stream"))
        async for item in exchange:
            items.append(item)
            if len(items) == 3:
                break
        await exchange.aclose()
        return items

    head, *chunks = asyncio.run(go())
    assert head["status"] == 200 and chunks == [b"data: 0\n\n", b"data: 1\n\n"]
    assert aborted == ["stream"]
