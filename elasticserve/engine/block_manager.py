"""Paged KV block allocator: one pool of reference-counted blocks shared by all layers, held per
kept layer, with automatic prefix caching.

A sequence holds one block list per kept layer. Blocks are reference-counted, so sequences can
share them: the children of a parallel-sampling request share their parent's prompt blocks, and
a write into a shared block first copies it (copy-on-write; the engine applies the pending copies
to the cache before the step runs).

Prefix caching (vLLM-style): once a full block of a sequence is computed it is registered under
(its parent block's entry, the sequence's cache key, the block's tokens); the cache key is the
shape id, because a layer's K/V depend on the layers below it, so a block is exact only for the
shape that computed it. An entry holds one physical block per kept layer of that shape. A new
sequence adopts the longest chain of registered blocks before its last token and starts its
prefill after them. Blocks no sequence holds stay registered and are evicted least recently
released first, only when the never-registered free blocks run out; they count as free, so
cached blocks are always evicted before a running sequence is preempted.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence

ROOT = -1  # the parent serial of a sequence's first block


class NoFreeBlocksError(RuntimeError):
    """The pool has fewer free blocks than a growth needs."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(eq=False)
class CachedBlock:
    """A registered full block: its key and one physical block per kept layer of its shape."""

    key: tuple[int, int, tuple[int, ...]]  # (parent serial, cache key, tokens)
    serial: int  # unique for the pool's lifetime: a child's key names its parent by it
    blocks: tuple[int, ...]


class BlockManager:
    """Hands out reference-counted physical block ids; finds and keeps cached prefix blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # A min-heap hands out the lowest free ids first, so a sequence's consecutive logical
        # blocks are often consecutive physical ones and the engine can use views, not gathers.
        self._free: list[int] = list(range(num_blocks))  # unregistered, held by no one
        self._refs = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, held by no one
        self._entry_of: dict[int, CachedBlock] = {}  # physical block -> its registered entry
        self._cache: dict[tuple[int, int, tuple[int, ...]], CachedBlock] = {}
        self._serials = itertools.count()
        self.copies: list[tuple[int, int]] = []  # (src, dst) blocks to copy before the next run
        self.queried_tokens = 0  # prompt tokens of admitted sequences looked up in the cache
        self.hit_tokens = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Physical blocks that belong to a registered entry."""
        return len(self._entry_of)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by sequences."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, num_layers: int, num_tokens: int) -> int:
        """Blocks that `num_tokens` tokens take in `num_layers` layers."""
        return num_layers * cdiv(num_tokens, self.block_size)

    # -- growth and copy-on-write --------------------------------------------------------------

    def blocks_to_grow(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks needed so seq's cache covers `num_tokens` tokens in every kept layer.

        New blocks, plus a copy of every shared block the tokens from `num_computed_tokens` on
        would be written into.
        """
        held = len(seq.block_table[0]) if seq.block_table else 0
        new = len(seq.layers) * max(0, cdiv(num_tokens, self.block_size) - held)
        return new + sum(self._refs[b] > 1 for b in self._written_blocks(seq, num_tokens))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_to_grow(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Allocate so seq covers `num_tokens` tokens, copying the shared blocks it will write.

        Allocates nothing if the pool is short.
        """
        need = self.blocks_to_grow(seq, num_tokens)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"{seq.seq_id!r} needs {need} blocks, {self.num_free_blocks} free"
            )
        if need == 0 and seq.block_table:
            self._unregister_written(seq, num_tokens)
            return
        if not seq.block_table:
            seq.block_table = [[] for _ in seq.layers]
        self._copy_on_write(seq, num_tokens)
        self._unregister_written(seq, num_tokens)
        held = len(seq.block_table[0])
        per_layer = max(0, cdiv(num_tokens, self.block_size) - held)
        if per_layer:
            ids = [self._allocate() for _ in range(per_layer * len(seq.layers))]
            for pos, table in enumerate(seq.block_table):
                table.extend(ids[pos * per_layer : (pos + 1) * per_layer])

    def _written_blocks(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Physical blocks seq holds that its tokens [num_computed_tokens, num_tokens) land in."""
        if not seq.block_table:
            return []
        held = len(seq.block_table[0])
        first = seq.num_computed_tokens // self.block_size
        stop = min(held, cdiv(num_tokens, self.block_size))
        return [b for table in seq.block_table for b in table[first:stop]]

    def _copy_on_write(self, seq: Sequence, num_tokens: int) -> None:
        held = len(seq.block_table[0])
        first = seq.num_computed_tokens // self.block_size
        stop = min(held, cdiv(num_tokens, self.block_size))
        for table in seq.block_table:
            for i in range(first, stop):
                if self._refs[table[i]] > 1:
                    new = self._allocate()
                    self.copies.append((table[i], new))
                    self._release(table[i])
                    table[i] = new
        del seq.cached_chain[first:]

    def _unregister_written(self, seq: Sequence, num_tokens: int) -> None:
        """A registered block seq alone holds and rewrites leaves the cache (it stays seq's)."""
        first = seq.num_computed_tokens // self.block_size
        for b in self._written_blocks(seq, num_tokens):
            if b in self._entry_of:
                self._unregister(self._entry_of[b])
                del seq.cached_chain[first:]

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies grow() made since the last call; the caller applies them."""
        copies, self.copies = self.copies, []
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give `child` the parent's blocks (shared, reference-counted) and cached chain."""
        if child.block_table:
            raise ValueError(f"{child.seq_id!r} already holds blocks")
        if child.layers != parent.layers:
            raise ValueError(f"{child.seq_id!r} must keep the parent's layers {parent.layers}")
        child.block_table = [list(table) for table in parent.block_table]
        for table in child.block_table:
            for b in table:
                self._refs[b] += 1
        child.cached_chain = list(parent.cached_chain)

    # -- prefix cache ----------------------------------------------------------------------------

    def match(self, seq: Sequence) -> list[CachedBlock]:
        """The longest chain of registered blocks that covers seq's tokens before its last one."""
        # a sequence that must compute its whole prompt (prompt log-probs) finds nothing
        if not self.enable_caching or seq.cache_key is None or seq.skip_reading_prefix_cache:
            return []
        tokens, size, hits = seq.all_token_ids, self.block_size, []
        parent = ROOT
        for i in range((len(tokens) - 1) // size):
            key = (parent, seq.cache_key, tuple(tokens[i * size : (i + 1) * size]))
            entry = self._cache.get(key)
            if entry is None or len(entry.blocks) != len(seq.layers):
                break
            hits.append(entry)
            parent = entry.serial
        return hits

    def blocks_to_admit(self, seq: Sequence, hits: list[CachedBlock], num_tokens: int) -> int:
        """Free blocks that admitting seq with `hits` and growing it to `num_tokens` takes."""
        revived = sum(self._refs[b] == 0 for entry in hits for b in entry.blocks)
        new = len(seq.layers) * max(0, cdiv(num_tokens, self.block_size) - len(hits))
        return revived + new

    def admit(self, seq: Sequence, hits: list[CachedBlock]) -> int:
        """Give a blockless seq the cached blocks `hits`; returns the tokens they cover."""
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"{seq.seq_id!r} already has cached tokens")
        seq.block_table = [[] for _ in seq.layers]
        for entry in hits:
            for table, b in zip(seq.block_table, entry.blocks, strict=True):
                self._take(b)
                table.append(b)
        seq.cached_chain = list(hits)
        cached = len(hits) * self.block_size
        seq.num_computed_tokens = cached
        if self.enable_caching and seq.cache_key is not None and not seq.skip_reading_prefix_cache:
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += cached
        return cached

    def cache_blocks(self, seq: Sequence) -> None:
        """Register seq's computed full blocks that are not registered yet."""
        if not self.enable_caching or seq.cache_key is None or not seq.block_table:
            return
        size, chain = self.block_size, seq.cached_chain
        full = min(seq.num_computed_tokens // size, len(seq.block_table[0]))
        if len(chain) >= full:
            return
        tokens = seq.all_token_ids
        for i in range(len(chain), full):
            parent = chain[-1].serial if chain else ROOT
            key = (parent, seq.cache_key, tuple(tokens[i * size : (i + 1) * size]))
            entry = self._cache.get(key)
            blocks = tuple(table[i] for table in seq.block_table)
            if entry is None and not any(b in self._entry_of for b in blocks):
                entry = CachedBlock(key, next(self._serials), blocks)
                self._cache[key] = entry
                for b in blocks:
                    self._entry_of[b] = entry
            if entry is None:
                return  # a block of seq already belongs to another entry: leave the chain here
            chain.append(entry)  # another sequence computed the same block: keep its serial

    def reset_cache(self) -> None:
        """Forget every registered block (those no one holds become plain free blocks)."""
        for entry in list(self._cache.values()):
            self._unregister(entry)

    # -- release ---------------------------------------------------------------------------------

    def free(self, seq: Sequence) -> None:
        """Drop seq's hold on all its blocks and clear its block table; idempotent."""
        for table in seq.block_table:
            # the tail first, so the blocks least likely to be shared are evicted first
            for b in reversed(table):
                self._release(b)
        seq.block_table = []
        seq.cached_chain = []

    def drop_layers(self, seq: Sequence, layers: tuple[int, ...]) -> None:
        """Shrink seq's kept layers to `layers`, releasing the dropped layers' blocks."""
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
                    for b in reversed(table):
                        self._release(b)
            seq.block_table = kept_tables
            seq.cached_chain = []  # its blocks no longer match any entry's layers
            if len(keep) < len(seq.layers):
                seq.cache_key = None
        seq.layers = tuple(layer for layer in seq.layers if layer in keep)

    def slot(self, seq: Sequence, layer_pos: int, token_index: int) -> int:
        """Cache slot of a token in seq's `layer_pos`-th kept layer."""
        block = seq.block_table[layer_pos][token_index // self.block_size]
        return block * self.block_size + token_index % self.block_size

    # -- one physical block ----------------------------------------------------------------------

    def _allocate(self) -> int:
        """A block for new K/V: a never-registered one first, else evict the LRU cached one."""
        if not self._free:
            victim, _ = self._evictable.popitem(last=False)
            self._unregister(self._entry_of[victim])
            heapq.heappush(self._free, victim)
        b = heapq.heappop(self._free)
        assert self._refs[b] == 0, f"block {b} handed out twice"
        self._refs[b] = 1
        return b

    def _take(self, b: int) -> None:
        """Hold a registered block, reviving it if no one held it."""
        if self._refs[b] == 0:
            del self._evictable[b]
        self._refs[b] += 1

    def _release(self, b: int) -> None:
        assert 0 <= b < self.num_blocks and self._refs[b] > 0, f"block {b} is not allocated"
        self._refs[b] -= 1
        if self._refs[b] == 0:
            if b in self._entry_of:
                self._evictable[b] = None
            else:
                heapq.heappush(self._free, b)

    def _unregister(self, entry: CachedBlock) -> None:
        """Remove an entry from the cache; its blocks no one holds become plain free blocks."""
        del self._cache[entry.key]
        for b in entry.blocks:
            del self._entry_of[b]
            if b in self._evictable:
                del self._evictable[b]
                heapq.heappush(self._free, b)
