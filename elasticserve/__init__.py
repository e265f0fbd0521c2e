"""elasticserve: one weight-shared LLM, any depth/width shape per request.

Exports load lazily, so pure-Python parts (scheduler, block manager, policy) import without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": "engine.llm",
    "EngineConfig": "engine.llm_engine",
    "LLMEngine": "engine.llm_engine",
    "CompletionOutput": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "SamplingParams": "engine.sampling",
    "Shape": "model.shapes",
    "ShapeSpec": "model.shapes",
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
    from .engine.llm import LLM
    from .engine.llm_engine import EngineConfig, LLMEngine
    from .engine.outputs import CompletionOutput, RequestOutput
    from .engine.sampling import SamplingParams
    from .model.shapes import Shape, ShapeSpec


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'elasticserve' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
