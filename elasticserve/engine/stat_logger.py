"""The log lines a vLLM user looks for: what was loaded at start-up, and throughput while busy.

`startup_lines` describes an engine once (model, dtype, CPU path, KV cache, grid, adapters);
`ThroughputLog` takes every step's token events and, at most every `interval` seconds while there
is work, logs one line in vLLM's form: prompt and generation tok/s, running, waiting, KV use, and
the mix of shapes the tokens were served at.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from ..model.device import cpu_has_native_bf16
from .llm_engine import LLMEngine
from .metrics import TokenEvent
from .outputs import EngineStats

log = logging.getLogger("elasticserve")


def startup_lines(engine: LLMEngine) -> list[str]:
    """The start-up description of `engine`: one line a subject."""
    bundle, runner = engine.bundle, engine.runner
    cfg, model = bundle.config, bundle.model
    dtype = str(model.dtype).removeprefix("torch.")
    kv_dtype = str(model.cache_dtype).removeprefix("torch.")
    if model.device.type == "cuda":
        path = f"CUDA {torch.cuda.get_device_name(model.device)}, Triton kernels"
    else:
        capability = torch.backends.cpu.get_cpu_capability()
        bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
        ops = "torch ops"
        if bundle.native is not None:
            quant = "AVX-512 VNNI" if bundle.native.vnni else "AVX2"
            if bundle.native.amx_int8:
                quant = f"AMX int8 at {bundle.native.amx_int8_min_rows}+ rows, {quant}"
            dense = "AMX for bf16" if bundle.native.amx else "AVX2"
            ops = f"native kernels ({dense}; q8/q4: {quant})"
        path = f"CPU {capability} ({bf16}), {torch.get_num_threads()} threads, {ops}"
    blocks, block_size = runner.num_blocks, runner.block_size
    kv_bytes = runner.cache.numel() * runner.cache.element_size()
    depths = sorted({s.shape.depth for s in bundle.specs})
    widths = sorted({s.shape.width for s in bundle.specs})
    quantized = sorted({s.shape.precision for s in bundle.specs} - {""}, reverse=True)
    precisions = [dtype, *quantized]
    adapters = "per-shape LoRA adapters" if model.lora is not None else "no adapters"
    return [
        f"model {bundle.name} ({cfg.model_type}, {cfg.num_layers} layers, hidden "
        f"{cfg.hidden_size}) from {bundle.model_dir}",
        f"dtype {dtype}, context {bundle.max_model_len} tokens",
        f"device: {path}",
        f"KV cache: {blocks} blocks x {block_size} tokens = {blocks * block_size} tokens a layer, "
        f"{kv_bytes / 2**20:.0f} MiB ({kv_dtype})",
        f"grid: {len(bundle.specs)} shapes, depths {depths}, widths {widths}, precisions "
        f"{precisions}; pack "
        f"{bundle.pack.fingerprint[:12]}, {adapters}",
    ]


class ThroughputLog:
    """vLLM's periodic stats line, from the engine thread's token events."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self._since: float | None = None  # start of the current window
        self._prompt = 0
        self._generation = 0
        self._shapes: Counter[str] = Counter()  # generated tokens per shape in the window

    def on_tokens(self, event: TokenEvent) -> None:
        if event.ttft is not None:
            self._prompt += event.prompt_tokens
        self._generation += event.new_tokens
        self._shapes[event.shape] += event.new_tokens

    def maybe_log(self, now: float, stats: EngineStats) -> str | None:
        """Log (and return) the line if a window has passed with work in it; else None."""
        if self._since is None:
            self._since = now
            return None
        elapsed = now - self._since
        if elapsed < self.interval:
            return None
        busy = self._generation or self._prompt or stats.num_running or stats.num_waiting
        line = None
        if busy:
            total = sum(self._shapes.values()) or 1
            mix = ", ".join(f"{s} {n / total:.0%}" for s, n in self._shapes.most_common(4))
            line = (
                f"Avg prompt throughput: {self._prompt / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {self._generation / elapsed:.1f} tokens/s, "
                f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {stats.kv_usage:.1%}, Shapes: {mix or '-'}"
            )
            log.info(line)
        self._since, self._prompt, self._generation = now, 0, 0
        self._shapes.clear()
        return line
