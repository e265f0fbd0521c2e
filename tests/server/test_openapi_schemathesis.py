"""Schemathesis over the server's own OpenAPI schema: no request it describes gets a 5xx.

A bounded run (a fixed seed, a few hundred cases over every operation) with and without an API
key. The context is cut to 64 tokens so that every generated request is cheap to serve.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from elasticserve.model.bundle import ModelBundle, load_bundle
from elasticserve.server.app import build_app

from .test_app import NAME, make_engine

KEY = "sesame"
EXAMPLES = 30  # per operation with a body, and auth state: a few hundred cases in all


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir: Path) -> ModelBundle:
    return load_bundle(tiny_llama_dir, dtype="float32", max_model_len=64)


@pytest.mark.parametrize("key", [None, KEY], ids=["open", "api-key"])
def test_no_request_the_schema_describes_gets_a_5xx(bundle: ModelBundle, key: str | None):
    engine = make_engine(bundle)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(engine, NAME, key))
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
        for operation in operations:
            statuses: Counter[int] = Counter()
            _fuzz(operation, key, statuses)
            assert not [s for s in statuses if s >= 500], (operation.label, statuses)
            if operation.path.endswith("completions"):  # bodies to vary: never cut short
                assert sum(statuses.values()) >= EXAMPLES, (operation.label, statuses)
    finally:
        engine.shutdown()


def _fuzz(operation: Any, key: str | None, statuses: Counter[int]) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else None

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # a fixed seed: the same cases every run
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def call(case: Any) -> None:
        response = case.call(headers=headers)
        statuses[response.status_code] += 1
        assert response.status_code < 500, (case.as_curl_command(), response.text)
        if response.status_code >= 400 and response.headers["content-type"] == "application/json":
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    call()
