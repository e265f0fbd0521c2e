"""The engine: continuous batching where every request runs its own shape.

`step()` = schedule (scheduler.py) -> run: plan, forward, sample (model_runner.py) -> postprocess:
the scheduler appends the tokens and ends sequences at a stop token or their length, the engine
detokenizes, ends those that completed a stop string, and reports an output per sampled request.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..model.bundle import ModelBundle
from ..model.shapes import Shape, ShapeSpec
from ..policy.base import Policy
from ..policy.step_time import StepLoad, attn_pairs, step_load
from ..policy.types import SLO, LoadState, Overloaded, Refuse, RequestView
from . import kv_cache
from .block_manager import BlockManager
from .detokenize import IncrementalDetokenizer
from .guided import GrammarCompiler
from .load_tracker import LoadTracker
from .model_runner import ModelRunner
from .output_processor import group_output, process_token, request_output, snapshot
from .outputs import EngineStats, RequestOutput, RequestSnapshot
from .request import Request, RequestGroup
from .sampling import SamplerOutput, SamplingParams
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
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
    enable_prefix_caching: bool = True  # reuse the KV of a prompt's cached prefix, same shape
    # which shapes share a cached prefix: "exact" (only the shape that computed it) or
    # "precision" (shapes that differ only in weight precision: BENCHMARKS.md measures the cost)
    prefix_cache_sharing: str = "exact"


PREFIX_CACHE_SHARING = ("exact", "precision")


def prefix_cache_keys(specs: Iterable[ShapeSpec], sharing: str) -> list[int]:
    """Per shape id, the key its cached blocks go under. "exact": its own id. "precision": the
    first id with the same layers and widths, so q8/q4 and dense siblings share a prefix."""
    if sharing not in PREFIX_CACHE_SHARING:
        raise ValueError(f"prefix_cache_sharing must be one of {PREFIX_CACHE_SHARING}: {sharing!r}")
    if sharing == "exact":
        return [spec.id for spec in specs]
    first: dict[tuple[tuple[int, ...], ...], int] = {}
    return [first.setdefault((s.layers, s.heads, s.mlp), s.id) for s in specs]


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
        self.num_preemptions = 0  # requests preempted since start (their KV recomputed later)
        self.last_step: tuple[StepLoad, float] | None = None  # load and seconds of the last step
        # end of the last step if work remained: the next step's time counts from there, so the
        # policy sees a token's whole cycle (a server's dispatch between steps included)
        self._busy_since: float | None = None
        self.config = config = config or EngineConfig()
        self.runner = ModelRunner(
            bundle, config.block_size, config.kv_cache_memory, config.max_num_seqs
        )
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self._cache_keys = prefix_cache_keys(bundle.specs, config.prefix_cache_sharing)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=bundle.max_model_len,
                enable_chunked_prefill=config.enable_chunked_prefill,
            ),
            self.block_manager,
        )
        self.requests: dict[str, Request] = {}  # by sequence id (a group's children too)
        self.groups: dict[str, RequestGroup] = {}  # parallel-sampling requests by request id
        self.eos_token_ids = bundle.eos_token_ids
        self.grammars = GrammarCompiler(
            bundle.tokenizer, bundle.config.vocab_size, bundle.eos_token_ids
        )
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
        vocab = self.bundle.config.vocab_size
        if params.logit_bias and (worst := max(params.logit_bias)) >= vocab:
            raise ValueError(
                f"logit_bias has token id {worst}, outside the vocabulary [0, {vocab})"
            )
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
        if request_id in self.requests or request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        size = params.num_sequences
        if size > self.config.max_num_seqs:
            raise ValueError(
                f"n / best_of ({size}) exceeds max_num_seqs={self.config.max_num_seqs}"
            )
        guided = params.guided_decoding
        guide = None if guided is None else self.grammars.compile(guided)
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
            max_tokens=max_tokens,
            priority=priority,
            arrival_time=arrival_time,
            stop_token_ids=frozenset(params.stop_token_ids or ())
            | (frozenset() if params.ignore_eos else self.eos_token_ids),
            cache_key=self._cache_keys[spec.id],
            pending_forks=size - 1,
            skip_reading_prefix_cache=params.prompt_logprobs is not None,
        )
        self.scheduler.add(seq)
        self.load.arrive(now, len(token_ids), max_tokens)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.bundle.model.device).manual_seed(params.seed)
        req = self.requests[request_id] = Request(
            seq=seq,
            prompt=text,
            params=params,
            spec=spec,
            detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids, params),
            generator=generator,
            logprobs=[] if params.logprobs is not None else None,
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
            pinned=pinned,
            min_shape=floor,
            slo=slo,
            guide=guide,
        )
        if size > 1:
            req.group = RequestGroup(request_id, params.n, size, [req])
            self.groups[request_id] = req.group
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; unknown or finished ids are ignored."""
        group = self.groups.pop(request_id, None)
        members = [m.seq.seq_id for m in group.members] if group is not None else [request_id]
        for seq_id in members:
            if self.scheduler.abort(seq_id) is not None:
                self.requests.pop(seq_id, None)
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
        if self._cache_keys[spec.id] != req.seq.cache_key and req.seq.block_table:
            req.seq.cache_key = None  # its K/V now mix two shapes: exact for neither
        req.spec = spec

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- what callers outside the engine read ----------------------------------------------------

    @property
    def kv_usage(self) -> float:
        return self.block_manager.usage

    def stats(self) -> EngineStats:
        """Requests running and waiting, and the KV pool's use."""
        bm, scheduler = self.block_manager, self.scheduler
        running, waiting = scheduler.num_running, scheduler.num_waiting
        return EngineStats(
            running,
            waiting,
            bm.usage,
            bm.num_free_blocks,
            bm.num_blocks,
            bm.queried_tokens,
            bm.hit_tokens,
        )

    def request(self, request_id: str) -> RequestSnapshot | None:
        """A view of an unfinished request (None once it finished, or if unknown)."""
        req = self.requests.get(request_id)
        if req is None and (group := self.groups.get(request_id)) is not None:
            req = next((m for m in group.members if m.finish_reason is None), None)
        return None if req is None else snapshot(req)

    def requests_by_shape(self) -> tuple[Counter[str], Counter[str]]:
        """Unfinished requests per shape name: (running, waiting)."""
        running: Counter[str] = Counter()
        waiting: Counter[str] = Counter()
        for req in self.requests.values():
            if req.seq.status is SequenceStatus.RUNNING:
                running[req.spec.name] += 1
            elif req.seq.status is SequenceStatus.WAITING:
                waiting[req.spec.name] += 1
        return running, waiting

    @property
    def mean_output_tokens(self) -> float:
        """The mean generated length of recent requests (max_tokens until one finishes)."""
        return self.load.mean_output_tokens

    def step_costs(self) -> tuple[float | None, float]:
        """The step time at the current step shape: (empty batch, per row) seconds.

        From the policy's step-time model, which every step corrects online. Safe to call from
        another thread: it reads `last_step` once (the engine thread replaces the tuple whole).
        """
        model = getattr(self.policy, "model", None)
        if model is None or model.observations == 0:
            return None, 0.0  # a prior no step has corrected yet would mislead the caller
        last = self.last_step
        shape = last[0].shape if last is not None else self.bundle.full.name
        if shape not in model.coefficients:
            shape = self.bundle.full.name
        context = round(self.load.mean_prompt_tokens + self.load.mean_output_tokens / 2)
        base = model.predict(StepLoad(shape, 0, 0, 0.0))
        one = model.predict(StepLoad(shape, 1, 1, attn_pairs(1, context)))
        return base, max(0.0, one - base)

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
        self.num_preemptions += len(out.preempted)
        for seq in out.preempted:  # recomputed from scratch, at its current shape: exact again
            seq.cache_key = self._cache_keys[self.requests[seq.seq_id].spec.id]
        self._fork(out)
        if copies := self.block_manager.take_copies():
            kv_cache.copy_blocks(self.runner.cache, copies, self.config.block_size)
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
                seq.layers, req.spec, seq.cache_key = spec.layers, spec, self._cache_keys[spec.id]
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

    def _fork(self, out: SchedulerOutput) -> None:
        """Fork the other members of each parallel-sampling request whose prompt this step ends.

        Member i shares the parent's blocks and samples with seed + i (vLLM's children seeds).
        """
        for s in out.scheduled:
            parent_seq = s.seq
            if not (parent_seq.pending_forks and s.will_sample):
                continue
            parent = self.requests[parent_seq.seq_id]
            params, group = parent.params, parent.group
            assert group is not None
            for index in range(1, parent_seq.pending_forks + 1):
                seq = Sequence(
                    seq_id=f"{group.request_id}#{index}",
                    prompt_token_ids=parent_seq.prompt_token_ids,
                    layers=parent_seq.layers,
                    max_tokens=parent_seq.max_tokens,
                    priority=parent_seq.priority,
                    arrival_time=parent_seq.arrival_time,
                    stop_token_ids=parent_seq.stop_token_ids,
                    cache_key=parent_seq.cache_key,
                )
                self.scheduler.fork(parent_seq, seq)
                generator = None
                if params.seed is not None:
                    generator = torch.Generator(self.bundle.model.device)
                    generator.manual_seed(params.seed + index)
                guided = params.guided_decoding
                child = dataclasses.replace(
                    parent,
                    seq=seq,
                    detokenizer=IncrementalDetokenizer(
                        self.tokenizer, seq.prompt_token_ids, params
                    ),
                    generator=generator,
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0,
                    shape_tokens={},
                    narrowest=None,
                    guide=None if guided is None else self.grammars.compile(guided),
                    index=index,
                )
                self.requests[seq.seq_id] = child
                group.members.append(child)
            parent_seq.pending_forks = 0

    def _postprocess(self, sampled: list[Request], result: SamplerOutput) -> list[RequestOutput]:
        """An output per sampled request; requests that finished leave the engine."""
        outputs = []
        groups: dict[str, RequestGroup] = {}
        for i, req in enumerate(sampled):
            top = result.top_logprobs[i]
            delta, stop_string = process_token(req, result.token_ids[i], result.logprobs[i], top)
            if stop_string:
                self.scheduler.finish(req.seq, SequenceStatus.FINISHED_STOPPED)
            if req.group is None:
                outputs.append(request_output(req, delta))
            else:
                req.group.deltas[req.index] = delta
                groups[req.group.request_id] = req.group
            if req.finish_reason is not None:
                del self.requests[req.seq.seq_id]
                self.load.finish(req.seq.num_output_tokens)
        for group in groups.values():
            outputs.append(group_output(group))
            if group.finished:
                del self.groups[group.request_id]
        return outputs


def _at_least(spec: ShapeSpec, floor: ShapeSpec) -> bool:
    return spec.shape.depth >= floor.shape.depth and spec.shape.width >= floor.shape.width
