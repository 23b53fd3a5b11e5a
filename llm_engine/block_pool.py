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

Token-granular reuse (like a radix cache, inside one block): a sequence's last computed block,
partial or not, can be registered when the sequence will write no more into it
(:meth:`BlockPool.register_partial`); it keeps its tokens and its parent's content id but gets no
digest and no content id of its own, so nothing chains on it. Every cached block, full or partial,
is also indexed under (parent content id, first token), and :meth:`BlockPool.match_partial`
returns the one sharing the longest common token prefix with a request's next tokens, compared
byte by byte: the caller copies that many tokens' K/V into a block of its own, never sharing it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import islice

from llm_engine.prefix_hash import BlockHash, BlockHasher, PrefixHasher, token_bytes

logger = logging.getLogger(__name__)
_DEFAULT_HASHER = PrefixHasher()
_TOKEN = 4  # bytes per token in ``token_bytes``
_SCAN = 64  # most index entries compared per partial lookup (most recent first): an O(1) bound


def common_tokens(a: bytes, b: bytes) -> int:
    """How many leading tokens two ``token_bytes`` strings share."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n // _TOKEN
    k = 0
    while a[k:k + _TOKEN] == b[k:k + _TOKEN]:
        k += _TOKEN
    return k // _TOKEN


def chain_hash(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """Digest of a full block given its parent's (``None``: the first block), default namespace."""
    return _DEFAULT_HASHER(_DEFAULT_HASHER.root if parent is None else parent, token_bytes(tokens))


class BlockPool:
    """Block ids ``0..num_blocks-1`` with refcounts, a verified digest index and an LRU free list.

    ``block_hasher`` makes the digests (default: blake2b in the empty namespace; an engine passes
    one for its model, :meth:`PrefixHasher.for_model`). ``hits``/``queries`` count verified
    prefix matches, ``mismatches`` the index hits refused because the content differed;
    ``partial_hits``/``partial_tokens`` count token-granular matches and the tokens they cover.
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
        # Token-granular index of every cached block (full or partial), oldest first:
        # (parent content id or root, first token's bytes) -> block ids.
        self.children: dict[tuple[int | bytes, bytes], dict[int, None]] = {}
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.peak_used = 0
        self.hits = self.queries = self.mismatches = 0
        self.partial_hits = self.partial_tokens = 0

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
            if self.block_tokens[b] is not None:
                self._forget(b)
            self.ref_cnt[b] = 1
            out.append(b)
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def _forget(self, b: int) -> None:
        """Evict block ``b``'s cached content from both indexes."""
        h = self.block_hash[b]
        if h is not None and self.cached.get(h) == b:
            del self.cached[h]
        key = (self.block_parent[b], self.block_tokens[b][:_TOKEN])
        group = self.children.get(key)
        if group is not None:
            group.pop(b, None)
            if not group:
                del self.children[key]
        self.block_hash[b] = self.block_tokens[b] = self.block_parent[b] = self.content_id[b] = None

    def _index_child(self, b: int) -> None:
        tokens = self.block_tokens[b]
        if tokens:
            self.children.setdefault((self.block_parent[b], tokens[:_TOKEN]), {})[b] = None

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

    def match_partial(self, tokens: bytes, parent: int | None) -> tuple[int, int] | None:
        """The cached block (full or partial) after the prefix that ends in block ``parent``
        (``None``: at the start) whose tokens share the longest common prefix with ``tokens``,
        and that prefix's length in tokens (>= 1); ``None`` on a miss. The block is not
        referenced: the caller copies those tokens' K/V before anything can rewrite it."""
        pkey = self._parent_key(parent)
        if not self.enable_caching or pkey is None or not tokens:
            return None
        group = self.children.get((pkey, tokens[:_TOKEN]))
        best, best_k, want = -1, 0, len(tokens) // _TOKEN
        for b in islice(reversed(group or ()), _SCAN):
            if self.block_parent[b] != pkey:  # the index is a key, not trusted: checked again
                continue
            k = common_tokens(self.block_tokens[b], tokens)
            if k > best_k:
                best, best_k = b, k
                if k == want:
                    break
        if not best_k:
            return None
        self.partial_hits += 1
        self.partial_tokens += best_k
        return best, best_k

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
        if self.block_tokens[block] is not None:  # registered as partial, now full: index it anew
            self._forget(block)
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
        self._index_child(block)

    def register_partial(self, block: int, tokens: bytes, parent: int | None = None) -> None:
        """Make ``block``, holding the K/V of ``tokens`` (at most a block's worth) after the cached
        block ``parent`` (``None``: at the start), matchable token by token (:meth:`match_partial`).
        Only for a block its single owner writes no more into: later matches read it, unreferenced.
        It gets no digest and no content id, so no block chains on it."""
        if (not self.enable_caching or not tokens or self.block_tokens[block] is not None
                or self.ref_cnt[block] > 1):
            return
        pkey = self._parent_key(parent)
        if pkey is None:  # the parent caches nothing: the prefix could not be verified
            return
        self.block_tokens[block], self.block_parent[block] = tokens, pkey
        self._index_child(block)

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one reference each; pass tail blocks first so they are evicted before the prefix."""
        for b in blocks:
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] < 0:
                raise RuntimeError(f"block {b} released twice")
            if self.ref_cnt[b] == 0:
                if self.block_tokens[b] is None:
                    self.free[b] = None
                    self.free.move_to_end(b, last=False)  # uncached: reuse first
                else:
                    self.free[b] = None
