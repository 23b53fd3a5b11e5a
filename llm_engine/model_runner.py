"""Executes a :class:`SchedulerOutput`: builds flat inputs and paged metadata, runs the model.

``execute`` returns hidden states for all scheduled tokens and the row index of each sequence's
last token, so callers choose which rows to project to logits: the last rows for sampling, every
prompt row for prompt log-probs, arbitrary rows for scoring or draft verification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llm_engine.attention import AttentionMetadata
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
    """Owns the model and the KV tensor; stateless between steps."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor, block_size: int, backend: str):
        self.model, self.kv_cache, self.block_size, self.backend = model, kv_cache, block_size, backend
        self.device = kv_cache.device
        layers = kv_cache.shape[1]
        self.kv_layers = [(kv_cache[0, i], kv_cache[1, i]) for i in range(layers)]

    def prepare(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids, pos, slots, qlens, seq_lens, tables = [], [], [], [], [], []
        for s in out.scheduled:
            p = np.arange(s.start, s.start + s.num_tokens)
            bt = np.asarray(s.seq.block_table, dtype=np.int64)
            ids.append(np.asarray(s.seq.all_token_ids[s.start:s.start + s.num_tokens], dtype=np.int64))
            pos.append(p)
            slots.append(bt[p // bs] * bs + p % bs)
            qlens.append(s.num_tokens)
            seq_lens.append(s.start + s.num_tokens)
            tables.append(bt)
        width = max(len(t) for t in tables)
        table = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            table[i, :len(t)] = t
        qsl = np.zeros(len(qlens) + 1, dtype=np.int32)
        np.cumsum(qlens, out=qsl[1:])
        d = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(d),
            query_start_loc=torch.from_numpy(qsl).to(d),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=d),
            block_tables=torch.from_numpy(table).to(d),
            max_query_len=max(qlens), max_seq_len=max(seq_lens))
        return StepInputs(torch.from_numpy(np.concatenate(ids)).to(d), torch.from_numpy(np.concatenate(pos)).to(d),
                          meta, torch.from_numpy(qsl[1:] - 1).long().to(d), qsl[:-1].tolist())

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> tuple[torch.Tensor, StepInputs]:
        """Run the step; returns hidden states ``[T, hidden]`` and the inputs used."""
        inp = self.prepare(out)
        ctx = ForwardContext(inp.meta, self.kv_layers, self.backend)
        return self.model(inp.input_ids, inp.positions, ctx), inp

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden.index_select(0, rows))
