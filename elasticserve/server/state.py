"""What the endpoints share: the engine, the served name, metrics, a tokenizer."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

from elasticserve.engine.metrics import PREFIX as METRICS_PREFIX
from elasticserve.engine.metrics import EngineMetrics
from elasticserve.model.shapes import ShapeSpec

from .async_engine import AsyncLLMEngine
from .errors import APIError
from .limits import ServerLimits
from .prompts import PromptEncoder


@dataclasses.dataclass
class ServerState:
    """What the endpoints share: the engine, the served name and a tokenizer of their own."""

    engine: AsyncLLMEngine
    name: str
    shape_latency: Mapping[str, Mapping[str, float]]  # shape -> predicted {"ttft_ms", "tpot_ms"}
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)
    metrics_prefix: str = METRICS_PREFIX  # "vllm:" serves vLLM's dashboards as they are

    def __post_init__(self) -> None:
        self.bundle = self.engine.bundle
        specs = [spec.name for spec in self.bundle.specs]
        self.metrics = EngineMetrics(self.name, specs, self.metrics_prefix)
        self.engine.attach_metrics(self.metrics)
        # The engine thread uses the bundle's tokenizer; a HF fast tokenizer is not safe to share.
        self.tokenizer = copy.deepcopy(self.bundle.tokenizer)
        self.prompts = PromptEncoder(
            self.bundle.tokenizer,
            self.bundle.max_model_len,
            self.limits.allow_special_tokens_in_content,
        )

    def resolve_shape(self, model: str | None) -> ShapeSpec | None:
        """The shape a request's `model` pins; None (the engine's policy picks) for the base.

        Parsed here once: the engine takes the resolved spec as it is.
        """
        model = self.name if model is None else model
        if model == self.name:
            shape = "auto"
        elif model.startswith(self.name + "@"):
            shape = model[len(self.name) + 1 :]
        else:
            raise APIError(
                404,
                f"The model `{model}` does not exist: this server serves `{self.name}` and its "
                f"shapes as `{self.name}@<shape>` (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        if shape.strip().lower() == "auto":
            return None
        try:
            return self.bundle.spec(shape)
        except ValueError as exc:
            raise APIError(400, str(exc), param="model", code="invalid_shape") from exc
