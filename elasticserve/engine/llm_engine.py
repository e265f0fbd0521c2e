"""The engine: continuous batching where every request runs its own shape.

`step()` = schedule (scheduler.py) -> run: plan, forward, sample (model_runner.py) -> postprocess:
the scheduler appends the tokens and ends sequences at a stop token or their length, the engine
detokenizes, ends those that completed a stop string, and reports an output per sampled request.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..model.bundle import ModelBundle
from ..model.shapes import Shape, ShapeSpec
from ..policy.base import Policy
from ..policy.step_time import StepLoad, step_load
from ..policy.types import SLO, LoadState, Overloaded, Refuse, RequestView
from .block_manager import BlockManager
from .detokenize import IncrementalDetokenizer
from .load_tracker import LoadTracker
from .model_runner import ModelRunner
from .outputs import CompletionOutput, RequestOutput
from .request import Request
from .sampling import SamplerOutput, SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_memory: int | None = (
        None  # bytes; None: enough for max_num_seqs long requests, <= 1 GiB
    )
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True


class LLMEngine:
    """Runs requests of any shapes together; single-threaded (the async wrapper owns the thread)."""

    def __init__(
        self,
        bundle: ModelBundle,
        config: EngineConfig | None = None,
        policy: Policy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.bundle = bundle
        self.policy = policy  # None: the requested shape, else the full one
        self.clock = clock  # arrival times and the policy's "now"
        self.load = LoadTracker()
        self.shape_switches: Counter[str] = Counter()  # "in_flight", "queued" (by the policy)
        self.last_step: tuple[StepLoad, float] | None = None  # load and seconds of the last step
        # end of the last step if work remained: the next step's time counts from there, so the
        # policy sees a token's whole cycle (a server's dispatch between steps included)
        self._busy_since: float | None = None
        self.config = config = config or EngineConfig()
        self.runner = ModelRunner(
            bundle, config.block_size, config.kv_cache_memory, config.max_num_seqs
        )
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=bundle.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.block_manager,
        )
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = bundle.eos_token_ids
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        shape: str | Shape | ShapeSpec | None = None,
        request_id: str | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        slo: SLO | Mapping[str, Any] | None = None,
        min_shape: str | Shape | ShapeSpec | None = None,
    ) -> str:
        """Queue a request; raises ValueError (nothing queued) for a bad prompt, shape or length.

        shape None or "auto": the policy picks it (full without a policy); any other shape is
        pinned. Raises `Overloaded` when the policy refuses the request.
        """
        params = params or SamplingParams()
        pinned = shape is not None and not (isinstance(shape, str) and shape.strip() == "auto")
        spec = self.bundle.spec(shape if pinned else None)
        slo = slo if isinstance(slo, SLO) else SLO.from_dict(slo)
        floor = None if min_shape is None else self.bundle.spec(min_shape)
        if pinned and floor is not None and not _at_least(spec, floor):
            raise ValueError(f"shape {spec.name} is below min_shape {floor.name}")
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            text, token_ids = None, list(prompt)
            vocab = self.bundle.config.vocab_size
            if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
                raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if not token_ids:
            raise ValueError("the prompt is empty")
        max_len = self.bundle.max_model_len
        room = max_len - len(token_ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens; the model's context length is {max_len}"
            )
        max_tokens = room if params.max_tokens is None else params.max_tokens
        if max_tokens > room:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context length of {max_len} tokens"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = self.clock()
        arrival_time = now if arrival_time is None else arrival_time
        if self.policy is not None:
            view = RequestView(
                request_id=request_id,
                shape_id=spec.id,
                layers=spec.layers,
                has_kv=False,
                prompt_tokens=len(token_ids),
                max_tokens=max_tokens,
                arrival_time=arrival_time,
                pinned=pinned,
                min_shape_id=None if floor is None else floor.id,
                slo=slo,
            )
            spec = self._admit(view, now)
        seq = Sequence(
            seq_id=request_id,
            prompt_token_ids=token_ids,
            layers=spec.layers,
            shape_id=spec.id,
            max_tokens=max_tokens,
            priority=priority,
            arrival_time=arrival_time,
            stop_token_ids=frozenset(params.stop_token_ids or ())
            | (frozenset() if params.ignore_eos else self.eos_token_ids),
        )
        self.scheduler.add(seq)
        self.load.arrive(now, len(token_ids), max_tokens)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.bundle.model.device).manual_seed(params.seed)
        self.requests[request_id] = Request(
            seq=seq,
            prompt=text,
            params=params,
            spec=spec,
            detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids, params),
            generator=generator,
            logprobs=[] if params.logprobs is not None else None,
            pinned=pinned,
            min_shape=floor,
            slo=slo,
        )
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown or finished ids are ignored."""
        if self.scheduler.abort(request_id) is not None:
            self.requests.pop(request_id, None)
        if not self.scheduler.has_unfinished():
            self._busy_since = None  # a caller may now idle before the next step

    def set_shape(self, request_id: str, shape: str | Shape | ShapeSpec) -> None:
        """Move a running request to another shape: any width; depth only a subset of its layers."""
        req = self.requests[request_id]
        spec = self.bundle.spec(shape)
        if not set(spec.layers) <= set(req.seq.layers):
            raise ValueError(
                f"{request_id}: depth cannot grow in flight ({req.spec.name} -> {spec.name})"
            )
        if spec.layers != req.seq.layers:
            self.block_manager.drop_layers(req.seq, spec.layers)
        req.spec, req.seq.shape_id = spec, spec.id

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def kv_usage(self) -> float:
        return self.block_manager.usage

    # -- one step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that produced a token or finished."""
        start = time.perf_counter() if self._busy_since is None else self._busy_since
        if self.policy is not None and self.scheduler.has_unfinished():
            self._apply_policy(self.policy)
        out = self.scheduler.schedule()
        if out.is_empty:
            self._busy_since = None
            return []
        load = step_load(
            (self.requests[s.seq.seq_id].spec.shape, s.num_new_tokens, s.start)
            for s in out.scheduled
        )
        rows = [(s, self.requests[s.seq.seq_id]) for s in out.scheduled]
        sampled = self.runner.run(rows)
        self.scheduler.postprocess(out, sampled.token_ids)
        outputs = self._postprocess([req for s, req in rows if s.will_sample], sampled)
        end = time.perf_counter()
        self.last_step = (load, end - start)
        self._busy_since = end if self.scheduler.has_unfinished() else None
        if self.policy is not None:
            self.policy.observe(*self.last_step)
        return outputs

    # -- shape policy --------------------------------------------------------------------------

    def _admit(self, view: RequestView, now: float) -> ShapeSpec:
        """The policy's shape for a new request; raises Overloaded if it refuses."""
        assert self.policy is not None
        choice = self.policy.admit(view, self._load_state(now), now)
        if isinstance(choice, Refuse):
            raise Overloaded(choice)
        return self.bundle.specs[choice]

    def _apply_policy(self, policy: Policy) -> None:
        """Move unpinned requests to the policy's shapes before scheduling the next step."""
        now = self.clock()
        decision = policy.decide(self._load_state(now), now)
        for request_id, shape_id in decision.changes.items():
            req, spec = self.requests[request_id], self.bundle.specs[shape_id]
            seq = req.seq
            if seq.block_table:
                self.set_shape(request_id, spec)  # width any, depth only shrinks
                self.shape_switches["in_flight"] += 1
                continue
            need = self.block_manager.blocks_for(
                len(spec.layers), seq.num_prompt_tokens + seq.max_tokens
            )
            if need <= self.block_manager.num_blocks:  # no KV yet: any depth that can fit
                seq.layers, seq.shape_id, req.spec = spec.layers, spec.id, spec
                self.shape_switches["queued"] += 1

    def _load_state(self, now: float) -> LoadState:
        views = [self._view(self.requests[s.seq_id]) for s in self.scheduler.waiting]
        running = [self._view(self.requests[s.seq_id]) for s in self.scheduler.running]
        return LoadState(
            waiting=tuple(views),
            running=tuple(running),
            kv_usage=self.kv_usage,
            arrival_rate=self.load.rate(now),
            mean_prompt_tokens=self.load.mean_prompt_tokens,
            mean_output_tokens=self.load.mean_output_tokens,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
        )

    @staticmethod
    def _view(req: Request) -> RequestView:
        seq = req.seq
        return RequestView(
            request_id=seq.seq_id,
            shape_id=req.spec.id,
            layers=seq.layers,
            has_kv=bool(seq.block_table),
            prompt_tokens=seq.num_prompt_tokens,
            output_tokens=seq.num_output_tokens,
            computed_tokens=seq.num_computed_tokens,
            max_tokens=seq.max_tokens,
            arrival_time=seq.arrival_time,
            pinned=req.pinned,
            min_shape_id=None if req.min_shape is None else req.min_shape.id,
            slo=req.slo,
        )

    def _postprocess(self, sampled: list[Request], result: SamplerOutput) -> list[RequestOutput]:
        """Log-probs, shapes and text of each sampled token; stop strings; finished requests."""
        outputs = []
        for i, req in enumerate(sampled):
            token = result.token_ids[i]
            req.cumulative_logprob += result.logprobs[i]
            if req.logprobs is not None:
                entry = {token: result.logprobs[i]}
                entry.update(dict(result.top_logprobs[i] or []))
                req.logprobs.append(entry)
            name = req.spec.name
            req.shape_tokens[name] = req.shape_tokens.get(name, 0) + 1
            if req.narrowest is None or req.spec.weight_fraction < req.narrowest.weight_fraction:
                req.narrowest = req.spec
            self._check_stop(req, token)
            outputs.append(self._output(req))
            if req.finish_reason is not None:
                del self.requests[req.seq.seq_id]
                self.load.finish(req.seq.num_output_tokens)
        return outputs

    def _check_stop(self, req: Request, token: int) -> None:
        """Set the finish reason of a request the scheduler ended, or end one at a stop string."""
        seq = req.seq
        if seq.status is SequenceStatus.FINISHED_STOPPED:  # a stop token never reaches the text
            req.finish_reason = "stop"
            req.stop_reason = token if token in (req.params.stop_token_ids or ()) else None
        else:
            _, stop = req.detokenizer.add(token)
            if stop is not None:  # the detokenizer has already cut the text at the stop string
                # outranks the length limit the same token may have reached
                req.finish_reason, req.stop_reason = "stop", stop
                self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
                return
            if seq.status is SequenceStatus.FINISHED_LENGTH:
                req.finish_reason = "length"
        if req.finish_reason is not None:
            req.detokenizer.flush()

    def _output(self, req: Request) -> RequestOutput:
        narrowest = req.narrowest or req.spec
        return RequestOutput(
            request_id=req.seq.seq_id,
            prompt=req.prompt,
            prompt_token_ids=req.seq.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=0,
                    text=req.detokenizer.text,
                    token_ids=list(req.seq.output_token_ids),
                    cumulative_logprob=req.cumulative_logprob,
                    logprobs=None if req.logprobs is None else list(req.logprobs),
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                )
            ],
            finished=req.finish_reason is not None,
            shape=req.spec.name,
            narrowest_shape=narrowest.name,
            shape_tokens=dict(req.shape_tokens),
        )


def _at_least(spec: ShapeSpec, floor: ShapeSpec) -> bool:
    return spec.shape.depth >= floor.shape.depth and spec.shape.width >= floor.shape.width
