"""Speculative decoding inside :class:`~llm_engine.engine.LLMEngine`'s step.

Before scheduling, each decoding request that may speculate gets a draft from its n-gram index,
sized by the goodput rule (:mod:`llm_engine.spec.adaptive`). The draft tokens are appended to
the sequence, so the unchanged scheduler and runner compute them like a short prefill chunk:
one forward yields the target's distribution after the last real token and after every draft
token. :meth:`EngineSpeculation.verify` then keeps the accepted prefix plus one token from the
target and rolls the sequence back (``num_computed_tokens`` and the token list; the KV slots of
rejected drafts are simply overwritten later). The engine calls these steps through
:class:`~llm_engine.step.SpeculationHooks`: ``propose_drafts`` before scheduling,
``fit_to_schedule`` after it, ``verify`` after the forward, ``accept`` once the tokens are appended.

Eligible: requests without per-token log-probs and without repetition penalty (the penalty's
history would differ per draft row). Greedy requests get exactly plain greedy output; sampled
ones get the target distribution (rejection sampling with per-request reproducible draws).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from llm_engine.sampling_params import SamplingParams
from llm_engine.sequence import RequestKind, Sequence
from llm_engine.spec.adaptive import SpecConfig
from llm_engine.spec.proposer import SpeculativeProposer
from llm_engine.spec.verify import VerifyResult, verify_sampled
from llm_engine.step import Verification

if TYPE_CHECKING:
    from llm_engine.scheduler import SchedulerOutput
    from llm_engine.step import EngineCore, ForwardPass


def target_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The sampler's distribution for rows of one request: temperature, top-k, top-p, min-p
    (the same order and rules as :func:`llm_engine.sampling.sample`), renormalised."""
    x = logits.float() / p.temperature
    v = x.shape[-1]
    if 0 < p.top_k < v or p.top_p < 1:
        k = p.top_k if 0 < p.top_k < v else v
        sorted_x, _ = x.sort(dim=-1, descending=True)
        kth = sorted_x[:, k - 1 : k]
        x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1:
            sp = torch.softmax(sorted_x.masked_fill(sorted_x < kth, float("-inf")), dim=-1)
            keep = (sp.cumsum(-1) - sp) < p.top_p
            keep[:, 0] = True  # the first always stays, even for a top_p that is 0 in float32
            thr = sorted_x.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
            x = x.masked_fill(x < thr, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


class EngineSpeculation:
    """N-gram speculation for one engine (its :class:`~llm_engine.step.SpeculationHooks`): the
    drafters, the draft-length controller and this step's drafts."""

    def __init__(self, engine: EngineCore, config: SpecConfig) -> None:
        self.engine = engine
        self.config = config
        self.proposer = SpeculativeProposer(config)
        self.drafts: dict[Sequence, list[int]] = {}  # draft tokens appended this step
        self._sampling: set[Sequence] = set()
        self._t0 = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.proposer.acceptance_rate

    def _eligible(self, seq: Sequence) -> bool:
        p = seq.params
        return (seq.kind is RequestKind.GENERATE and p.logprobs is None and p.repetition_penalty == 1.0
                and seq.num_tokens - seq.num_computed_tokens == 1 and bool(seq.output_token_ids))

    def propose_drafts(self) -> None:
        """Appends each eligible decoding sequence's draft, sized by the goodput rule within the
        step budget that the other work leaves."""
        self._t0 = time.perf_counter()
        self.drafts = {}
        sched = self.engine.scheduler
        live = {s.request_id for s in sched.running}
        for rid in [r for r in self.proposer._drafters if r not in live and r not in self.engine.requests]:
            self.proposer.remove_request(rid)
        seqs = [s for s in sched.running if self._eligible(s)]
        if not seqs or not self.config.enabled:
            return
        for s in seqs:
            if s.request_id not in self.proposer:
                self.proposer.add_request(s.request_id, s.all_token_ids)
        budget = self.engine.config.max_num_batched_tokens
        decoding = sum(1 for s in sched.running if s.num_tokens - s.num_computed_tokens == 1)
        pending = sum(s.num_tokens - s.num_computed_tokens for s in sched.running) - decoding
        pending += sum(len(item.payload.prompt_token_ids) for item in sched.waiting.items.values())
        other = min(pending, max(budget - decoding, 0))
        room = [min(s.params.max_tokens - len(s.output_token_ids) - 1,
                    self.engine.max_model_len - s.num_tokens - 1) for s in seqs]
        drafts = self.proposer.propose([s.request_id for s in seqs], other, room)
        spare = budget - decoding - other  # drafts never push prefill work out of the step
        for s, d in zip(seqs, drafts):
            d = d[: max(spare, 0)]
            if d:
                spare -= len(d)
                s.output_token_ids.extend(d)
                self.drafts[s] = d

    def fit_to_schedule(self, sched: SchedulerOutput) -> None:
        """Drops drafts of sequences that were preempted or not given their whole draft."""
        full = {s.seq for s in sched.scheduled if s.samples}
        self._sampling = full  # ``samples`` turns false once the token is appended: remember it
        if not self.drafts:
            return
        for seq, d in list(self.drafts.items()):
            if seq not in full:
                del seq.output_token_ids[len(seq.output_token_ids) - len(d):]
                del self.drafts[seq]
                for s in sched.scheduled:
                    if s.seq is seq:  # a partial chunk: keep only the real token
                        s.num_tokens = seq.num_tokens - s.start

    def verify(self, sched: SchedulerOutput, forward: ForwardPass,
               extra_rows: torch.Tensor | None = None) -> Verification:
        """Verifies this step's drafts, rolling each sequence back to its accepted prefix (the
        new tokens are not yet appended); also returns the logits of ``extra_rows``.

        One LM-head projection covers every drafted row and the extra rows of the step (separate
        projections would each re-read the whole head), and greedy requests compare one batched
        argmax."""
        hidden, inp = forward.hidden, forward.inputs
        items = []
        for i, s in enumerate(sched.scheduled):
            d = self.drafts.get(s.seq)
            if d is not None:
                hi = inp.row_start[i] + s.num_tokens
                items.append((s.seq, d, hi - len(d) - 1, hi))
        parts = [torch.arange(lo, hi) for _, _, lo, hi in items]
        nv = sum(len(p) for p in parts)
        if extra_rows is not None:
            parts.append(extra_rows.cpu())
        if not parts:
            return Verification()
        logits = self.engine.runner.logits(hidden, torch.cat(parts).to(hidden.device))
        extra = logits[nv:] if extra_rows is not None else None
        if not items:
            return Verification(extra_logits=extra)
        logits = logits[:nv]
        best = logits.argmax(-1).tolist()
        out: dict[Sequence, list[int]] = {}
        at = 0
        for seq, d, lo, hi in items:
            k = hi - lo - 1
            del seq.output_token_ids[len(seq.output_token_ids) - k:]
            if seq.params.temperature == 0:
                b = best[at:at + k + 1]
                n = 0
                while n < k and b[n] == d[n]:
                    n += 1
                res = VerifyResult(list(d[:n]) + [b[n]], n, list(range(n)))
            else:
                gen = torch.Generator().manual_seed((seq.seed * 1_000_003 + len(seq.output_token_ids)) & ((1 << 63) - 1))
                res = verify_sampled(target_probs(logits[at:at + k + 1], seq.params).cpu(), d, gen)
            at += k + 1
            seq.num_computed_tokens = seq.num_tokens + res.num_accepted
            self.proposer.accept(seq.request_id, k, res.num_accepted, [])
            out[seq] = res.tokens
        return Verification(out, extra)

    def accept(self, sched: SchedulerOutput, verified: Mapping[Sequence, list[int]]) -> None:
        """Feeds appended tokens to the drafters and the step time to the cost model."""
        for s in sched.scheduled:
            seq = s.seq
            if seq.request_id in self.proposer:
                added = verified.get(seq)
                if added is None and seq in self._sampling and seq.output_token_ids:
                    added = seq.output_token_ids[-1:]
                if added:
                    self.proposer.accept(seq.request_id, 0, 0, added)
        self.proposer.observe_step(sched.num_tokens, time.perf_counter() - self._t0)
