"""The arguments of `elasticserve serve` (argparse only: `--help` loads no server)."""

from __future__ import annotations

import argparse
import re

from elasticserve.policy.types import POLICIES

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS |= {f"{u}ib": v for u, v in _UNITS.items() if u not in ("", "b")}
_UNITS |= {f"{u}b": 10 ** (3 * i) for i, u in enumerate("kmgt", start=1)}


def parse_bytes(text: str) -> int:
    """'512MiB', '1.5GB', '2G' (binary), '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if match is None or unit not in _UNITS or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: write e.g. 512MiB, 2GiB, 1.5GB or a number of bytes"
        )
    return int(float(match[1]) * _UNITS[unit])


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `elasticserve serve`, --model/--pack/--dtype/--device included."""
    parser.add_argument(
        "--model", default=None, help="HF dir, .safetensors or .gguf (default: SmolLM2-135M)"
    )
    parser.add_argument("--pack", default=None, help="pack directory (default: the model's own)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument(
        "--cpu-kernels",
        default="auto",
        choices=("auto", "native", "torch"),
        help="on a CPU: native C++ kernels when they build here (auto), required, or torch ops",
    )
    parser.add_argument(
        "--precisions",
        default=None,
        help="quantized precisions the grid adds, e.g. q8,q4 (shapes d30-w1.0-q4, ...), served "
        "by the native CPU kernels; 'none': the model's dtype only (default: the pack's list)",
    )
    parser.add_argument(
        "--no-lora",
        action="store_true",
        help="serve the pack's shapes without its fine-tuned adapters (if it has any)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--served-model-name", default=None, help="the model name clients use (default: derived)"
    )
    parser.add_argument(
        "--policy",
        default="fixed",
        choices=POLICIES,
        help="shape policy for requests that pin no shape (fixed: the full shape)",
    )
    parser.add_argument(
        "--slo-ttft-ms", type=float, default=None, help="default time-to-first-token target"
    )
    parser.add_argument(
        "--slo-tpot-ms", type=float, default=None, help="default time-per-output-token target"
    )
    parser.add_argument(
        "--kv-cache-memory", type=parse_bytes, default=None, help="KV cache size, e.g. 512MiB"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="max running requests")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=512, help="token budget of one step"
    )
    parser.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of a prompt's cached prefix, computed at the same shape",
    )
    parser.add_argument(
        "--prefix-cache-sharing",
        choices=("exact", "precision"),
        default="exact",
        help="exact: a cached prefix serves only the shape that computed it; precision: also "
        "the shapes that differ from it only in weight precision (an approximation, measured in "
        "BENCHMARKS.md)",
    )
    parser.add_argument(
        "--max-waiting", type=int, default=256, help="queue length beyond which requests get 429"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    parser.add_argument(
        "--metrics-prefix",
        default="elasticserve:",
        help="prefix of the /metrics names (vllm: serves vLLM's Grafana dashboards as they are)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=parse_bytes,
        default="4MiB",
        help="request bodies larger than this get 413 before they are parsed",
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        help="max_tokens of a request that sets none (capped by the context)",
    )
    parser.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="parse special tokens typed into chat messages (default: they are plain text)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds a SIGTERM leaves in-flight requests to finish before they get an error",
    )
