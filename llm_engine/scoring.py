"""Candidate scoring for LLM ranking: which tokens to score, and how, without a vocab x tokens tensor.

A ranking call is one context and many candidates. Each candidate becomes a :class:`ScoringItem`:
the token sequence the model must see (context, then the candidate, then for ``yes_prob`` a
template suffix) plus the positions whose next-token distribution is scored and the token ids
read there. Every item starts with the same context tokens, so the KV prefix cache computes the
context once; the context and each candidate are tokenised separately for exactly that reason
(tokenising ``context + candidate`` as one string could merge tokens across the boundary and
break the shared prefix).

:func:`gather_logprobs` turns final hidden states into log-probabilities of only the wanted
token ids. It walks the rows in chunks sized to a memory budget, so a 1,000-candidate call never
holds more than ``max_chunk_elements`` logits at once; log-softmax is taken per chunk in float32.
:func:`reduce_scores` folds per-token log-probs into one score per candidate with a vectorised
segment sum and the configured length normalisation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


class ScoringMethod(enum.StrEnum):
    """How a candidate is scored (the ``method`` of a ``/v1/rank`` request)."""

    LOGLIK = "loglik"  # log-likelihood of the candidate's tokens after the context
    YES_PROB = "yes_prob"  # p(yes) (or p(yes) / (p(yes) + p(no))) after a filled-in template


class Normalization(enum.StrEnum):
    """Length normalisation of a ``loglik`` score."""

    SUM = "sum"
    MEAN = "mean"  # per token
    POWER = "power"  # sum / len**alpha


METHODS = tuple(m.value for m in ScoringMethod)
NORMALIZATIONS = tuple(n.value for n in Normalization)

DEFAULT_YES_TEMPLATE = "{context}\nItem:{candidate}\nIs this item a good match? Answer:"


class ScoringError(ValueError):
    """A ranking request cannot be scored as given (bad method, template, or empty candidate)."""


@dataclass(frozen=True)
class ScoringOptions:
    """How a ranking call turns model outputs into one score per candidate."""

    method: str = field(default="loglik", metadata={"help": "loglik | yes_prob"})
    normalize: str = field(
        default="mean",
        metadata={"help": "loglik length normalisation: sum | mean (per token) | power (sum / len**alpha)"},
    )
    length_alpha: float = field(default=1.0, metadata={"help": "exponent for normalize=power"})
    template: str = field(
        default=DEFAULT_YES_TEMPLATE,
        metadata={"help": "yes_prob prompt; must contain {context} before {candidate}"},
    )
    yes_token: str = field(default=" Yes", metadata={"help": "yes_prob: the token whose probability is the score"})
    no_token: str | None = field(
        default=" No",
        metadata={"help": "yes_prob: when set, score = p(yes) / (p(yes) + p(no)); else p(yes)"},
    )

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ScoringError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ScoringError(f"normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.method == ScoringMethod.YES_PROB:
            c, k = self.template.find("{context}"), self.template.find("{candidate}")
            if c < 0 or k < 0 or k < c:
                raise ScoringError("template must contain {context} followed later by {candidate}")


@dataclass
class ScoringItem:
    """One candidate as the model sees it: tokens, the shared-prefix length, and what to read.

    ``target_positions[j]`` is a position in ``token_ids`` whose output distribution is scored;
    ``target_ids[j]`` holds the token ids read there (one for ``loglik``: the next token; two for
    ``yes_prob``: yes and no).
    """

    token_ids: list[int]
    prefix_len: int
    target_positions: list[int]
    target_ids: list[list[int]]

    @property
    def num_targets(self) -> int:
        return len(self.target_positions)


@dataclass
class ScoreResult:
    """Scores aligned with the candidates, the ranking (indices, best first) and token counts."""

    scores: list[float]
    ranking: list[int]
    token_logprobs: list[list[float]]
    prompt_tokens: int
    cached_tokens: int = 0
    # The shared context's own sequence (prefix-cached calls only): its length, and how much of
    # it the prefix cache already held when the call arrived (a returning user's history).
    context_tokens: int = 0
    context_cached_tokens: int = 0


def plan_loglik(context_ids: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[ScoringItem]:
    """Items scoring each candidate's tokens given the context (the first one needs the context's
    last position, so the context must be non-empty: callers prepend BOS when they have one)."""
    if not context_ids:
        raise ScoringError("loglik needs a non-empty context (prepend a BOS token)")
    n = len(context_ids)
    items = []
    for i, cand in enumerate(candidates):
        if not cand:
            raise ScoringError(f"candidate {i} tokenises to nothing")
        positions = list(range(n - 1, n - 1 + len(cand)))
        items.append(ScoringItem(list(context_ids) + list(cand), n, positions, [[t] for t in cand]))
    return items


def plan_yes_prob(
    prefix_ids: Sequence[int],
    candidates: Sequence[Sequence[int]],
    suffix_ids: Sequence[int],
    yes_id: int,
    no_id: int | None,
) -> list[ScoringItem]:
    """Items reading p(yes) (and p(no)) at the last token of ``prefix + candidate + suffix``."""
    read = [yes_id] if no_id is None else [yes_id, no_id]
    items = []
    for i, cand in enumerate(candidates):
        if not cand:
            raise ScoringError(f"candidate {i} tokenises to nothing")
        ids = list(prefix_ids) + list(cand) + list(suffix_ids)
        items.append(ScoringItem(ids, len(prefix_ids), [len(ids) - 1], [read]))
    return items


def split_template(template: str, context: str) -> tuple[str, str]:
    """``(prefix, suffix)`` text around ``{candidate}`` with the context filled in."""
    head, _, tail = template.partition("{candidate}")
    return head.replace("{context}", context), tail.replace("{context}", context)


def single_token_id(encode: Callable[[str], list[int]], text: str, what: str) -> int:
    """The one token ``text`` encodes to; a clear error when it is several."""
    ids = encode(text)
    if len(ids) != 1:
        raise ScoringError(f"{what} {text!r} must be exactly one token, got {len(ids)}: {ids}")
    return ids[0]


def plan(
    options: ScoringOptions,
    context: str,
    candidates: Sequence[str],
    encode: Callable[[str], list[int]],
    bos_id: int | None = None,
) -> list[ScoringItem]:
    """Tokenises a ranking request into scoring items (context and candidates separately)."""
    options.validate()
    bos = [bos_id] if bos_id is not None else []
    cand_ids = [encode(c) for c in candidates]
    if options.method == ScoringMethod.LOGLIK:
        return plan_loglik(bos + encode(context), cand_ids)
    prefix, suffix = split_template(options.template, context)
    yes = single_token_id(encode, options.yes_token, "yes_token")
    no = single_token_id(encode, options.no_token, "no_token") if options.no_token is not None else None
    return plan_yes_prob(bos + encode(prefix), cand_ids, encode(suffix) if suffix else [], yes, no)


def gather_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """``log_softmax(hidden @ weight.T)[row, target_ids[row]]`` computed a chunk of rows at a time.

    ``hidden`` is [N, H] (final-norm outputs), ``weight`` the [V, H] output projection,
    ``target_ids`` [N, K]. Returns [N, K] float32. At most ``max_chunk_elements`` logits exist at
    once (one row is always allowed), so memory does not grow with the number of candidates.
    """
    n = hidden.shape[0]
    vocab = weight.shape[0]
    out = torch.empty(target_ids.shape, dtype=torch.float32, device=hidden.device)
    rows = max(1, max_chunk_elements // max(vocab, 1))
    for start in range(0, n, rows):
        h = hidden[start : start + rows]
        logits = (h @ weight.t()).float()
        if bias is not None:
            logits += bias.float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        out[start : start + rows] = logits.gather(1, target_ids[start : start + rows]) - lse
        del logits
    return out


def reduce_scores(
    token_logprobs: torch.Tensor,
    segment_ids: torch.Tensor,
    num_items: int,
    options: ScoringOptions,
) -> torch.Tensor:
    """One score per item from per-target log-probs ([T, K]) grouped by ``segment_ids`` ([T])."""
    if options.method == ScoringMethod.YES_PROB:
        # One target per item: column 0 is yes, column 1 (when present) no.
        lp = token_logprobs.double()
        if lp.shape[1] == 1:
            scores = lp[:, 0].exp()
        else:
            scores = torch.softmax(lp[:, :2], dim=-1)[:, 0]
        return torch.zeros(num_items, dtype=torch.float64).index_copy_(0, segment_ids, scores)
    lp = token_logprobs[:, 0].double()
    total = torch.zeros(num_items, dtype=torch.float64).index_add_(0, segment_ids, lp)
    if options.normalize == Normalization.SUM:
        return total
    count = torch.zeros(num_items, dtype=torch.float64).index_add_(0, segment_ids, torch.ones_like(lp))
    if options.normalize == Normalization.MEAN:
        return total / count
    return total / count.pow(options.length_alpha)


def ranking_of(scores: torch.Tensor) -> list[int]:
    """Candidate indices, best first; ties keep the request's order."""
    return torch.argsort(-scores, stable=True).tolist()


def score_items(
    items: Sequence[ScoringItem],
    hidden_for: Callable[[Sequence[ScoringItem]], torch.Tensor],
    weight: torch.Tensor,
    options: ScoringOptions,
    *,
    bias: torch.Tensor | None = None,
    max_chunk_elements: int = 1 << 24,
    cached_tokens: int = 0,
) -> ScoreResult:
    """Scores items given ``hidden_for(items)``: the final hidden states at every item's target
    positions, concatenated in item order ([sum num_targets, H])."""
    hidden = hidden_for(items)
    targets = torch.tensor([t for it in items for t in it.target_ids], dtype=torch.long, device=hidden.device)
    seg = torch.repeat_interleave(
        torch.arange(len(items)), torch.tensor([it.num_targets for it in items], dtype=torch.long)
    )
    lp = gather_logprobs(hidden, weight, targets, bias=bias, max_chunk_elements=max_chunk_elements).cpu()
    scores = reduce_scores(lp, seg, len(items), options)
    per_item = torch.split(lp[:, 0], [it.num_targets for it in items])
    return ScoreResult(
        scores=scores.tolist(),
        ranking=ranking_of(scores),
        token_logprobs=[p.tolist() for p in per_item],
        prompt_tokens=sum(len(it.token_ids) for it in items),
        cached_tokens=cached_tokens,
    )
