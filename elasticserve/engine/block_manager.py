"""Paged KV block allocator: one pool of blocks shared by all layers, held per kept layer."""

from __future__ import annotations

import heapq

from .sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than a growth needs."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Hands out physical block ids; a sequence holds one block list per kept layer."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A min-heap hands out the lowest free ids first, so a sequence's consecutive logical
        # blocks are often consecutive physical ones and the engine can use views, not gathers.
        self._free: list[int] = list(range(num_blocks))
        self._used = bytearray(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_layers: int, num_tokens: int) -> int:
        """Blocks that `num_tokens` tokens take in `num_layers` layers."""
        return num_layers * cdiv(num_tokens, self.block_size)

    def blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """Physical blocks needed so seq's cache covers `num_tokens` tokens in every kept layer."""
        held = len(seq.block_table[0]) if seq.block_table else 0
        return len(seq.layers) * max(0, cdiv(num_tokens, self.block_size) - held)

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_to_grow(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Allocate so seq covers `num_tokens` tokens; allocates nothing if the pool is short."""
        need = self.blocks_to_grow(seq, num_tokens)
        if need > len(self._free):
            raise NoFreeBlocksError(f"{seq.seq_id!r} needs {need} blocks, {len(self._free)} free")
        if need == 0:
            return
        if not seq.block_table:
            seq.block_table = [[] for _ in seq.layers]
        ids = [heapq.heappop(self._free) for _ in range(need)]
        for i in ids:
            assert not self._used[i], f"block {i} handed out twice"
            self._used[i] = 1
        per_layer = need // len(seq.layers)
        for pos, table in enumerate(seq.block_table):
            table.extend(ids[pos * per_layer : (pos + 1) * per_layer])

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks and clear its block table; idempotent."""
        for table in seq.block_table:
            self._release(table)
        seq.block_table = []

    def drop_layers(self, seq: Sequence, layers: tuple[int, ...]) -> None:
        """Shrink seq's kept layers to `layers`, freeing the dropped layers' blocks."""
        keep = set(layers)
        if not keep or not keep <= set(seq.layers):
            raise ValueError(
                f"layers {tuple(layers)} must be a non-empty subset of "
                f"{seq.seq_id!r}'s kept layers {seq.layers}"
            )
        if seq.block_table:
            kept_tables = []
            for layer, table in zip(seq.layers, seq.block_table, strict=True):
                if layer in keep:
                    kept_tables.append(table)
                else:
                    self._release(table)
            seq.block_table = kept_tables
        seq.layers = tuple(layer for layer in seq.layers if layer in keep)

    def slot(self, seq: Sequence, layer_pos: int, token_index: int) -> int:
        """Cache slot of a token in seq's `layer_pos`-th kept layer."""
        block = seq.block_table[layer_pos][token_index // self.block_size]
        return block * self.block_size + token_index % self.block_size

    def _release(self, ids: list[int]) -> None:
        for i in ids:
            assert 0 <= i < self.num_blocks and self._used[i], f"block {i} is not allocated"
            self._used[i] = 0
            heapq.heappush(self._free, i)
