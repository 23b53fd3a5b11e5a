"""The preallocated KV tensor and the per-request view of the block pool.

:func:`allocate_kv_cache` sizes one tensor ``[2, layers, blocks, block_size, Hkv, D]`` from a
byte budget (CPU) or a fraction of free GPU memory. :class:`KVCacheManager` maps each sequence to
its block table, reuses cached prefix blocks on admission, and registers blocks as they fill.
"""

from __future__ import annotations

import torch

from llm_engine.block_pool import BlockPool, chain_hash
from llm_engine.sequence import Sequence


def num_blocks_for_budget(budget_bytes: int, num_layers: int, block_shape: tuple[int, ...],
                          dtype: torch.dtype) -> int:
    """How many blocks (K and V for every layer) fit in ``budget_bytes``."""
    per = 2 * num_layers * torch.Size(block_shape).numel() * torch.empty((), dtype=dtype).element_size()
    return max(budget_bytes // per, 0)


def allocate_kv_cache(num_blocks: int, num_layers: int, block_shape: tuple[int, ...],
                      dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One contiguous pool; ``cache[0, l]``/``cache[1, l]`` are layer ``l``'s K and V blocks."""
    return torch.zeros((2, num_layers, num_blocks, *block_shape), dtype=dtype, device=device)


class KVCacheManager:
    """Block tables for sequences on top of a :class:`BlockPool`."""

    def __init__(self, pool: BlockPool, block_size: int):
        self.pool, self.block_size = pool, block_size

    def admit_cached_prefix(self, seq: Sequence) -> None:
        """On first scheduling, reuse cached full blocks of the prompt (never the whole prompt:
        the last token must be computed to produce logits)."""
        bs = self.block_size
        toks = seq.all_token_ids
        limit = min(len(toks) - 1, seq.cache_limit) // bs
        parent, blocks = None, []
        for i in range(limit):
            h = chain_hash(parent, toks[i * bs:(i + 1) * bs])
            b = self.pool.lookup(h)
            if b is None:
                break
            blocks.append(b)
            seq.block_hashes.append(h)
            parent = h
        if blocks:
            self.pool.touch(blocks)
            seq.block_table.extend(blocks)
            seq.num_computed_tokens = len(blocks) * bs
            seq.num_cached_tokens = seq.num_computed_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks still needed to hold ``num_new_tokens`` more tokens (0 if none)."""
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(need - len(seq.block_table), 0)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        n = self.can_allocate(seq, num_new_tokens)
        if n > self.pool.num_free:
            return False
        if n:
            seq.block_table.extend(self.pool.allocate(n))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register hashes for blocks that became full of computed tokens."""
        if not self.pool.enable_caching:
            return
        bs, toks = self.block_size, seq.all_token_ids
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = chain_hash(parent, toks[i * bs:(i + 1) * bs])
            seq.block_hashes.append(h)
            self.pool.register(seq.block_table[i], h)

    def free(self, seq: Sequence) -> None:
        """Release all of the sequence's blocks at once (finish, cancel or preemption)."""
        self.pool.release(reversed(seq.block_table))
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
