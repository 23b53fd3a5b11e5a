"""Vectorised sampling over a batch of logits rows, each with its own parameters.

Order: repetition penalty -> (log-probs reported from the penalised logits) -> temperature ->
top-k -> top-p -> min-p -> draw. The draw is an exponential race, ``argmax(p / E)``, whose noise
comes from a counter-based hash of ``(seed, step, token)``: every request has its own stream,
reproducible whatever else is in the batch and after preemption, with no per-row generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm_engine.sampling_params import SamplingParams

_M32 = 0xFFFFFFFF


def hash_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, V]`` uniforms in (0, 1) from a 32-bit integer hash (lowbias32) of seed, step, token."""
    idx = torch.arange(vocab, dtype=torch.int64, device=seeds.device)[None, :]
    x = (idx * 0x9E3779B1 + (steps[:, None] * 0x85EBCA77 & _M32) + (seeds[:, None] * 0xC2B2AE3D & _M32)) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x.double() + 0.5) / 4294967296.0


@dataclass
class SampleResult:
    """Sampled ids ``[B]``; when any row asked: their log-probs ``[B]`` and top-n ``[B, n]`` (n = max asked)."""

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalties: torch.Tensor) -> torch.Tensor:
    """Divide positive / multiply negative logits of already-seen tokens (CTRL-style penalty)."""
    rows = [i for i, p in enumerate(penalties.tolist()) if p != 1.0]
    if not rows:
        return logits
    b, v = logits.shape
    seen = torch.zeros(b, v, dtype=torch.bool, device=logits.device)
    r = torch.tensor([i for i in rows for _ in history[i]], dtype=torch.long, device=logits.device)
    c = torch.tensor([t for i in rows for t in history[i]], dtype=torch.long, device=logits.device)
    seen[r, c] = True
    p = penalties[:, None]
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def _filter(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, top-p and min-p as -inf masks on temperature-scaled logits ``[R, V]``."""
    dev, v = x.device, x.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < v else v for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if (top_k < v).any() or (top_p < 1).any():
        sorted_x, _ = x.sort(dim=-1, descending=True)
        kth = sorted_x.gather(1, (top_k - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
        if (top_p < 1).any():
            sp = torch.softmax(sorted_x.masked_fill(sorted_x < kth, float("-inf")), dim=-1)
            # keep tokens whose preceding mass is < top_p (the first always stays)
            keep = (sp.cumsum(-1) - sp) < top_p[:, None]
            keep[:, 0] = True  # even a top_p that rounds to 0 in float32
            thr = sorted_x.masked_fill(~keep, float("inf")).min(dim=-1, keepdim=True).values
            x = x.masked_fill(x < thr, float("-inf"))
    if (min_p > 0).any():
        lp = torch.log_softmax(x, dim=-1)
        x = x.masked_fill(lp < torch.log(min_p[:, None]) + lp.max(-1, keepdim=True).values, float("-inf"))
    return x


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int],
           history: list[list[int]] | None = None) -> SampleResult:
    """Pick one token per row. ``steps[i]`` is the row's output position (keys its noise)."""
    dev = logits.device
    logits = logits.float()
    b, v = logits.shape
    f = lambda xs: torch.tensor(xs, dtype=torch.float32, device=dev)  # noqa: E731
    rep = f([p.repetition_penalty for p in params])
    if history is not None:
        logits = apply_repetition_penalty(logits, history, rep)
    temp = f([p.temperature for p in params])
    greedy = temp == 0
    ids = logits.argmax(-1)
    rand = (~greedy).nonzero()[:, 0]
    if rand.numel():  # the filtering and noise only for sampled rows
        r = rand.tolist()
        x = logits[rand] / temp[rand, None]
        sub = [params[i] for i in r]
        x = _filter(x, sub)
        u = hash_uniform(torch.tensor([seeds[i] for i in r], dtype=torch.int64, device=dev),
                         torch.tensor([steps[i] for i in r], dtype=torch.int64, device=dev), v)
        ids[rand] = (torch.softmax(x, dim=-1).double() / (-torch.log(u))).argmax(-1)
    n = max((p.logprobs or 0) for p in params)
    if not n and all(p.logprobs is None for p in params):
        return SampleResult(ids, None, None, None)
    logp = torch.log_softmax(logits, dim=-1)
    top_ids = top_lp = None
    if n:
        top_lp, top_ids = logp.topk(n, dim=-1)
    return SampleResult(ids, logp.gather(1, ids[:, None])[:, 0], top_ids, top_lp)
