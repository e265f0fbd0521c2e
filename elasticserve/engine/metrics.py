"""Prometheus metrics: vLLM's names and set under an `elasticserve:` prefix, labelled by shape.

Each `EngineMetrics` (one per app) has its own CollectorRegistry, never the global one, so several
servers can live in one process; the process collector (CPU, memory, fds) is in it, as in vLLM's.
The engine thread times each request (`RequestTimes`) as its outputs appear and reports to every
attached `EngineMetrics`; the load gauges follow every step. With the prefix `vllm:` a vLLM
dashboard reads these as they are (the `shape` label is one more it can ignore).
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from .outputs import RequestOutput

PREFIX = "elasticserve:"
# vLLM's buckets, with finer ones at the bottom: small shapes on a GPU decode in about a ms.
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
ITL_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4),
    *(0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
# vLLM's 1-2-5 series for token counts, and its iteration_tokens_total buckets
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5))
ITERATION_BUCKETS = (
    1.0,
    8.0,
    16.0,
    32.0,
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
)
REQUEST_BUCKETS = (
    *(0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0),
    *(40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)


@dataclass
class RequestTimes:
    """What the metrics remember about one request between its outputs (engine thread only)."""

    arrival: float  # time.monotonic() when the server received it
    scheduled: bool = False
    scheduled_at: float | None = None  # when it first ran
    first_token: float | None = None
    last_shape: str | None = None
    last_token: float | None = None
    num_tokens: int = 0


@dataclass(frozen=True)
class RequestDone:
    """What a finished request adds to the per-request histograms."""

    prompt_tokens: int
    generation_tokens: int
    inference_s: float | None  # first scheduled -> finished (None if it never ran)
    prefill_s: float | None  # first scheduled -> first token
    decode_s: float | None  # first token -> last token


def request_done(times: RequestTimes, out: RequestOutput, now: float) -> RequestDone:
    """The histograms' view of a request that finished at `now`."""
    started, first = times.scheduled_at, times.first_token
    return RequestDone(
        prompt_tokens=len(out.prompt_token_ids),
        generation_tokens=sum(c.num_tokens for c in out.outputs),
        inference_s=None if started is None else now - started,
        prefill_s=None if started is None or first is None else max(0.0, first - started),
        decode_s=None if first is None or times.last_token is None else times.last_token - first,
    )


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request, with the latencies they imply."""

    shape: str
    new_tokens: int
    prompt_tokens: int
    ttft: float | None  # set on the request's first token
    itl: float | None  # per-token gap since its previous output, otherwise
    switched_from: str | None  # the shape of its previous tokens, when it changed


def token_event(times: RequestTimes, out: RequestOutput, now: float) -> TokenEvent | None:
    """Advance `times` past `out`; None if `out` brought no new token."""
    new = sum(c.num_tokens for c in out.outputs) - times.num_tokens  # every choice of n > 1
    if new <= 0:
        return None
    first = times.last_token is None
    switched = times.last_shape if times.last_shape not in (None, out.shape) else None
    event = TokenEvent(
        shape=out.shape,
        new_tokens=new,
        prompt_tokens=len(out.prompt_token_ids),
        ttft=now - times.arrival if first else None,
        itl=None if first else (now - (times.last_token or now)) / new,
        switched_from=switched,
    )
    times.num_tokens += new
    if first:
        times.first_token = now
    times.last_token, times.last_shape = now, out.shape
    return event


class EngineMetrics:
    """The server's metrics, in a registry of their own; every method is thread-safe."""

    def __init__(self, model_name: str, shapes: Iterable[str], prefix: str = PREFIX):
        disable_created_metrics()  # vLLM's exposition has no `*_created` series
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        for collector in (PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        self.prefix = prefix
        self.model_name = model_name
        self.shapes = list(shapes)
        shape = ["model_name", "shape"]
        self.running = self._gauge("num_requests_running", "Requests in the running batch.", shape)
        self.waiting = self._gauge(
            "num_requests_waiting", "Requests waiting to be scheduled.", shape
        )
        self.kv_usage = self._gauge(
            "kv_cache_usage_perc", "KV-cache usage (1 = full).", ["model_name"]
        )
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "Time to first token.", shape, TTFT_BUCKETS
        )
        self.itl = self._histogram(
            "inter_token_latency_seconds",
            "Time between two tokens of a request.",
            shape,
            ITL_BUCKETS,
        )
        self.tpot = self._histogram(
            "time_per_output_token_seconds",
            "Time per output token (each gap between two tokens, as vLLM observes it).",
            shape,
            ITL_BUCKETS,
        )
        self.e2e = self._histogram(
            "e2e_request_latency_seconds", "Arrival to last token.", shape, REQUEST_BUCKETS
        )
        self.queue_time = self._histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", shape, REQUEST_BUCKETS
        )
        self.inference_time = self._histogram(
            "request_inference_time_seconds", "First scheduled to finished.", shape, REQUEST_BUCKETS
        )
        self.prefill_time = self._histogram(
            "request_prefill_time_seconds",
            "First scheduled to first token.",
            shape,
            REQUEST_BUCKETS,
        )
        self.decode_time = self._histogram(
            "request_decode_time_seconds", "First token to last token.", shape, REQUEST_BUCKETS
        )
        self.request_prompt_tokens = self._histogram(
            "request_prompt_tokens", "Prompt tokens of finished requests.", shape, TOKEN_BUCKETS
        )
        self.request_generation_tokens = self._histogram(
            "request_generation_tokens",
            "Generated tokens of finished requests.",
            shape,
            TOKEN_BUCKETS,
        )
        self.iteration_tokens = self._histogram(
            "iteration_tokens_total",
            "Tokens run in one engine step.",
            ["model_name"],
            ITERATION_BUCKETS,
        )
        self.preemptions = self._counter(
            "num_preemptions",
            "Requests preempted (their KV freed, recomputed later).",
            ["model_name"],
        )
        self.cache_config = Gauge(
            prefix + "cache_config_info",
            "Information of the KV cache config (the value is 1).",
            [
                "block_size",
                "cache_dtype",
                "num_gpu_blocks",
                "num_cpu_blocks",
                "enable_prefix_caching",
            ],
            registry=self.registry,
        )
        self.prompt_tokens = self._counter("prompt_tokens", "Prefilled prompt tokens.", shape)
        self.generation_tokens = self._counter("generation_tokens", "Generated tokens.", shape)
        self.success = self._counter(
            "request_success", "Finished requests.", [*shape, "finished_reason"]
        )
        self.prefix_queries = self._counter(
            "prefix_cache_queries",
            "Prompt tokens of admitted requests looked up in the prefix cache.",
            ["model_name"],
        )
        self.prefix_hits = self._counter(
            "prefix_cache_hits", "Of those, tokens found in the prefix cache.", ["model_name"]
        )
        self._prefix_seen = (0, 0)  # the engine's totals at the last update
        self.switches = self._counter(
            "shape_switches",
            "A request's tokens moved to another shape in flight.",
            ["model_name", "from_shape", "to_shape"],
        )
        for name in self.shapes:  # so a dashboard sees zeros, not gaps, for idle shapes
            self.running.labels(model_name, name).set(0)
            self.waiting.labels(model_name, name).set(0)

    def _gauge(self, name: str, doc: str, labels: list[str]) -> Gauge:
        return Gauge(self.prefix + name, doc, labels, registry=self.registry)

    def _counter(self, name: str, doc: str, labels: list[str]) -> Counter:
        return Counter(self.prefix + name, doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, labels: list[str], buckets: tuple[float, ...]
    ) -> Histogram:
        return Histogram(self.prefix + name, doc, labels, registry=self.registry, buckets=buckets)

    def set_load(self, running: Tally[str], waiting: Tally[str], kv_usage: float) -> None:
        """Requests running and waiting per shape, and KV use, after a step."""
        for name in {*self.shapes, *running, *waiting}:
            self.running.labels(self.model_name, name).set(running[name])
            self.waiting.labels(self.model_name, name).set(waiting[name])
        self.kv_usage.labels(self.model_name).set(kv_usage)

    def set_prefix_cache(self, queries: int, hits: int) -> None:
        """The engine's prefix-cache totals since start (token counts) after a step."""
        seen_queries, seen_hits = self._prefix_seen
        self.prefix_queries.labels(self.model_name).inc(max(0, queries - seen_queries))
        self.prefix_hits.labels(self.model_name).inc(max(0, hits - seen_hits))
        self._prefix_seen = (max(queries, seen_queries), max(hits, seen_hits))

    def on_scheduled(self, shape: str, queue_time: float) -> None:
        """A request ran for the first time, `queue_time` after it arrived."""
        self.queue_time.labels(self.model_name, shape).observe(max(0.0, queue_time))

    def on_tokens(self, event: TokenEvent) -> None:
        """A request produced tokens: TTFT or inter-token latency, token counts, switches."""
        name, shape = self.model_name, event.shape
        if event.ttft is not None:
            self.ttft.labels(name, shape).observe(event.ttft)
            self.prompt_tokens.labels(name, shape).inc(event.prompt_tokens)
        if event.itl is not None:
            self.itl.labels(name, shape).observe(event.itl)
            self.tpot.labels(name, shape).observe(event.itl)
        if event.switched_from is not None:
            self.switches.labels(name, event.switched_from, shape).inc()
        self.generation_tokens.labels(name, shape).inc(event.new_tokens)

    def on_finished(self, shape: str, reason: str, e2e: float) -> None:
        """A request ended (stop, length, abort, error) at `shape`, its narrowest."""
        self.e2e.labels(self.model_name, shape).observe(e2e)
        self.success.labels(self.model_name, shape, reason).inc()

    def on_step(self, tokens: int, preempted: int) -> None:
        """An engine step ran `tokens` tokens and preempted `preempted` requests."""
        self.iteration_tokens.labels(self.model_name).observe(tokens)
        if preempted:
            self.preemptions.labels(self.model_name).inc(preempted)

    def on_request_done(self, shape: str, done: RequestDone) -> None:
        """A finished request's token counts and phase times (at its narrowest shape)."""
        name = self.model_name
        self.request_prompt_tokens.labels(name, shape).observe(done.prompt_tokens)
        self.request_generation_tokens.labels(name, shape).observe(done.generation_tokens)
        if done.inference_s is not None:
            self.inference_time.labels(name, shape).observe(done.inference_s)
        if done.prefill_s is not None:
            self.prefill_time.labels(name, shape).observe(done.prefill_s)
        if done.decode_s is not None:
            self.decode_time.labels(name, shape).observe(done.decode_s)

    def set_cache_config(
        self, block_size: int, cache_dtype: str, num_blocks: int, prefix_caching: bool
    ) -> None:
        """vLLM's cache_config_info: the KV cache's configuration as labels of a constant 1."""
        labels = (str(block_size), cache_dtype, str(num_blocks), "0", str(prefix_caching))
        self.cache_config.labels(*labels).set(1)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)
