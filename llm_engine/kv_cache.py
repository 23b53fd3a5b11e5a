"""The preallocated KV tensor and the per-request view of the block pool.

:func:`allocate_kv_cache` sizes one tensor ``[2, layers, blocks, block_size, Hkv, D]`` from a
byte budget (CPU) or a fraction of free GPU memory. :class:`KVCacheManager` maps each sequence to
its block table, reuses cached prefix blocks on admission, registers blocks as they fill, and
moves a preempted sequence's blocks to host swap slots and back (swap preemption).
Past the last cached full block, admission also reuses a token prefix of a cached block (the last,
partial block a finished sequence left, or a full block the request diverges inside): it takes a
fresh block and plans a copy of those tokens' K/V into it (:meth:`KVCacheManager.take_copies`,
made by the runner before the step's forward), so a block someone may read is never written.
Every live block table is mirrored in one :class:`BlockTableArray` row as blocks are appended, so
the runner gathers a step's ``[B, max_blocks]`` table with one index instead of rebuilding it
from Python lists every step.
"""

from __future__ import annotations

import numpy as np
import torch

from llm_engine.block_pool import BlockPool
from llm_engine.prefix_hash import token_bytes
from llm_engine.sequence import Sequence


def num_blocks_for_budget(budget_bytes: int, num_layers: int, block_shape: tuple[int, ...],
                          dtype: torch.dtype) -> int:
    """How many blocks (K and V for every layer) fit in ``budget_bytes``."""
    per = 2 * num_layers * torch.Size(block_shape).numel() * torch.empty((), dtype=dtype).element_size()
    return max(budget_bytes // per, 0)


def allocate_kv_cache(num_blocks: int, num_layers: int, block_shape: tuple[int, ...],
                      dtype: torch.dtype, device: torch.device | str, pin_memory: bool = False) -> torch.Tensor:
    """One contiguous pool; ``cache[0, l]``/``cache[1, l]`` are layer ``l``'s K and V blocks.
    The host swap area has the same layout; ``pin_memory`` page-locks it for copies to a GPU."""
    return torch.zeros((2, num_layers, num_blocks, *block_shape), dtype=dtype, device=device, pin_memory=pin_memory)


class BlockTableArray:
    """Block tables of live sequences as rows of one int32 array (padded with 0).

    Rows are handed out on a sequence's first block and returned when it frees its blocks; the
    array grows (rows or columns, doubling) when needed, so it never limits the scheduler.
    """

    def __init__(self, rows: int = 64, cols: int = 32):
        self.array = np.zeros((rows, cols), dtype=np.int32)
        self._free = list(range(rows - 1, -1, -1))

    def acquire(self) -> int:
        if not self._free:
            n = self.array.shape[0]
            self.array = np.concatenate([self.array, np.zeros_like(self.array)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()

    def release(self, row: int) -> None:
        self._free.append(row)

    def write(self, row: int, start: int, blocks: list[int]) -> None:
        """Set ``row[start:start + len(blocks)]``: the O(changes) update."""
        end = start + len(blocks)
        if end > self.array.shape[1]:
            cols = max(end, 2 * self.array.shape[1])
            grown = np.zeros((self.array.shape[0], cols), dtype=np.int32)
            grown[:, :self.array.shape[1]] = self.array
            self.array = grown
        self.array[row, start:end] = blocks


class KVCacheManager:
    """Block tables for sequences on top of a :class:`BlockPool`; ``host`` (a second pool, of
    slots in the runner's host swap area) is set when swap preemption is on; ``partial_reuse``
    turns on token-granular reuse of a cached block past the last full-block hit."""

    def __init__(self, pool: BlockPool, block_size: int, host: BlockPool | None = None, partial_reuse: bool = True):
        self.pool, self.block_size, self.host = pool, block_size, host
        self.partial_reuse = partial_reuse
        self.tables = BlockTableArray()
        self._copies: dict[Sequence, tuple[int, int, int]] = {}  # planned (source, own block, tokens)

    def _extend(self, seq: Sequence, blocks: list[int]) -> None:
        if seq.kv_row < 0:
            seq.kv_row = self.tables.acquire()
        self.tables.write(seq.kv_row, len(seq.block_table), blocks)
        seq.block_table.extend(blocks)

    def admit_cached_prefix(self, seq: Sequence) -> None:
        """On first scheduling, reuse cached full blocks of the prompt (never the whole prompt:
        the last token must be computed to produce logits). Each block is reused only if the
        pool verifies its tokens and its parent, so a colliding digest ends the reuse there.
        Then, with ``partial_reuse``, the cached block after them sharing the most leading tokens
        with the prompt's next ones lends those tokens' K/V: copied, see :meth:`take_copies`."""
        bs, hasher = self.block_size, self.pool.block_hasher
        toks = seq.all_token_ids
        cap = min(len(toks) - 1, seq.cache_limit)
        limit = cap // bs
        h, blocks = hasher.root, []
        for i in range(limit):
            data = token_bytes(toks[i * bs:(i + 1) * bs])
            h = hasher(h, data)
            b = self.pool.match(h, data, blocks[-1] if blocks else None)
            if b is None:
                break
            blocks.append(b)
            seq.block_hashes.append(h)
        if blocks:
            self.pool.touch(blocks)
            self._extend(seq, blocks)
        start = len(blocks) * bs
        if self.partial_reuse and cap > start and self.pool.num_free:
            hit = self.pool.match_partial(token_bytes(toks[start:min(start + bs, cap)]),
                                          blocks[-1] if blocks else None)
            if hit is not None:
                # The source is not referenced: nothing writes a pool block between this decision
                # and the copy at the start of the step (even if the source is allocated again in
                # between, or is the block allocated here: then the copy maps it onto itself).
                own = self.pool.allocate(1)
                self._extend(seq, own)
                self._copies[seq] = (hit[0], own[0], hit[1])
                start += hit[1]
        if start:
            seq.num_computed_tokens = seq.num_cached_tokens = start

    def take_copies(self) -> list[tuple[int, int, int]]:
        """The ``(source block, destination block, tokens)`` K/V copies planned by admissions
        since the last call; the runner makes them before the step's forward."""
        copies = list(self._copies.values())
        self._copies.clear()
        return copies

    def cache_last_block(self, seq: Sequence) -> None:
        """Make the sequence's last computed block matchable token by token, if the blocks before
        it are cached (so its prefix is verifiable). Only once it writes no more into that block:
        when it frees its blocks, or for a finished prefill-only context still held."""
        n = seq.num_computed_tokens
        if not self.partial_reuse or not self.pool.enable_caching or seq.swapped or n <= 0:
            return
        bs, i = self.block_size, (n - 1) // self.block_size
        if i >= len(seq.block_table):
            return
        parent = seq.block_table[i - 1] if i else None
        if parent is not None and self.pool.content_id[parent] is None:
            return
        self.pool.register_partial(seq.block_table[i], token_bytes(seq.token_slice(i * bs, n)), parent)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks still needed to hold ``num_new_tokens`` more tokens (0 if none)."""
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(need - len(seq.block_table), 0)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        n = self.can_allocate(seq, num_new_tokens)
        if n > self.pool.num_free:
            return False
        if n:
            self._extend(seq, self.pool.allocate(n))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register digests (and token bytes, for verified hits) of blocks that became full."""
        if not self.pool.enable_caching:
            return
        bs, hasher = self.block_size, self.pool.block_hasher
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):  # usually empty: O(1) per step
            data = token_bytes(seq.token_slice(i * bs, (i + 1) * bs))
            h = hasher(seq.block_hashes[-1] if seq.block_hashes else hasher.root, data)
            seq.block_hashes.append(h)
            self.pool.register(seq.block_table[i], h, data, seq.block_table[i - 1] if i else None)

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]] | None:
        """Take a preempted sequence's KV off the pool but keep it resumable; returns the
        ``(pool block, host slot)`` copies to make before the next forward, or ``None`` (nothing
        changed) when the host area is short, so the caller recomputes instead.

        Only blocks the sequence holds alone (refcount 1) are copied and released. A block with
        refcount > 1 is a full, hashed prefix block that other sequences also reference: releasing
        our reference would free no memory, and its content never changes while referenced. So the
        sequence keeps that reference, which costs no copy and no host slot, and the block is
        still valid at swap-in. ``num_computed_tokens``, the hashes and the block-table row stay.
        """
        idx = [i for i, b in enumerate(seq.block_table) if self.pool.ref_cnt[b] == 1]
        if self.host is None or len(idx) > self.host.num_free:
            return None
        slots = self.host.allocate(len(idx))
        moved = [seq.block_table[i] for i in idx]
        seq.swapped = list(zip(idx, slots))
        self.pool.release(reversed(moved))  # hashed ones stay revivable until evicted
        return list(zip(moved, slots))

    def swap_in(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Give a swapped-out sequence pool blocks again, for its swapped blocks and
        ``num_new_tokens`` more tokens; returns the ``(host slot, pool block)`` copies to make
        before the next forward, or ``None`` (nothing changed) when the pool is short."""
        n = len(seq.swapped)
        if n + self.can_allocate(seq, num_new_tokens) > self.pool.num_free:
            return None
        blocks = self.pool.allocate(n)
        for (i, _), b in zip(seq.swapped, blocks):
            seq.block_table[i] = b
            if i < len(seq.block_hashes):  # same content as before: it can serve prefix hits again
                data = token_bytes(seq.token_slice(i * self.block_size, (i + 1) * self.block_size))
                self.pool.register(b, seq.block_hashes[i], data, seq.block_table[i - 1] if i else None)
        if n:
            self.tables.array[seq.kv_row, [i for i, _ in seq.swapped]] = blocks
        slots = [h for _, h in seq.swapped]
        self.host.release(slots)
        seq.swapped.clear()
        self.allocate(seq, num_new_tokens)
        return list(zip(slots, blocks))

    def free(self, seq: Sequence) -> None:
        """Release all of the sequence's blocks at once (finish, cancel or preemption), and its
        host slots if it is swapped out. Its last computed block stays matchable
        (:meth:`cache_last_block`) unless its K/V copy was planned and never made."""
        if self._copies.pop(seq, None) is None:
            self.cache_last_block(seq)
        if seq.swapped:
            gone = {i for i, _ in seq.swapped}
            self.pool.release(b for i, b in reversed(list(enumerate(seq.block_table))) if i not in gone)
            self.host.release(h for _, h in seq.swapped)
            seq.swapped.clear()
        else:
            self.pool.release(reversed(seq.block_table))
        if seq.kv_row >= 0:
            self.tables.release(seq.kv_row)
            seq.kv_row = -1
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
