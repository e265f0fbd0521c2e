"""The step-time model: fit, envelope of a mixed step, online correction, shape latencies."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from elasticserve.model.bundle import load_bundle
from elasticserve.model.shapes import Shape
from elasticserve.policy.step_time import (
    Sample,
    StepLoad,
    StepTimeModel,
    predicted_latency,
    step_load,
)


def _synthetic(coefficients, loads, noise=0.0, seed=0) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for load in loads:
        exact = sum(c * x for c, x in zip(coefficients, load.features(), strict=True))
        samples.append(Sample(load, exact * (1 + rng.uniform(-noise, noise))))
    return samples


LOADS = [
    StepLoad("d6-w1.0", rows, tokens, attn)
    for rows, tokens, attn in [
        (1, 1, 0.02),
        (2, 2, 0.04),
        (4, 4, 0.08),
        (8, 8, 0.16),
        (1, 16, 0.14),
        (4, 64, 0.5),
        (2, 2, 0.2),
        (9, 24, 0.3),
    ]
]


def test_step_time_imports_without_torch():
    code = "import sys, elasticserve.policy.step_time; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_fit_recovers_linear_coefficients():
    truth = (0.004, 0.001, 0.0002, 0.003)
    model = StepTimeModel.fit(_synthetic(truth, LOADS))
    assert model.coefficients["d6-w1.0"] == pytest.approx(truth, rel=1e-4)
    held = StepLoad("d6-w1.0", 3, 40, 0.3)
    assert model.predict(held) == pytest.approx(_synthetic(truth, [held])[0].seconds, rel=1e-4)


def test_fit_keeps_coefficients_non_negative_on_noisy_samples():
    truth = (0.004, 0.001, 0.0, 0.0)  # tokens and attention cost nothing: noise must not go < 0
    model = StepTimeModel.fit(_synthetic(truth, LOADS, noise=0.1))
    assert all(c >= 0 for c in model.coefficients["d6-w1.0"])
    errors = model.relative_errors(_synthetic(truth, LOADS))
    assert max(errors) < 0.12


def test_step_load_takes_the_envelope_of_a_mixed_step():
    rows = [(Shape(24, 0.5), 1, 99), (Shape(30, 0.75), 1, 9), (Shape(15, 1.0), 16, 0)]
    load = step_load(rows)
    assert load.shape == "d30-w1.0"  # deepest depth, widest width: what the step costs
    assert (load.rows, load.tokens) == (3, 18)
    assert load.attn == pytest.approx((100 + 10 + 16 * 17 / 2) / 1000)


def test_online_correction_converges_on_a_slowdown_and_back():
    truth = (0.004, 0.001, 0.0002, 0.003)
    model = StepTimeModel.fit(_synthetic(truth, LOADS), alpha=0.1)
    rng = random.Random(1)
    for _ in range(60):  # the machine gets 2x slower, with +-20% noise per step
        load = rng.choice(LOADS)
        model.observe(load, 2.0 * model.raw(load) * rng.uniform(0.8, 1.2))
    assert model.ratio == pytest.approx(2.0, rel=0.1)
    probe = StepLoad("d6-w1.0", 5, 5, 0.1)
    assert model.predict(probe) == pytest.approx(2.0 * model.raw(probe), rel=0.1)
    for _ in range(60):  # and recovers
        load = rng.choice(LOADS)
        model.observe(load, model.raw(load))
    assert model.ratio == pytest.approx(1.0, rel=0.05)


def test_one_outlier_moves_the_correction_only_a_little():
    model = StepTimeModel.fit(_synthetic((0.004, 0.001, 0.0, 0.0), LOADS), alpha=0.1)
    model.observe(LOADS[0], 1000 * model.raw(LOADS[0]))  # a step stalled by another process
    assert model.ratio < 1.3


def test_predicted_latency_of_each_shape_alone(tiny_llama_dir):
    bundle = load_bundle(tiny_llama_dir, dtype="float32")
    latency = predicted_latency(StepTimeModel.prior(bundle.specs), bundle.specs)
    assert list(latency) == [s.name for s in bundle.specs]
    full, small = latency[bundle.full.name], latency["d3-w0.5"]
    assert 0 < small["tpot_ms"] < full["tpot_ms"] and 0 < small["ttft_ms"] < full["ttft_ms"]
