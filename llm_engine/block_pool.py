"""Refcounted pool of fixed-size KV blocks with prefix caching and O(1) LRU eviction.

The pool hands out block *ids*; what a block holds (its tensor shape) is the caller's business,
so the same pool serves the LLM KV cache and any other paged store. A full block is indexed by a
chain digest over its tokens and its parent's digest (:mod:`llm_engine.prefix_hash`), so equal
prefixes map to equal digests. Blocks whose refcount drops to zero go to the tail of an ordered
free list but keep their content: a later request with the same prefix can revive them, and they
are evicted (forgotten) only when popped from the head for a new allocation, i.e. least recently
freed first.

A digest is only an index key, never trusted: each cached block also keeps its token bytes and
the *content id* of its parent, and :meth:`BlockPool.match` hands a block out only if both equal
the request's. Content ids are handed out once and never reused, and two blocks share one only if
their tokens and parents' ids are equal, so by induction over the chain a match means the whole
prefix is equal, token for token, in the same namespace, whatever the hasher (a colliding digest
is a counted miss, ``mismatches``, not someone else's KV).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from llm_engine.prefix_hash import BlockHash, BlockHasher, PrefixHasher, token_bytes

logger = logging.getLogger(__name__)
_DEFAULT_HASHER = PrefixHasher()


def chain_hash(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """Digest of a full block given its parent's (``None``: the first block), default namespace."""
    return _DEFAULT_HASHER(_DEFAULT_HASHER.root if parent is None else parent, token_bytes(tokens))


class BlockPool:
    """Block ids ``0..num_blocks-1`` with refcounts, a verified digest index and an LRU free list.

    ``block_hasher`` makes the digests (default: blake2b in the empty namespace; an engine passes
    one for its model, :meth:`PrefixHasher.for_model`). ``hits``/``queries`` count verified
    prefix matches, ``mismatches`` the index hits refused because the content differed.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True, block_hasher: BlockHasher | None = None):
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.block_hasher: BlockHasher = block_hasher if block_hasher is not None else _DEFAULT_HASHER
        self.ref_cnt = [0] * num_blocks
        # Per cached block: its digest, token bytes, parent's content id (or the hasher's root for
        # a first block) and its own content id; all None while the block caches nothing.
        self.block_hash: list[BlockHash | None] = [None] * num_blocks
        self.block_tokens: list[bytes | None] = [None] * num_blocks
        self.block_parent: list[int | bytes | None] = [None] * num_blocks
        self.content_id: list[int | None] = [None] * num_blocks
        self._next_content_id = 0
        self.cached: dict[BlockHash, int] = {}  # digest -> block id
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.peak_used = 0
        self.hits = self.queries = self.mismatches = 0

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
                self.block_hash[b] = self.block_tokens[b] = self.block_parent[b] = self.content_id[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def _parent_key(self, parent: int | None) -> int | bytes | None:
        return self.block_hasher.root if parent is None else self.content_id[parent]

    def lookup(self, h: BlockHash) -> int | None:
        """The block indexed under digest ``h``, unverified (inspection); reuse goes through :meth:`match`."""
        return self.cached.get(h) if self.enable_caching else None

    def match(self, h: BlockHash, tokens: bytes, parent: int | None) -> int | None:
        """The cached block holding exactly ``tokens`` after the prefix that ends in block
        ``parent`` (``None``: at the start), looked up by its digest ``h``; ``None`` on a miss."""
        self.queries += 1
        b = self.cached.get(h) if self.enable_caching else None
        if b is not None and (self.block_tokens[b] != tokens or self.block_parent[b] != self._parent_key(parent)):
            self.mismatches += 1
            if self.mismatches & (self.mismatches - 1) == 0:  # 1st, 2nd, 4th, ...: visible, never a flood
                logger.warning("prefix cache: %d digest hits refused, content differed (colliding hasher?)",
                               self.mismatches)
            b = None
        self.hits += b is not None
        return b

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks (reviving them from the free list if unreferenced)."""
        for b in blocks:
            if self.ref_cnt[b] == 0:
                del self.free[b]
            self.ref_cnt[b] += 1
        self.peak_used = max(self.peak_used, self.num_used)

    def register(self, block: int, h: BlockHash, tokens: bytes = b"", parent: int | None = None) -> None:
        """Record that ``block`` now holds the full block with digest ``h`` and token bytes
        ``tokens``, following the cached block ``parent`` (``None``: it is a first block)."""
        if not self.enable_caching or self.block_hash[block] is not None:
            return
        pkey = self._parent_key(parent)
        if pkey is None:  # the parent caches nothing, so this block's prefix could not be verified
            return
        other = self.cached.get(h)
        if other is not None and self.block_tokens[other] == tokens and self.block_parent[other] == pkey:
            cid = self.content_id[other]  # same content computed twice: children of either chain on
        else:
            cid, self._next_content_id = self._next_content_id, self._next_content_id + 1
            if other is None:
                self.cached[h] = block
            # else: a colliding digest; the indexed block keeps the slot and this one stays unindexed
        self.block_hash[block], self.block_tokens[block] = h, tokens
        self.block_parent[block], self.content_id[block] = pkey, cid

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
