"""Executes a :class:`SchedulerOutput`: builds flat inputs and paged metadata, runs the model.

``execute`` returns hidden states for all scheduled tokens and the row index of each sequence's
last token, so callers choose which rows to project to logits: the last rows for sampling, every
prompt row for prompt log-probs, arbitrary rows for scoring or draft verification.
``swap`` makes a step's KV copies between the pool and the host swap area (swap preemption) and
the token copies between pool blocks of partial prefix reuse;
pure-decode steps go through :class:`~llm_engine.decode_graphs.PaddedDecode` when it is enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from llm_engine.attention import AttentionMetadata
from llm_engine.config import AttentionBackend
from llm_engine.decode_graphs import PaddedDecode, StepFn
from llm_engine.kv_cache import BlockTableArray
from llm_engine.model.llama import ForwardContext, LlamaForCausalLM
from llm_engine.scheduler import SchedulerOutput


@dataclass
class StepInputs:
    """Flat token ids, positions and attention metadata of one step."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    last_rows: torch.Tensor  # [B] row of each sequence's last scheduled token
    row_start: list[int]  # first row of each sequence


class ModelRunner:
    """Owns the model, the KV tensor and the host swap area (same layout, ``None`` unless swap
    preemption is on); reads block tables from the KV manager's array."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, backend: AttentionBackend,
                 block_tables: BlockTableArray, swap_area: torch.Tensor | None = None):
        self.model, self.kv_cache, self.block_size, self.backend = model, kv_cache, block_size, backend
        self.block_tables = block_tables
        self.swap_area = swap_area
        self.device = kv_cache.device
        layers = kv_cache.shape[1]
        self.kv_layers = [(kv_cache[0, i], kv_cache[1, i]) for i in range(layers)]
        self.decode: PaddedDecode | None = None

    def enable_padded_decode(self, scratch_block: int, max_batch: int, max_blocks: int,
                             make_step: Callable[[StepFn], StepFn]) -> None:
        """Route decode steps of up to ``max_batch`` sequences through :class:`PaddedDecode`;
        ``scratch_block`` must be a pool block no sequence will ever own."""
        self.decode = PaddedDecode(self.model, self.kv_layers, self.backend, self.block_size, scratch_block,
                                   max_batch, max_blocks, make_step)

    @torch.inference_mode()
    def swap(self, out: SchedulerOutput) -> None:
        """Swap-outs (pool -> host), then token copies (pool -> pool), then swap-ins (host -> pool):
        one gather and one scatter each. The copies are synchronous, so this step's forward may
        reuse the blocks a swap-out freed. The gathered temporaries are pageable memory, so pinning
        the area buys little today; it is what a later asynchronous copy would need."""
        if out.blocks_to_swap_out:
            blocks, slots = (torch.tensor(x) for x in zip(*out.blocks_to_swap_out))
            self.swap_area.index_copy_(2, slots, self.kv_cache.index_select(2, blocks.to(self.device)).cpu())
        if out.blocks_to_copy:
            self.copy_tokens(out.blocks_to_copy)
        if out.blocks_to_swap_in:
            slots, blocks = (torch.tensor(x) for x in zip(*out.blocks_to_swap_in))
            self.kv_cache.index_copy_(2, blocks.to(self.device), self.swap_area.index_select(2, slots).to(self.device))

    @torch.inference_mode()
    def copy_tokens(self, copies: list[tuple[int, int, int]]) -> None:
        """For each ``(source, destination, k)``: the first ``k`` token slots of the source block
        (K and V, every layer) into the destination's. All reads come before all writes, so a
        destination may be another copy's source."""
        src, dst, k = (np.asarray(x, dtype=np.int64) for x in zip(*copies))
        offset = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        bs = self.block_size
        flat = self.kv_cache.flatten(2, 3)  # [2, layers, blocks * block_size, Hkv, D], a view
        index = (torch.from_numpy(np.repeat(src * bs, k) + offset).to(self.device),
                 torch.from_numpy(np.repeat(dst * bs, k) + offset).to(self.device))
        flat.index_copy_(2, index[1], flat.index_select(2, index[0]))

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        """Vectorised: one Python pass collects per-sequence scalars, NumPy derives the per-token
        arrays, and the step's block table is one gather from the KV manager's persistent array."""
        bs = self.block_size
        sched = out.scheduled
        ids: list[int] = []
        for s in sched:
            ids.extend(s.seq.token_slice(s.start, s.start + s.num_tokens))
        starts = np.fromiter((s.start for s in sched), dtype=np.int64, count=len(sched))
        qlens = np.fromiter((s.num_tokens for s in sched), dtype=np.int64, count=len(sched))
        rows = np.fromiter((s.seq.kv_row for s in sched), dtype=np.int64, count=len(sched))
        seq_lens = starts + qlens
        qsl = np.zeros(len(sched) + 1, dtype=np.int64)
        np.cumsum(qlens, out=qsl[1:])
        t = int(qsl[-1])
        if t == len(sched):  # decode only: one token per sequence
            pos, tok_rows = starts, rows
        else:
            pos = np.arange(t, dtype=np.int64) - np.repeat(qsl[:-1] - starts, qlens)
            tok_rows = np.repeat(rows, qlens)
        array = self.block_tables.array
        slots = array[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs
        width = int(-(-int(seq_lens.max()) // bs))
        table = array[rows, :width]
        d = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(d),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(d),
            seq_lens=torch.from_numpy(seq_lens.astype(np.int32)).to(d),
            block_tables=torch.from_numpy(table).to(d),
            max_query_len=int(qlens.max()), max_seq_len=int(seq_lens.max()))
        return StepInputs(torch.tensor(ids, dtype=torch.int64, device=d), torch.from_numpy(pos).to(d),
                          meta, torch.from_numpy(qsl[1:] - 1).to(d), qsl[:-1].tolist())

    @torch.inference_mode()
    def run(self, inp: StepInputs) -> torch.Tensor:
        """The model's forward over prepared inputs; returns hidden states ``[T, hidden]``."""
        if self.decode is not None and self.decode.fits(inp.meta):
            return self.decode.run(inp.input_ids, inp.positions, inp.meta)
        ctx = ForwardContext(inp.meta, self.kv_layers, self.backend)
        return self.model(inp.input_ids, inp.positions, ctx)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, StepInputs]:
        """Prepares and runs the step; returns hidden states ``[T, hidden]`` and the inputs used."""
        inp = self.prepare(out)
        return self.run(inp), inp

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden.index_select(0, rows))
