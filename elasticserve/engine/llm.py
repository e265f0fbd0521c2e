"""The offline API, vLLM-style: `LLM(...).generate(prompts, SamplingParams(...), shape=...)`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..model.bundle import ModelBundle, load_bundle
from ..model.shapes import Shape, ShapeSpec
from .llm_engine import EngineConfig, LLMEngine
from .outputs import RequestOutput
from .sampling import SamplingParams

ShapeArg = str | Shape | ShapeSpec | None


class LLM:
    """Load a base model once; generate at any shape of its grid, several shapes per batch."""

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        pack: str | os.PathLike[str] | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        max_model_len: int | None = None,
        engine_config: EngineConfig | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cpu_kernels: str = "auto",
        precisions: str | tuple[str, ...] | None = None,
    ):
        self.bundle: ModelBundle = load_bundle(
            model,
            pack,
            dtype=dtype,
            device=device,
            cache_dir=cache_dir,
            max_model_len=max_model_len,
            cpu_kernels=cpu_kernels,
            precisions=precisions,
        )
        self.engine = LLMEngine(self.bundle, engine_config)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.bundle.tokenizer

    @property
    def model_dir(self) -> Path:
        """The HF directory of the loaded weights (the dequantized cache for a GGUF)."""
        return self.bundle.model_dir

    @property
    def shapes(self) -> list[ShapeSpec]:
        """The shape grid: name, kept layers, per-layer widths, weight fraction, perplexity."""
        return self.bundle.specs

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        shape: ShapeArg | Sequence[ShapeArg] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order; `shape` is one shape or one per prompt."""
        batch: list[str | list[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            batch = [prompts]  # type: ignore[list-item]
        else:
            batch = list(prompts)  # type: ignore[arg-type]
        n = len(batch)
        params = _per_prompt(sampling_params, n, SamplingParams)
        shapes = _per_prompt(shape, n, (str, Shape, ShapeSpec))
        ids: list[str] = []
        try:
            for prompt, p, s in zip(batch, params, shapes, strict=True):
                ids.append(self.engine.add_request(prompt, p or SamplingParams(), s))
        except Exception:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=n, disable=not use_tqdm, desc="generate") as bar:
            while len(done) < n:
                for output in self.engine.step():
                    if output.finished:
                        done[output.request_id] = output
                        bar.update(1)
        return [done[i] for i in ids]


def _per_prompt(value, n: int, single):
    if value is None or isinstance(value, single):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"got {len(values)} values for {n} prompts")
    return values
