"""Ranking inside the engine: a scoring call is a prefill-only work item on the shared scheduler.

A call (one context, many candidates) runs in two phases on the engine's own scheduler and KV
pool, beside whatever generation is in flight:

1. the shared context runs as one prefill-only sequence; its full blocks are registered in the
   prefix cache and stay referenced until the call ends, so no eviction can take them. Its last
   row predicts every candidate's first token, so those boundary log-probs are read right there,
   once (the prefix cache never hides that position: the context sequence always computes at
   least its last token, even when a previous call cached the rest);
2. every candidate enters the waiting queue with the same priority and arrival (so the batch
   former packs them into the same steps), is admitted with the cached context blocks, and runs
   only the candidate itself: the context's last partial block is registered for token-granular
   reuse once the context is done (it writes no more into it), so each candidate copies those
   tokens' K/V (with ``enable_partial_block_reuse``; without it, it computes them again).

In each step the hidden rows of scored positions are gathered across all candidates and turned
into log-probs of only the wanted token ids (:func:`llm_engine.scoring.gather_logprobs`, in
chunks); sequences finish when their prefill completes, without a decode step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence as Seq

import torch

from llm_engine.sampling_params import SamplingParams
from llm_engine.scoring import (
    ScoreResult,
    ScoringError,
    ScoringItem,
    ScoringOptions,
    gather_logprobs,
    plan,
    ranking_of,
    reduce_scores,
)
from llm_engine.sequence import Sequence, SeqStatus

if TYPE_CHECKING:
    from llm_engine.model_runner import StepInputs
    from llm_engine.scheduler import SchedulerOutput
    from llm_engine.step import EngineCore

log = logging.getLogger(__name__)

ScoreCallback = Callable[[ScoreResult | Exception], None]


def plan_request(options: ScoringOptions, context: str, candidates: list[str],
                 encode: Callable[[str], list[int]], bos_id: int | None) -> list[ScoringItem]:
    """Tokenised scoring items for one ranking request (see :func:`llm_engine.scoring.plan`)."""
    return plan(options, context, candidates, encode, bos_id)


@dataclass
class ScoreTask:
    """Attached to a prefill-only sequence: which of its positions to read, and into where."""

    call: "_Call"
    index: int  # candidate index; -1 for the shared-context sequence
    positions: list[int] = field(default_factory=list)  # positions read in this sequence
    slots: list[int] = field(default_factory=list)  # the matching rows of the candidate's targets
    targets: list[list[int]] = field(default_factory=list)


@dataclass
class _Call:
    request_id: str
    items: list[ScoringItem]
    options: ScoringOptions
    callback: ScoreCallback
    priority: int
    arrival: float
    logprobs: list[torch.Tensor]  # per candidate [num_targets, K], filled as steps run
    prefix: Sequence | None = None
    boundary: list[tuple[int, int]] = field(default_factory=list)  # (candidate, slot) read off the context
    pending: set[int] = field(default_factory=set)
    seqs: dict[int, Sequence] = field(default_factory=dict)
    cached_tokens: int = 0
    context_cached_tokens: int = 0


class ScoringManager:
    """The engine's scoring work items; the engine calls :meth:`collect` and :meth:`after_step`."""

    def __init__(self, engine: EngineCore, max_chunk_elements: int = 1 << 24) -> None:
        self.engine = engine
        self.max_chunk_elements = max_chunk_elements
        self.calls: dict[str, _Call] = {}
        self._new_prefix_done: list[_Call] = []

    @property
    def active(self) -> bool:
        return bool(self.calls)

    # submission ----------------------------------------------------------------------------
    def submit(self, request_id: str, items: Seq[ScoringItem], options: ScoringOptions,
               callback: ScoreCallback, priority: int = 0) -> None:
        if request_id in self.calls:
            raise ScoringError(f"duplicate scoring request id {request_id!r}")
        if not items:
            raise ScoringError("no candidates")
        vocab = self.engine.model.config.vocab_size
        longest = max(len(it.token_ids) for it in items)
        if longest > self.engine.max_model_len:
            raise ScoringError(f"a candidate sequence of {longest} tokens exceeds max_model_len={self.engine.max_model_len}")
        for it in items:
            if min(it.token_ids) < 0 or max(it.token_ids) >= vocab or max(max(t) for t in it.target_ids) >= vocab:
                raise ScoringError(f"token ids must be in [0, {vocab})")
        width = len(items[0].target_ids[0])
        call = _Call(request_id, list(items), options, callback, priority, time.monotonic(),
                     [torch.full((it.num_targets, width), float("nan")) for it in items])
        self.calls[request_id] = call
        shared = min(it.prefix_len for it in items)
        if self.engine.config.enable_prefix_caching and shared >= self.engine.config.block_size:
            prefix = Sequence(f"{request_id}/prefix", items[0].token_ids[:shared], SamplingParams(max_tokens=1),
                              priority=priority, arrival=call.arrival)
            call.boundary = [(i, j) for i, it in enumerate(items) for j, p in enumerate(it.target_positions)
                             if p == shared - 1]
            prefix.score = ScoreTask(call, -1, [shared - 1] if call.boundary else [], [], [])
            call.prefix = prefix
            self.engine.scheduler.add(prefix)
        else:
            self._admit_candidates(call)

    def _admit_candidates(self, call: _Call) -> None:
        done = set(call.boundary)
        for i, it in enumerate(call.items):
            keep = [j for j in range(it.num_targets) if (i, j) not in done]
            if not keep:  # everything it needs was read off the context's last row
                continue
            seq = Sequence(f"{call.request_id}/{i}", list(it.token_ids), SamplingParams(max_tokens=1),
                           priority=call.priority, arrival=call.arrival)
            seq.score = ScoreTask(call, i, [it.target_positions[j] for j in keep], keep,
                                  [list(it.target_ids[j]) for j in keep])
            seq.cache_limit = min(seq.score.positions)
            call.seqs[i] = seq
            call.pending.add(i)
            self.engine.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Cancel a call: its queued and running sequences go, their blocks return at once."""
        call = self.calls.pop(request_id, None)
        if call is None:
            return
        for seq in list(call.seqs.values()) + ([call.prefix] if call.prefix is not None else []):
            if not seq.is_finished:
                self.engine.scheduler.abort(seq)
            else:
                self.engine.kv.free(seq)

    # per step ------------------------------------------------------------------------------
    def collect(self, sched: SchedulerOutput, hidden: torch.Tensor, inp: StepInputs) -> None:
        """Gathers log-probs at the scored positions of every scoring chunk in this step (one
        chunked projection for all of them)."""
        rows, targets, owners, counts = [], [], [], []
        for i, s in enumerate(sched.scheduled):
            task: ScoreTask | None = s.seq.score
            if task is None:
                continue
            lo, hi = s.start, s.start + s.num_tokens
            base = inp.row_start[i] - lo
            if task.index < 0:
                if task.positions and lo <= task.positions[0] < hi:
                    # The context's last row: one row, all candidates' first tokens as targets.
                    call = task.call
                    rows.append(base + task.positions[0])
                    targets.append([t for c, j in call.boundary for t in call.items[c].target_ids[j]])
                    owners.append((task, None))
                    counts.append(1)
                continue
            sel = [k for k, p in enumerate(task.positions) if lo <= p < hi]
            if not sel:
                continue
            rows.extend(base + task.positions[k] for k in sel)
            targets.extend(task.targets[k] for k in sel)
            owners.append((task, sel))
            counts.append(len(sel))
        if not rows:
            return
        h = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        width = max(len(t) for t in targets)
        tgt = torch.tensor([t + [t[0]] * (width - len(t)) for t in targets], device=hidden.device)
        head = self.engine.model.lm_head
        lp = gather_logprobs(h, head.weight, tgt, bias=head.bias, max_chunk_elements=self.max_chunk_elements).cpu()
        for (task, sel), part in zip(owners, torch.split(lp, counts)):
            call = task.call
            if sel is None:
                k = call.logprobs[0].shape[1]
                values = part[0, : len(call.boundary) * k].view(len(call.boundary), k)
                for (c, j), v in zip(call.boundary, values):
                    call.logprobs[c][j] = v
                continue
            out = call.logprobs[task.index]
            k = out.shape[1]
            out[torch.tensor([task.slots[x] for x in sel])] = part[:, :k]

    def after_step(self, sched: SchedulerOutput) -> None:
        """Retires scoring sequences whose prefill completed; starts phase 2; answers calls."""
        for s in sched.scheduled:
            task: ScoreTask | None = s.seq.score
            if task is None or not s.samples:
                continue
            seq, call = s.seq, task.call
            if task.index < 0:
                # Prefix computed: register its blocks, keep them referenced, admit candidates.
                call.context_cached_tokens = seq.num_cached_tokens
                self.engine.kv.cache_full_blocks(seq)
                self.engine.kv.cache_last_block(seq)
                self.engine.scheduler.running.remove(seq)
                if call.request_id in self.calls:
                    self._admit_candidates(call)
                    if not call.pending:
                        self._answer(call)
                continue
            call.cached_tokens += seq.num_cached_tokens
            self.engine.scheduler.finish(seq)
            call.pending.discard(task.index)
            if not call.pending and call.request_id in self.calls:
                self._answer(call)

    def _answer(self, call: _Call) -> None:
        del self.calls[call.request_id]
        if call.prefix is not None:
            self.engine.kv.free(call.prefix)
            call.prefix.status = SeqStatus.FINISHED
        try:
            n = len(call.items)
            lp = torch.cat(call.logprobs)
            if torch.isnan(lp).any():
                raise RuntimeError("internal error: a scored position was never computed")
            seg = torch.repeat_interleave(torch.arange(n), torch.tensor([it.num_targets for it in call.items]))
            scores = reduce_scores(lp, seg, n, call.options)
            per_item = torch.split(lp[:, 0], [it.num_targets for it in call.items])
            result: ScoreResult | Exception = ScoreResult(
                scores=scores.tolist(), ranking=ranking_of(scores), token_logprobs=[p.tolist() for p in per_item],
                prompt_tokens=sum(len(it.token_ids) for it in call.items), cached_tokens=call.cached_tokens,
                context_tokens=len(call.prefix.prompt_token_ids) if call.prefix is not None else 0,
                context_cached_tokens=call.context_cached_tokens)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            result = exc
        call.callback(result)


def score_sync(engine, items: Seq[ScoringItem], options: ScoringOptions, request_id: str = "score") -> ScoreResult:  # noqa: ANN001
    """Runs one scoring call to completion on ``engine`` (offline use and benchmarks)."""
    box: list[ScoreResult | Exception] = []
    engine.scoring.submit(request_id, items, options, box.append)
    while not box:
        engine.step()
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]
