"""The model runner: owns the KV cache and runs one scheduled step on the model.

`run()` = one `SeqChunk` per scheduled sequence -> `build_step` (rows sorted into shape segments,
a plan per layer, model/step_plan.py) -> `ElasticModel.forward` over the paged cache (new K/V
written in place) -> the sampler on the rows that yield a token. A chunk whose prompt positions
owe prompt log-probs returns every row's logits, and the runner appends those entries to its
request (engine/prompt_logprobs.py) before sampling from the chunk's last row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..model.bundle import ModelBundle
from ..model.step_plan import SeqChunk, build_step
from . import kv_cache, prompt_logprobs
from .request import Request
from .sampling import Sampler, SamplerOutput
from .scheduler import ScheduledSeq


class ModelRunner:
    """The KV cache pool, the step builder, the forward pass and the sampler of one model."""

    def __init__(
        self,
        bundle: ModelBundle,
        block_size: int,
        kv_cache_memory: int | None,
        max_num_seqs: int,
    ) -> None:
        self.bundle = bundle
        self.block_size = block_size
        cfg, model = bundle.config, bundle.model
        max_len = bundle.max_model_len
        dtype = model.cache_dtype
        memory = kv_cache_memory
        if memory is None:  # enough for max_num_seqs / 4 full-length requests, at most 1 GiB
            per_token = kv_cache.block_bytes(cfg, 1, dtype) * cfg.num_layers
            memory = min(2**30, per_token * max_len * max(4, max_num_seqs // 4))
        self.num_blocks = kv_cache.num_blocks_for(cfg, memory, block_size, dtype, max_len)
        self.cache = kv_cache.allocate(cfg, self.num_blocks, block_size, dtype, model.device)
        self.sampler = Sampler()
        self.eos_token_ids = bundle.eos_token_ids

    def run(self, rows: Sequence[tuple[ScheduledSeq, Request]]) -> SamplerOutput:
        """Run the scheduled chunks; one sampled token per chunk that ends at its last token."""
        owed = [prompt_logprobs.wanted(req, item.start, item.num_new_tokens) for item, req in rows]
        chunks = [
            SeqChunk(
                spec=req.spec,
                token_ids=item.token_ids,
                num_computed=item.start,
                block_table=item.seq.block_table,
                logits="all" if tokens else "last" if item.will_sample else "none",
            )
            for (item, req), tokens in zip(rows, owed, strict=True)
        ]
        logits, logit_slices = self._forward(chunks)
        if any(owed):
            requests = [(req, item.start, t) for (item, req), t in zip(rows, owed, strict=True)]
            prompt_logprobs.record(requests, logits, logit_slices)
        return self._sample(rows, logits, logit_slices)

    def _forward(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, list[slice]]:
        """The native step where it runs the chunks, the torch step where it does not (no block
        table, or adapters without their experts); a step of both runs each part on its path and
        joins the logits."""
        native = self.bundle.native
        if native is None:
            return self._torch_forward(chunks)
        here = [native.supports([c]) for c in chunks]
        if all(here):
            return native.forward(chunks, self.cache, self.block_size)
        if any(c.spec.shape.precision for c, ok in zip(chunks, here, strict=True) if not ok):
            raise ValueError("a q8/q4 shape runs only in the native kernels, with a block table")
        if not any(here):
            return self._torch_forward(chunks)
        parts = [
            [i for i, ok in enumerate(here) if ok],
            [i for i, ok in enumerate(here) if not ok],
        ]
        results = [
            native.forward([chunks[i] for i in parts[0]], self.cache, self.block_size),
            self._torch_forward([chunks[i] for i in parts[1]]),
        ]
        slices: list[slice] = [slice(0, 0)] * len(chunks)
        offset = 0
        for idx, (logits, part_slices) in zip(parts, results, strict=True):
            for i, sl in zip(idx, part_slices, strict=True):
                slices[i] = slice(sl.start + offset, sl.stop + offset)
            offset += logits.shape[0]
        return torch.cat([results[0][0], results[1][0].float()]), slices

    def _torch_forward(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, list[slice]]:
        cfg, model = self.bundle.config, self.bundle.model
        step = build_step(
            chunks,
            cfg.num_layers,
            cfg.head_dim,
            2 * cfg.kv_size,
            self.block_size,
            self.bundle.biases,
            model.device,
            kernels=model.use_kernels,
        )
        return model.forward(step, self.cache), step.logit_slices

    def _sample(
        self,
        rows: Sequence[tuple[ScheduledSeq, Request]],
        logits: torch.Tensor,
        logit_slices: list[slice],
    ) -> SamplerOutput:
        sampled = [(i, req) for i, (item, req) in enumerate(rows) if item.will_sample]
        if not sampled:
            return SamplerOutput(token_ids=[], logprobs=[], top_logprobs=[])
        picked = logits[[logit_slices[i].stop - 1 for i, _ in sampled]]  # each chunk's last row
        requests = [req for _, req in sampled]
        return self.sampler(
            picked,
            [r.params for r in requests],
            [r.generator for r in requests],
            [r.seq.prompt_token_ids for r in requests],
            [r.seq.output_token_ids for r in requests],
            self.eos_token_ids,
            [r.guide for r in requests],
        )
