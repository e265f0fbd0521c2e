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
