"""Drive an OpenAI-compatible server with timed streaming requests and summarize what it did.

Metrics follow vLLM's `bench serve`: TTFT is send → first content chunk; ITL each gap between
content chunks; TPOT (e2e − TTFT) / (tokens − 1); goodput the completed requests per second
that meet both SLOs. Beyond it: the served-shape mix (from each chunk's `model@shape` field),
the token-weighted perplexity of what was served, and quality-adjusted goodput
`goodput × ppl_best / ppl_served`, where `ppl_best` is the lowest held-out perplexity in the
server's `/v1/shapes` grid (the full shape's): a server that meets the SLO only by serving
worse shapes earns proportionally less.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

STAT_KEYS = ("mean", "median", "p90", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2e")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: the target, the workload and the SLO."""

    base_url: str
    model: str
    endpoint: str = "completions"  # or "chat"
    dataset: str = "random"  # or "austen", "sharegpt" (datasets.py)
    data: str | None = None
    input_len: int = 128
    output_len: int = 128
    num_prompts: int = 100
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0
    timeout: float = 300.0  # seconds per request, connect to last chunk
    ignore_eos: bool = True
    api_key: str | None = None  # sent as `Authorization: Bearer <key>`
    # Fields added to every request body, e.g. a logit_bias that bans EOS where ignore_eos is not
    # understood: equal output lengths for every server.
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestResult:
    """What one streamed request did; times in seconds."""

    index: int
    sent: float = 0.0  # offset of the send from the run's start
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    shapes: dict[str, int] = field(default_factory=dict)  # content chunks per served shape

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for single-token outputs."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The record as written to the run's JSON, latencies in ms."""
        return {
            "index": self.index,
            "sent_s": round(self.sent, 6),
            "ok": self.ok,
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "ttft_ms": _ms(self.ttft),
            "tpot_ms": _ms(self.tpot),
            "e2e_ms": _ms(self.e2e),
            "itl_ms": [_ms(x) for x in self.itl],
            "shapes": self.shapes,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


# --- arrivals ---------------------------------------------------------------------------------


def arrival_offsets(num: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send times (s from start) of `num` requests: gamma gaps, shape `burstiness`, mean 1/rate."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request rate ({rate}) and burstiness ({burstiness}) must be > 0")
    if math.isinf(rate):
        return np.zeros(num)
    # Gamma(k, θ) has mean kθ and CV 1/√k: θ = 1/(rate·k) keeps the mean rate for any burstiness;
    # k = 1 is the Poisson process's exponential gaps.
    gaps = np.random.default_rng(seed).gamma(burstiness, 1.0 / (rate * burstiness), size=num)
    gaps[0] = 0.0  # the first request starts the clock
    return np.cumsum(gaps)


# --- one request ------------------------------------------------------------------------------


def api_root(base_url: str) -> str:
    """`http://host:port` from a base URL given with or without a trailing `/v1`."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def request_body(cfg: BenchConfig, prompt: str) -> dict[str, Any]:
    """The streaming completions/chat request for `prompt`."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": cfg.output_len,
        "temperature": 0.0,  # greedy, as vLLM's benchmark: sampling cost is not what is measured
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    return body | cfg.extra_body


def client_for(cfg: BenchConfig, connections: int) -> httpx.AsyncClient:
    """The HTTP client of a run: `connections` kept open, the API key in every request's header."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    # trust_env=False: a proxy from the environment would sit inside every measured latency.
    return httpx.AsyncClient(limits=limits, headers=headers, timeout=cfg.timeout, trust_env=False)


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    return (delta.get("content") if delta is not None else choice.get("text")) or ""


def _served_shape(model: str) -> str:
    # `<name>@<shape>` names the shape; a server without shapes reports just its model name.
    return model.rsplit("@", 1)[-1] if model else "?"


async def _read_stream(response: httpx.Response, result: RequestResult, start: float) -> None:
    last = start
    content_chunks = 0
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("error"):
            raise RuntimeError(f"error in stream: {str(chunk['error'])[:200]}")
        now = time.perf_counter()
        if _chunk_text(chunk):
            if result.ttft is None:
                result.ttft = now - start
            else:
                result.itl.append(now - last)
            last = now
            content_chunks += 1
            shape = _served_shape(chunk.get("model", ""))
            result.shapes[shape] = result.shapes.get(shape, 0) + 1
        if usage := chunk.get("usage"):
            result.output_tokens = usage.get("completion_tokens") or 0
            result.prompt_tokens = usage.get("prompt_tokens")
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or content_chunks


async def send_request(
    client: httpx.AsyncClient, cfg: BenchConfig, prompt: str, index: int, t0: float
) -> RequestResult:
    """Stream one request; any failure is recorded in the result, never raised."""
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    start = time.perf_counter()
    result = RequestResult(index=index, sent=start - t0)
    try:
        async with (
            asyncio.timeout(cfg.timeout),
            client.stream(
                "POST", api_root(cfg.base_url) + path, json=request_body(cfg, prompt)
            ) as response,
        ):
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            await _read_stream(response, result, start)
    except TimeoutError:
        result.error = f"timeout after {cfg.timeout:g} s"
        return result
    except Exception as exc:  # one bad request (reset, garbage, ...) must not end the run
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result
    if result.ttft is None:
        result.error = "stream ended without any content"
    else:
        result.ok = True
    return result


# --- one run ----------------------------------------------------------------------------------


async def fetch_shape_ppl(client: httpx.AsyncClient, base_url: str) -> dict[str, float]:
    """Held-out perplexity per shape name from the server's `/v1/shapes`; {} if it has none."""
    try:
        response = await client.get(api_root(base_url) + "/v1/shapes", timeout=10.0)
        payload = response.json() if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        return {}
    entries = payload.get("data", []) if isinstance(payload, dict) else payload
    table: dict[str, float] = {}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("ppl") is None:
            continue
        name = entry.get("shape") or entry.get("name") or entry.get("id")
        table[_served_shape(str(name))] = float(entry["ppl"])
    return table


async def _paced(
    client: httpx.AsyncClient,
    cfg: BenchConfig,
    prompt: str,
    index: int,
    t0: float,
    at: float,
    gate: asyncio.Semaphore | None,
) -> RequestResult:
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    async with gate if gate is not None else contextlib.nullcontext():
        return await send_request(client, cfg, prompt, index, t0)


async def run_benchmark(
    cfg: BenchConfig, prompts: list[str], progress: bool = True
) -> tuple[list[RequestResult], float, dict[str, float]]:
    """Send `prompts` on the arrival schedule; returns records, duration (s) and shape ppl."""
    offsets = arrival_offsets(len(prompts), cfg.request_rate, cfg.burstiness, cfg.seed)
    gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    async with client_for(cfg, cfg.max_concurrency or len(prompts)) as client:
        shape_ppl = await fetch_shape_ppl(client, cfg.base_url)
        bar = tqdm(total=len(prompts), desc=f"rate {cfg.request_rate:g}", disable=not progress)
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(_paced(client, cfg, p, i, t0, float(at), gate))
            for i, (p, at) in enumerate(zip(prompts, offsets, strict=True))
        ]
        for task in tasks:
            task.add_done_callback(lambda _: bar.update())
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
        bar.close()
    return results, duration, shape_ppl


# --- metrics ----------------------------------------------------------------------------------


def latency_stats(seconds: list[float]) -> dict[str, float | None]:
    """Mean, median, p90 and p99 in ms (linear interpolation, as numpy); None when empty."""
    if not seconds:
        return dict.fromkeys(STAT_KEYS)
    ms = np.asarray(seconds) * 1000.0
    values = [ms.mean(), *np.percentile(ms, [50, 90, 99])]
    return {k: round(float(v), 3) for k, v in zip(STAT_KEYS, values, strict=True)}


def meets_slo(r: RequestResult, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Completed within both SLOs (an unset SLO always holds; one token has no TPOT)."""
    if not r.ok or r.ttft is None:
        return False
    ttft_ok = slo_ttft_ms is None or r.ttft * 1000.0 <= slo_ttft_ms
    tpot = r.tpot
    return ttft_ok and (slo_tpot_ms is None or tpot is None or tpot * 1000.0 <= slo_tpot_ms)


def shape_mix(results: list[RequestResult]) -> dict[str, float]:
    """Fraction of streamed tokens (content chunks) per served shape, largest first."""
    counts: dict[str, int] = {}
    for r in results:
        for shape, n in r.shapes.items():
            counts[shape] = counts.get(shape, 0) + n
    total = sum(counts.values())
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])
    return {shape: round(n / total, 6) for shape, n in ordered} if total else {}


def served_ppl(mix: dict[str, float], shape_ppl: dict[str, float]) -> float | None:
    """Token-weighted perplexity of what was served; None unless every served shape has one."""
    if not mix or any(s not in shape_ppl for s in mix):
        return None
    # Perplexity is exp(mean NLL): mixing tokens averages their NLL, i.e. the log-perplexities.
    return math.exp(sum(f * math.log(shape_ppl[s]) for s, f in mix.items()))


def output_lengths(results: list[RequestResult], asked: int) -> dict[str, int | None]:
    """Min, median and max output tokens of the completed requests; how many stopped short."""
    counts = sorted(r.output_tokens for r in results if r.ok)
    if not counts:
        return {"out_min": None, "out_median": None, "out_max": None, "short_outputs": 0}
    return {
        "out_min": counts[0],
        "out_median": counts[len(counts) // 2],
        "out_max": counts[-1],
        "short_outputs": sum(n < asked for n in counts),  # EOS before max_tokens
    }


def summarize(
    cfg: BenchConfig, results: list[RequestResult], duration: float, shape_ppl: dict[str, float]
) -> dict[str, Any]:
    """The run's summary: counts, throughputs, latency stats, goodput, shape mix, quality."""
    done = [r for r in results if r.ok]
    good = sum(meets_slo(r, cfg.slo_ttft_ms, cfg.slo_tpot_ms) for r in results)
    out_tokens = sum(r.output_tokens for r in done)
    mix = shape_mix(done)
    ppl = served_ppl(mix, shape_ppl)
    ppl_best = min(shape_ppl.values()) if shape_ppl else None
    goodput = good / duration if duration > 0 else 0.0
    summary: dict[str, Any] = {
        "request_rate": _rate_json(cfg.request_rate),
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "num_requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": round(duration, 4),
        "total_input_tokens": sum(r.prompt_tokens or 0 for r in done),
        "total_output_tokens": out_tokens,
        "request_throughput": round(len(done) / duration, 4) if duration > 0 else 0.0,
        "output_throughput": round(out_tokens / duration, 3) if duration > 0 else 0.0,
        **output_lengths(done, cfg.output_len),
    }
    samples = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [t for r in done if (t := r.tpot) is not None],
        "itl": [x for r in done for x in r.itl],
        "e2e": [r.e2e for r in done if r.e2e is not None],
    }
    for name in LATENCIES:
        for key, value in latency_stats(samples[name]).items():
            summary[f"{name}_{key}_ms"] = value
    summary |= {
        "slo_ttft_ms": cfg.slo_ttft_ms,
        "slo_tpot_ms": cfg.slo_tpot_ms,
        "goodput": round(goodput, 4),
        "slo_attainment_pct": round(100.0 * good / len(results), 2) if results else 0.0,
        "ppl_served": None if ppl is None else round(ppl, 4),
        "ppl_best": ppl_best,
        "qa_goodput": round(goodput * ppl_best / ppl, 4) if ppl and ppl_best else None,
        "shape_mix": mix,
    }
    return summary


def _rate_json(rate: float) -> float | str:
    # JSON has no infinity; "inf" reads back with float().
    return "inf" if math.isinf(rate) else rate


# --- results ----------------------------------------------------------------------------------


def run_filename(rate: float) -> str:
    """`rate-2.json`, `rate-0.5.json`, `rate-inf.json`."""
    return f"rate-{rate:g}.json"


def save_run(
    out: Path, cfg: BenchConfig, summary: dict[str, Any], results: list[RequestResult]
) -> Path:
    """Write config + summary + per-request records as one JSON file in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    config = asdict(cfg) | {"request_rate": _rate_json(cfg.request_rate), "api_key": None}
    payload = {"config": config, "summary": summary, "requests": [r.to_json() for r in results]}
    path = out / run_filename(cfg.request_rate)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)  # an interrupted run leaves no half-written JSON behind
    return path


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every run JSON in `out`, by increasing request rate (inf last)."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("rate-*.json"))]
    return sorted(runs, key=lambda run: float(run["summary"]["request_rate"]))


def write_csv(out: Path) -> Path:
    """Rewrite `out/summary.csv` from its run JSONs: a row per rate, a `mix:` column per shape."""
    summaries = [run["summary"] for run in load_runs(out)]
    shapes = sorted({s for summary in summaries for s in summary["shape_mix"]})
    columns = [k for k in summaries[0] if k != "shape_mix"] if summaries else []
    path = out / "summary.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, *(f"mix:{s}" for s in shapes)])
        for summary in summaries:
            mix = summary["shape_mix"]
            writer.writerow([*(summary.get(k) for k in columns), *(mix.get(s, 0) for s in shapes)])
    return path
