"""Continuous-batching scheduler: which sequences run how many tokens in the next step.

Scheduling is unified (vLLM v1): a sequence is just `num_computed_tokens` of `num_tokens`, and a
step gives each scheduled sequence `num_new_tokens` of its uncomputed tokens, so prefill chunks,
recomputation after preemption and decodes are the same thing. One step:

1. Running sequences, best first by (priority, arrival_time, add order): each takes
   min(uncomputed, budget left) tokens (1 for a decode) and grows its blocks to cover them. When
   the pool is short, the worst running sequence not yet scheduled in this step is preempted
   (blocks freed, recomputed from scratch later, put back at the front of its priority in
   waiting) until the growth fits; if the sequence itself is the worst, it is preempted.
2. If nothing was preempted, waiting sequences are admitted in order (strict FCFS within a
   priority: a head that does not fit blocks the queue) while the token budget, max_num_seqs and
   free blocks allow. A sequence first adopts its longest chain of cached prefix blocks (the
   block manager's prefix cache) and starts after them. A chunk is min(uncomputed, budget left),
   or the whole rest of the prompt without chunked prefill. Admission reserves blocks for this
   chunk only and leaves a watermark free for running decodes, unless nothing runs.

Per engine step: `out = schedule()`; run the model on `out.scheduled`; then
`postprocess(out, token_ids)` with one sampled token per `will_sample` sequence: it advances
progress, registers the newly computed full blocks in the prefix cache, appends each token, and
finishes the sequences that sampled one of their stop tokens
or reached max_tokens or the context length. The engine `finish()`es the ones it stops itself
(a stop string in the text).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    watermark: float = 0.01  # fraction of blocks admission leaves free for running decodes

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) < 1:
            raise ValueError(f"scheduler limits must be positive: {self}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len}): a recomputed sequence "
                "must fit one step"
            )


@dataclass
class ScheduledSeq:
    """`num_new_tokens` tokens of `seq`, from position `start`, to run in this step."""

    seq: Sequence
    num_new_tokens: int
    # Snapshots taken at schedule time, so they stay right after the engine appends a token.
    start: int = field(init=False)
    will_sample: bool = field(init=False)  # this chunk's last position yields a new token

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.will_sample = self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step feeds for the sequence."""
        return self.seq.all_token_ids[self.start : self.start + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]
    num_batched_tokens: int

    @property
    def is_empty(self) -> bool:
        """Nothing to run."""
        return not self.scheduled


class Scheduler:
    """Decides each step's batch and owns the waiting and running queues."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # sorted by _waiting_key
        self.running: list[Sequence] = []  # sorted by _rank
        self._ranks: dict[str, tuple[int, float, int]] = {}  # unfinished seq_id -> rank
        self._seqs: dict[str, Sequence] = {}
        self._counter = itertools.count()
        self._watermark = int(block_manager.num_blocks * config.watermark)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError if it is invalid or could never fit."""
        n = seq.num_prompt_tokens + seq.max_tokens
        if seq.seq_id in self._seqs:
            raise ValueError(f"request id {seq.seq_id!r} is already in use")
        if not seq.prompt_token_ids:
            raise ValueError(f"request {seq.seq_id!r} has an empty prompt")
        if seq.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {seq.max_tokens}")
        if n > self.config.max_model_len:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_tokens ({seq.max_tokens}) = {n} "
                f"exceeds max_model_len={self.config.max_model_len}"
            )
        if not seq.layers:
            raise ValueError(f"request {seq.seq_id!r} keeps no layers")
        need = self.block_manager.blocks_for(len(seq.layers), n)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"request {seq.seq_id!r} needs {need} KV blocks at full length ({n} tokens in "
                f"{len(seq.layers)} layers) but the whole cache has {self.block_manager.num_blocks}"
            )
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise ValueError(f"request {seq.seq_id!r} is not a fresh waiting sequence")
        self._ranks[seq.seq_id] = (seq.priority, seq.arrival_time, next(self._counter))
        self._seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=self._waiting_key)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's sequences and token counts; grow their blocks."""
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        pending = list(self.running)
        i = 0
        while i < len(pending) and budget > 0:
            seq = pending[i]
            n = min(seq.num_uncomputed_tokens, budget)
            assert n > 0, f"{seq.seq_id!r} has nothing to compute: append its token first"
            while not bm.can_grow(seq, seq.num_computed_tokens + n):
                victim = pending.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.grow(seq, seq.num_computed_tokens + n)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1

        # After a preemption memory is tight: admitting now would only evict someone next step.
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.pending_forks > self.config.max_num_seqs:
                break
            hits = bm.match(seq)
            cached = len(hits) * bm.block_size
            n = seq.num_tokens - cached
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            reserve = self._watermark if self.running else 0
            if bm.blocks_to_admit(seq, hits, cached + n) > bm.num_free_blocks - reserve:
                break
            bm.admit(seq, hits)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            bm.grow(seq, cached + n)
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=self._rank)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n

        return SchedulerOutput(scheduled, preempted, self.config.max_num_batched_tokens - budget)

    def postprocess(self, out: SchedulerOutput, token_ids: list[int]) -> None:
        """Mark the scheduled tokens computed and append the sampled ones (`will_sample` order).

        A sequence whose token is one of its stop tokens finishes stopped; one that reached
        max_tokens or the context length finishes at its length.
        """
        sampling = sum(s.will_sample for s in out.scheduled)
        if len(token_ids) != sampling:
            raise ValueError(
                f"{sampling} sequences sample in this step, got {len(token_ids)} tokens"
            )
        tokens = iter(token_ids)
        for s in out.scheduled:
            seq = s.seq
            token = next(tokens) if s.will_sample else None
            if seq.is_finished:
                continue
            assert seq.num_computed_tokens == s.start, f"{seq.seq_id!r} postprocessed twice"
            seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_blocks(seq)
            if token is None:
                continue
            seq.append_token(token)
            if token in seq.stop_token_ids:
                self.finish(seq, SequenceStatus.FINISHED_STOPPED)
            elif (
                seq.num_output_tokens >= seq.max_tokens
                or seq.num_tokens >= self.config.max_model_len
            ):
                self.finish(seq, SequenceStatus.FINISHED_LENGTH)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Run `child` beside `parent`, whose chunk now scheduled completes its prompt.

        The child shares the parent's blocks and recomputes only the prompt's last token (to
        sample a first token of its own); the first write of either into a shared block copies it.
        """
        bm = self.block_manager
        if parent.status is not SequenceStatus.RUNNING or not parent.block_table:
            raise ValueError(f"{parent.seq_id!r} is not running with blocks: cannot fork it")
        if len(parent.block_table[0]) * bm.block_size < parent.num_prompt_tokens:
            raise ValueError(f"{parent.seq_id!r}'s blocks do not cover its prompt yet")
        if child.seq_id in self._seqs:
            raise ValueError(f"request id {child.seq_id!r} is already in use")
        if child.prompt_token_ids != parent.prompt_token_ids or child.output_token_ids:
            raise ValueError(f"{child.seq_id!r} must be a fresh copy of {parent.seq_id!r}'s prompt")
        bm.fork(parent, child)
        child.num_computed_tokens = parent.num_prompt_tokens - 1
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = SequenceStatus.RUNNING
        self._ranks[child.seq_id] = self._ranks[parent.seq_id]
        self._seqs[child.seq_id] = child
        bisect.insort(self.running, child, key=self._rank)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Remove seq from the queues, free its blocks, set its final status; no-op if done."""
        if not status.is_finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {status}")
        if seq.is_finished:
            return
        if self._seqs.get(seq.seq_id) is seq:
            queue = self.running if seq.status is SequenceStatus.RUNNING else self.waiting
            queue.remove(seq)
            del self._seqs[seq.seq_id], self._ranks[seq.seq_id]
        self.block_manager.free(seq)
        seq.status = status

    def abort(self, seq_id: str) -> Sequence | None:
        """Finish an unfinished sequence as aborted and return it; None if unknown."""
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return seq

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        bisect.insort(self.waiting, seq, key=self._waiting_key)

    def _rank(self, seq: Sequence) -> tuple[int, float, int]:
        return self._ranks[seq.seq_id]

    def _waiting_key(self, seq: Sequence) -> tuple[int, bool, float, int]:
        # Preempted sequences go back ahead of their priority's new arrivals.
        priority, arrival, order = self._ranks[seq.seq_id]
        return priority, seq.num_preemptions == 0, arrival, order
