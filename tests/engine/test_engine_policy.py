"""The engine with a shape policy on the tiny model: a burst shrinks shapes, then full returns.

Time is a fake clock and step times come from a fixed step-time model (no online correction), so
what the policy decides does not depend on how busy this machine is.
"""

from __future__ import annotations

import time

import pytest

from elasticserve import EngineConfig, SamplingParams
from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.model.bundle import load_bundle
from elasticserve.policy.factory import make_policy
from elasticserve.policy.step_time import StepTimeModel
from elasticserve.policy.types import SLO, Overloaded

TEXT = "It is a truth universally acknowledged"
STEP_S = 0.02  # fake seconds per engine step


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


pytestmark = pytest.mark.usefixtures("one_thread")  # nothing here is timed (conftest)


@pytest.fixture(scope="module")
def bundle(tiny_llama_dir):
    return load_bundle(tiny_llama_dir, dtype="float32")


def fake_model(specs) -> StepTimeModel:
    """2 ms + weight fraction x (8 ms + 1.5 ms per row): full misses 20 ms beyond 6 rows."""
    coefficients = {
        s.name: (0.002 + 0.008 * s.weight_fraction, 0.0015 * s.weight_fraction, 0.0, 0.0)
        for s in specs
    }
    return StepTimeModel(coefficients, alpha=0.0)


def make_engine(bundle, tpot_ms=20.0, ttft_ms=5000.0):
    clock = Clock()
    policy = make_policy("slo", bundle.specs, fake_model(bundle.specs), SLO(ttft_ms, tpot_ms))
    return LLMEngine(bundle, EngineConfig(), policy=policy, clock=clock), clock


def step(engine, clock, outputs=None):
    for out in engine.step():
        if outputs is not None and out.finished:
            outputs[out.request_id] = out
    clock.now += STEP_S


def drain(engine, clock) -> dict:
    outputs: dict = {}
    while engine.has_unfinished_requests():
        step(engine, clock, outputs)
    return outputs


PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_burst_serves_smaller_shapes_then_the_full_shape_returns(bundle):
    engine, clock = make_engine(bundle)
    full = bundle.full
    first = engine.add_request(TEXT, PARAMS)
    assert engine.requests[first].spec == full  # light load: full
    step(engine, clock)
    step(engine, clock)
    burst = [engine.add_request(f"{TEXT} ({i})", PARAMS) for i in range(15)]
    step(engine, clock)  # one step later the running request is already narrower
    moved = engine.requests[first].spec
    assert moved != full and set(moved.layers) <= set(full.layers)
    assert engine.shape_switches["in_flight"] >= 1
    outputs = drain(engine, clock)
    assert outputs[first].narrowest_shape != full.name
    for rid in burst:
        assert full.name not in outputs[rid].shape_tokens  # the burst never ran at full
        assert sum(outputs[rid].shape_tokens.values()) == 12
    clock.now += 10.0  # the burst is long over
    late = engine.add_request(TEXT, PARAMS)
    assert engine.requests[late].spec == full
    assert drain(engine, clock)[late].shape_tokens == {full.name: 12}


def test_refusal_raises_overloaded_and_queues_nothing(bundle):
    engine, _ = make_engine(bundle, ttft_ms=1.0)  # no shape prefills in 1 ms, even alone
    with pytest.raises(Overloaded) as refused:
        engine.add_request(TEXT, PARAMS)
    assert refused.value.retry_after_s >= 1 and "idle" in str(refused.value)
    assert not engine.requests and not engine.has_unfinished_requests()
    rid = engine.add_request(TEXT, PARAMS, slo={"ttft_ms": 10_000})  # its own SLO is looser
    assert rid in engine.requests
    with pytest.raises(ValueError, match="unknown slo"):
        engine.add_request(TEXT, PARAMS, slo={"ttft": 5})


def test_pinned_shapes_stay_and_min_shape_is_a_floor(bundle):
    engine, clock = make_engine(bundle, tpot_ms=30.0)  # 17 rows: full misses, d6-w0.75 meets
    pinned = engine.add_request(TEXT, PARAMS, shape="d6-w0.5")
    floor = bundle.spec("d6-w0.75")
    floored = engine.add_request(TEXT, PARAMS, min_shape=floor)
    crowd = [engine.add_request(f"{TEXT} ({i})", PARAMS) for i in range(15)]
    outputs: dict = {}
    while engine.has_unfinished_requests():
        if pinned in engine.requests:
            assert engine.requests[pinned].spec.name == "d6-w0.5"
        if floored in engine.requests:
            shape = engine.requests[floored].spec.shape
            assert shape.depth >= floor.shape.depth and shape.width >= floor.shape.width
        step(engine, clock, outputs)
    assert outputs[pinned].shape_tokens == {"d6-w0.5": 12}
    # the crowd shrank, but not below the floor row: that one sets what every step costs
    served = {bundle.spec(n) for r in crowd for n in outputs[r].shape_tokens}
    assert bundle.full not in served and floor in served
    with pytest.raises(ValueError, match="below min_shape"):
        engine.add_request(TEXT, PARAMS, shape="d3-w0.5", min_shape=floor)


def test_observed_step_times_reach_the_step_time_model(bundle):
    engine, clock = make_engine(bundle)
    engine.add_request(TEXT, PARAMS)
    drain(engine, clock)
    model = engine.policy.model
    assert model.observations == 12  # one per step: prefill + 11 decodes
    predicted, observed = model.last
    assert predicted > 0 and observed > 0
    assert engine.last_step is not None and engine.last_step[0].shape == bundle.full.name


def test_observed_step_time_spans_busy_gaps_not_idle_ones(bundle):
    engine, clock = make_engine(bundle)
    pause = 0.2  # far above a tiny-model step
    engine.add_request(TEXT, PARAMS)
    engine.step()
    time.sleep(pause)  # work remains: a server dispatching outputs between steps
    engine.step()
    assert engine.last_step is not None and engine.last_step[1] >= pause
    drain(engine, clock)
    time.sleep(pause)  # nothing to do: idle time is no step's
    engine.add_request(TEXT, PARAMS)
    engine.step()
    assert engine.last_step[1] < pause
    engine.abort(next(iter(engine.requests)))
    time.sleep(pause)  # the last request aborted between steps: idle again
    engine.add_request(TEXT, PARAMS)
    engine.step()
    assert engine.last_step[1] < pause


def test_without_a_policy_auto_is_the_full_shape(bundle):
    engine = LLMEngine(bundle)
    rid = engine.add_request(TEXT, PARAMS, shape="auto", slo={"tpot_ms": 1.0}, min_shape="d3")
    assert engine.requests[rid].spec == bundle.full and not engine.requests[rid].pinned
    assert not drain(engine, Clock())[rid].shape_tokens.keys() - {bundle.full.name}
