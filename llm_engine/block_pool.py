"""Refcounted pool of fixed-size KV blocks with prefix caching and O(1) LRU eviction.

The pool hands out block *ids*; what a block holds (its tensor shape) is the caller's business,
so the same pool serves the LLM KV cache and any other paged store. A full block is identified by
a chain hash over its tokens and its parent's hash, so equal prefixes map to equal hashes.
Blocks whose refcount drops to zero go to the tail of an ordered free list but keep their hash:
they can be revived by a later request with the same prefix, and are evicted (hash forgotten)
only when popped from the head for a new allocation, i.e. least recently freed first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full block given its parent's hash; deterministic across processes (ints only)."""
    return hash((parent if parent is not None else -1, tuple(tokens)))


class BlockPool:
    """Block ids ``0..num_blocks-1`` with refcounts, a hash index and an LRU free list."""

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.peak_used = 0
        self.hits = self.queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the LRU head, evicting their cached content; raises if short."""
        if n > len(self.free):
            raise MemoryError(f"need {n} KV blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            b, _ = self.free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def lookup(self, h: int) -> int | None:
        """The cached block holding content hash ``h``, if any."""
        self.queries += 1
        b = self.cached.get(h) if self.enable_caching else None
        self.hits += b is not None
        return b

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks (reviving them from the free list if unreferenced)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def register(self, block: int, h: int) -> None:
        """Record that ``block`` now holds the full block with hash ``h``."""
        if self.enable_caching and self.block_hash[block] is None:
            self.block_hash[block] = h
            self.cached.setdefault(h, block)

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference each; pass tail blocks first so they are evicted before the prefix."""
        for b in blocks:
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} released twice")
            if self.ref_cnt[b] == 0:
                if self.block_hash[b] is None:
                    self.free[b] = None
                    self.free.move_to_end(b, last=False)  # uncached: reuse first
                else:
                    self.free[b] = None
