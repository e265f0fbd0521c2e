"""/metrics under vLLM's names (prefix vllm:), the start-up lines and the periodic stats line."""

from __future__ import annotations

import openai
from fastapi.testclient import TestClient

from elasticserve.engine.llm_engine import LLMEngine
from elasticserve.engine.metrics import TokenEvent
from elasticserve.engine.outputs import EngineStats
from elasticserve.engine.stat_logger import ThroughputLog, startup_lines
from elasticserve.model.bundle import load_bundle
from elasticserve.server.app import build_app

from .test_app import NAME, make_engine

VLLM_SERIES = [
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_prefill_time_seconds_bucket",
    "vllm:request_decode_time_seconds_bucket",
    "vllm:request_inference_time_seconds_bucket",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:iteration_tokens_total_bucket",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info{",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
]


def test_metrics_carry_vllm_names_and_no_created_series(tiny_llama_dir):
    engine = make_engine(load_bundle(tiny_llama_dir, dtype="float32"))
    try:
        with TestClient(build_app(engine, NAME, metrics_prefix="vllm:")) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http)
            client.completions.create(model=NAME, prompt="Emma", max_tokens=4, temperature=0)
            text = http.get("/metrics").text
    finally:
        engine.shutdown()
    missing = [name for name in VLLM_SERIES if name not in text]
    assert not missing, missing
    assert "_created" not in text
    assert 'vllm:request_generation_tokens_sum{model_name="tiny",shape="d6-w1.0"} 4.0' in text


def test_startup_lines_name_model_device_cache_and_grid(tiny_llama_dir):
    engine = LLMEngine(load_bundle(tiny_llama_dir, dtype="float32"))
    text = "\n".join(startup_lines(engine))
    assert "llama, 6 layers, hidden 64" in text
    assert "dtype float32" in text
    assert "device: CPU" in text
    blocks = engine.runner.num_blocks
    assert f"KV cache: {blocks} blocks x 16 tokens" in text
    assert f"grid: {len(engine.bundle.specs)} shapes" in text


def test_throughput_line_after_each_busy_window():
    stats = EngineStats(num_running=2, num_waiting=1, kv_usage=0.25)
    log = ThroughputLog(interval=10.0)
    assert log.maybe_log(0.0, stats) is None  # opens the first window
    log.on_tokens(TokenEvent("full", 30, 100, ttft=0.5, itl=None, switched_from=None))
    log.on_tokens(TokenEvent("d3-w0.5", 10, 50, ttft=None, itl=0.01, switched_from=None))
    assert log.maybe_log(5.0, stats) is None  # the window is not over
    line = log.maybe_log(10.0, stats)
    assert line is not None
    assert "Avg prompt throughput: 10.0 tokens/s" in line
    assert "Avg generation throughput: 4.0 tokens/s" in line
    assert "Running: 2 reqs, Waiting: 1 reqs, KV cache usage: 25.0%" in line
    assert "Shapes: full 75%, d3-w0.5 25%" in line
    assert log.maybe_log(20.0, EngineStats()) is None  # idle: nothing to say
