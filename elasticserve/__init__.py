"""elasticserve: one weight-shared LLM, any depth/width shape per request.

Exports load lazily, so pure-Python parts (scheduler, block manager, policy) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": "llm",
    "EngineConfig": "engine",
    "LLMEngine": "engine",
    "CompletionOutput": "outputs",
    "RequestOutput": "outputs",
    "SamplingParams": "sampling",
    "Shape": "shapes",
    "ShapeSpec": "shapes",
}

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "Shape",
    "ShapeSpec",
]

if TYPE_CHECKING:
    from .engine import EngineConfig, LLMEngine
    from .llm import LLM
    from .outputs import CompletionOutput, RequestOutput
    from .sampling import SamplingParams
    from .shapes import Shape, ShapeSpec


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'elasticserve' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
