"""Paged KV block allocator: per-layer accounting, lowest-first ids, no leaks, clean errors."""

from __future__ import annotations

import pytest

from elasticserve.engine.block_manager import BlockManager, NoFreeBlocksError
from elasticserve.engine.sequence import Sequence


def make_seq(layers: tuple[int, ...] = (0, 1), prompt_len: int = 10, seq_id: str = "s") -> Sequence:
    return Sequence(seq_id, list(range(prompt_len)), layers, max_tokens=8)


def test_grow_allocates_one_block_list_per_kept_layer() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    seq = make_seq(layers=(0, 2, 5))
    assert bm.blocks_to_grow(seq, 10) == 3 * 3
    bm.grow(seq, 10)
    assert [len(t) for t in seq.block_table] == [3, 3, 3]
    assert bm.num_free_blocks == 32 - 9
    assert bm.blocks_to_grow(seq, 12) == 0  # the last block still has room
    bm.grow(seq, 12)
    assert bm.num_free_blocks == 32 - 9
    bm.grow(seq, 13)
    assert [len(t) for t in seq.block_table] == [4, 4, 4]
    assert bm.usage == pytest.approx(12 / 32)


def test_lowest_ids_first_give_contiguous_layers() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    seq = make_seq(layers=(0, 1))
    bm.grow(seq, 12)
    assert seq.block_table == [[0, 1, 2], [3, 4, 5]]
    other = make_seq(layers=(3,), seq_id="o")
    bm.grow(other, 4)
    bm.free(seq)
    again = make_seq(layers=(0, 1), seq_id="again")
    bm.grow(again, 8)
    assert again.block_table == [[0, 1], [2, 3]]  # freed low ids are reused first


def test_slot_addresses_the_tokens_block() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    bm.grow(make_seq(layers=(0,), seq_id="pad"), 4)  # take block 0 so ids are not trivial
    seq = make_seq(layers=(1, 3))
    bm.grow(seq, 6)
    assert seq.block_table == [[1, 2], [3, 4]]
    assert bm.slot(seq, 0, 0) == 4
    assert bm.slot(seq, 0, 5) == 2 * 4 + 1
    assert bm.slot(seq, 1, 3) == 3 * 4 + 3


def test_grow_without_enough_blocks_allocates_nothing() -> None:
    bm = BlockManager(num_blocks=5, block_size=4)
    seq = make_seq(layers=(0, 1))
    bm.grow(seq, 8)
    before = [list(t) for t in seq.block_table]
    assert not bm.can_grow(seq, 12)  # needs 2 more, 1 free
    with pytest.raises(NoFreeBlocksError, match="needs 2 blocks, 1 free"):
        bm.grow(seq, 12)
    assert seq.block_table == before
    assert bm.num_free_blocks == 1


def test_free_returns_everything_and_is_idempotent() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    seq = make_seq(layers=(0, 1))
    bm.grow(seq, 7)
    bm.free(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == 8
    bm.free(seq)
    assert bm.num_free_blocks == 8


def test_shallow_sequence_holds_proportionally_fewer_blocks() -> None:
    bm = BlockManager(num_blocks=200, block_size=16)
    deep, shallow = make_seq(tuple(range(8)), seq_id="deep"), make_seq((3, 7), seq_id="shallow")
    bm.grow(deep, 100)
    used_deep = 200 - bm.num_free_blocks
    bm.grow(shallow, 100)
    used_shallow = 200 - bm.num_free_blocks - used_deep
    assert (used_deep, used_shallow) == (8 * 7, 2 * 7)


def test_drop_layers_frees_the_dropped_layers_blocks() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    seq = make_seq(layers=(0, 1, 2, 3))
    bm.grow(seq, 8)
    kept = {layer: list(t) for layer, t in zip(seq.layers, seq.block_table, strict=True)}
    bm.drop_layers(seq, (3, 1))
    assert seq.layers == (1, 3)
    assert seq.block_table == [kept[1], kept[3]]
    assert bm.num_free_blocks == 32 - 4
    assert bm.blocks_to_grow(seq, 9) == 2  # growth now costs only the kept layers
    with pytest.raises(ValueError, match="subset"):
        bm.drop_layers(seq, (0, 1))
    with pytest.raises(ValueError, match="non-empty"):
        bm.drop_layers(seq, ())
    waiting = make_seq(layers=(0, 1, 2), seq_id="w")
    bm.drop_layers(waiting, (2,))  # no blocks held: only the layers change
    assert waiting.layers == (2,)
    assert waiting.block_table == []


def test_double_free_and_foreign_ids_are_bugs() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(layers=(0,))
    bm.grow(seq, 4)
    clone = make_seq(layers=(0,), seq_id="clone")
    clone.block_table = [list(seq.block_table[0])]
    bm.free(seq)
    with pytest.raises(AssertionError, match="not allocated"):
        bm.free(clone)
    foreign = make_seq(layers=(0,), seq_id="foreign")
    foreign.block_table = [[99]]
    with pytest.raises(AssertionError, match="not allocated"):
        bm.free(foreign)


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=8, block_size=0)


# -- reference counts, copy-on-write, prefix caching ---------------------------------------------


def computed_seq(bm: BlockManager, tokens: list[int], seq_id: str, key: int | None = 0) -> Sequence:
    """A sequence of `tokens` (layers 0, 1) whose KV is all computed, its full blocks registered."""
    seq = Sequence(seq_id, list(tokens), (0, 1), max_tokens=8, cache_key=key)
    bm.admit(seq, bm.match(seq))
    bm.grow(seq, len(tokens))
    seq.num_computed_tokens = len(tokens)
    bm.cache_blocks(seq)
    return seq


def test_full_blocks_are_found_by_their_chain_of_tokens_and_shape() -> None:
    bm = BlockManager(num_blocks=32, block_size=4, enable_caching=True)
    first = computed_seq(bm, list(range(10)), "first")
    assert bm.num_cached_blocks == 2 * 2  # two full blocks in two layers; the partial one is not
    bm.free(first)
    assert bm.num_free_blocks == 32 and bm.usage == 0.0  # cached blocks count as free

    def hits(tokens: list[int], key: int | None = 0) -> int:
        return len(bm.match(Sequence("q", tokens, (0, 1), max_tokens=1, cache_key=key)))

    assert hits([*list(range(8)), 99, 98]) == 2
    assert hits(list(range(8))) == 1  # the last token is always recomputed, to get its logits
    assert hits([*list(range(4)), 7, 7, 7, 7, 0]) == 1  # a different second block
    assert hits([5, 1, 2, 3, *list(range(4, 9))]) == 0  # same second block, other parent
    assert hits(list(range(10)), key=1) == 0  # another shape's K/V is not exact
    assert hits(list(range(10)), key=None) == 0
    shallow = Sequence("s", list(range(10)), (1,), max_tokens=1, cache_key=0)
    assert bm.match(shallow) == []  # an entry holds every kept layer of its shape


def test_a_hit_shares_the_blocks_and_skips_their_tokens() -> None:
    bm = BlockManager(num_blocks=32, block_size=4, enable_caching=True)
    first = computed_seq(bm, list(range(10)), "first")
    second = Sequence("second", [*list(range(9)), 50, 51], (0, 1), max_tokens=4, cache_key=0)
    hits = bm.match(second)
    assert bm.blocks_to_admit(second, hits, 11) == 2  # one new block per layer
    assert bm.admit(second, hits) == 8 and second.num_computed_tokens == 8
    bm.grow(second, 11)
    assert [t[:2] for t in second.block_table] == [t[:2] for t in first.block_table]
    assert all(bm.refcount(b) == 2 for t in first.block_table for b in t[:2])
    assert bm.queried_tokens == 10 + 11 and bm.hit_tokens == 8
    bm.free(first)
    assert all(bm.refcount(b) == 1 for t in second.block_table for b in t[:2])
    bm.free(second)
    assert bm.num_free_blocks == 32


def test_eviction_takes_never_cached_blocks_first_then_least_recently_released() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_caching=True)
    old = computed_seq(bm, [1, 2, 3, 4], "old")  # 2 layers x 2 full blocks
    bm.free(old)
    new = computed_seq(bm, [5, 6, 7, 8], "new")  # takes the 4 never-cached blocks
    assert bm.num_cached_blocks == 8
    bm.free(new)
    taker = Sequence("t", [9] * 3, (0,), max_tokens=1, cache_key=None)
    bm.grow(taker, 2)  # evicts one of old's blocks: old's whole entry for that block goes
    assert bm.match(Sequence("o", [1, 2, 3, 4, 0], (0, 1), max_tokens=1, cache_key=0)) != []
    # old released its tail block first: the tail entry is the one evicted, the head stays
    assert len(bm.match(Sequence("o", [1, 2, 3, 4, 0], (0, 1), max_tokens=1, cache_key=0))) == 1
    assert len(bm.match(Sequence("n", [5, 6, 7, 8, 0], (0, 1), max_tokens=1, cache_key=0))) == 2
    bm.free(taker)
    assert bm.num_free_blocks == 8


def test_fork_shares_blocks_and_the_first_write_copies_the_shared_block() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    parent = make_seq(layers=(0, 1), prompt_len=6, seq_id="p")
    bm.grow(parent, 6)
    parent.num_computed_tokens = 6
    child = make_seq(layers=(0, 1), prompt_len=6, seq_id="c")
    bm.fork(parent, child)
    assert child.block_table == parent.block_table and bm.num_free_blocks == 32 - 4
    child.num_computed_tokens = 5  # recompute the prompt's last token
    assert bm.blocks_to_grow(child, 6) == 2  # the shared second block, in each layer
    bm.grow(child, 6)
    copies = bm.take_copies()
    assert copies == [
        (parent.block_table[0][1], child.block_table[0][1]),
        (parent.block_table[1][1], child.block_table[1][1]),
    ]
    assert [t[0] for t in child.block_table] == [t[0] for t in parent.block_table]
    assert all(bm.refcount(t[1]) == 1 for t in parent.block_table + child.block_table)
    assert bm.blocks_to_grow(parent, 7) == 0  # the parent is the last holder: no copy
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 32 and bm.take_copies() == []
