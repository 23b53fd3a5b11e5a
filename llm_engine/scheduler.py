"""Continuous-batching scheduler: decides, per step, which tokens of which requests run.

Policy (one step, token budget ``max_num_batched_tokens``):
1. running requests, decodes first, then prefill chunks in progress, each by (priority, arrival);
   when the pool is out of blocks, the lowest-priority newest running request is preempted:
   ``preemption_mode="recompute"`` frees its blocks and recomputes it later from prompt + output
   so far; ``"swap"`` copies its KV to the host swap area and back when it resumes (no recompute),
   falling back to recompute for a victim the swap area has no room for. Either gives identical
   output;
2. waiting requests in :class:`batching.BatchQueue` order (priority with ageing, then
   arrival) fill the remaining budget with (chunked) prefills, reusing cached prefix blocks (and
   a token prefix of the next cached block, copied into a block of their own), and swapped-out
   requests resume (swap-in).
The scheduler only decides; the result is a plain :class:`SchedulerOutput` the runner executes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from batching import BatchQueue, QueueItem, form_batch
from llm_engine.config import EngineConfig
from llm_engine.kv_cache import KVCacheManager
from llm_engine.sequence import Sequence, SeqStatus

logger = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    """Run tokens ``[start, start + num_tokens)`` of ``seq`` this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's end, so a next token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """What one step runs, plus who was preempted to make room and the KV copies to make first.

    The engine executes swap-outs, then swap-ins, before the forward (even in a step that
    schedules nothing): a swap-out must read its blocks before anything reuses them. A step never
    has both (admission, hence swap-in, is skipped in a step that preempts), so a host slot freed
    by a swap-in is never rewritten before it is read. Token copies between pool blocks (partial
    prefix reuse) come between the two: their sources are not referenced, so they must be read
    before a swap-in or the forward can rewrite a source that this step allocated again.
    """

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (pool block, host slot)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host slot, pool block)
    blocks_to_copy: list[tuple[int, int, int]] = field(default_factory=list)  # (source, destination, tokens)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    """Owns the waiting queue and the running set; allocates KV blocks through the manager."""

    def __init__(self, config: EngineConfig, kv: KVCacheManager, max_model_len: int):
        self.config, self.kv, self.max_model_len = config, kv, max_model_len
        self.waiting: BatchQueue[Sequence] = BatchQueue()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # all preemptions; of these, num_swaps_out went to host memory
        self.num_swaps_out = self.num_swaps_in = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.push(QueueItem(seq.request_id, seq, seq.priority, seq.arrival))

    def abort(self, seq: Sequence) -> None:
        """Drop a request wherever it is and free its blocks immediately."""
        self.waiting.remove(seq.request_id)
        if seq in self.running:
            self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    def next_priority(self) -> int | None:
        """The most urgent class among the requests the next step would run (``None``: no work).

        Running requests all run (or are preempted for a more urgent one); waiting ones only when a
        sequence slot is free; the queue's ageing is left out (a class, not an order, is asked for).
        """
        classes = [s.priority for s in self.running]
        if len(self.running) < self.config.max_num_seqs:
            classes.extend(it.priority for it in self.waiting.items.values())
        return min(classes, default=None)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        moves = self.kv.swap_out(seq) if self.config.preemption_mode == "swap" else None
        if moves is None:
            self.kv.free(seq)  # recompute later from prompt + output so far
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)
        if moves is not None:
            seq.status = SeqStatus.SWAPPED
            out.blocks_to_swap_out.extend(moves)
            self.num_swaps_out += 1
        out.preempted.append(seq)
        logger.debug("preempted %s (%s)", seq.request_id, "swap" if moves is not None else "recompute")

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.priority, s.arrival))
        for seq in order:
            if budget <= 0:
                break
            if seq not in self.running:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq, n):
                done = {s.seq for s in out.scheduled}
                victim = max((s for s in self.running if s not in done), key=lambda s: (s.priority, s.arrival))
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq in self.running:
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
        if out.preempted:
            return out
        free_slots = self.config.max_num_seqs - len(self.running)
        if free_slots <= 0 or budget <= 0 or not len(self.waiting):
            return out  # nothing can be admitted: skip ordering the waiting queue

        def admit(item: QueueItem[Sequence], remaining: int) -> int:
            seq = item.payload
            if seq.status is SeqStatus.SWAPPED:
                n = min(seq.num_tokens - seq.num_computed_tokens, remaining)
                moves = self.kv.swap_in(seq, n)
                if moves is None:
                    return 0
                out.blocks_to_swap_in.extend(moves)
                self.num_swaps_in += 1
                return n
            # prompt log-probs need every prompt position computed, so no prefix reuse for them
            if not seq.block_table and self.config.enable_prefix_caching and seq.params.prompt_logprobs is None:
                self.kv.admit_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, remaining)
            if not self.kv.allocate(seq, n):
                self.kv.free(seq)
                return 0
            return n

        for item, n in form_batch(self.waiting, budget, free_slots, admit):
            seq = item.payload
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
        out.blocks_to_copy = self.kv.take_copies()
        return out
