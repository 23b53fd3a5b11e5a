"""The rerank stage of Recommend: the LLM scores the DLRM's top candidates with the user's history.

After the DLRM has scored every candidate, its top ``top_n`` go to the LLM as one ranking call
(:mod:`llm_engine.ranking`): the shared context is the user's live history rendered from the
item texts, the candidates are the items' texts, scored as ``/v1/rank`` scores them (mean
log-likelihood of the candidate's tokens by default). The final order of those ``top_n`` is

    blended = (1 - w) * z(logit(p_dlrm)) + w * z(llm score)

where ``z`` standardises over the call's reranked items (mean 0, standard deviation 1; all zeros
when they are equal) and ``w`` is ``weight``. Items the LLM did not score (no text) take
``z = 0`` on its side. Items below the top ``top_n`` keep the DLRM order after them.

``w`` is the call's ``rerank_weight`` when it sets one, else :attr:`RerankStage.weight`: with
``rerank_weight_tuning`` (the default) the weight :mod:`serving.rerank_tuning` learns from the
clicks on reranked items (``rerank_weight`` until it has enough of them), else ``rerank_weight``.

Prefix caching across calls. The prompt is laid out so that what stays the same comes first
and what changes is appended: the instruction (in the header), then the history, oldest first,
one line per interaction (``- <item tokens> [<kind>]\\n``), then only the marker ``-`` that opens
the next line, which each candidate completes (its tokens are the same item tokens a history line
shows). A new interaction then appends tokens, and the KV prefix cache keeps every full block
before it; only the new lines and the last partial block are computed again (an instruction
after the history would be recomputed at every call).

The shown history starts at an absolute position that is a multiple of the window's *step*:
the first one at or after ``total - rerank_history``, moved further by whole steps while the
history does not fit the model with the longest possible candidate. A moved start changes every
position after it, so the whole context is computed again. The step is therefore large
(hysteresis): when the history outgrows its limit, the start jumps so that only about
``rerank_history_low_mark`` of the limit stays, and the next interactions append to that prefix,
cached, until the limit is reached again. In lines, the limit is ``rerank_history`` or, when
fewer, as many of the longest lines (``rerank_item_tokens`` of text) as fit the model; the step is
the fewest whole ``rerank_history_chunk``s that drop ``1 - rerank_history_low_mark`` of it
(actual lines, shorter, keep a little more after a jump). The price is less history shown: about
``limit - step / 2`` lines on average, and ``limit - step`` right after a jump.

The start is a function of the history alone (its absolute positions and the lines' tokens), not
of which calls came before: calls racing for one user with the same history render the same
prompt, a restarted or another replica renders it without state, and as the history grows the
start only moves forward. (A start remembered per user could land each jump exactly on the low
mark, but where it landed would depend on which calls happened to see the history, and when.)

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
from serving.rerank_tuning import TuningConfig, WeightTuner
from serving.user_history import UserHistory

log = logging.getLogger(__name__)

__all__ = ["RerankConfig", "RerankBackend", "RerankOutcome", "RerankStage", "blend", "history_step", "history_window",
           "standardised"]

HEADER = "A user's recent activity, oldest first, then their next choice:\n"
LINE_MARK = "-"  # opens a history line; the loglik context ends with it, so a candidate completes a line
YES_HEADER = "A user's recent activity, oldest first:\n"
YES_ITEM, YES_QUESTION = "\nItem:", "\nIs this item a good match? Answer:"


@dataclass
class RerankConfig:
    """The rerank stage's defaults (a Recommend call may override ``top_n`` and ``weight``)."""

    rerank_top_n: int = field(default=20, metadata={"help": "DLRM top candidates the LLM reranks when an LLM is attached (0 = off; a call may override)"})
    rerank_weight: float = field(default=0.5, metadata={"help": "weight of the LLM's standardised score in the blend, in [0, 1] (a call may override); with rerank_weight_tuning, until the tuner has rerank_tuning_min_outcomes"})
    rerank_weight_tuning: bool = field(default=True, metadata={"help": "learn the blend weight from this process's clicks on reranked items (serving.rerank_tuning); off: rerank_weight always"})
    rerank_tuning_min_outcomes: int = field(default=200, metadata={"help": "clicks on reranked items before the tuned weight replaces rerank_weight"})
    rerank_tuning_horizon_s: float = field(default=600.0, metadata={"help": "a click counts for a reranked call this long after it (event time); calls are then forgotten"})
    rerank_tuning_half_life: float = field(default=5000.0, metadata={"help": "outcomes after which an outcome counts half in the tuner (it follows drift)"})
    rerank_tuning_kinds: str = field(default="click", metadata={"help": "comma-separated action kinds that are an outcome of a reranked call"})
    rerank_tuning_calls: int = field(default=50_000, metadata={"help": "reranked calls the tuner remembers at most (the least recently served users go first)"})
    rerank_tuning_position_bias: float = field(default=0.0, metadata={"help": "eta: each click counts (shown rank)**eta (inverse propensity); 0 assumes a click among the reranked items does not depend on its position, ~1 suits a vertical list"})
    rerank_deadline_ms: float = field(default=250.0, metadata={"help": "longest the LLM may take; later, Recommend answers in DLRM order, degraded"})
    rerank_method: str = field(default="loglik", metadata={"help": "how the LLM scores a candidate: loglik (mean token log-likelihood) or yes_prob"})
    rerank_history: int = field(default=50, metadata={"help": "most recent interactions shown in the prompt"})
    rerank_history_chunk: int = field(default=8, metadata={"help": "the shown window's start lands on multiples of this many interactions (its step is a multiple of it)"})
    rerank_history_low_mark: float = field(default=0.5, metadata={"help": "when the shown history outgrows its limit (rerank_history, or the model's context), the window moves so that about this fraction of the limit stays, then grows by appends (a cached prefix) until the limit again; each move recomputes the prompt (lower: fewer recomputes, fewer lines shown; 1: the start moves by one chunk)"})
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
        if not 0.0 <= self.rerank_history_low_mark <= 1.0:
            raise ValueError(f"rerank_history_low_mark must be in [0, 1], got {self.rerank_history_low_mark}")
        self.tuning().validate()

    def tuning(self) -> TuningConfig:
        """The weight tuner's settings (:mod:`serving.rerank_tuning`)."""
        kinds = frozenset(k.strip() for k in self.rerank_tuning_kinds.split(",") if k.strip())
        return TuningConfig(self.rerank_weight, self.rerank_tuning_min_outcomes,
                            int(self.rerank_tuning_horizon_s * 1000), self.rerank_tuning_half_life, kinds,
                            self.rerank_tuning_calls, position_bias=self.rerank_tuning_position_bias)


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


def history_window(first: int, count: int, history_len: int, step: int) -> int:
    """Index (into the ``count`` interactions starting at absolute position ``first``) of the
    first one to show: the first multiple of ``step`` at or after ``first + count - history_len``."""
    total = first + count
    start = max(total - history_len, first)
    start = -(-start // step) * step
    return min(start, total) - first


def history_step(chunk: int, low_mark: float, limit_lines: int) -> int:
    """The window's step: the fewest whole ``chunk``s that drop ``1 - low_mark`` of ``limit_lines``
    (one chunk at least)."""
    drop = round((1.0 - low_mark) * limit_lines, 6)  # 0.3 * 40 is 12.000000000000002
    return chunk * max(1, math.ceil(drop / chunk))


def _z(x: np.ndarray) -> np.ndarray:
    sd = float(x.std()) if x.size else 0.0
    return np.zeros_like(x) if sd < 1e-12 or not math.isfinite(sd) else (x - x.mean()) / sd


def standardised(dlrm_probs: np.ndarray, llm_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(z(logit p), z(llm))`` over the given items, as the blend weighs them (NaN LLM: z = 0)."""
    p = np.clip(np.asarray(dlrm_probs, np.float64), 1e-7, 1 - 1e-7)
    zd = _z(np.log(p) - np.log1p(-p))
    llm = np.asarray(llm_scores, np.float64)
    zl = np.zeros_like(zd)
    known = np.isfinite(llm)
    if known.sum() >= 2:
        zl[known] = _z(llm[known])
    return zd, zl


def blend(dlrm_probs: np.ndarray, llm_scores: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - w) z(logit p) + w z(llm)`` over the given items; NaN LLM scores count as z = 0."""
    zd, zl = standardised(dlrm_probs, llm_scores)
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
        yes = cfg.rerank_method == "yes_prob"
        self._header = self._bos + backend.encode(YES_HEADER if yes else HEADER)
        self._mark = tuple(backend.encode(LINE_MARK))
        # yes_prob appends its own "Item:" after the history, so it needs no marker there.
        self._trailer = [] if yes else list(self._mark)
        # Texts repeat across calls (an item's text, a history line): tokenised once each.
        self._tokens = functools.lru_cache(maxsize=200_000)(self._encode)
        self._kind = functools.lru_cache(maxsize=1024)(lambda kind: tuple(backend.encode(f" [{kind}]\n")))
        if yes:
            self._yes_item, self._yes_question = backend.encode(YES_ITEM), backend.encode(YES_QUESTION)
            self._yes = single_token_id(backend.encode, self.options.yes_token, "yes_token")
            self._no = single_token_id(backend.encode, self.options.no_token, "no_token")
        self._extra = len(self._yes_item) + len(self._yes_question) if yes else 0
        # The tokens the history may take so that the longest possible candidate still fits.
        self.history_budget = backend.max_model_len - cfg.rerank_item_tokens - len(self._header) \
            - len(self._trailer) - self._extra
        longest_line = len(self._mark) + cfg.rerank_item_tokens + len(self._kind("click"))
        limit = min(cfg.rerank_history, max(self.history_budget, 0) // longest_line,
                    history.per_user if history is not None else cfg.rerank_history)
        self.history_step = history_step(cfg.rerank_history_chunk, cfg.rerank_history_low_mark, limit)
        self.context_tokens = 0  # since start, for the prefix hit rate
        self.context_cached = 0
        self.context_lines = 0  # history lines shown, over ``contexts`` answered calls
        self.contexts = 0
        self.tuner = WeightTuner(cfg.tuning()) if cfg.rerank_weight_tuning else None
        m.RERANK_TUNED_WEIGHT.set(self.weight)

    @property
    def weight(self) -> float:
        """The blend weight of a call that does not set one: the tuned weight, or ``rerank_weight``."""
        return self.tuner.weight if self.tuner is not None else self.cfg.rerank_weight

    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.backend.encode(text)[: self.cfg.rerank_item_tokens])

    def candidate_tokens(self, text: str) -> tuple[int, ...]:
        """An item's tokens as a candidate and inside a history line (its first ``rerank_item_tokens``)."""
        return self._tokens(" " + text)

    def line_tokens(self, text: str, kind: str) -> tuple[int, ...]:
        """One history line: the marker, the item's tokens (truncated, never the kind) and the kind."""
        return self._mark + self.candidate_tokens(text) + self._kind(kind)

    def _shown(self, user_id: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Absolute positions and tokens of the lines in the count window (items with text only)."""
        if self.history is None or self.cfg.rerank_history <= 0:
            return np.zeros(0, np.int64), []
        items, first = self.history.recent(user_id)
        start = history_window(first, len(items), self.cfg.rerank_history, self.history_step)
        shown = items[start:]
        texts = self.texts.get([it.item_id for it in shown])
        keep = [k for k, text in enumerate(texts) if text is not None]
        if len(keep) < len(shown):
            m.RERANK_SKIPPED.labels("history").inc(len(shown) - len(keep))
        lines = [self.line_tokens(texts[k], shown[k].kind) for k in keep]
        return first + start + np.asarray(keep, np.int64), lines

    def history_lines(self, user_id: int) -> list[tuple[int, ...]]:
        """The shown history, one token tuple per interaction, oldest first (see the module doc)."""
        return self._shown(user_id)[1]

    def context_ids(self, user_id: int, fit: bool = False) -> list[int]:
        """The user's history prompt as token ids (the shared prefix of every candidate).

        With ``fit``, the start moves on by whole steps (multiples of ``history_step`` in absolute
        position, like the count window) until the longest possible candidate
        (``rerank_item_tokens``) fits the model. The cut depends on the history alone, never on
        the call's candidates, so it stays put while the history grows and the prompt stays a
        cached prefix (cutting tokens one by one, or by this call's longest candidate, would
        shift it at every call).
        """
        return self._context(user_id, fit)[0]

    def _context(self, user_id: int, fit: bool) -> tuple[list[int], int]:
        """``(context_ids, history lines shown)``."""
        pos, lines = self._shown(user_id)
        if fit and lines:
            step = self.history_step
            # tokens from line k to the end, and from each step-aligned start on
            suffix = np.cumsum(np.fromiter(map(len, reversed(lines)), np.int64, len(lines)))[::-1]
            suffix = np.append(suffix, 0)
            starts = np.arange(int(pos[0]) // step * step, int(pos[-1]) + step + 1, step)
            first_line = np.searchsorted(pos, starts)
            ok = np.flatnonzero(suffix[first_line] <= self.history_budget)
            lines = lines[first_line[ok[0]]:] if ok.size else []
        return self._header + [t for line in lines for t in line] + self._trailer, len(lines)

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
        cands = [self.candidate_tokens(texts[k]) for k in scored]
        context, shown = self._context(user_id, fit=True)
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
        zd, zl = standardised(dlrm_probs, llm)
        blended = (1.0 - weight) * zd + weight * zl  # blend()
        order = np.lexsort((item_ids, -blended))
        if self.tuner is not None:
            self.tuner.record(user_id, item_ids, zd, zl, weight)
        self.context_tokens += result.context_tokens
        self.context_cached += result.context_cached_tokens
        self.context_lines += shown
        self.contexts += 1
        if self.context_tokens:
            m.RERANK_PREFIX_HIT.set(self.context_cached / self.context_tokens)
        m.RERANK_SECONDS.observe(llm_ms / 1000.0)
        return RerankOutcome(order, llm, blended, llm_ms, result.context_tokens, result.context_cached_tokens)
