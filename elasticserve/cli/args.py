"""Arguments shared by the subcommands that load a model."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--pack/--dtype/--device, shared by every command that loads a model."""
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


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The load_bundle / LLM keywords of `add_model_arguments`' options (all but model, pack)."""
    return {
        "dtype": args.dtype,
        "device": args.device,
        "cpu_kernels": args.cpu_kernels,
        "precisions": args.precisions,
    }
