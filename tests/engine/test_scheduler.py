"""Continuous-batching scheduler on fake requests: budgets, admission, preemption, no leaks."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from elasticserve.engine.block_manager import BlockManager
from elasticserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from elasticserve.engine.sequence import Sequence, SequenceStatus


def make_seq(
    seq_id: str,
    prompt_len: int = 4,
    max_tokens: int = 4,
    layers: tuple[int, ...] = (0, 1),
    priority: int = 0,
    arrival: float = 0.0,
) -> Sequence:
    prompt = [(31 * i + sum(map(ord, seq_id))) % 1000 for i in range(prompt_len)]
    return Sequence(seq_id, prompt, layers, max_tokens, priority, arrival)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, **config: Any) -> Scheduler:
    cfg = SchedulerConfig(**{"watermark": 0.0, **config})
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def fake_token(tokens: list[int]) -> int:
    """A deterministic 'model': the next token depends on the whole prefix."""
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) + len(tokens)) % 1000


def sampled(out: SchedulerOutput) -> list[int]:
    """The fake model's token for every sequence that samples in this step."""
    return [fake_token(s.seq.all_token_ids) for s in out.scheduled if s.will_sample]


def finish_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """What the engine does after the forward pass: hand the sampled tokens to postprocess."""
    sched.postprocess(out, sampled(out))


def plan(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


MODULES = (
    "elasticserve.engine.sequence, elasticserve.engine.block_manager, elasticserve.engine.scheduler"
)


def test_scheduler_modules_import_no_torch() -> None:
    # A bare package object stands in for elasticserve/__init__.py, so this checks these modules.
    path = str(Path(__file__).resolve().parents[2] / "elasticserve")
    code = (
        f"import sys, types; pkg = types.ModuleType('elasticserve'); pkg.__path__ = [{path!r}];"
        f"sys.modules['elasticserve'] = pkg; import {MODULES}; sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_importing_the_scheduler_through_the_package_loads_no_torch() -> None:
    code = f"import sys, {MODULES}; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], check=False)
    assert result.returncode == 0, "elasticserve/__init__.py must import torch-using modules lazily"


def test_empty_scheduler_returns_empty_output() -> None:
    out = make_scheduler().schedule()
    assert out.is_empty and out.num_batched_tokens == 0 and not out.preempted


def test_decodes_come_before_new_prefills() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add(make_seq("a", prompt_len=5))
    finish_step(sched, sched.schedule())
    sched.add(make_seq("b", prompt_len=40))
    out = sched.schedule()
    assert plan(out) == [("a", 1), ("b", 15)]
    assert [s.will_sample for s in out.scheduled] == [True, False]


def test_chunked_prefill_splits_a_long_prompt_within_the_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=32)
    seq = make_seq("long", prompt_len=100, max_tokens=3)
    sched.add(seq)
    chunks = []
    while sched.has_unfinished():
        out = sched.schedule()
        assert out.num_batched_tokens == sum(n for _, n in plan(out)) <= 32
        chunks.append(
            (out.scheduled[0].start, out.num_batched_tokens, out.scheduled[0].will_sample)
        )
        finish_step(sched, out)
    assert chunks == [
        (0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True), (100, 1, True),
        (101, 1, True),
    ]  # fmt: skip
    assert seq.status is SequenceStatus.FINISHED_LENGTH and seq.num_output_tokens == 3


def test_budget_is_filled_exactly_by_several_prompts() -> None:
    sched = make_scheduler(max_num_batched_tokens=32)
    for name in "abc":
        sched.add(make_seq(name, prompt_len=20))
    out = sched.schedule()
    assert plan(out) == [("a", 20), ("b", 12)]
    finish_step(sched, out)
    assert plan(sched.schedule()) == [("a", 1), ("b", 8), ("c", 20)]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_it_fits() -> None:
    sched = make_scheduler(
        max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False
    )
    sched.add(make_seq("a", prompt_len=40))
    sched.add(make_seq("b", prompt_len=40))
    out = sched.schedule()
    assert plan(out) == [("a", 40)]
    finish_step(sched, out)
    assert plan(sched.schedule()) == [("a", 1), ("b", 40)]
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=32, enable_chunked_prefill=False)


def test_max_num_seqs_caps_the_running_set() -> None:
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"s{i}", max_tokens=1 + i) for i in range(4)]
    for seq in seqs:
        sched.add(seq)
    out = sched.schedule()
    assert plan(out) == [("s0", 4), ("s1", 4)]
    finish_step(sched, out)  # s0 reaches max_tokens=1 and leaves
    assert seqs[0].status is SequenceStatus.FINISHED_LENGTH
    assert plan(sched.schedule()) == [("s1", 1), ("s2", 4)]


def test_admission_waits_for_blocks_and_keeps_strict_fcfs() -> None:
    sched = make_scheduler(num_blocks=10, block_size=4)
    big, bigger, small = make_seq("big", 16), make_seq("bigger", 12), make_seq("small", 1)
    for seq in (big, bigger, small):
        sched.add(seq)
    out = sched.schedule()
    # big takes 8 of 10 blocks; bigger needs 6; small would fit but must not jump the queue.
    assert plan(out) == [("big", 16)]
    assert sched.block_manager.num_free_blocks == 2
    finish_step(sched, out)
    sched.finish(big, SequenceStatus.FINISHED_STOPPED)
    assert sched.block_manager.num_free_blocks == 10
    assert plan(sched.schedule()) == [("bigger", 12), ("small", 1)]


def test_watermark_keeps_blocks_for_running_decodes_unless_nothing_runs() -> None:
    sched = make_scheduler(num_blocks=100, block_size=4, watermark=0.05)
    sched.add(make_seq("a", prompt_len=4, layers=(0,)))
    sched.add(make_seq("b", prompt_len=4 * 96, layers=(0,)))  # 96 blocks: leaves 3 < 5 free
    assert plan(sched.schedule()) == [("a", 4)]
    sched.abort("a")
    assert plan(sched.schedule()) == [("b", 384)]  # alone, it may use the watermark


def test_preemption_evicts_the_latest_arrival_of_the_worst_priority() -> None:
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    # Each holds 2 blocks (2 layers x 4 prompt tokens); the first decode needs 2 more each.
    a = make_seq("a", priority=0, arrival=2.0, max_tokens=5)
    b = make_seq("b", priority=1, arrival=0.0, max_tokens=5)
    c = make_seq("c", priority=0, arrival=1.0, max_tokens=5)
    for seq in (a, b, c):
        sched.add(seq)
    first = sched.schedule()
    assert plan(first) == [("c", 4), ("a", 4), ("b", 4)]
    finish_step(sched, first)
    out = sched.schedule()
    assert out.preempted == [b, a]  # b is worst (priority 1), then a (latest of priority 0)
    assert plan(out) == [("c", 1)]
    assert sched.waiting == [a, b]
    assert (a.num_preemptions, a.num_computed_tokens, a.block_table) == (1, 0, [])
    assert a.status is SequenceStatus.WAITING and a.num_output_tokens == 1
    finish_step(sched, out)
    recompute = sched.schedule()
    assert plan(recompute) == [("c", 1)]  # c holds 4 of 6 blocks: a's 5 tokens need 4 more
    finish_step(sched, recompute)
    while sched.has_unfinished():
        out = sched.schedule()
        for s in out.scheduled:
            if s.seq is a and s.start == 0:
                assert s.token_ids == a.all_token_ids  # prompt + the token sampled before
        finish_step(sched, out)
    for seq in (a, b, c):
        assert seq.status is SequenceStatus.FINISHED_LENGTH
        tokens = list(seq.prompt_token_ids)
        for _ in range(seq.max_tokens):
            tokens.append(fake_token(tokens))
        assert seq.all_token_ids == tokens
    assert sched.block_manager.num_free_blocks == 6


def test_a_sequence_preempts_itself_when_it_is_the_worst() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    good = make_seq("good", prompt_len=2, arrival=0.0)
    bad = make_seq("bad", prompt_len=4, arrival=1.0)
    sched.add(good)
    sched.add(bad)
    finish_step(sched, sched.schedule())  # good: 3 tokens, 2 blocks; bad: 5 tokens, no room
    out = sched.schedule()
    assert plan(out) == [("good", 1)]
    assert out.preempted == [bad]
    assert sched.running == [good] and sched.waiting == [bad]


def test_priority_then_arrival_then_add_order() -> None:
    sched = make_scheduler(max_num_seqs=1)
    specs = [("p1-late", 1, 5.0), ("p0-late", 0, 9.0), ("p1-early", 1, 1.0), ("p0-tie-a", 0, 3.0)]
    specs.append(("p0-tie-b", 0, 3.0))
    for name, priority, arrival in specs:
        sched.add(make_seq(name, priority=priority, arrival=arrival, max_tokens=1))
    order = []
    while sched.has_unfinished():
        out = sched.schedule()
        order += [s.seq.seq_id for s in out.scheduled]
        finish_step(sched, out)
    assert order == ["p0-tie-a", "p0-tie-b", "p0-late", "p1-early", "p1-late"]


def test_abort_frees_blocks_from_waiting_and_running() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=8)
    run, wait = make_seq("run", prompt_len=8), make_seq("wait", prompt_len=8)
    sched.add(run)
    sched.add(wait)
    out = sched.schedule()
    assert plan(out) == [("run", 8)]
    finish_step(sched, out)
    assert sched.abort("wait") is wait
    assert sched.abort("run") is run
    for seq in (run, wait):
        assert seq.status is SequenceStatus.FINISHED_ABORTED and seq.block_table == []
    assert sched.abort("run") is None and sched.abort("nobody") is None
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_unfinished() and sched.schedule().is_empty


def test_finished_sequences_are_never_scheduled() -> None:
    sched = make_scheduler()
    seq = make_seq("s", max_tokens=10)
    sched.add(seq)
    out = sched.schedule()
    sched.postprocess(out, [7])
    sched.finish(seq, SequenceStatus.FINISHED_STOPPED)  # a stop string, found by the engine
    assert seq.status is SequenceStatus.FINISHED_STOPPED
    assert sched.schedule().is_empty and sched.block_manager.num_free_blocks == 64
    with pytest.raises(ValueError, match="FINISHED"):
        sched.finish(seq, SequenceStatus.RUNNING)


def test_a_stop_token_finishes_the_sequence_in_postprocess() -> None:
    sched = make_scheduler()
    seq = make_seq("s", max_tokens=10)
    seq.stop_token_ids = frozenset({7})
    sched.add(seq)
    sched.postprocess(sched.schedule(), [3])
    assert seq.status is SequenceStatus.RUNNING and seq.output_token_ids == [3]
    sched.postprocess(sched.schedule(), [7])
    assert seq.status is SequenceStatus.FINISHED_STOPPED and seq.output_token_ids == [3, 7]
    assert sched.schedule().is_empty and sched.block_manager.num_free_blocks == 64


def test_postprocess_requires_one_token_per_sampling_sequence() -> None:
    sched = make_scheduler()
    sched.add(make_seq("s"))
    with pytest.raises(ValueError, match="1 sequences sample in this step, got 0 tokens"):
        sched.postprocess(sched.schedule(), [])


@pytest.mark.parametrize(
    ("seq", "message"),
    [
        (make_seq("empty", prompt_len=0), "empty prompt"),
        (make_seq("long", prompt_len=60, max_tokens=10), "exceeds max_model_len=64"),
        (make_seq("deep", prompt_len=30, layers=tuple(range(8))), "needs 72 KV blocks"),
        (make_seq("none", max_tokens=0), "max_tokens must be >= 1"),
    ],
)
def test_add_rejects_requests_with_a_clear_message(seq: Sequence, message: str) -> None:
    sched = make_scheduler(num_blocks=60, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match=message):
        sched.add(seq)
    assert not sched.has_unfinished()


def test_duplicate_request_id_is_rejected() -> None:
    sched = make_scheduler()
    sched.add(make_seq("x"))
    with pytest.raises(ValueError, match="already in use"):
        sched.add(make_seq("x"))


def test_drop_layers_in_flight_frees_blocks_and_keeps_decoding() -> None:
    sched = make_scheduler(num_blocks=64, block_size=4)
    seq = make_seq("s", prompt_len=8, max_tokens=3, layers=(0, 1, 2, 3))
    sched.add(seq)
    finish_step(sched, sched.schedule())
    assert sched.block_manager.num_free_blocks == 64 - 4 * 2
    sched.block_manager.drop_layers(seq, (1, 3))
    assert sched.block_manager.num_free_blocks == 64 - 2 * 2
    while sched.has_unfinished():
        finish_step(sched, sched.schedule())
    assert seq.num_output_tokens == 3 and sched.block_manager.num_free_blocks == 64


def check_invariants(sched: Scheduler, out: SchedulerOutput, cfg: SchedulerConfig) -> None:
    bm = sched.block_manager
    owned = [b for seq in sched.running for table in seq.block_table for b in table]
    assert len(owned) == len(set(owned)), "a physical block is owned twice"
    assert len(owned) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert all(not seq.block_table for seq in sched.waiting)
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert 0 < out.num_batched_tokens <= cfg.max_num_batched_tokens or out.is_empty
    assert len(out.scheduled) <= cfg.max_num_seqs
    for s in out.scheduled:
        assert s.seq.status is SequenceStatus.RUNNING and s.num_new_tokens > 0
        assert len(s.seq.block_table) == len(s.seq.layers)
        assert all(len(t) * bm.block_size >= s.start + s.num_new_tokens for t in s.seq.block_table)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_simulation_finishes_everything_without_leaks(seed: int) -> None:
    rng = random.Random(seed)
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48, max_model_len=128)
    sched = Scheduler(cfg, BlockManager(num_blocks=120, block_size=8))
    kv: dict[str, list[int]] = {}  # what a fake model has cached per sequence
    seqs: list[Sequence] = []
    preemptions = 0
    for step in range(2000):
        if step < 300 and rng.random() < 0.3:
            depth = rng.randint(1, 8)
            seq = make_seq(
                f"r{step}",
                prompt_len=rng.randint(1, 100),
                max_tokens=rng.randint(1, 40),
                layers=tuple(sorted(rng.sample(range(8), depth))),
                priority=rng.randint(0, 2),
                arrival=float(step),
            )
            n = seq.num_tokens + seq.max_tokens
            if n > cfg.max_model_len or depth * -(-n // 8) > 120:
                with pytest.raises(ValueError):
                    sched.add(seq)
            else:
                sched.add(seq)
                seqs.append(seq)
        if seqs and rng.random() < 0.03:
            sched.abort(rng.choice(seqs).seq_id)
        if sched.running and rng.random() < 0.05:
            seq = rng.choice(sched.running)
            sched.block_manager.drop_layers(seq, seq.layers[len(seq.layers) // 2 :])
        out = sched.schedule()
        check_invariants(sched, out, cfg)
        preemptions += len(out.preempted)
        for seq in out.preempted:
            kv[seq.seq_id] = []
        for s in out.scheduled:
            cache = kv.setdefault(s.seq.seq_id, [])
            assert s.start == len(cache), "a chunk must start where the cache ends"
            cache += s.token_ids
        sched.postprocess(out, sampled(out))
        for s in out.scheduled:
            if s.will_sample and not s.seq.is_finished and rng.random() < 0.02:
                sched.finish(s.seq, SequenceStatus.FINISHED_STOPPED)
        if step >= 300 and not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert all(seq.is_finished and not seq.block_table for seq in seqs)
    assert preemptions > 0, "the pool is sized to force preemption"
    for seq in seqs:
        if seq.status is SequenceStatus.FINISHED_LENGTH:
            assert seq.num_output_tokens == seq.max_tokens
            tokens = list(seq.prompt_token_ids)
            for _ in range(seq.max_tokens):
                tokens.append(fake_token(tokens))
            assert seq.all_token_ids == tokens


def test_a_cached_prefix_is_not_prefilled_again_and_cached_blocks_go_before_preemption() -> None:
    cfg = SchedulerConfig(watermark=0.0, max_num_batched_tokens=64)
    sched = Scheduler(cfg, BlockManager(num_blocks=12, block_size=4, enable_caching=True))
    first = make_seq("first", prompt_len=13, max_tokens=1)
    first.cache_key = 0
    sched.add(first)
    while sched.has_unfinished():
        finish_step(sched, sched.schedule())
    assert sched.block_manager.num_free_blocks == 12  # 3 blocks x 2 layers stay cached
    turn = Sequence("turn", [*first.all_token_ids, 7, 8, 9], (0, 1), 2, cache_key=0)
    sched.add(turn)
    out = sched.schedule()
    assert plan(out) == [("turn", 17 - 12)] and turn.num_cached_tokens == 12
    finish_step(sched, out)
    # a stranger needs 10 of the 12 blocks: the cached ones are evicted, nobody is preempted
    stranger = make_seq("stranger", prompt_len=17, max_tokens=2, layers=(0, 1))
    sched.add(stranger)
    seen = []
    while sched.has_unfinished():
        out = sched.schedule()
        seen += out.preempted
        finish_step(sched, out)
    assert seen == [] and turn.num_output_tokens == 2 and stranger.num_output_tokens == 2
    assert sched.block_manager.num_free_blocks == 12
