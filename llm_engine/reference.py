"""A reference runner on ``transformers``: one sequence at a time, KV in a ``DynamicCache``.

It is the oracle and the baseline for the engine's endpoint features: greedy generation with
and without n-gram speculation (verified in one forward over the drafts, the cache cropped back
on rejection), and candidate scoring with the context prefilled once and its KV reused by every
candidate batch. It holds no paged pool and no scheduler; the engine does that at scale.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from llm_engine.scoring import ScoringItem
from llm_engine.spec.adaptive import SpecConfig
from llm_engine.spec.proposer import SpeculativeProposer
from llm_engine.spec.verify import verify_greedy, verify_sampled


@dataclass
class Sampling:
    """Per-request sampling settings (temperature 0 = greedy)."""

    temperature: float = 0.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None


def process_logits(logits: torch.Tensor, s: Sampling, seen: Sequence[int]) -> torch.Tensor:
    """Repetition penalty, temperature, top-k, top-p and min-p on logits [..., V] (float32)."""
    x = logits.float().clone()
    if s.repetition_penalty != 1.0 and len(seen):
        idx = torch.tensor(sorted(set(seen)))
        v = x[..., idx]
        x[..., idx] = torch.where(v > 0, v / s.repetition_penalty, v * s.repetition_penalty)
    if s.temperature == 0:
        return x
    x = x / s.temperature
    if 0 < s.top_k < x.shape[-1]:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        probs = torch.softmax(x, -1)
        sp, si = torch.sort(probs, descending=True, dim=-1)
        drop = (sp.cumsum(-1) - sp) >= s.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, si, drop), float("-inf"))
    if s.min_p > 0:
        probs = torch.softmax(x, -1)
        x = x.masked_fill(probs < s.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return x


@dataclass
class StepOutput:
    """Tokens appended by one engine step (several when drafts were accepted)."""

    token_ids: list[int]
    logits: torch.Tensor  # [len(token_ids), V] raw logits each token was sampled from
    drafted: int = 0
    accepted: int = 0


class ReferenceRunner:
    """A ``transformers`` causal LM driven step by step with a KV cache."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32, threads: int | None = None) -> None:
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
        self.config = self.model.config

    @torch.no_grad()
    def forward(self, ids: Sequence[int], cache=None):  # noqa: ANN001, ANN201 - DynamicCache
        from transformers import DynamicCache

        cache = cache if cache is not None else DynamicCache()
        out = self.model(torch.tensor([list(ids)]), past_key_values=cache, use_cache=True)
        return out.logits[0], out.past_key_values

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: Sampling | None = None,
        stop_token_ids: Sequence[int] = (),
        spec: SpecConfig | None = None,
    ) -> Iterator[StepOutput]:
        """Yields each step's new tokens until ``max_tokens`` or a stop token (included)."""
        s = sampling or Sampling()
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        stops = set(stop_token_ids)
        proposer = SpeculativeProposer(spec) if spec is not None and spec.enabled else None
        if proposer is not None:
            proposer.add_request("r", list(prompt_ids))
        logits, cache = self.forward(prompt_ids)
        out: list[int] = []
        row = logits[-1:]
        pending: int | None = None  # last sampled token, not yet fed to the model
        seq_len = len(prompt_ids)
        while len(out) < max_tokens:
            if pending is None:
                tok = self._sample(row[0], s, list(prompt_ids) + out, gen)
                new, lg = [tok], row
                drafted = accepted = 0
            else:
                left = max_tokens - len(out) - 1
                draft = proposer.propose(["r"], max_lens=[left])[0] if proposer is not None else []
                t0 = time.perf_counter()
                logits, cache = self.forward([pending] + draft, cache)
                if proposer is not None:
                    proposer.observe_step(1 + len(draft), time.perf_counter() - t0)
                seen = list(prompt_ids) + out
                if s.temperature == 0:
                    res = verify_greedy(process_logits(logits, s, seen), draft)
                else:
                    probs = torch.softmax(process_logits(logits, s, seen), -1)
                    res = verify_sampled(probs, draft, gen)
                seq_len += 1 + len(draft)
                keep = seq_len - len(draft) + res.num_accepted  # KV of rejected drafts is dropped
                if keep < seq_len:
                    cache.crop(keep - seq_len)  # negative: drop that many trailing tokens
                    seq_len = keep
                new, lg = res.tokens, logits[: len(res.tokens)]
                drafted, accepted = len(draft), res.num_accepted
                if proposer is not None and draft:
                    proposer.accept("r", len(draft), res.num_accepted, [])
            new = new[: max_tokens - len(out)]
            for i, t in enumerate(new):
                if t in stops:
                    new = new[: i + 1]
                    break
            out += new
            if proposer is not None:
                proposer.accept("r", 0, 0, new)
            yield StepOutput(new, lg[: len(new)], drafted, accepted)
            if new[-1] in stops:
                return
            pending = new[-1]

    def _sample(self, row: torch.Tensor, s: Sampling, seen: list[int], gen: torch.Generator | None) -> int:
        x = process_logits(row, s, seen)
        if s.temperature == 0:
            return int(x.argmax())
        return int(torch.multinomial(torch.softmax(x, -1), 1, generator=gen))

    # ranking -----------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_full(self, items: Sequence[ScoringItem]) -> torch.Tensor:
        """Target-position hidden states by one full forward per item (the naive method)."""
        rows = []
        for it in items:
            h = self.model.model(torch.tensor([it.token_ids])).last_hidden_state[0]
            rows.append(h[it.target_positions])
        return torch.cat(rows)

    @torch.no_grad()
    def hidden_shared_prefix(self, items: Sequence[ScoringItem], batch: int = 32) -> torch.Tensor:
        """Target-position hidden states with the shared prefix run once: its KV is computed on
        ``prefix[:-1]`` (the last prefix token is recomputed with each candidate so the first
        candidate token's log-prob has its position) and reused for batches of candidates."""
        from transformers import DynamicCache

        p = min(it.prefix_len for it in items) - 1
        prefix = items[0].token_ids[:p]
        base = DynamicCache()
        if p > 0:
            self.model.model(torch.tensor([prefix]), past_key_values=base, use_cache=True)
        rows: list[torch.Tensor] = []
        for start in range(0, len(items), batch):
            group = items[start : start + batch]
            tails = [it.token_ids[p:] for it in group]
            width = max(len(t) for t in tails)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), p + width, dtype=torch.long)
            mask[:, :p] = 1
            for i, t in enumerate(tails):
                ids[i, : len(t)] = torch.tensor(t)
                mask[i, p : p + len(t)] = 1
            cache = DynamicCache()
            if p > 0:
                for layer in range(len(base.layers)):
                    k, v = base.layers[layer].keys, base.layers[layer].values
                    cache.update(k.expand(len(group), -1, -1, -1).contiguous(),
                                 v.expand(len(group), -1, -1, -1).contiguous(), layer)
            pos = torch.arange(p, p + width)[None].expand(len(group), -1)
            h = self.model.model(ids, attention_mask=mask, past_key_values=cache, position_ids=pos,
                                 use_cache=True).last_hidden_state
            for i, it in enumerate(group):
                rows.append(h[i, torch.tensor(it.target_positions) - p])
        return torch.cat(rows)
