"""The metadata record of one step's attention: where its query tokens and their keys live.

Its own module so that the back ends (``reference``, ``triton_kernels``) and the package that
dispatches to them all import it from below, never from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Where a step's tokens live. ``T`` flat query tokens across ``B`` sequences."""

    slot_mapping: torch.Tensor  # [T] int64: block * block_size + offset where each token's K/V goes
    query_start_loc: torch.Tensor  # [B+1] int32: prefix sums of query lengths
    seq_lens: torch.Tensor  # [B] int32: context length incl. this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32 (padded with 0)
    max_query_len: int
    max_seq_len: int
    # Tensors a back end derives from the above once per step and reuses in every layer.
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
