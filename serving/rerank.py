"""The rerank stage of Recommend: the LLM scores the DLRM's top candidates with the user's history.

After the DLRM has scored every candidate, its top ``top_n`` go to the LLM as one ranking call
(:mod:`llm_engine.ranking`): the shared context is the user's live history rendered from the
item texts, the candidates are the items' texts, scored as ``/v1/rank`` scores them (mean
log-likelihood of the candidate's tokens by default). The final order of those ``top_n`` is

    blended = (1 - w) * z(logit(p_dlrm)) + w * z(llm score)

where ``z`` standardises over the call's reranked items (mean 0, standard deviation 1; all zeros
when they are equal) and ``w`` is ``weight``. Items the LLM did not score (no text) take
``z = 0`` on its side. Items below the top ``top_n`` keep the DLRM order after them.

Prefix caching across calls. The context is built at the token level, each history line
tokenised on its own (``- <text> [<kind>]\\n``), oldest first, so a new interaction appends tokens
and the KV prefix cache keeps every full block before it. The window of shown history moves in
whole chunks of ``history_chunk`` interactions (its start is the first multiple of the chunk at
or after ``total - history_len``), so it shifts once every ``history_chunk`` interactions instead
of at every one: a returning user's context is a cache hit up to its last block.

Never a failure: a rerank that does not answer within ``deadline_ms``, fails, or cannot fit the
model or the KV pool returns None, and Recommend answers in DLRM order with ``degraded`` set and
a counted reason. Unknown items (no text) are skipped with a counter.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from batching import Priority
from llm_engine.scoring import ScoreResult, ScoringItem, ScoringOptions, plan_loglik, plan_yes_prob, single_token_id
from serving import metrics as m
from serving.item_text import ItemTexts
from serving.user_history import Interaction, UserHistory

log = logging.getLogger(__name__)

__all__ = ["RerankConfig", "RerankBackend", "RerankOutcome", "RerankStage", "blend", "history_window"]

HEADER = "A user's recent activity, oldest first:\n"
TRAILER = "The user will next choose:"
YES_ITEM, YES_QUESTION = "\nItem:", "\nIs this item a good match? Answer:"


@dataclass
class RerankConfig:
    """The rerank stage's defaults (a Recommend call may override ``top_n`` and ``weight``)."""

    rerank_top_n: int = field(default=20, metadata={"help": "DLRM top candidates the LLM reranks when an LLM is attached (0 = off; a call may override)"})
    rerank_weight: float = field(default=0.5, metadata={"help": "weight of the LLM's standardised score in the blend, in [0, 1] (a call may override)"})
    rerank_deadline_ms: float = field(default=250.0, metadata={"help": "longest the LLM may take; later, Recommend answers in DLRM order, degraded"})
    rerank_method: str = field(default="loglik", metadata={"help": "how the LLM scores a candidate: loglik (mean token log-likelihood) or yes_prob"})
    rerank_history: int = field(default=50, metadata={"help": "most recent interactions shown in the prompt"})
    rerank_history_chunk: int = field(default=8, metadata={"help": "the shown window moves in steps of this many interactions (keeps the prompt a cached prefix)"})
    rerank_item_tokens: int = field(default=48, metadata={"help": "tokens kept of each item's text"})

    def validate(self) -> None:
        if self.rerank_top_n < 0 or not 0.0 <= self.rerank_weight <= 1.0:
            raise ValueError("rerank_top_n must be >= 0 and rerank_weight in [0, 1]")
        if self.rerank_method not in ("loglik", "yes_prob"):
            raise ValueError(f"rerank_method must be loglik or yes_prob, got {self.rerank_method!r}")
        if self.rerank_history < 0 or self.rerank_history_chunk <= 0 or self.rerank_item_tokens <= 0:
            raise ValueError("rerank_history must be >= 0, rerank_history_chunk and rerank_item_tokens > 0")
        if self.rerank_deadline_ms <= 0:
            raise ValueError("rerank_deadline_ms must be positive")


class RerankBackend(Protocol):
    """What the stage needs of the LLM (``serving.http.engine_backend.EngineBackend`` is one)."""

    max_model_len: int

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def kv_capacity_tokens(self) -> int: ...

    async def score_items(self, request_id: str, items: list[ScoringItem], options: ScoringOptions,
                          priority: int = ...) -> ScoreResult: ...


@dataclass(frozen=True, slots=True)
class RerankOutcome:
    """The reranked head: ``order`` indexes the items given, best first."""

    order: np.ndarray
    llm_scores: np.ndarray  # per item given (NaN where the LLM did not score it)
    blended: np.ndarray  # per item given
    llm_ms: float
    context_tokens: int
    context_cached_tokens: int


def history_window(first: int, count: int, history_len: int, chunk: int) -> int:
    """Index (into the ``count`` interactions starting at absolute position ``first``) of the
    first one to show: the first multiple of ``chunk`` at or after ``first + count - history_len``."""
    total = first + count
    start = max(total - history_len, first)
    start = -(-start // chunk) * chunk
    return min(start, total) - first


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std()) if x.size else 0.0
    return np.zeros_like(x) if sd < 1e-12 or not math.isfinite(sd) else (x - x.mean()) / sd


def blend(dlrm_probs: np.ndarray, llm_scores: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - w) z(logit p) + w z(llm)`` over the given items; NaN LLM scores count as z = 0."""
    p = np.clip(np.asarray(dlrm_probs, np.float64), 1e-7, 1 - 1e-7)
    zd = _z(np.log(p) - np.log1p(-p))
    llm = np.asarray(llm_scores, np.float64)
    zl = np.zeros_like(zd)
    known = np.isfinite(llm)
    if known.sum() >= 2:
        zl[known] = _z(llm[known])
    return (1.0 - weight) * zd + weight * zl


class RerankStage:
    """Renders the prompt, calls the LLM within the deadline, and blends."""

    def __init__(self, cfg: RerankConfig, backend: RerankBackend, texts: ItemTexts,
                 history: UserHistory | None) -> None:
        cfg.validate()
        self.cfg, self.backend, self.texts, self.history = cfg, backend, texts, history
        self.options = ScoringOptions(method=cfg.rerank_method)
        self._ids = itertools.count()
        bos = backend.bos_token_id
        self._bos = [bos] if bos is not None else []
        self._header = self._bos + backend.encode(HEADER)
        self._trailer = backend.encode(TRAILER)
        # Texts repeat across calls (an item's text, a history line): tokenised once each.
        self._tokens = functools.lru_cache(maxsize=200_000)(self._encode)
        if cfg.rerank_method == "yes_prob":
            self._yes_item, self._yes_question = backend.encode(YES_ITEM), backend.encode(YES_QUESTION)
            self._yes = single_token_id(backend.encode, self.options.yes_token, "yes_token")
            self._no = single_token_id(backend.encode, self.options.no_token, "no_token")
        self._extra = len(self._yes_item) + len(self._yes_question) if cfg.rerank_method == "yes_prob" else 0
        self.context_tokens = 0  # since start, for the prefix hit rate
        self.context_cached = 0

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.backend.encode(text)[: self.cfg.rerank_item_tokens])

    def _line(self, it: Interaction, text: str) -> tuple[int, ...]:
        return self._tokens(f"- {text} [{it.kind}]\n")

    def history_lines(self, user_id: int) -> list[tuple[int, ...]]:
        """The shown history, one token tuple per interaction, oldest first (see the module doc)."""
        if self.history is None or self.cfg.rerank_history <= 0:
            return []
        items, first = self.history.recent(user_id)
        shown = items[history_window(first, len(items), self.cfg.rerank_history, self.cfg.rerank_history_chunk):]
        texts = self.texts.get([it.item_id for it in shown])
        lines = [self._line(it, text) for it, text in zip(shown, texts) if text is not None]
        if len(lines) < len(shown):
            m.RERANK_SKIPPED.labels("history").inc(len(shown) - len(lines))
        return lines

    def context_ids(self, user_id: int, fit: bool = False) -> list[int]:
        """The user's history prompt as token ids (the shared prefix of every candidate).

        With ``fit``, the oldest lines go, a whole chunk at a time, until the longest possible
        candidate (``rerank_item_tokens``) fits the model. The cut depends on the history alone,
        never on the call's candidates, and moves in chunks, so it stays put while the history
        grows and the prompt stays a cached prefix (cutting tokens one by one, or by this call's
        longest candidate, would shift it at every call).
        """
        lines = self.history_lines(user_id)
        if fit:
            budget = self.backend.max_model_len - self.cfg.rerank_item_tokens - len(self._header) \
                - len(self._trailer) - self._extra
            total = sum(map(len, lines))
            drop = 0
            while total > budget and drop < len(lines):
                cut = lines[drop:drop + self.cfg.rerank_history_chunk]
                total -= sum(map(len, cut))
                drop += len(cut)
            lines = lines[drop:]
        return self._header + [t for line in lines for t in line] + self._trailer

    def _items(self, context: list[int], cands: list[tuple[int, ...]]) -> list[ScoringItem]:
        if self.cfg.rerank_method == "yes_prob":
            return plan_yes_prob(context + self._yes_item, cands, self._yes_question, self._yes, self._no)
        return plan_loglik(context, cands)

    def _fits(self, context: list[int], cands: list[tuple[int, ...]]) -> bool:
        extra = self._extra
        longest = max(len(c) for c in cands) + extra
        if len(context) + longest > self.backend.max_model_len:
            return False
        # Blocks one call can pin at once: the context, plus each candidate's tail (the context's
        # partial last block and the candidate itself). More than the pool holds cannot run.
        need = len(context) + sum(len(c) + extra + 16 for c in cands)
        return need <= self.backend.kv_capacity_tokens

    async def rerank(self, user_id: int, item_ids: np.ndarray, dlrm_probs: np.ndarray,
                     weight: float) -> RerankOutcome | str:
        """The blended order of ``item_ids`` (the DLRM's top, best first), or the reason it failed."""
        t0 = time.perf_counter()
        texts = self.texts.get(item_ids.tolist())
        scored = [k for k, t in enumerate(texts) if t is not None]
        if len(texts) - len(scored):
            m.RERANK_SKIPPED.labels("candidate").inc(len(texts) - len(scored))
        if len(scored) < 2:
            return "no_text"
        cands = [self._tokens(" " + texts[k]) for k in scored]
        context = self.context_ids(user_id, fit=True)
        if not self._fits(context, cands):
            return "too_long"
        items = self._items(context, cands)
        rid = f"rerank-{next(self._ids)}"
        try:
            result = await asyncio.wait_for(
                self.backend.score_items(rid, items, self.options, Priority.RERANK),
                self.cfg.rerank_deadline_ms / 1000.0)
        except (asyncio.TimeoutError, TimeoutError):
            return "deadline"
        except Exception:  # noqa: BLE001 - the LLM failing degrades the order, never the call
            log.exception("rerank failed")
            return "llm_error"
        llm_ms = (time.perf_counter() - t0) * 1000.0
        llm = np.full(item_ids.size, np.nan)
        llm[scored] = result.scores
        blended = blend(dlrm_probs, llm, weight)
        order = np.lexsort((item_ids, -blended))
        self.context_tokens += result.context_tokens
        self.context_cached += result.context_cached_tokens
        if self.context_tokens:
            m.RERANK_PREFIX_HIT.set(self.context_cached / self.context_tokens)
        m.RERANK_SECONDS.observe(llm_ms / 1000.0)
        return RerankOutcome(order, llm, blended, llm_ms, result.context_tokens, result.context_cached_tokens)
